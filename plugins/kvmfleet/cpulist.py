"""Kernel CPU lists (``/sys/devices/system/cpu/online``, ``possible``: ``0-3,8-11``), parsed in one place."""

from __future__ import annotations

import errno
import re

ONLINE = "/sys/devices/system/cpu/online"
POSSIBLE = "/sys/devices/system/cpu/possible"
MAX_CPU_ID = 2**16  # far above any machine's; a bigger id is garbage, not a CPU


def parse(text: str) -> list[int] | None:
    """The CPUs a list names, as the kernel prints one (``%*pbl``: ascending, disjoint ranges); None for an empty
    list or anything else."""
    cpus: list[int] = []
    last = -1
    for item in text.strip().split(","):
        m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", item)
        if not m:
            return None
        low = int(m.group(1))
        high = int(m.group(2)) if m.group(2) is not None else low
        if not last < low <= high < MAX_CPU_ID:
            return None
        cpus.extend(range(low, high + 1))
        last = high
    return cpus


def read(path: str = ONLINE) -> list[int]:
    """The CPUs of a CPU list file; OSError naming the file when it cannot be read or is no CPU list."""
    with open(path, encoding="ascii", errors="replace") as f:
        text = f.read()
    cpus = parse(text)
    if cpus is None:
        raise OSError(errno.EINVAL, f"{path}: not a CPU list ({text.strip()[:80]!r})")
    return cpus
