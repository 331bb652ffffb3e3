"""KVM statistics from debugfs: ``/sys/kernel/debug/kvm/<pid>-<fd>/`` per VM.

Each per-VM directory holds that VM's stats plus its vCPU stats summed over its vCPUs (the
``vcpuN/`` subdirectories hold only arch files such as ``tsc-offset``: they are counted, not read, so that a
VM read here has its vCPU count, :attr:`~kvmfleet.model.VMReading.vcpus_listed`). Every file is opened, read
and closed within the sample: an open debugfs file takes a reference on its VM, and a collector that
kept one open would keep a dead VM's memory alive (``docs/statistics.md``, "Borrowed fds and pinning").

Under kernel lockdown reads fail with EPERM (integrity mode blocks the 0644 files, confidentiality
all of them); the listing still works, so :meth:`DebugfsSource.listed_vms` keeps naming VMs for
discovery while :meth:`usability` says why the counters cannot be read.

The ``<pid>`` of a directory is the VMM's pid in the host's (initial) PID namespace. A collector in a PID
namespace of its own (a container, ``unshare --pid``) sees other pids in its /proc: a host pid names no
process there, or an unrelated one. There the source reads nothing, lists nothing and names nobody, so
that no VM is given another process's identity; :meth:`usability` says why. Reasons, first that applies:
the PID namespace (with lockdown added when it would deny reads too), debugfs missing, lockdown.
"""

from __future__ import annotations

import errno
import os
import re
import stat

from .. import procfs
from ..facts import lockdown_mode
from ..identity import parse_identity
from ..logsay import SayOnce
from ..model import StatDesc, Stats, StatType, StatUnit, Usability, Value, VMIdentity, VMKey, VMReading
from .base import Source

DEFAULT_ROOT = "/sys/kernel/debug/kvm"
VM_DIR = re.compile(r"(\d+)-(\d+)$")
VCPU_DIR = re.compile(r"vcpu[0-9]+")  # kvm_create_vcpu_debugfs(): one per vCPU, named by its id
# Files that are not a single number (mmu_rmaps_stat is a text table); histograms show only their
# first bucket in debugfs, which would mislead: the binary stats fd carries them whole.
NOT_A_COUNTER = frozenset({"mmu_rmaps_stat"})


def guess_desc(name: str, mode: int) -> StatDesc | None:
    """What a debugfs file is, from the kernel's conventions: instant stats are 0444, the rest 0644;
    peak stats are named ``max_*``; ``*_ns`` are nanoseconds; histograms end in ``_hist``."""
    if name in NOT_A_COUNTER or name.endswith("_hist"):
        return None
    if not mode & stat.S_IWUSR:
        kind = StatType.INSTANT
    elif name.startswith("max_"):
        kind = StatType.PEAK
    else:
        kind = StatType.CUMULATIVE
    if name.endswith("_ns"):
        return StatDesc(name, kind, StatUnit.SECONDS, 10, -9)
    if name == "guest_mode":
        return StatDesc(name, kind, StatUnit.BOOLEAN)
    return StatDesc(name, kind)


def _is_vcpu_dir(entry: os.DirEntry[str]) -> bool:
    return VCPU_DIR.fullmatch(entry.name) is not None and entry.is_dir(follow_symlinks=False)


def foreign_pids_reason(namespace: procfs.PidNamespace) -> str:
    """Why debugfs's pids name no process of ours in ``namespace`` (this process's), or "" when they do (or it
    cannot be told: kernels before 4.1 without NSpid, no /proc/self/ns)."""
    if namespace.host is not False:
        return ""
    return (f"this process runs in a PID namespace of its own ({namespace.describe()}): debugfs names VMs by the "
            "host's pids, which match no process here, or the wrong one (run the collector in the host's PID "
            "namespace, e.g. podman --pid=host; statsfd reads the VMMs of this namespace)")


class DebugfsSource(Source):
    name = "debugfs"

    def __init__(self, root: str = DEFAULT_ROOT, proc: str = "/proc", say: SayOnce | None = None) -> None:
        self.root = root
        self.proc = proc
        self.say = say or SayOnce()
        self._usability = Usability(True, "not read yet")
        self._descs: dict[str, StatDesc | None] = {}  # by file name: the same for every VM
        self._identities: dict[tuple[int, int], VMIdentity] = {}
        self._foreign = foreign_pids_reason(procfs.pid_namespace(proc))  # "" where debugfs pids are ours

    def usability(self) -> Usability:
        return self._usability

    def _unusable(self, reason: str) -> list[VMReading]:
        self._usability = Usability(False, reason)
        self.say("debugfs", f"kvmfleet: debugfs source unusable: {reason}")
        return []

    def listed_vms(self) -> list[tuple[int, int]]:
        """(pid, vm fd) of every VM debugfs names; works under lockdown too. None in a PID namespace of our own:
        those pids are the host's."""
        if self._foreign:
            return []
        try:
            names = os.listdir(self.root)
        except OSError:
            return []
        found = []
        for name in names:
            match = VM_DIR.match(name)
            if match:
                found.append((int(match.group(1)), int(match.group(2))))
        return found

    def identity(self, pid: int, vm_fd: int) -> VMIdentity | None:
        if self._foreign:
            return None  # a host pid: the process with that pid here is another one, if any
        cached = self._identities.get((pid, vm_fd))
        started = procfs.start_time(pid, self.proc)
        if started is None:
            return None  # the VMM is gone; its directory goes with the VM
        if cached is not None and cached.key.start_time == started:
            return cached
        kind, vm_name, uuid = parse_identity(procfs.cmdline(pid, self.proc), procfs.comm(pid, self.proc), pid)
        identity = VMIdentity(VMKey(pid, started, vm_fd), kind, vm_name, uuid)
        self._identities[(pid, vm_fd)] = identity
        return identity

    def _desc(self, path: str, name: str) -> StatDesc | None:
        if name not in self._descs:
            try:
                mode = os.stat(path).st_mode
            except OSError:
                return None
            self._descs[name] = guess_desc(name, mode) if stat.S_ISREG(mode) else None
        return self._descs[name]

    def vcpus_listed(self, pid: int, vm_fd: int) -> int | None:
        """How many vCPU directories debugfs has for this VM (listing works under lockdown too), or None when
        there is no such directory to list (or its pid is not ours to name)."""
        if self._foreign:
            return None
        try:
            with os.scandir(f"{self.root}/{pid}-{vm_fd}") as entries:
                return sum(1 for entry in entries if _is_vcpu_dir(entry))
        except OSError:
            return None

    def _read_dir(self, vm_dir: str) -> tuple[Stats, dict[str, StatDesc], int]:
        """Open, read, close each counter file, count the vCPU directories. EPERM propagates (lockdown); ENOENT
        means the VM went."""
        stats: dict[str, Value] = {}
        descs: dict[str, StatDesc] = {}
        vcpus = 0
        with os.scandir(vm_dir) as entries:
            names = []
            for entry in entries:
                if _is_vcpu_dir(entry):
                    vcpus += 1
                else:
                    names.append(entry.name)
        for name in names:
            path = f"{vm_dir}/{name}"
            desc = self._desc(path, name)
            if desc is None:
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                raw = os.read(fd, 64)
            finally:
                os.close(fd)
            try:
                stats[name] = int(raw)
            except ValueError:
                self._descs[name] = None
                self.say(f"debugfs-text:{name}", f"kvmfleet: debugfs {name} is not a number, skipped")
                continue
            descs[name] = desc
        return stats, descs, vcpus

    def read(self) -> list[VMReading]:
        if self._foreign:
            mode = lockdown_mode()
            also = (f"; kernel lockdown ({mode}) also denies reading {self.root}"
                    if mode in ("integrity", "confidentiality") else "")
            return self._unusable(self._foreign + also)
        if not os.path.isdir(self.root):
            return self._unusable(f"{self.root} not present (debugfs not mounted, or no KVM module)")
        readings = []
        for pid, vm_fd in self.listed_vms():
            identity = self.identity(pid, vm_fd)
            if identity is None:
                continue
            try:
                stats, descs, vcpus = self._read_dir(f"{self.root}/{pid}-{vm_fd}")
            except OSError as err:
                if err.errno in (errno.EPERM, errno.EACCES):
                    why = (f"kernel lockdown ({lockdown_mode()}) denies reading {self.root}"
                           if err.errno == errno.EPERM else f"permission denied on {self.root} (not root?)")
                    return self._unusable(why)
                continue  # the VM vanished mid-read: it is simply not in this sample
            readings.append(VMReading(identity, self.name, stats, {}, descs, vm_stats_include_vcpus=True,
                                      vcpus_listed=vcpus))
        self._forget_gone(readings)
        self._usability = Usability(True, f"{len(readings)} VMs readable")
        self.say.forget("debugfs")
        return readings

    def _forget_gone(self, readings: list[VMReading]) -> None:
        live = {(r.identity.key.pid, r.identity.key.vm_fd) for r in readings}
        for key in [key for key in self._identities if key not in live]:
            del self._identities[key]
