"""The journal: the spool kept up to date while the shipper runs, so that a crash loses at most the last seconds.

A shipper's lines are numbered as they are submitted (:class:`~kvmfleet.ship.buffer.LineBuffer`). Once a
second, the journal's own thread looks at the oldest line not yet delivered: if it was already there at the
previous look (the server is down, slow, or refusing), every undelivered line not yet in the spool is appended
to it, in one write; as lines are delivered, a short ``A`` record says so. A healthy server delivers lines within
a fraction of a second, so then nothing is written at all; once nothing has waited for ``sync_every`` seconds
the file is removed.

The bound (what a crash can lose): a line still undelivered two seconds (``2 * every``) after it was submitted
is in the spool file, in the page cache: it survives ``kill -9`` of collectd. The file is fsynced at most every
five seconds (``sync_every``) while it changes: a line undelivered seven seconds after it was submitted survives
a power cut as well. Disk writes stay bounded: each line is appended once, acks are a few bytes, one fsync per
five seconds at most, and the file is rewritten with only the undelivered lines when most of it (and over a
MiB) is dead, or removed when all of it is, so each line is written at most about twice and the file holds at
most about twice the undelivered lines. The read callback never waits on any of it: the journal copies the
lines it needs under the shipper's lock (no I/O there) and writes outside it.

At start the previous run's spool is read (:func:`~kvmfleet.ship.spool.read_spool`) and left in place: its lines
are numbered anew as the first ones of this run and the file is rewritten, atomically, before anything is
appended to it (or removed once its lines are delivered). At stop every undelivered line is written (a clean
file), or the spool removed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from .. import privfile
from .spool import (
    Chunk,
    NotASpool,
    SpoolFile,
    ack_record,
    encode_chunks,
    move_aside,
    read_spool,
    remove_stale_temp_files,
)

log = logging.getLogger("kvmfleet.ship.journal")

COMPACT_MIN_BYTES = 1 << 20  # dead bytes worth a rewrite (and more than the live ones)
EVERY = 1.0  # seconds between two looks
SYNC_EVERY = 5.0  # fsync at most this often while the file changes
KILL_BOUND = 2 * EVERY  # a line undelivered this long after it was submitted survives kill -9
POWER_CUT_BOUND = KILL_BOUND + SYNC_EVERY  # ... and a power cut


class Unsent(Protocol):
    """What the journal needs from the shipper (under the shipper's lock, no I/O)."""

    def unsent_bounds(self) -> tuple[int, int]:
        """(number of the oldest undelivered line, number the next submitted line will get)."""

    def unsent_since(self, seq: int) -> tuple[int, int, list[Chunk]]:
        """The bounds, and the undelivered lines numbered ``seq`` or later, at one moment."""


class Journal:
    """Keeps the spool at ``path`` up to date for one shipper (see the module doc)."""

    def __init__(self, path: str, capacity: int, source: Unsent, every: float = EVERY,
                 sync_every: float = SYNC_EVERY, name: str = "kvmfleet-spool") -> None:
        self.path = os.path.abspath(path)
        self.capacity = capacity
        self.every = float(every)
        self.sync_every = float(sync_every)
        self.name = name
        self._source = source
        self._file = SpoolFile(self.path)
        self._io = threading.Lock()  # one writer at a time: the journal thread, then stop()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._enabled = True
        self._loaded = False  # load() was called: the file at path is this journal's to rewrite or remove
        self._next = 0  # every undelivered line numbered below this is in the spool file
        self._mark = 0  # the next line's number at the previous tick
        self._acked = 0  # the last ack written
        self._rewrite_first = False  # the file holds the previous run's numbers, or an append failed
        self._has_file = False
        self._dirty_since: float | None = None  # written, not yet fsynced, since
        self._idle_since: float | None = None  # nothing waiting since
        self._appends: deque[tuple[int, int]] = deque()  # (next line number after it, file size after it)
        self._say: dict[str, float] = {}
        self.counts = self.no_stats()

    # ------------------------------------------------------------------ start, stop
    def load(self) -> list[str]:
        """The previous run's undelivered lines (they become this run's first lines); never raises."""
        self._loaded = True
        directory = os.path.dirname(self.path)
        if not os.path.lexists(directory):
            return []  # created 0700 with the first write
        try:
            privfile.check_directory(directory)
        except privfile.PrivateFileError as err:
            self._disable(str(err.strerror))
            return []
        remove_stale_temp_files(self.path)
        try:
            found = read_spool(self.path, self.capacity)
        except FileNotFoundError:
            return []
        except privfile.PrivateFileError as err:  # the file itself: a link, another user's, not a file
            return self._set_aside(f"cannot be trusted ({err.strerror})")
        except NotASpool:
            return self._set_aside("is not a kvmfleet spool")
        except OSError as err:
            return self._set_aside(f"cannot be read ({err.strerror or err})")
        self._has_file = self._rewrite_first = True
        self._next = self._mark = len(found.lines)  # numbered from 0 (see numbered_from)
        self.counts["spool_damaged"] = found.damaged + int(found.torn)
        how = "" if found.clean else " (the previous run did not stop cleanly)"
        log.info("spool: loaded %d lines from %s%s", len(found.lines), self.path, how)
        problems = found.problems()
        if problems:
            level = logging.ERROR if found.damaged or found.over or found.skipped_bytes else logging.WARNING
            log.log(level, "spool: %s: %s", self.path, "; ".join(problems))
        return found.lines

    def numbered_from(self, first: int) -> None:
        """The loaded lines got the numbers from ``first`` on (lines were submitted before the start)."""
        if self._has_file:
            self._next = self._mark = self._next + first

    def _set_aside(self, why: str) -> list[str]:
        try:
            move_aside(self.path, why)
        except OSError:
            self._disable("a file that cannot be read is in the way")
        return []

    def _disable(self, why: str) -> None:
        self._enabled = False
        log.error("spool: %s: %s: the spool is off, unsent lines live in memory only", self.path, why)

    def start(self) -> None:
        if not self._enabled:
            return
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """End the thread; False if it is still busy on the disk after ``timeout`` seconds."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(max(0.0, timeout))
            return not self._thread.is_alive()
        return True

    def finish(self, chunks: Sequence[Chunk], timeout: float) -> int:
        """At stop: write every undelivered line (the newest ``capacity``) as a clean spool, or remove it;
        returns how many of ``chunks``' lines were written. Waits up to ``timeout`` for a journal write under
        way. A spool never loaded (stopped before it started) keeps its lines, ahead of these."""
        earlier = [] if self._loaded else self.load()
        if not self._enabled or not self._io.acquire(timeout=max(0.0, timeout)):
            return 0
        try:
            ours = [text for _, part in _newest(chunks, self.capacity) for text in part]
            lines = (earlier + ours)[-self.capacity:]
            if not lines:
                if self._has_file:
                    self._file.remove()
                return 0
            return min(len(ours), self._file.rewrite([(0, lines)], clean=True))
        finally:
            self._file.close()
            self._io.release()

    @property
    def stats(self) -> dict[str, int]:
        """``journaled`` (lines written to the spool while running), ``spool_syncs``, ``spool_rewrites``,
        ``spool_errors`` (failed writes), ``spool_damaged`` (records skipped when it was read)."""
        return dict(self.counts)

    @staticmethod
    def no_stats() -> dict[str, int]:
        return {"journaled": 0, "spool_syncs": 0, "spool_rewrites": 0, "spool_errors": 0, "spool_damaged": 0}

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        while not self._stop.wait(self.every):
            with self._io:
                if self._stop.is_set():
                    return
                try:
                    self.tick(time.monotonic())
                except OSError as err:
                    self._failed(err)
                except Exception:  # a bug: say it, keep the thread
                    log.exception("%s: unexpected error", self.name)

    def _failed(self, err: OSError) -> None:
        self.counts["spool_errors"] += 1
        self._file.close()
        self._rewrite_first = True  # an append may have been cut short: rewrite the file whole next time
        key = f"{type(err).__name__}:{err.errno}"
        now = time.monotonic()
        if now - self._say.get(key, -1e9) >= 60:
            self._say[key] = now
            log.error("spool: cannot write %s: %s (will try again; unsent lines are in memory)", self.path, err)

    def tick(self, now: float) -> None:
        """One look (see the module doc): journal the lines that waited a whole tick, ack, compact, fsync."""
        lo, hi = self._source.unsent_bounds()
        waited, self._mark = lo < self._mark, hi
        idle = lo >= self._next and not waited  # nothing in the file is waiting, nothing new waits
        self._idle_since = (self._idle_since or now) if idle else None
        if self._has_file and idle and now - (self._idle_since or now) >= self.sync_every:
            self._remove()  # after a while: a server slower than a tick would make it come and go
        self._next = max(self._next, lo)
        if waited and (hi > self._next or self._rewrite_first):
            self._journal(now)
        elif self._file.is_open and lo > self._acked:
            self._append(now, ack_record(lo), lo)
        if self._dirty_since is not None and now - self._dirty_since >= self.sync_every:
            self._file.sync()
            self._dirty_since = None
            self.counts["spool_syncs"] += 1

    def _journal(self, now: float) -> None:
        lo, hi, chunks = self._source.unsent_since(self._next)
        if self._rewrite_first or not self._file.is_open or self._dead_bytes(lo) * 2 > max(self._file.size,
                                                                                    2 * COMPACT_MIN_BYTES):
            self._rewrite()
            return
        data = b"".join(encode_chunks(chunks)) + ack_record(lo)
        self._append(now, data, lo, hi)
        self.counts["journaled"] += sum(len(lines) for _, lines in chunks)

    def _rewrite(self) -> None:
        lo, hi, chunks = self._source.unsent_since(0)
        written = self._file.rewrite(_newest(chunks, self.capacity))
        self.counts["journaled"] += written
        self.counts["spool_rewrites"] += 1
        self._rewrite_first, self._has_file = False, True
        self._next, self._acked = hi, lo
        self._appends = deque([(hi, self._file.size)])
        self._dirty_since = None  # rewrite fsyncs

    def _append(self, now: float, data: bytes, lo: int, hi: int | None = None) -> None:
        try:
            self._file.append(data)
        except FileNotFoundError:
            self._rewrite()  # removed or replaced behind our back
            return
        self._acked = lo
        if hi is not None:
            self._next = hi
            self._appends.append((hi, self._file.size))
        if self._dirty_since is None:
            self._dirty_since = now  # the look's clock, as every other decision of the look

    def _dead_bytes(self, lo: int) -> int:
        """Bytes at the start of the file whose lines are all delivered."""
        while len(self._appends) > 1 and self._appends[1][0] <= lo:
            self._appends.popleft()
        return self._appends[0][1] if self._appends and self._appends[0][0] <= lo else 0

    def _remove(self) -> None:
        self._file.remove()
        self._has_file = self._rewrite_first = False
        self._appends.clear()
        self._dirty_since = None


def _newest(chunks: Sequence[Chunk], limit: int) -> list[Chunk]:
    """The newest ``limit`` lines of ``chunks`` (oldest first)."""
    total = sum(len(lines) for _, lines in chunks)
    out: list[Chunk] = []
    skip = max(0, total - limit)
    for seq, lines in chunks:
        if skip >= len(lines):
            skip -= len(lines)
            continue
        out.append((seq + skip, lines[skip:]) if skip else (seq, lines))
        skip = 0
    return out


