"""Run a command under a real seccomp filter that refuses ``pidfd_getfd``, as systemd-nspawn and container runtimes
do by default::

    python -m tests.support.seccomp [--errno EPERM|ENOSYS] -- CMD ARGS...

The filter (classic BPF, x86_64 only) returns the errno for syscall 438 and allows every other syscall; it is
installed with ``PR_SET_NO_NEW_PRIVS`` and stays across the ``exec`` of CMD and in all its children.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
AUDIT_ARCH_X86_64 = 0xC000003E
SYS_PIDFD_GETFD = 438
# classic BPF opcodes
LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
RET_K = 0x06  # BPF_RET | BPF_K
# offsets in struct seccomp_data
NR_OFFSET, ARCH_OFFSET = 0, 4


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def program(refuse_with: int) -> list[tuple[int, int, int, int]]:
    """(code, jt, jf, k) of the filter: other architectures are allowed (the test runs x86_64 code only)."""
    return [
        (LD_W_ABS, 0, 0, ARCH_OFFSET),
        (JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        (RET_K, 0, 0, SECCOMP_RET_ALLOW),
        (LD_W_ABS, 0, 0, NR_OFFSET),
        (JEQ_K, 0, 1, SYS_PIDFD_GETFD),
        (RET_K, 0, 0, SECCOMP_RET_ERRNO | refuse_with),
        (RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]


def install(refuse_with: int = errno.EPERM) -> None:
    """Install the filter on this process (and everything it execs or forks from now on)."""
    if platform.machine() != "x86_64":
        raise OSError(errno.ENOTSUP, f"the filter is written for x86_64, not {platform.machine()}")
    insns = program(refuse_with)
    filters = (SockFilter * len(insns))(*[SockFilter(*insn) for insn in insns])
    prog = SockFprog(len(insns), ctypes.cast(filters, ctypes.POINTER(SockFilter)))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def main(argv: list[str]) -> int:
    refuse_with = errno.EPERM
    if argv[:1] == ["--errno"]:
        refuse_with = getattr(errno, argv[1])
        argv = argv[2:]
    if argv[:1] != ["--"] or len(argv) < 2:
        print("usage: python -m tests.support.seccomp [--errno EPERM|ENOSYS] -- CMD ARGS...", file=sys.stderr)
        return 2
    install(refuse_with)
    os.execvp(argv[1], argv[1:])
    return 127  # not reached


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
