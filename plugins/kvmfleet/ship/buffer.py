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

DEFAULT_CAPACITY = 100_000


class LineBuffer:
    """FIFO of lines, at most ``capacity`` of them; on overflow the oldest are dropped and counted.

    ``append``/``extend`` (producer), ``take`` and ``requeue_front`` (the one consumer) each hold an internal
    lock for a short, network-free moment.
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
            if n >= cap:
                dropped = len(self._q) + n - cap
                self._q.clear()
                self._q.extend(new[n - cap:])
            else:
                dropped = len(self._q) + n - cap
                if dropped > 0:
                    q = self._q
                    for _ in range(dropped):
                        q.popleft()
                else:
                    dropped = 0
                self._q.extend(new)
            self._dropped += dropped
            return dropped

    def append(self, line: str) -> int:
        return self.extend([line])

    def take(self, max_lines: int) -> list[str]:
        """Remove and return up to ``max_lines`` of the oldest lines (in order)."""
        with self._lock:
            q = self._q
            n = min(max_lines, len(q))
            if n == len(q):
                out = list(q)
                q.clear()
            else:
                popleft = q.popleft
                out = [popleft() for _ in range(n)]
            self._taken += n
            return out

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
            self._dropped += dropped
            if not new:
                self._requeued += len(lines)
            return dropped

    def drain(self) -> list[str]:
        """Remove and return everything (for the spool)."""
        with self._lock:
            out = list(self._q)
            self._q.clear()
            self._taken += len(out)
            return out

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
