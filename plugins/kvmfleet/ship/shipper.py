"""The shipper: a buffer, one sender thread, retries with backoff, and a spool for what is left at shutdown.

Life cycle inside collectd: ``Shipper(...)`` in the config/init callback, :meth:`Shipper.start` in the init
callback (loads the spool, starts the one sender thread), :meth:`Shipper.submit` in the read callback (never
touches the network and never waits for the sender: it appends to the buffer under a short lock and sets an
Event), :meth:`Shipper.stop` in the shutdown callback (flushes what it can within the timeout, spools the rest,
returns in time even if the server is a blackhole).

Delivery is at least once: a batch that failed with a retryable error is sent again, and lines that were in
flight when ``stop`` gave up are spooled too. InfluxDB identifies a point by measurement, tag set and
timestamp, so a point written twice is stored once: the result is exactly once in the database.

A batch rejected as a whole (HTTP 400/413/422) is split in halves and the halves sent again, recursively
(at most ``split_budget`` splits per batch), so that only the offending lines are dropped and counted in
``dropped_rejected``; InfluxDB 1.x has already stored the good lines of a "partial write" and rewriting them
is harmless.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from .buffer import LineBuffer
from .spool import load_spool, write_spool
from .writers import ConfigWriteError, PermanentWriteError, WriteError, Writer

log = logging.getLogger("kvmfleet.ship")


class Shipper:
    """Ship line-protocol lines through ``writer`` from a bounded ``buffer``, spooling to ``spool_path``.

    :param writer: a :class:`~kvmfleet.ship.writers.Writer` (``V1Writer`` or ``V2Writer``)
    :param buffer: the bounded buffer (default: :class:`LineBuffer` of 100,000 lines)
    :param spool_path: file for unsent lines at shutdown (``None``: what is unsent at stop is lost, and logged)
    :param batch_lines: most lines in one request
    :param retry_min: first retry delay and floor of the backoff, seconds
    :param retry_max: ceiling of the backoff, seconds; delay n is uniform in
        ``[retry_min, min(retry_max, retry_min * 2**(n-1))]`` (full jitter above the floor), at least a server's
        ``Retry-After`` (capped at ``retry_max``)
    :param linger: after a wake-up, wait this long (unless a full batch is waiting) to gather more lines
    :param split_budget: most batch splits spent isolating rejected lines of one batch
    :param log_every: repeat an unchanged failure in the log at most this often, seconds
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
        split_budget: int = 256,
        log_every: float = 60.0,
        name: str = "kvmfleet-ship",
    ) -> None:
        if batch_lines < 1:
            raise ValueError("batch_lines must be >= 1")
        if not 0 < retry_min <= retry_max:
            raise ValueError("need 0 < retry_min <= retry_max")
        self.writer = writer
        self.buffer = buffer if buffer is not None else LineBuffer()
        self.spool_path = os.fspath(spool_path) if spool_path is not None else None
        self.batch_lines = int(batch_lines)
        self.retry_min = float(retry_min)
        self.retry_max = float(retry_max)
        self.linger = float(linger)
        self.split_budget = int(split_budget)
        self.log_every = float(log_every)
        self.name = name

        self._lock = threading.Lock()  # counters and in-flight lines; always taken before the buffer's lock
        self._wake = threading.Event()  # lines were submitted
        self._stop_evt = threading.Event()  # stop() was called
        self._thread: threading.Thread | None = None
        self._flush_deadline = float("inf")
        self._abandoned = False
        self._stopped = False
        self._pending: deque[list[str]] = deque()  # in-flight chunks, oldest first
        self._rng = random.Random()

        self._sent = 0
        self._batches = 0
        self._rejected = 0
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
        """Load the spool (if any) into the buffer and start the sender thread (once)."""
        if self._thread is not None or self._stopped:
            raise RuntimeError("Shipper.start() may be called once")
        if self.spool_path:
            try:
                lines = load_spool(self.spool_path, max_lines=self.buffer.capacity)
            except OSError as e:
                log.error("%s: cannot load spool %s: %s", self.name, self.spool_path, e)
                lines = []
            if lines:
                self.buffer.requeue_front(lines, new=True)
                self._spool_loaded = len(lines)
                log.info("%s: %d spooled lines queued for sending", self.name, len(lines))
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        if len(self.buffer):
            self._wake.set()

    def submit(self, lines: Iterable[str]) -> int:
        """Queue lines (empty strings are ignored). Never blocks on the network or the sender.

        Returns how many old lines the buffer dropped to make room (also counted in ``stats()["dropped"]``).
        """
        batch = [text for text in lines if text]
        if not batch:
            return 0
        dropped = self.buffer.extend(batch)
        self._wake.set()
        return dropped

    def stop(self, timeout: float = 10.0) -> dict[str, Any]:
        """Flush what can be sent within ``timeout`` seconds, spool the rest, stop the thread; returns stats().

        Returns within ``timeout`` (plus the time to write the spool file) whatever the server does; a sender
        stuck in a blackhole is interrupted (socket shutdown for V1) or, as a last resort, left behind as a
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
        thread = self._thread
        alive = False
        if thread is not None:
            thread.join(max(0.0, self._flush_deadline - time.monotonic()))
            if thread.is_alive():
                self.writer.abort()
                thread.join(max(0.0, min(0.25, deadline - time.monotonic() - 0.05)))
            alive = thread.is_alive()
        with self._lock:
            if alive:
                self._abandoned = True
            unsent = [text for chunk in self._pending for text in chunk]
            self._pending.clear()
            unsent.extend(self.buffer.drain())
        if alive:
            log.warning("%s: sender still blocked in a write after %.1fs; leaving it behind", self.name,
                        time.monotonic() - t0)
        else:
            self.writer.close()
        spooled = 0
        if unsent and self.spool_path:
            try:
                spooled = write_spool(self.spool_path, unsent, max_lines=self.buffer.capacity)
                log.info("%s: spooled %d unsent lines to %s", self.name, spooled, self.spool_path)
            except OSError as e:
                log.error("%s: cannot write spool %s: %s: %d lines lost", self.name, self.spool_path, e,
                          len(unsent))
        elif unsent:
            log.warning("%s: %d unsent lines lost at stop (no spool_path)", self.name, len(unsent))
        with self._lock:
            self._spooled += spooled
            self._lost_at_stop += len(unsent) - spooled
        return self.stats()

    def stats(self) -> dict[str, Any]:
        """A consistent snapshot of the counters (``last_error`` is secret-free, ``last_success`` Unix time).

        ``submitted == sent + dropped + dropped_rejected + buffered + spooled + lost_at_stop`` at any time
        (``buffered`` includes ``in_flight``).
        """
        with self._lock:
            b = self.buffer.stats()
            in_flight = sum(len(c) for c in self._pending)
            return {
                "sent": self._sent,
                "buffered": b["buffered"] + in_flight,
                "in_flight": in_flight,
                "dropped": b["dropped"],
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

    # ------------------------------------------------------------------ sender thread
    def _stopping_done(self) -> bool:
        return self._stop_evt.is_set() and time.monotonic() >= self._flush_deadline

    def _run(self) -> None:
        while True:
            try:
                self._loop()
                return
            except Exception:  # a bug somewhere: keep the lines, say it loudly, keep shipping
                log.exception("%s: unexpected error in the sender thread", self.name)
                with self._lock:
                    lines = [text for chunk in self._pending for text in chunk]
                    self._pending.clear()
                    if not self._abandoned:
                        self.buffer.requeue_front(lines)
                if self._stop_evt.is_set() or self._abandoned:
                    return
                self._stop_evt.wait(self.retry_max)

    def _loop(self) -> None:
        attempt = 0
        while not self._abandoned:
            if self._stopping_done():
                break
            with self._lock:
                if self._abandoned:
                    break
                batch = self.buffer.take(self.batch_lines)
                if batch:
                    self._pending.append(batch)
            if not batch:
                if self._stop_evt.is_set():
                    break
                self._wake.wait(self.log_every)
                self._wake.clear()
                self._note_drops()
                if self.linger > 0 and not self._stop_evt.is_set() and len(self.buffer) < self.batch_lines:
                    self._stop_evt.wait(self.linger)
                continue
            if self._send_pending():
                if attempt:
                    log.info("%s: delivery resumed after %d failed attempts", self.name, attempt)
                attempt = 0
                continue
            attempt += 1
            self._note_drops()
            if self._stop_evt.is_set():
                break  # stopping: no retry after a failure; the rest gets spooled
            self._stop_evt.wait(self._backoff(attempt))

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.retry_max, self.retry_min * (2.0 ** min(attempt - 1, 62)))
        delay = self._rng.uniform(self.retry_min, ceiling)
        if self._retry_after is not None:
            delay = max(delay, min(self._retry_after, self.retry_max))
        return delay

    def _send_pending(self) -> bool:
        """Send the in-flight chunks; True when all are sent or rejected, False after a retryable error."""
        budget = self.split_budget
        while True:
            with self._lock:
                if self._abandoned or not self._pending:
                    return True
                chunk = self._pending[0]
            try:
                self.writer.write(chunk)
            except PermanentWriteError as e:
                with self._lock:
                    if self._abandoned:
                        return True
                    self._pending.popleft()
                    if len(chunk) > 1 and budget > 0:
                        budget -= 1
                        self._splits += 1
                        mid = len(chunk) // 2
                        self._pending.appendleft(chunk[mid:])
                        self._pending.appendleft(chunk[:mid])
                        continue
                    self._rejected += len(chunk)
                    self._last_error = str(e)
                self._log_failure(e, f"{len(chunk)} line(s) dropped")
                continue
            except Exception as e:
                err = e if isinstance(e, WriteError) else WriteError(
                    f"{getattr(self.writer, 'name', 'writer')}: unexpected {type(e).__name__}")
                with self._lock:
                    if self._abandoned:
                        return False
                    lines = [text for c in self._pending for text in c]
                    self._pending.clear()
                    self.buffer.requeue_front(lines)
                    self._retries += 1
                    self._consecutive_failures += 1
                    self._last_error = str(err)
                    buffered = len(self.buffer)
                self._retry_after = err.retry_after
                self._log_failure(err, f"will retry; {buffered} lines buffered")
                if not isinstance(e, WriteError):
                    log.debug("%s: unexpected writer exception", self.name, exc_info=True)
                return False
            with self._lock:
                if self._abandoned:
                    return True
                self._pending.popleft()
                self._sent += len(chunk)
                self._batches += 1
                self._consecutive_failures = 0
                self._last_success = time.time()
                self._retry_after = None

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
        dropped = self.buffer.dropped
        now = time.monotonic()
        if dropped > self._drops_logged and (now - self._drops_log_time >= self.log_every or not self._drops_logged):
            self._drops_log_time = now
            log.warning("%s: buffer full (%d lines): %d oldest lines dropped so far", self.name,
                        self.buffer.capacity, dropped)
            self._drops_logged = dropped
