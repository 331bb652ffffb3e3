"""KVM binary stats fds held by the VMMs, borrowed with ``pidfd_open`` + ``pidfd_getfd``.

Only the process that owns a VM may call ``KVM_GET_STATS_FD`` on it (KVM answers EIO to anyone
else), so this source never tries: it duplicates the stats fds the VMM already holds
(``anon_inode:kvm-vm-stats``, ``anon_inode:kvm-vcpu-stats:N``; QEMU >= 8.1 keeps one per vCPU).
Each duplicated fd is checked once, when borrowed (:mod:`.borrowcheck`: a VMM may swap the fd between
our look at its fd table and ``pidfd_getfd``): its header, id and descriptors are parsed then, and a
sample is one ``pread`` per fd. An fd that is not what its VMM listed is closed at once and said once;
an error with one VMM leaves the others read as usual.

A borrowed fd keeps its VM alive, so each VMM is watched through its pidfd: all pidfds are polled
once per sample and a VMM's fds are closed in the first sample after it exits.

Discovery walks ``/proc/<pid>/fd``: new processes at once, young ones (younger than
``young_s``) every sample, since a VMM creates its VM just after it starts, and everything else
every ``rescan_s`` seconds. Callers may name pids to scan now (:meth:`StatsfdSource.hint`).
"""

from __future__ import annotations

import errno
import heapq
import os
import select
import time
from collections.abc import Container
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter
from typing import Any, Callable

from .. import borrowrights, procfs
from ..binstats import StatsFormatError, StatsLayout
from ..identity import parse_identity
from ..logsay import SayOnce
from ..model import StatDesc, Usability, VMIdentity, VMKey, VMReading
from ..statblock import Shape, StatBlock
from .base import Source
from .borrowcheck import BorrowRejected, verify_stats_fd


@dataclass
class _Borrowed:
    """One stats fd duplicated from a VMM."""

    fd: int  # ours
    target_fd: int  # the VMM's
    inode: int
    vm_fd: int
    vcpu: int  # -1 for the VM-level stats fd
    layout: StatsLayout


@dataclass
class _Vmm:
    pid: int
    start_time: int
    pidfd: int
    vmm: str
    name: str
    uuid: str | None
    vm_fds: list[int] = field(default_factory=list)
    borrowed: dict[int, _Borrowed] = field(default_factory=dict)  # by the VMM's fd number
    scanned_at: float = 0.0
    # the read plan, rebuilt whenever ``borrowed`` changes: everything a sample needs, precomputed
    plan: list[tuple[int, int, int, int, Shape, int, int]] = field(default_factory=list)
    # the same plan as columns, joined with every other VMM's into the source's host plan (:class:`_HostPlan`), and
    # per VM (identity, descriptors, where its VM stats are in the plan or -1, its vCPU ids, where their stats are)
    fds: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    shapes: list[Shape] = field(default_factory=list)
    per_vm: list[tuple[VMIdentity, dict[str, StatDesc], int, tuple[int, ...], tuple[int, ...]]] = \
        field(default_factory=list)
    identities: dict[int, VMIdentity] = field(default_factory=dict)
    descs: dict[int, dict[str, StatDesc]] = field(default_factory=dict)
    said: set[str] = field(default_factory=set)  # SayOnce keys of its rejected fds, forgotten when it goes

    def identity(self, vm_fd: int, index: int) -> VMIdentity:
        # a process with several VMs (rare: test harnesses) names them NAME, NAME#2, ...
        name = self.name if index == 0 else f"{self.name}#{index + 1}"
        return VMIdentity(VMKey(self.pid, self.start_time, vm_fd), self.vmm, name, self.uuid)

    def replan(self, descs_for: Callable[[frozenset[Shape]], dict[str, StatDesc]]) -> None:
        vm_fds = self.vm_fds or [-1]
        self.identities = {vm_fd: self.identity(vm_fd, i) for i, vm_fd in enumerate(vm_fds)}
        shapes: dict[int, set[Shape]] = {vm_fd: set() for vm_fd in vm_fds}
        self.plan = []
        for target, held in sorted(self.borrowed.items()):
            vm_fd = held.vm_fd if held.vm_fd in shapes else vm_fds[0]
            layout = held.layout
            self.plan.append((target, held.fd, layout.data_size, layout.data_offset, layout.shape, held.vcpu, vm_fd))
            shapes[vm_fd].add(layout.shape)
        self.descs = {vm_fd: descs_for(frozenset(found)) for vm_fd, found in shapes.items()}
        self.fds = [fd for _, fd, _, _, _, _, _ in self.plan]
        self.sizes = [size for _, _, size, _, _, _, _ in self.plan]
        self.offsets = [offset for _, _, _, offset, _, _, _ in self.plan]
        self.shapes = [shape for _, _, _, _, shape, _, _ in self.plan]
        self.per_vm = []
        for vm_fd, identity in self.identities.items():
            vm_at, vcpu_at = -1, {}
            for at, (_, _, _, _, _, vcpu, owner) in enumerate(self.plan):
                if owner == vm_fd:
                    if vcpu < 0:
                        vm_at = at  # the last one wins, as in the slow path
                    else:
                        vcpu_at[vcpu] = at
            self.per_vm.append((identity, self.descs[vm_fd], vm_at, tuple(vcpu_at), tuple(vcpu_at.values())))


def _picker(indexes: list[int]) -> Callable[[list[StatBlock]], Any]:
    """``blocks -> tuple(blocks[i] for i in indexes)``, by itemgetter where it returns a tuple."""
    if len(indexes) >= 2:
        return itemgetter(*indexes)
    return lambda blocks: tuple(blocks[i] for i in indexes)


class _HostPlan:
    """Every VMM's plan as one: a sample is one ``map(os.pread, fds, sizes, offsets)`` over every borrowed fd of the
    host and one ``map(StatBlock, ...)`` over what it read (no Python frame per fd, none per VMM), then a reading per
    VM from its blocks. Rebuilt when a VMM comes, goes or changes its fds."""

    def __init__(self, vmms: list[_Vmm]) -> None:
        self.fds: list[int] = []
        self.sizes: list[int] = []
        self.offsets: list[int] = []
        self.shapes: list[Shape] = []
        # per VM: identity, descriptors, where its VM stats are (or -1), its vCPU ids, a picker of their blocks
        self.per_vm: list[tuple[VMIdentity, dict[str, StatDesc], int, tuple[int, ...],
                                Callable[[list[StatBlock]], Any]]] = []
        for vmm in vmms:
            base = len(self.fds)
            self.fds += vmm.fds
            self.sizes += vmm.sizes
            self.offsets += vmm.offsets
            self.shapes += vmm.shapes
            for identity, descs, vm_at, vcpu_ids, vcpu_at in vmm.per_vm:
                if vm_at >= 0 or vcpu_ids:
                    self.per_vm.append((identity, descs, base + vm_at if vm_at >= 0 else -1, vcpu_ids,
                                        _picker([base + at for at in vcpu_at])))


def _group_by_vm(kvm_fds: list[procfs.KvmFd]) -> tuple[list[int], dict[int, int]]:
    """(vm fds, stats fd -> vm fd). A stats fd belongs to the nearest VM fd below it: VMMs create
    the VM, then its vCPUs and their stats fds. Exact for one VM per process (every real VMM)."""
    vm_fds = [kfd.fd for kfd in kvm_fds if kfd.kind == "vm"]
    owner: dict[int, int] = {}
    current = vm_fds[0] if vm_fds else -1
    for kfd in kvm_fds:
        if kfd.kind == "vm":
            current = kfd.fd
        elif kfd.kind in ("vm-stats", "vcpu-stats"):
            owner[kfd.fd] = current
    return vm_fds, owner


def _is_vmm(kvm_fds: list[procfs.KvmFd]) -> bool:
    """Whether a process with these KVM fds runs a VM whose stats can be read here. Stats fds alone are another
    collector's borrowed copies (kvmfleet's collectd plugin beside ``kvmfleet stat``), not a VM: a VMM holds its VM
    or vCPU fds as long as its guest lives."""
    kinds = {kfd.kind for kfd in kvm_fds}
    return bool(kinds & {"vm", "vcpu"}) and bool(kinds & {"vm", "vm-stats", "vcpu-stats"})


class StatsfdSource(Source):
    name = "statsfd"

    def __init__(self, proc: str = "/proc", rescan_s: float = 30.0, young_s: float = 60.0,
                 say: SayOnce | None = None, clock: Callable[[], float] = time.monotonic,
                 only_pids: Container[int] | None = None) -> None:
        """``only_pids`` restricts discovery to those processes (one VMM, or a test's own guests)."""
        self.proc = proc
        self.only_pids = only_pids
        self.rescan_s = rescan_s
        self.young_ticks = int(young_s * procfs.CLK_TCK)
        self.say = say or SayOnce()
        self._clock = clock
        self._vmms: dict[int, _Vmm] = {}
        self._others: dict[int, tuple[int, float]] = {}  # pid -> (start time, last scan) of non-VMMs
        self._young: set[int] = set()  # the non-VMMs among them that were younger than young_s when scanned
        self._listed: set[str] = set()  # the names in /proc at the last sample
        self._unsettled: set[int] = set()  # pids to look at again at the next sample (see _discover)
        self._rescans: list[tuple[float, int]] = []  # heap of (when, pid): a known pid's next rescan
        self._hinted: set[int] = set()
        self._poller = select.poll()  # every VMM's pidfd, registered once
        self._pid_of_pidfd: dict[int, int] = {}
        self._denied: str = ""  # why borrowing failed, if it did
        self._self_pid = os.getpid()
        self._descs_cache: dict[frozenset[Shape], dict[str, StatDesc]] = {}
        self._host_plan: _HostPlan | None = None  # None: rebuilt at the next read (a VMM came, went or changed)
        self.rejected_fds = 0  # borrowed fds that were not the stats fds their VMM listed, since the start
        self._static = self._usability = self._probe()  # what no later sample changes

    # -- state -------------------------------------------------------------------------------
    def _probe(self) -> Usability:
        """Python, root, and a pidfd_getfd that no seccomp filter refuses (a filter, once installed, stays)."""
        if not hasattr(os, "pidfd_open"):
            return Usability(False, "Python lacks os.pidfd_open (needs 3.9 on Linux 5.3+)")
        if os.geteuid() != 0:
            return Usability(False, "not root: borrowing a VMM's fds needs root with CAP_SYS_PTRACE")
        probe = borrowrights.probe_self()
        if probe.allowed is False:
            return Usability(False, probe.reason)
        return Usability(True, "not read yet")

    def usability(self) -> Usability:
        return self._usability

    def held_fds(self) -> int:
        """How many fds this source holds right now (borrowed stats fds plus pidfds)."""
        return sum(len(vmm.borrowed) + 1 for vmm in self._vmms.values())

    def hint(self, pids: set[int]) -> None:
        """Scan these pids at the next read (e.g. named by debugfs as holding VMs)."""
        self._hinted |= pids

    # -- discovery ---------------------------------------------------------------------------
    def _due(self, pid: int, now: float, uptime: int) -> bool:
        if pid in self._hinted:
            return True
        seen = self._others.get(pid)
        if seen is None:
            return True
        started, scanned = seen
        return uptime - started < self.young_ticks or now - scanned >= self.rescan_s

    def _discover(self, now: float) -> None:
        # /proc's names as strings, compared with the last listing's as sets: only what changed is turned into pids
        try:
            names = set(os.listdir(self.proc))
        except OSError as err:
            self.say("statsfd-proc", f"kvmfleet: cannot list {self.proc}: {err}")
            return
        appeared, vanished, self._listed = names - self._listed, self._listed - names, names
        others = self._others
        for name in vanished:
            if name.isdigit():
                others.pop(int(name), None)
        uptime = procfs.uptime_ticks()
        self._young = {pid for pid in self._young if pid in others and uptime - others[pid][0] < self.young_ticks}
        # the pids not seen before (or neither a VMM nor noted since: see below), the hinted and young ones, and those
        # whose rescan is due; each is then checked as before (heap entries may be stale)
        due = {int(name) for name in appeared if name.isdigit()} | self._unsettled | self._hinted | self._young
        rescans = self._rescans
        while rescans and rescans[0][0] <= now:
            due.add(heapq.heappop(rescans)[1])
        due = {pid for pid in due if str(pid) in names}
        due.discard(self._self_pid)
        outside: set[int] = set()  # not in only_pids (yet: a caller may add to it), looked at again next time
        if self.only_pids is not None:
            outside = {pid for pid in due if pid not in self.only_pids}
            due -= outside
        for pid in sorted(due):  # in pid order, as /proc lists them
            vmm = self._vmms.get(pid)
            try:
                if vmm is not None:
                    if now - vmm.scanned_at >= self.rescan_s or pid in self._hinted:
                        self._scan_fds(vmm, now)  # vCPU hotplug, or fds the VMM closed
                elif self._due(pid, now, uptime):
                    self._scan_new(pid, now)
            except Exception as err:  # one process's trouble, not the host's
                self._drop_failed(pid, "scanning", err)
        self._hinted.clear()
        # a pid looked at but neither taken as a VMM nor noted (it exited, or was reused, while being scanned; a VMM
        # retired while its pid stays listed) is looked at again at the next sample
        self._unsettled = {pid for pid in due if pid not in others and pid not in self._vmms} | outside

    def _scan_new(self, pid: int, now: float) -> None:
        started = procfs.start_time(pid, self.proc)
        if started is None:
            return
        try:
            kvm_fds = procfs.kvm_fds(pid, self.proc)
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EPERM):
                self._denied = borrowrights.fd_table_denied_reason(pid)
            self._note_other(pid, started, now)
            return
        if not _is_vmm(kvm_fds):
            self._note_other(pid, started, now)
            return
        try:
            pidfd = procfs.pidfd_open(pid)
        except OSError:
            return  # exited just now
        if procfs.start_time(pid, self.proc) != started:
            os.close(pidfd)  # the pid was reused between the scan and pidfd_open
            return
        kind, name, uuid = parse_identity(procfs.cmdline(pid, self.proc), procfs.comm(pid, self.proc), pid)
        vmm = _Vmm(pid, started, pidfd, kind, name, uuid)
        self._vmms[pid] = vmm
        self._poller.register(pidfd, select.POLLIN)
        self._pid_of_pidfd[pidfd] = pid
        self._others.pop(pid, None)
        self._borrow(vmm, kvm_fds, now)

    def _note_other(self, pid: int, started: int, now: float) -> None:
        self._others[pid] = (started, now)
        heapq.heappush(self._rescans, (now + self.rescan_s, pid))
        if procfs.uptime_ticks() - started < self.young_ticks:
            self._young.add(pid)

    def _scan_fds(self, vmm: _Vmm, now: float) -> None:
        try:
            kvm_fds = procfs.kvm_fds(vmm.pid, self.proc)
        except OSError:
            return
        self._borrow(vmm, kvm_fds, now)

    def _borrow(self, vmm: _Vmm, kvm_fds: list[procfs.KvmFd], now: float) -> None:
        vmm.scanned_at = now
        heapq.heappush(self._rescans, (now + self.rescan_s, vmm.pid))
        vmm.vm_fds, owner = _group_by_vm(kvm_fds)
        present = {kfd.fd: kfd for kfd in kvm_fds if kfd.fd in owner}
        # drop what the VMM closed (vCPU unplug) or replaced by another file under the same number
        for target, held in list(vmm.borrowed.items()):
            kfd = present.get(target)
            if kfd is None or self._inode(vmm.pid, target) != held.inode:
                self._release(vmm, target)
        for target, kfd in present.items():
            if target not in vmm.borrowed:
                self._borrow_one(vmm, kfd, owner[target])
        vmm.replan(self._descs_for)
        self._host_plan = None

    def _inode(self, pid: int, fd: int) -> int:
        try:
            return os.stat(f"{self.proc}/{pid}/fd/{fd}").st_ino
        except OSError:
            return -1

    def _borrow_one(self, vmm: _Vmm, kfd: procfs.KvmFd, vm_fd: int) -> None:
        try:
            fd = procfs.pidfd_getfd(vmm.pidfd, kfd.fd)
        except OSError as err:
            if err.errno in (errno.EPERM, errno.EACCES):
                self._denied = borrowrights.denied_reason(vmm.pid)
            elif err.errno in (errno.EMFILE, errno.ENFILE):
                self.say("statsfd-emfile", f"kvmfleet: out of file descriptors borrowing stats fds ({err}); "
                         "raise the collector's RLIMIT_NOFILE (about 1 + vCPUs + 1 per VM)")
            elif err.errno == errno.ENOSYS:
                self._denied = "pidfd_getfd is not available (needs Linux 5.6)"
            return
        try:
            layout = verify_stats_fd(fd, kfd)
            inode = os.fstat(fd).st_ino
        except (OSError, BorrowRejected) as err:
            os.close(fd)
            self._reject(vmm, kfd.fd, err if isinstance(err, BorrowRejected) else BorrowRejected("link", str(err)))
            return
        for skipped in layout.skipped:
            self.say(f"statsfd-skip:{skipped}", f"kvmfleet: stats descriptor skipped: {skipped}")
        vcpu = kfd.index if kfd.kind == "vcpu-stats" else -1
        vmm.borrowed[kfd.fd] = _Borrowed(fd, kfd.fd, inode, vm_fd, vcpu, layout)

    def _reject(self, vmm: _Vmm, target: int, err: BorrowRejected) -> None:
        """Say it once per VMM, fd and kind of reason: a VMM that flips its fds must not flood the log."""
        self.rejected_fds += 1
        key = f"statsfd-reject:{vmm.pid}:{target}:{err.kind}"
        vmm.said.add(key)
        self.say.first(key, f"kvmfleet: fd {target} of pid {vmm.pid} rejected and closed: {err}")

    def _release(self, vmm: _Vmm, target: int) -> None:
        held = vmm.borrowed.pop(target)
        os.close(held.fd)
        vmm.replan(self._descs_for)
        self._host_plan = None

    def _retire(self, pid: int) -> None:
        vmm = self._vmms.pop(pid)
        self._host_plan = None
        self._unsettled.add(pid)  # its pid may be reused before the next listing
        for target in list(vmm.borrowed):
            self._release(vmm, target)
        self._poller.unregister(vmm.pidfd)
        del self._pid_of_pidfd[vmm.pidfd]
        os.close(vmm.pidfd)
        for key in vmm.said:
            self.say.forget(key)

    def _reap_exited(self) -> None:
        """One poll over every pidfd: a pidfd turns readable when its process exits."""
        if not self._vmms:
            return
        for pidfd, _events in self._poller.poll(0):
            self._retire(self._pid_of_pidfd[pidfd])

    # -- reading -----------------------------------------------------------------------------
    def read(self) -> list[VMReading]:
        if not self._static:
            self._usability = self._static
            self.say("statsfd", f"kvmfleet: statsfd source unusable: {self._usability.reason}")
            return []
        self._reap_exited()
        self._discover(self._clock())
        readings = self._read_all()
        self._update_usability(readings)
        return readings

    def _drop_failed(self, pid: int, doing: str, err: Exception) -> None:
        """An unexpected error with one VMM: said once, its fds closed (it is scanned again later); the other
        VMMs are read as usual."""
        self.say.first(f"statsfd-error:{pid}:{doing}",
                       f"kvmfleet: {doing} pid {pid} failed, its fds closed: {type(err).__name__}: {err}")
        if pid in self._vmms:
            self._retire(pid)
        self._note_other(pid, 0, self._clock())  # looked at again after rescan_s, not at every sample

    def _read_all(self) -> list[VMReading]:
        """Every VM by the host plan, or VMM by VMM where that fails."""
        plan = self._host_plan
        if plan is None:
            plan = self._host_plan = _HostPlan(list(self._vmms.values()))
        try:
            readings = self._read_planned(plan)
        except Exception:  # whatever it was, the VMM by VMM path finds the VMM and says what
            readings = None
        return readings if readings is not None else self._read_each()

    def _read_planned(self, plan: _HostPlan) -> list[VMReading] | None:
        """One pread per borrowed fd, by the host plan; hot: runs for every fd of every sample. None if an fd
        failed or returned less than its data block: :meth:`_read_each` then reads again VMM by VMM and fd by fd
        and drops what failed."""
        try:
            data = list(map(os.pread, plan.fds, plan.sizes, plan.offsets))
        except OSError:
            return None
        if list(map(len, data)) != plan.sizes:
            return None
        blocks = list(map(StatBlock, plan.shapes, repeat(None), data))
        name = self.name
        return [VMReading(identity, name, blocks[vm_at] if vm_at >= 0 else {}, dict(zip(vcpu_ids, pick_vcpus(blocks))),
                          descs)
                for identity, descs, vm_at, vcpu_ids, pick_vcpus in plan.per_vm]

    def _read_each(self) -> list[VMReading]:
        readings = []
        for vmm in list(self._vmms.values()):
            try:
                readings.extend(self._read_vmm_checked(vmm))
            except Exception as err:  # one VMM's trouble, not the host's
                self._drop_failed(vmm.pid, "reading", err)
        return readings

    def _read_vmm_checked(self, vmm: _Vmm) -> list[VMReading]:
        """One VMM fd by fd: an fd that fails or returns less than its data block is said and dropped."""
        per_vm = {vm_fd: VMReading(identity, self.name, descs=vmm.descs[vm_fd])
                  for vm_fd, identity in vmm.identities.items()}
        pread, from_data = os.pread, StatBlock.from_data
        failed = []
        for target, fd, size, offset, shape, vcpu, vm_fd in vmm.plan:
            try:
                data = pread(fd, size, offset)
                if len(data) < size:
                    raise StatsFormatError(f"stats data truncated: {len(data)} of {size} bytes")
            except (OSError, StatsFormatError) as err:
                self.say(f"statsfd-read:{vmm.pid}:{target}",
                         f"kvmfleet: stats fd {target} of pid {vmm.pid} failed, dropped: {err}")
                failed.append(target)
                continue
            if vcpu < 0:
                per_vm[vm_fd].vm_stats = from_data(shape, data)
            else:
                per_vm[vm_fd].vcpus[vcpu] = from_data(shape, data)
        for target in failed:
            self._release(vmm, target)
        return [reading for reading in per_vm.values() if reading.vm_stats or reading.vcpus]

    def _descs_for(self, shapes: frozenset[Shape]) -> dict[str, StatDesc]:
        """One shared descriptor map per combination of layouts (in practice: one per host)."""
        descs = self._descs_cache.get(shapes)
        if descs is None:
            descs = self._descs_cache[shapes] = {}
            for shape in shapes:
                descs.update(shape.descs)
        return descs

    def _update_usability(self, readings: list[VMReading]) -> None:
        if readings:
            self._usability = Usability(True, f"{len(readings)} VMs with stats fds")
            self.say.forget("statsfd")
            return
        if self._denied:
            reason = self._denied
        elif self._vmms:
            reason = (f"{len(self._vmms)} VMMs hold no KVM stats fds (QEMU < 8.1 keeps none; "
                      "Linux < 5.14 has none)")
        else:
            self._usability = Usability(True, "no VMs running")
            return
        self._usability = Usability(False, reason)
        self.say("statsfd", f"kvmfleet: statsfd source unusable: {reason}")

    def vmm_pids(self) -> set[int]:
        return set(self._vmms)

    def close(self) -> None:
        for pid in list(self._vmms):
            self._retire(pid)

