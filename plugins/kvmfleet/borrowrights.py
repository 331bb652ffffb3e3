"""Why this process may or may not borrow another process's fds with ``pidfd_getfd``, naming the one cause.

Two different things refuse it, with different fixes: a seccomp filter (systemd-nspawn's default, container
runtimes, a systemd unit's ``SystemCallFilter=``) refuses the syscall itself, whatever the target; a missing
``CAP_SYS_PTRACE``, Yama's ``ptrace_scope`` or another security module refuses access to the target process.
Borrowing one of our own fds tells them apart: ``ptrace_may_access()`` on our own thread group succeeds before
any capability, Yama or LSM check (kernel/ptrace.c), so when that fails, the syscall itself is filtered.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass

from . import procfs

CAP_SYS_PTRACE = 19  # bit of the capability sets (include/uapi/linux/capability.h)
PIDFD_GETFD_SINCE = (5, 6)
YAMA_FILE = "/proc/sys/kernel/yama/ptrace_scope"
SECCOMP_MODES = {0: "disabled", 1: "strict", 2: "filter"}


@dataclass(frozen=True)
class SelfProbe:
    """Whether ``pidfd_getfd`` works on this process's own fds: ``allowed`` None when it cannot be tried (no
    ``pidfd_open``); ``reason`` says why it is refused ("" when allowed)."""

    allowed: bool | None
    reason: str = ""


def kernel_at_least(version: tuple[int, int], release: str | None = None) -> bool:
    """Whether the running kernel (or ``release``, e.g. ``6.1.0-18-amd64``) is at least ``version``."""
    match = re.match(r"(\d+)\.(\d+)", release if release is not None else os.uname().release)
    return match is not None and (int(match.group(1)), int(match.group(2))) >= version


def seccomp_seen(fields: dict[str, str]) -> str:
    """``Seccomp: 2 in /proc/self/status, 1 filter``: what the status says, for reasons."""
    mode, filters = procfs.parse_seccomp(fields)
    text = f"Seccomp: {'unknown' if mode is None else mode} in /proc/self/status"
    if filters is not None:
        text += f", {filters} filter{'' if filters == 1 else 's'}"
    return text


def _refused_self(err: OSError, fields: dict[str, str]) -> str:
    """Why borrowing our own fd failed with ``err``."""
    mode, _ = procfs.parse_seccomp(fields)
    name = errno.errorcode.get(err.errno or 0, str(err.errno))
    if err.errno == errno.ENOSYS and not kernel_at_least(PIDFD_GETFD_SINCE):
        return f"pidfd_getfd is not available (Linux {os.uname().release}; it came with 5.6)"
    if err.errno in (errno.EPERM, errno.EACCES, errno.ENOSYS) and mode == 2:
        return (f"pidfd_getfd is refused by a seccomp filter ({name}; {seccomp_seen(fields)}): allow it in the "
                "container/unit (systemd-nspawn --system-call-filter=pidfd_getfd, SystemCallFilter=, "
                "podman --security-opt seccomp=...)")
    return (f"pidfd_getfd fails ({name}) even on this process's own fds, with no seccomp filter "
            f"({seccomp_seen(fields)}): a security module refuses it")


def probe_self() -> SelfProbe:
    """Borrow one of our own fds (needs no ptrace rights): refused only by a filter on the syscall itself."""
    try:
        pidfd = os.pidfd_open(os.getpid())
    except (AttributeError, OSError) as err:
        return SelfProbe(None, f"pidfd_open is not available ({err})")
    try:
        fd = procfs.pidfd_getfd(pidfd, pidfd)
    except OSError as err:
        return SelfProbe(False, _refused_self(err, procfs.self_status()))
    finally:
        os.close(pidfd)
    os.close(fd)
    return SelfProbe(True)


def yama_scope(path: str = YAMA_FILE) -> int | None:
    """Yama's ptrace_scope, None when Yama is absent or the file unreadable."""
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            text = handle.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def has_cap_sys_ptrace(cap_eff: str) -> bool | None:
    """Whether a ``CapEff`` value (hex, as /proc/<pid>/status prints it) holds CAP_SYS_PTRACE; None if garbled."""
    return procfs.has_any_cap(cap_eff, CAP_SYS_PTRACE)


def denied_cause(fields: dict[str, str], scope: int | None, attach: bool = True) -> str:
    """Why ptrace access to another process is refused, from this process's status fields and Yama's scope,
    when the syscall itself is allowed (:func:`probe_self`). Yama restricts only attaching (``pidfd_getfd``), not
    reading (``/proc/<pid>/fd`` links): ``attach`` False leaves it out."""
    if not attach:
        scope = None
    cap_eff = fields.get("CapEff", "")
    has_cap = has_cap_sys_ptrace(cap_eff)
    causes = []
    if scope == 3:
        causes.append(f"Yama ptrace_scope is 3 ({YAMA_FILE}): no process may attach to another, root included, "
                      "until the next boot")
    if has_cap is False:
        cap = (f"this process lacks CAP_SYS_PTRACE (CapEff {cap_eff} in /proc/self/status), needed to reach a "
               "process with capabilities it lacks: give it back (podman --cap-add SYS_PTRACE, a unit's "
               "CapabilityBoundingSet=)")
        if scope in (1, 2):
            cap += f"; Yama ptrace_scope {scope} asks for it as well"
        causes.append(cap)
    if causes:
        return "; and ".join(causes)
    yama = ("Yama does not restrict reading" if not attach else
            "no Yama" if scope is None else f"Yama ptrace_scope {scope}")
    has = "an unreadable CapEff" if has_cap is None else f"CAP_SYS_PTRACE (CapEff {cap_eff})"
    return (f"neither capabilities nor Yama explain it ({has}, {yama}): a security module (AppArmor, SELinux) "
            "refuses it, or this process runs in a user namespace other than the VMM's")


def denied_reason(pid: int) -> str:
    """Why ``pidfd_getfd`` on process ``pid`` failed with EPERM/EACCES: the seccomp filter when our own fds are
    refused too, else the capability, Yama scope or LSM that refuses this target."""
    probe = probe_self()
    if probe.allowed is False:
        return probe.reason
    return f"pidfd_getfd denied for pid {pid}: {denied_cause(procfs.self_status(), yama_scope())}"


def fd_table_denied_reason(pid: int) -> str:
    """Why the links in ``/proc/<pid>/fd`` cannot be read (they need ptrace read access to ``pid``; no seccomp
    filter is involved)."""
    cause = denied_cause(procfs.self_status(), None, attach=False)
    return f"cannot read the fd links of pid {pid} (/proc/{pid}/fd): {cause}"
