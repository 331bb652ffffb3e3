"""The shipper: a buffer, one sender thread, retries with backoff, and a spool that keeps what waits.

Life cycle inside collectd: ``Shipper(...)`` in the config/init callback, :meth:`Shipper.start` in the init
callback (reads the spool, starts the sender thread and the spool's journal thread), :meth:`Shipper.submit` in
the read callback (never touches the network or the disk and never waits for the sender: it appends to the
buffer under a short lock and sets an Event), :meth:`Shipper.stop` in the shutdown callback (flushes what it can
within the timeout, spools the rest, returns in time even if the server is a blackhole).

Delivery is at least once: a batch that failed with a retryable error is sent again, lines in flight when
``stop`` gave up are spooled too, and after a crash the spool may hold lines already delivered. InfluxDB
identifies a point by measurement, tag set and timestamp, so a point written twice is stored once.

Durability (:mod:`kvmfleet.ship.journal`): while lines wait (the server is down, slow or refusing), they are
appended to the spool within two seconds and fsynced within seven; what a ``kill -9`` or a power cut can lose is
only what was submitted in those last seconds.

A batch the server rejects (HTTP 400/413/422: InfluxDB 1.x's "partial write", a line it cannot parse, a field
type conflict) is bisected: each half is sent again, and halves of the halves, until the lines rejected alone
are the only ones dropped (counted in ``dropped_rejected``). A batch with ``b`` bad lines of ``n`` costs about
``2 b log2(n / b)`` requests; each flush cycle sends new lines first, then at most ``split_budget`` requests of
bisection, and carries the rest to the next cycle (nothing is dropped for want of budget). Good lines the server
already stored in a partial write are sent again with their half, at most once per level (``log2 n`` times):
harmless, and bounded. A line refused alone as too large (413) is not judged by its content: it is retried like
a failed write.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .buffer import LineBuffer
from .journal import EVERY as JOURNAL_EVERY
from .journal import SYNC_EVERY, Journal
from .spool import Chunk
from .writers import ConfigWriteError, PermanentWriteError, WriteError, Writer

log = logging.getLogger("kvmfleet.ship")

DONE, CARRY, FAILED = "done", "carry", "failed"  # how a flush cycle ended


@dataclass(eq=False)
class _Chunk:
    """Lines taken from the buffer and not yet delivered: consecutive sequence numbers from ``seq``.
    ``suspect``: part of a rejected request, being bisected."""

    seq: int
    lines: list[str]
    suspect: bool = False


class Shipper:
    """Ship line-protocol lines through ``writer`` from a bounded ``buffer``, spooling to ``spool_path``.

    :param writer: a :class:`~kvmfleet.ship.writers.Writer` (``V1Writer`` or ``V2Writer``)
    :param buffer: the bounded buffer (default: :class:`LineBuffer` of 100,000 lines)
    :param spool_path: file for lines that wait (``None``: what is unsent at stop is lost, and logged)
    :param batch_lines: most lines in one request; at most twice as many are out of the buffer at once (a batch
        being sent and the halves of rejected ones being bisected)
    :param retry_min: first retry delay and floor of the backoff, seconds
    :param retry_max: ceiling of the backoff, seconds; delay n is uniform in
        ``[retry_min, min(retry_max, retry_min * 2**(n-1))]`` (full jitter above the floor), at least a server's
        ``Retry-After`` (capped at ``retry_max``)
    :param linger: after a wake-up, wait this long (unless a full batch is waiting) to gather more lines
    :param split_budget: most bisection requests per flush cycle (the rest waits for the next cycle)
    :param log_every: repeat an unchanged failure in the log at most this often, seconds
    :param journal_every: the spool journal's tick, seconds (see :mod:`kvmfleet.ship.journal`)
    :param sync_every: fsync the spool at most this often while it changes, seconds
    """

    def __init__(
        self,
        writer: Writer,
        buffer: LineBuffer | None = None,
        spool_path: str | os.PathLike[str] | None = None,
        *,
        batch_lines: int = 5000,
        retry_min: float = 1.0,
        retry_max: float = 60.0,
        linger: float = 0.2,
        split_budget: int = 64,
        log_every: float = 60.0,
        journal_every: float = JOURNAL_EVERY,
        sync_every: float = SYNC_EVERY,
        name: str = "kvmfleet-ship",
    ) -> None:
        if batch_lines < 1:
            raise ValueError("batch_lines must be >= 1")
        if not 0 < retry_min <= retry_max:
            raise ValueError("need 0 < retry_min <= retry_max")
        self.writer = writer
        self.buffer = buffer if buffer is not None else LineBuffer()
        self.spool_path = os.path.abspath(os.fspath(spool_path)) if spool_path is not None else None
        self.batch_lines = int(batch_lines)
        self.retry_min = float(retry_min)
        self.retry_max = float(retry_max)
        self.linger = float(linger)
        self.split_budget = max(1, int(split_budget))
        self.log_every = float(log_every)
        self.name = name
        self.journal = (Journal(self.spool_path, self.buffer.capacity, self, journal_every, sync_every)
                        if self.spool_path else None)

        self._lock = threading.Lock()  # counters and pending chunks; always taken before the buffer's lock
        self._wake = threading.Event()  # lines were submitted
        self._stop_evt = threading.Event()  # stop() was called
        self._thread: threading.Thread | None = None
        self._flush_deadline = float("inf")
        self._abandoned = False
        self._stopped = False
        self._pending: list[_Chunk] = []  # out of the buffer, not delivered; by sequence number
        self._pending_lines = 0
        self._rng = random.Random()
        self._init_counters()

    def _init_counters(self) -> None:
        self._sent = 0
        self._batches = 0
        self._rejected = 0
        self._dropped_pending = 0
        self._retries = 0
        self._splits = 0
        self._consecutive_failures = 0
        self._last_error: str | None = None
        self._last_success: float | None = None
        self._spool_loaded = 0
        self._spooled = 0
        self._lost_at_stop = 0
        self._retry_after: float | None = None
        self._last_log_key: str | None = None
        self._last_log_time = 0.0
        self._drops_logged = 0
        self._drops_log_time = 0.0

    # ------------------------------------------------------------------ public API
    def start(self) -> None:
        """Read the spool (if any) into the buffer, start the sender thread and the journal (once)."""
        if self._thread is not None or self._stopped:
            raise RuntimeError("Shipper.start() may be called once")
        if self.journal is not None:
            lines = self.journal.load()
            self.journal.numbered_from(self.buffer.next_seq)
            if lines:
                self.buffer.extend(lines)
                self._spool_loaded = len(lines)
                log.info("%s: %d spooled lines queued for sending", self.name, len(lines))
            self.journal.start()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        if len(self.buffer):
            self._wake.set()

    def submit(self, lines: Iterable[str]) -> int:
        """Queue lines (empty strings are ignored). Never blocks on the network, the disk or the sender.

        Returns how many old lines the buffer dropped to make room (also counted in ``stats()["dropped"]``).
        """
        batch = [text for text in lines if text]
        if not batch:
            return 0
        dropped = self.buffer.extend(batch)
        self._wake.set()
        return dropped

    def stop(self, timeout: float = 10.0) -> dict[str, Any]:
        """Flush what can be sent within ``timeout`` seconds, spool the rest, stop the threads; returns stats().

        Returns within ``timeout`` (plus the time to write the spool file) whatever the server does; a sender
        stuck in a blackhole is interrupted (the writer's ``abort``) or, as a last resort, left behind as a
        daemon thread whose in-flight lines are spooled too.
        """
        t0 = time.monotonic()
        deadline = t0 + max(0.0, timeout)
        if self._stopped:
            return self.stats()
        self._stopped = True
        reserve = min(1.0, 0.2 * max(0.0, timeout))
        self._flush_deadline = deadline - reserve
        self._stop_evt.set()
        self._wake.set()
        alive = self._join_sender(deadline)
        with self._lock:
            if alive:
                self._abandoned = True
            chunks: list[Chunk] = [(c.seq, c.lines) for c in self._pending]
            self._pending, self._pending_lines = [], 0
            chunks.append(self.buffer.take_seq(len(self.buffer) + self.buffer.capacity))
        if alive:
            log.warning("%s: sender still blocked in a write after %.1fs; leaving it behind", self.name,
                        time.monotonic() - t0)
        else:
            self.writer.close()
        self._spool_at_stop(chunks, deadline)
        return self.stats()

    def _join_sender(self, deadline: float) -> bool:
        """Wait for the sender until the flush deadline, then interrupt its write; True if it is still alive."""
        thread = self._thread
        if thread is None:
            return False
        thread.join(max(0.0, self._flush_deadline - time.monotonic()))
        if thread.is_alive():
            self.writer.abort()
            thread.join(max(0.0, min(0.25, deadline - time.monotonic() - 0.05)))
        return thread.is_alive()

    def _spool_at_stop(self, chunks: list[Chunk], deadline: float) -> None:
        """Write what is unsent to the spool (the newest ``capacity`` lines), or say what is lost."""
        unsent = sum(len(lines) for _, lines in chunks)
        spooled = 0
        if self.journal is not None:
            self.journal.stop(max(0.5, deadline - time.monotonic()))
            try:
                spooled = self.journal.finish(chunks, max(0.5, deadline - time.monotonic()))
            except OSError as e:
                log.error("%s: cannot write spool %s: %s", self.name, self.spool_path, e)
            if spooled:
                log.info("%s: spooled %d unsent lines to %s", self.name, spooled, self.spool_path)
        if unsent > spooled:
            why = "no spool_path" if self.journal is None else "not spooled"
            log.warning("%s: %d unsent lines lost at stop (%s)", self.name, unsent - spooled, why)
        with self._lock:
            self._spooled += spooled
            self._lost_at_stop += unsent - spooled

    def stats(self) -> dict[str, Any]:
        """A consistent snapshot of the counters (``last_error`` is secret-free, ``last_success`` Unix time).

        ``submitted == sent + dropped + dropped_rejected + buffered + spooled + lost_at_stop`` at any time
        (``buffered`` includes ``in_flight``, the lines out of the buffer: in a request, waiting for a retry,
        or being bisected).
        """
        with self._lock:
            b = self.buffer.stats()
            out = {
                "sent": self._sent,
                "buffered": b["buffered"] + self._pending_lines,
                "in_flight": self._pending_lines,
                "bisecting": sum(len(c.lines) for c in self._pending if c.suspect),
                "dropped": b["dropped"] + self._dropped_pending,
                "dropped_rejected": self._rejected,
                "retries": self._retries,
                "last_error": self._last_error,
                "last_success": self._last_success,
                "submitted": b["added"],
                "capacity": b["capacity"],
                "batches": self._batches,
                "splits": self._splits,
                "consecutive_failures": self._consecutive_failures,
                "spool_loaded": self._spool_loaded,
                "spooled": self._spooled,
                "lost_at_stop": self._lost_at_stop,
                "running": self._thread is not None and self._thread.is_alive() and not self._stopped,
            }
        out.update(self.journal.stats if self.journal is not None else Journal.no_stats())
        return out

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is buffered or in flight (for tests and tools; not for collectd callbacks)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                idle = not self._pending and len(self.buffer) == 0
            if idle:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    # ------------------------------------------------------------------ the journal's view (journal.Unsent)
    def unsent_bounds(self) -> tuple[int, int]:
        """(number of the oldest undelivered line, number of the next line to come)."""
        with self._lock:
            front, nxt = self.buffer.bounds()
            return (self._pending[0].seq if self._pending else front), nxt

    def unsent_since(self, seq: int) -> tuple[int, int, list[Chunk]]:
        """The bounds and the undelivered lines numbered ``seq`` or later, oldest first (copies, no I/O)."""
        with self._lock:
            chunks: list[Chunk] = []
            for c in self._pending:
                if c.seq + len(c.lines) > seq:
                    chunks.append((c.seq, c.lines) if c.seq >= seq else (seq, c.lines[seq - c.seq:]))
            lo = self._pending[0].seq if self._pending else self.buffer.front_seq
            start, lines = self.buffer.tail(seq)
        if lines:
            chunks.append((start, lines))
        return lo, start + len(lines), chunks

    # ------------------------------------------------------------------ sender thread
    def _stopping_done(self) -> bool:
        return self._stop_evt.is_set() and time.monotonic() >= self._flush_deadline

    def _run(self) -> None:
        while True:
            try:
                self._loop()
                return
            except Exception:  # a bug somewhere: the lines stay pending; say it loudly, keep shipping
                log.exception("%s: unexpected error in the sender thread", self.name)
                if self._stop_evt.is_set() or self._abandoned:
                    return
                self._stop_evt.wait(self.retry_max)

    def _loop(self) -> None:
        attempt = 0
        while not self._abandoned:
            if self._stopping_done():
                break
            if not self._take_fresh():
                if self._stop_evt.is_set():
                    break
                self._wake.wait(self.log_every)
                self._wake.clear()
                self._note_drops()
                if self.linger > 0 and not self._stop_evt.is_set() and len(self.buffer) < self.batch_lines:
                    self._stop_evt.wait(self.linger)
                continue
            if self._cycle() != FAILED:
                if attempt:
                    log.info("%s: delivery resumed after %d failed attempts", self.name, attempt)
                attempt = 0
                continue
            attempt += 1
            self._note_drops()
            if self._stop_evt.is_set():
                break  # stopping: no retry after a failure; the rest gets spooled
            self._stop_evt.wait(self._backoff(attempt))

    def _take_fresh(self) -> bool:
        """Take new lines from the buffer: a batch of ``batch_lines`` next to the halves being bisected, while
        these are at most ``batch_lines`` (so at most twice ``batch_lines`` are out of the buffer); True if
        anything is pending."""
        with self._lock:
            fresh = sum(len(c.lines) for c in self._pending if not c.suspect)
            room = self.batch_lines - fresh if self._pending_lines - fresh <= self.batch_lines else 0
            if room > 0 and not self._abandoned:
                seq, lines = self.buffer.take_seq(room)
                if lines:
                    last = self._pending[-1] if self._pending else None
                    if last is not None and not last.suspect and last.seq + len(last.lines) == seq:
                        self._pending[-1] = _Chunk(last.seq, last.lines + lines)  # one request, not two
                    else:
                        self._pending.append(_Chunk(seq, lines))
                    self._pending_lines += len(lines)
            return bool(self._pending)

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.retry_max, self.retry_min * (2.0 ** min(attempt - 1, 62)))
        delay = self._rng.uniform(self.retry_min, ceiling)
        if self._retry_after is not None:
            delay = max(delay, min(self._retry_after, self.retry_max))
        return delay

    def _next_chunk(self, bisect: bool, held: set[int]) -> _Chunk | None:
        """The chunk to send next: new lines first, then (if ``bisect``) the oldest suspect half; never one
        ``held`` (refused alone as too large in this cycle)."""
        for c in self._pending:
            if not c.suspect and id(c) not in held:
                return c
        if bisect:
            return next((c for c in self._pending if id(c) not in held), None)
        return None

    def _cycle(self) -> str:
        """One flush cycle: DONE (nothing pending), CARRY (bisection left for the next cycle) or FAILED (a retry
        is due: a failed write, or a line refused alone as too large)."""
        budget = self.split_budget
        held: set[int] = set()
        while True:
            with self._lock:
                if self._abandoned:
                    return DONE
                chunk = self._next_chunk(budget > 0, held)
                if chunk is None:
                    return FAILED if held else CARRY if self._pending else DONE
            budget -= chunk.suspect
            try:
                self.writer.write(chunk.lines)
            except PermanentWriteError as e:
                if self._rejected_chunk(chunk, e):
                    held.add(id(chunk))
                continue
            except Exception as e:
                self._failed(e)
                return FAILED
            self._delivered(chunk)

    def _delivered(self, chunk: _Chunk) -> None:
        with self._lock:
            if self._abandoned:
                return
            self._remove(chunk)
            self._sent += len(chunk.lines)
            self._batches += 1
            self._consecutive_failures = 0
            self._last_success = time.time()
            self._retry_after = None

    def _rejected_chunk(self, chunk: _Chunk, err: PermanentWriteError) -> bool:
        """Bisect a rejected chunk, or drop a line rejected alone; True for a line refused alone as too large
        (413: about its size, not its content), which is then retried like a failed write."""
        with self._lock:
            if self._abandoned:
                return False
            n = len(chunk.lines)
            if n > 1:
                mid = n // 2
                i = self._index(chunk)
                self._pending[i:i + 1] = [_Chunk(chunk.seq, chunk.lines[:mid], True),
                                          _Chunk(chunk.seq + mid, chunk.lines[mid:], True)]
                self._splits += 1
                return False
            if err.status == 413:
                chunk.suspect = True
                self._note_failure(err)
            else:
                self._remove(chunk)
                self._rejected += 1
                self._last_error = str(err)
        if err.status == 413:
            self._log_failure(err, "a line refused alone as too large; will retry")
            return True
        self._log_failure(err, "1 line dropped")
        return False

    def _failed(self, e: Exception) -> None:
        err = e if isinstance(e, WriteError) else WriteError(
            f"{getattr(self.writer, 'name', 'writer')}: unexpected {type(e).__name__}")
        with self._lock:
            if self._abandoned:
                return
            self._note_failure(err)
            self._trim()
            buffered = len(self.buffer) + self._pending_lines
        self._log_failure(err, f"will retry; {buffered} lines buffered")
        if not isinstance(e, WriteError):
            log.debug("%s: unexpected writer exception", self.name, exc_info=True)

    def _note_failure(self, err: WriteError) -> None:
        """Count a failed attempt (lock held)."""
        self._retries += 1
        self._consecutive_failures += 1
        self._last_error = str(err)
        self._retry_after = err.retry_after

    def _trim(self) -> None:
        """After a failure, keep buffer + pending within the capacity: drop the oldest pending lines (lock held),
        as putting them back into a full buffer would."""
        excess = len(self.buffer) + self._pending_lines - self.buffer.capacity
        while excess > 0 and self._pending:
            first = self._pending[0]
            k = min(excess, len(first.lines))
            if k == len(first.lines):
                self._pending.pop(0)
            else:
                self._pending[0] = _Chunk(first.seq + k, first.lines[k:], first.suspect)
            self._pending_lines -= k
            self._dropped_pending += k
            excess -= k

    def _index(self, chunk: _Chunk) -> int:
        return next(i for i, c in enumerate(self._pending) if c is chunk)

    def _remove(self, chunk: _Chunk) -> None:
        del self._pending[self._index(chunk)]
        self._pending_lines -= len(chunk.lines)

    def _log_failure(self, err: WriteError, what: str) -> None:
        now = time.monotonic()
        key = f"{type(err).__name__}:{err.status}"
        if key == self._last_log_key and now - self._last_log_time < self.log_every:
            return
        self._last_log_key = key
        self._last_log_time = now
        level = logging.ERROR if isinstance(err, (ConfigWriteError, PermanentWriteError)) else logging.WARNING
        log.log(level, "%s: %s (%s)", self.name, err, what)

    def _note_drops(self) -> None:
        dropped = self.buffer.dropped + self._dropped_pending
        now = time.monotonic()
        if dropped > self._drops_logged and (now - self._drops_log_time >= self.log_every or not self._drops_logged):
            self._drops_log_time = now
            log.warning("%s: buffer full (%d lines): %d oldest lines dropped so far", self.name,
                        self.buffer.capacity, dropped)
            self._drops_logged = dropped
