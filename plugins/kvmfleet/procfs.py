"""Reading other processes through /proc, and borrowing their fds with pidfds.

Every function takes the pid of a process that may exit at any moment: they return None or an
empty result when it has, and let other OSErrors (EACCES, ...) reach the caller, which decides
whether they matter.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import time
from dataclasses import dataclass

SYS_PIDFD_GETFD = 438  # x86_64 and the generic table alike
# The inode of the initial (host) PID namespace's /proc/<pid>/ns/pid: fixed since Linux 3.8 (PROC_PID_INIT_INO in
# include/linux/proc_ns.h). debugfs names VMs by their pids in that namespace.
PROC_PID_INIT_INO = 0xEFFFFFFC
CLK_TCK = os.sysconf("SC_CLK_TCK")  # the unit of process start times
_GONE = (errno.ENOENT, errno.ESRCH)

# readlink(/proc/<pid>/fd/<n>) of the fds a VMM holds (virt/kvm/kvm_main.c names them)
_KVM_LINK = re.compile(r"anon_inode:kvm-(vm|vm-stats|vcpu|vcpu-stats)(?::(\d+))?$")


def pids(proc: str = "/proc") -> list[int]:
    return [int(name) for name in os.listdir(proc) if name.isdigit()]


def start_time(pid: int, proc: str = "/proc") -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot): with the pid, names one process for good."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as stat:
            raw = stat.read()
    except OSError as err:
        if err.errno in _GONE:
            return None
        raise
    # comm (field 2) may hold spaces and parentheses: fields after it start past the last ')'
    rest = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


def uptime_ticks() -> int:
    """Clock ticks since boot (CLOCK_BOOTTIME, like start times): ``uptime_ticks() - start_time`` is an age."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * CLK_TCK)


def cmdline(pid: int, proc: str = "/proc") -> list[str]:
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as handle:
            raw = handle.read()
    except OSError as err:
        if err.errno in _GONE:
            return []
        raise
    return [arg.decode("utf-8", "replace") for arg in raw.split(b"\0")[:-1]] if raw else []


def comm(pid: int, proc: str = "/proc") -> str:
    try:
        with open(f"{proc}/{pid}/comm", "rb") as handle:
            return handle.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class KvmFd:
    """One KVM fd held by a process: ``kind`` is vm, vm-stats, vcpu or vcpu-stats; ``index`` the vCPU id."""

    fd: int
    kind: str
    index: int = -1


def kvm_fds(pid: int, proc: str = "/proc") -> list[KvmFd]:
    """The KVM anon-inode fds a process holds, in fd order. Empty if it has exited. EACCES/EPERM propagate, from
    the listing or from the links (the listing is allowed where reading the links needs ptrace read access)."""
    fd_dir = f"{proc}/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError as err:
        if err.errno in _GONE:
            return []
        raise
    found = []
    for name in names:
        try:
            link = os.readlink(f"{fd_dir}/{name}")
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EPERM):
                raise
            continue  # closed between listdir and readlink
        match = _KVM_LINK.match(link)
        if match:
            found.append(KvmFd(int(name), match.group(1), int(match.group(2) or -1)))
    found.sort(key=lambda kfd: kfd.fd)
    return found


_libc: ctypes.CDLL | None = None


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """Duplicate fd ``target_fd`` of the process behind ``pidfd`` (Linux 5.6; needs ptrace rights)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = int(_libc.syscall(SYS_PIDFD_GETFD, pidfd, target_fd, 0))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd(fd {target_fd}): {os.strerror(err)}")
    return fd


def pidfd_open(pid: int) -> int:
    return os.pidfd_open(pid)


def borrowed_fd_count(proc: str = "/proc") -> int:
    """How many KVM stats fds and pidfds this process holds: what a statsfd source has borrowed."""
    count = 0
    for name in os.listdir(f"{proc}/self/fd"):
        try:
            link = os.readlink(f"{proc}/self/fd/{name}")
        except OSError:
            continue  # the fd of the listdir itself
        count += link.startswith("anon_inode:kvm-") or link == "anon_inode:[pidfd]"
    return count


def status_fields(text: str) -> dict[str, str]:
    """The ``Key:<tab>value`` lines of a /proc/<pid>/status text (the first of a repeated key wins)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def self_status(proc: str = "/proc") -> dict[str, str]:
    """:func:`status_fields` of this process's status; empty when unreadable."""
    try:
        with open(f"{proc}/self/status", encoding="utf-8", errors="replace") as handle:
            return status_fields(handle.read())
    except OSError:
        return {}


def has_any_cap(cap_eff: str | None, *caps: int) -> bool | None:
    """Whether a ``CapEff`` value (hex, as /proc/<pid>/status prints it) holds one of the capability bits ``caps``
    (include/uapi/linux/capability.h); None when it is missing or garbled."""
    if not cap_eff or not re.fullmatch(r"[0-9a-fA-F]+", cap_eff):
        return None
    bits = int(cap_eff, 16)
    return any(bits >> cap & 1 for cap in caps)


def parse_nspid(value: str) -> tuple[int, ...]:
    """The NSpid line: the pid in the PID namespace of the /proc mount, then in each nested one down to the process's
    own (one entry when /proc belongs to the process's own namespace, *even a nested one*). () if garbled."""
    parts = value.split()
    return tuple(int(part) for part in parts) if parts and all(part.isdigit() for part in parts) else ()


def parse_seccomp(fields: dict[str, str]) -> tuple[int | None, int | None]:
    """(mode, filters) from status fields: mode 0 none, 1 strict, 2 filter (``Seccomp``, Linux 3.8);
    the number of filters installed (``Seccomp_filters``, Linux 5.9). None where absent or garbled."""
    mode, filters = fields.get("Seccomp", ""), fields.get("Seccomp_filters", "")
    return (int(mode) if mode.isdigit() else None), (int(filters) if filters.isdigit() else None)


def pid_ns_inode(proc: str = "/proc") -> int | None:
    """The inode of this process's PID namespace (``pid:[N]`` behind /proc/self/ns/pid), None if unreadable."""
    try:
        link = os.readlink(f"{proc}/self/ns/pid")
    except OSError:
        return None
    match = re.fullmatch(r"pid:\[(\d+)\]", link)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class PidNamespace:
    """Which PID namespace this process runs in, as far as /proc tells."""

    nspid: tuple[int, ...]  # the NSpid line (see parse_nspid)
    inode: int | None  # see pid_ns_inode

    @property
    def host(self) -> bool | None:
        """True in the initial PID namespace (whose pids debugfs uses); None when it cannot be told.

        The namespace inode decides: NSpid alone misses a container that mounted its own /proc (NSpid then has one
        entry, the container's pid). More than one NSpid entry means a nested namespace in any case."""
        if self.inode is not None:
            return self.inode == PROC_PID_INIT_INO
        return False if len(self.nspid) > 1 else None

    def describe(self) -> str:
        """What was seen, e.g. ``NSpid 2 in /proc/self/status, /proc/self/ns/pid is pid:[4026532183]``."""
        seen = [f"NSpid {' '.join(map(str, self.nspid))} in /proc/self/status"] if self.nspid else []
        if self.inode is not None:
            seen.append(f"/proc/self/ns/pid is pid:[{self.inode}], the host's is pid:[{PROC_PID_INIT_INO}]")
        return ", ".join(seen) or "nothing readable"


def pid_namespace(proc: str = "/proc") -> PidNamespace:
    return PidNamespace(parse_nspid(self_status(proc).get("NSpid", "")), pid_ns_inode(proc))
