"""perf_event_open(2) for tracepoint events, through ctypes: what both mechanisms open (:mod:`.perfcount` counts
with such events, :mod:`.bpf` hangs its programs on them)."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

SYSCALL_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}
PERF_TYPE_TRACEPOINT = 2
PERF_FLAG_FD_CLOEXEC = 1 << 3
ATTR_DISABLED = 1 << 0  # bits of the perf_event_attr flags word
ATTR_INHERIT = 1 << 1
PERF_ATTR_SIZE_VER0 = 64
PERF_EVENT_IOC_ENABLE = 0x2400  # _IO('$', 0)
PERF_EVENT_IOC_SET_FILTER = 0x40082406  # _IOW('$', 6, char *)
PERF_EVENT_IOC_SET_BPF = 0x40042408  # _IOW('$', 8, __u32)

HINTS = {
    errno.EACCES: "needs CAP_PERFMON (or CAP_SYS_ADMIN) or a lower kernel.perf_event_paranoid",
    errno.EPERM: "needs CAP_PERFMON (or CAP_SYS_ADMIN); kernel lockdown or perf_event_paranoid refuse it",
    errno.ENOENT: "no such tracepoint id (the format file's ID: line is stale?)",
    errno.EINVAL: "no such tracepoint id or unsupported attribute",
    errno.ENODEV: "no such CPU or tracepoint event",
    errno.ENOSYS: "no perf events in this kernel",
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def tracepoint_event(event_id: int, pid: int, cpu: int, *, inherit: bool = False, name: str = "") -> int:
    """A disabled counting event on tracepoint ``event_id`` (``pid``/``cpu`` as perf_event_open(2) takes them);
    OSError with the errno and what it means."""
    nr = SYSCALL_PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"perf_event_open: no syscall number known for {platform.machine()}")
    flags = ATTR_DISABLED | (ATTR_INHERIT if inherit else 0)
    # type, size, config, sample_period (0: counting), sample_type, read_format, flags, wakeup_events, bp_type,
    # config1
    raw = struct.pack("=IIQQQQQIIQ", PERF_TYPE_TRACEPOINT, PERF_ATTR_SIZE_VER0, event_id, 0, 0, 0, flags, 0, 0, 0)
    attr = ctypes.create_string_buffer(raw, PERF_ATTR_SIZE_VER0)
    fd = _libc.syscall(ctypes.c_long(nr), attr, ctypes.c_long(pid), ctypes.c_long(cpu), ctypes.c_long(-1),
                       ctypes.c_long(PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        hint = HINTS.get(err)
        what = f"perf_event_open(tracepoint {name or '?'} id {event_id}, pid {pid}, cpu {cpu})"
        raise OSError(err, f"{what}: {os.strerror(err)}" + (f" ({hint})" if hint else ""))
    return int(fd)
