"""A bounded, thread-safe FIFO of line-protocol lines that drops the OLDEST lines when full.

Capacity is counted in lines. The default, :data:`DEFAULT_CAPACITY` = 100,000 lines, holds one hour of
host + per-VM points for 200 VMs at a 10 s interval (360 samples x 201 points = 72,360 lines) with room to
spare. Memory: a line is a Python ``str`` (ASCII: 49 bytes of header + one byte per character) plus an
8-byte slot in the deque. A realistic per-VM line with 40 integer KVM counters and host/vm/uuid tags
(``kvm_vm,host=...,uuid=...,vm=... exits=123456789i,...``) is ~1,130 characters and costs ~1,190 bytes in
the buffer (measured with tracemalloc by ``tests/unit/test_buffer.py::test_memory_per_line``), so a full
default buffer takes about 120 MB (a sending batch of 5,000 lines adds ~6 MB). The buffer only fills while
the server is unreachable; lower ``capacity`` (config ``buffer_lines``) to bound it further.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from itertools import islice

DEFAULT_CAPACITY = 100_000


class LineBuffer:
    """FIFO of lines, at most ``capacity`` of them; on overflow the oldest are dropped and counted.

    ``append``/``extend`` (producer), ``take`` and ``requeue_front`` (the one consumer) each hold an internal
    lock for a short, network-free moment.

    Each line added gets a sequence number, the count of lines added before it: lines leave at the front and
    join at the back, so the queue holds the numbers ``front_seq`` to ``next_seq - 1`` (``take_seq`` and ``tail``
    say which). ``requeue_front`` puts lines back as the ones just before the front.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1 line")
        self.capacity = int(capacity)
        self._q: deque[str] = deque()
        self._lock = threading.Lock()
        self._added = 0
        self._dropped = 0
        self._taken = 0
        self._requeued = 0
        self._front = 0  # sequence number of the first queued line

    def __len__(self) -> int:
        return len(self._q)

    def extend(self, lines: Iterable[str]) -> int:
        """Append lines at the back; returns how many old lines were dropped to make room."""
        new = lines if isinstance(lines, list) else list(lines)
        n = len(new)
        if not n:
            return 0
        cap = self.capacity
        with self._lock:
            self._added += n
            dropped = max(0, len(self._q) + n - cap)
            if n >= cap:
                self._q.clear()
                self._q.extend(new[n - cap:])
            else:
                q = self._q
                for _ in range(dropped):
                    q.popleft()
                q.extend(new)
            self._dropped += dropped
            self._front += dropped
            return dropped

    def append(self, line: str) -> int:
        return self.extend([line])

    def take(self, max_lines: int) -> list[str]:
        """Remove and return up to ``max_lines`` of the oldest lines (in order)."""
        return self.take_seq(max_lines)[1]

    def take_seq(self, max_lines: int) -> tuple[int, list[str]]:
        """:meth:`take`, with the sequence number of the first line taken."""
        with self._lock:
            q = self._q
            n = min(max_lines, len(q))
            if n == len(q):
                out = list(q)
                q.clear()
            else:
                popleft = q.popleft
                out = [popleft() for _ in range(n)]
            first = self._front
            self._front += n
            self._taken += n
            return first, out

    def tail(self, since: int) -> tuple[int, list[str]]:
        """A copy of the queued lines numbered ``since`` or later, and the number of the first: the journal's
        view, read from the back so that a few new lines cost little."""
        with self._lock:
            start = max(since, self._front)
            count = self._front + len(self._q) - start
            lines = list(islice(reversed(self._q), max(0, count)))
        lines.reverse()
        return start, lines

    @property
    def front_seq(self) -> int:
        """The sequence number of the oldest queued line (``next_seq`` when empty)."""
        return self._front

    @property
    def next_seq(self) -> int:
        """The sequence number the next line added will get."""
        with self._lock:
            return self._front + len(self._q)

    def bounds(self) -> tuple[int, int]:
        """(``front_seq``, ``next_seq``) at one moment."""
        with self._lock:
            return self._front, self._front + len(self._q)

    def requeue_front(self, lines: list[str], new: bool = False) -> int:
        """Put lines taken earlier back at the front, in their order (for a retry).

        If that overflows the buffer, the oldest of them (the first ones) are dropped and counted, since they
        are older than anything queued. Returns the number dropped. ``new=True`` counts them as added (lines
        that were never in this buffer, e.g. loaded from the spool, which are older than anything queued).
        """
        if not lines:
            return 0
        with self._lock:
            if new:
                self._added += len(lines)
            room = self.capacity - len(self._q)
            dropped = max(0, len(lines) - room)
            keep = lines[dropped:] if dropped else lines
            self._q.extendleft(reversed(keep))
            self._front -= len(keep)
            self._dropped += dropped
            if not new:
                self._requeued += len(lines)
            return dropped

    def drain(self) -> list[str]:
        """Remove and return everything (for the spool)."""
        return self.take_seq(len(self._q) + self.capacity)[1]

    @property
    def dropped(self) -> int:
        return self._dropped

    def stats(self) -> dict[str, int]:
        """``capacity``, ``buffered``, ``added``, ``dropped`` (overflow), ``taken``, ``requeued``."""
        with self._lock:
            return {
                "capacity": self.capacity,
                "buffered": len(self._q),
                "added": self._added,
                "dropped": self._dropped,
                "taken": self._taken,
                "requeued": self._requeued,
            }
