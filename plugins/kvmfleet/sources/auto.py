"""``auto``: per VM, the best source that works on this host.

VM-level counters come from debugfs where it is readable (its per-VM directory already sums the
vCPUs); otherwise from the VM stats fd a VMM holds, else from libvirt's VM stats group (QEMU keeps no
VM stats fd, so under lockdown libvirt is the only way to them). Per-vCPU counters come from borrowed
vCPU stats fds where the VMM holds them (one ``pread`` each, against a QMP round trip through
libvirtd), else from libvirt. A VM seen by several sources is one VM (matched by its QEMU pid and VM
fd, by pid, or by UUID); its ``source`` says what was combined (``libvirt+statsfd``), and the choice
is logged once per VM. libvirt is not asked at all while debugfs reads. A VM that debugfs names but
no source can read is still reported (empty stats, source ``none``) so an operator sees it exists; it, and a VM
read without its vCPUs, has them counted from debugfs's ``vcpuN`` directories, which lockdown lets us list.
Why a source is unusable is logged once per reason.
"""

from __future__ import annotations

import logging
from collections.abc import Container

from ..logsay import SayOnce
from ..model import Usability, VMKey, VMReading
from ..textsafe import for_terminal, shortened
from .base import Source
from .debugfs import DebugfsSource
from .libvirt import DEFAULT_URI, LibvirtSource
from .statsfd import StatsfdSource


class AutoSource(Source):
    name = "auto"

    def __init__(self, debugfs: DebugfsSource | None = None, statsfd: StatsfdSource | None = None,
                 say: SayOnce | None = None, only_pids: Container[int] | None = None,
                 libvirt: LibvirtSource | None = None, libvirt_uri: str = DEFAULT_URI) -> None:
        """``only_pids`` restricts every part to those VMM processes (selftest, tests)."""
        self.say = say or SayOnce()
        self.only_pids = only_pids
        self.debugfs = debugfs or DebugfsSource(say=self.say)
        self.statsfd = statsfd or StatsfdSource(say=self.say, only_pids=only_pids)
        self.libvirt = libvirt or LibvirtSource(libvirt_uri, say=self.say, only_pids=only_pids, optional=True)
        self._libvirt_asked = False

    def usability(self) -> Usability:
        parts = self.sources_used()
        usable = [name for name, state in parts.items() if state]
        reasons = "; ".join(f"{name}: {state.reason}" for name, state in parts.items())
        return Usability(bool(usable), reasons)

    def sources_used(self) -> dict[str, Usability]:
        used = {self.debugfs.name: self.debugfs.usability(), self.statsfd.name: self.statsfd.usability()}
        libvirt = self.libvirt.usability()
        if not self._libvirt_asked and libvirt:
            libvirt = Usability(True, "not needed: debugfs reads every VM")
        used[self.libvirt.name] = libvirt
        return used

    def read(self) -> list[VMReading]:
        from_debugfs = {_match_key(r.identity.key): r for r in self.debugfs.read() if self._wanted(r.identity.key.pid)}
        listed = [(pid, fd) for pid, fd in self.debugfs.listed_vms() if self._wanted(pid)]
        self.statsfd.hint({pid for pid, _ in listed} - self.statsfd.vmm_pids())
        from_statsfd = {_match_key(r.identity.key): r for r in self.statsfd.read()}
        # a VMM that closed its VM fd (vm_fd -1 in statsfd) still matches debugfs by pid alone
        by_pid = {key[0]: reading for key, reading in from_statsfd.items() if key[1] == -1}

        merged: list[VMReading] = []
        used: set[int] = set()  # id() of the statsfd readings merged into a debugfs one
        for key, dbg in from_debugfs.items():
            fds = from_statsfd.get(key) or by_pid.get(key[0])
            if fds is not None:
                used.add(id(fds))
                dbg.vcpus = fds.vcpus  # per-vCPU detail; the debugfs totals already include it
                dbg.descs = {**fds.descs, **dbg.descs}
                dbg.source = "debugfs+statsfd"
            merged.append(dbg)
        rest = [r for r in from_statsfd.values() if id(r) not in used]
        self._libvirt_asked = not self.debugfs.usability()
        merged.extend(self._with_libvirt(rest) if self._libvirt_asked else rest)
        seen = {_match_key(r.identity.key) for r in merged} | {(r.identity.key.pid, -1) for r in merged}
        merged.extend(self._unreadable(listed, seen))
        self._count_vcpus(merged, listed)
        return merged

    def _count_vcpus(self, readings: list[VMReading], listed: list[tuple[int, int]]) -> None:
        """A VM read without any vCPU (debugfs locked down and no vCPU stats fds, or no source at all) still has
        its vCPUs counted from debugfs's listing, which lockdown allows."""
        dirs_of: dict[int, list[int]] = {}
        for pid, vm_fd in listed:
            dirs_of.setdefault(pid, []).append(vm_fd)
        for reading in readings:
            if reading.vcpus or reading.vcpus_listed is not None:
                continue
            key = reading.identity.key
            fds = dirs_of.get(key.pid, [])
            # a VMM that closed its VM fd (vm_fd -1) has one VM: its pid's only directory
            if key.vm_fd in fds:
                reading.vcpus_listed = self.debugfs.vcpus_listed(key.pid, key.vm_fd)
            elif key.vm_fd == -1 and len(fds) == 1:
                reading.vcpus_listed = self.debugfs.vcpus_listed(key.pid, fds[0])

    def _with_libvirt(self, from_statsfd: list[VMReading]) -> list[VMReading]:
        """Debugfs unreadable: VM-level counters from libvirt, per-vCPU ones from held stats fds where the VMM
        has them (cheaper), else from libvirt too; statsfd readings libvirt does not know stay as they are."""
        with_vcpus = {r.identity.key.pid for r in from_statsfd if r.vcpus}
        from_libvirt = self.libvirt.read_groups(lambda pid: pid not in with_vcpus)
        if not from_libvirt:
            return from_statsfd
        by_key = {_match_key(r.identity.key): r for r in from_statsfd}
        by_pid = {r.identity.key.pid: r for r in from_statsfd}
        by_uuid = {r.identity.uuid: r for r in from_statsfd if r.identity.uuid}
        merged: list[VMReading] = []
        used: set[int] = set()
        for lvr in from_libvirt:
            key = lvr.identity.key
            fds = by_key.get(_match_key(key)) or by_pid.get(key.pid) or by_uuid.get(lvr.identity.uuid or "")
            if fds is not None and id(fds) not in used:
                used.add(id(fds))
                if fds.vm_stats:  # a VMM that holds its VM stats fd: a pread beats a QMP round trip
                    lvr.vm_stats = fds.vm_stats
                if fds.vcpus:
                    lvr.vcpus = fds.vcpus
                lvr.descs = {**lvr.descs, **fds.descs}  # the kernel's descriptors carry units
                lvr.source = "libvirt+statsfd"
            self.say(f"auto-choice:{lvr.identity.uuid}:{key.pid}",
                     f"kvmfleet: VM {for_terminal(shortened(lvr.identity.name, 80))} (pid {key.pid}): VM-level "
                     "counters from "
                     f"{'statsfd' if fds is not None and fds.vm_stats else 'libvirt'}, per-vCPU counters from "
                     f"{'statsfd (held stats fds)' if fds is not None and fds.vcpus else 'libvirt'}",
                     logging.INFO)
            merged.append(lvr)
        merged.extend(r for r in from_statsfd if id(r) not in used)
        return merged

    def _wanted(self, pid: int) -> bool:
        return self.only_pids is None or pid in self.only_pids

    def _unreadable(self, listed: list[tuple[int, int]], seen: set[tuple[int, int]]) -> list[VMReading]:
        """VMs debugfs names that no source could read: reported with no stats."""
        found = []
        for pid, vm_fd in listed:
            if (pid, vm_fd) in seen or (pid, -1) in seen:
                continue
            identity = self.debugfs.identity(pid, vm_fd)
            if identity is None:
                continue
            self.say(f"auto-none:{pid}-{vm_fd}",
                     f"kvmfleet: VM {for_terminal(shortened(identity.name, 80))} (pid {pid}) has no readable source: "
                     f"{self.usability().reason}")
            found.append(VMReading(identity, "none"))
        return found

    def close(self) -> None:
        self.debugfs.close()
        self.statsfd.close()
        self.libvirt.close()


def _match_key(key: VMKey) -> tuple[int, int]:
    return key.pid, key.vm_fd
