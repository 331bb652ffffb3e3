"""``auto``: per VM, the best source that works on this host.

VM-level counters come from debugfs where it is readable (its per-VM directory already sums the
vCPUs), otherwise from the VM stats fd a VMM holds; per-vCPU counters come from borrowed vCPU stats
fds. A VM that debugfs names but no source can read is still reported (empty stats, source
``none``) so an operator sees it exists. Why a source is unusable is logged once per reason.

The parts are kept in a list so a later source (libvirt, QMP) slots in beside them.
"""

from __future__ import annotations

from collections.abc import Container

from ..logsay import SayOnce
from ..model import Usability, VMKey, VMReading
from .base import Source
from .debugfs import DebugfsSource
from .statsfd import StatsfdSource


class AutoSource(Source):
    name = "auto"

    def __init__(self, debugfs: DebugfsSource | None = None, statsfd: StatsfdSource | None = None,
                 say: SayOnce | None = None, only_pids: Container[int] | None = None) -> None:
        """``only_pids`` restricts both parts to those VMM processes (selftest, tests)."""
        self.say = say or SayOnce()
        self.only_pids = only_pids
        self.debugfs = debugfs or DebugfsSource(say=self.say)
        self.statsfd = statsfd or StatsfdSource(say=self.say, only_pids=only_pids)

    def usability(self) -> Usability:
        parts = self.sources_used()
        usable = [name for name, state in parts.items() if state]
        reasons = "; ".join(f"{name}: {state.reason}" for name, state in parts.items())
        return Usability(bool(usable), reasons)

    def sources_used(self) -> dict[str, Usability]:
        return {self.debugfs.name: self.debugfs.usability(), self.statsfd.name: self.statsfd.usability()}

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
        merged.extend(r for r in from_statsfd.values() if id(r) not in used)
        seen = {_match_key(r.identity.key) for r in merged} | {(r.identity.key.pid, -1) for r in merged}
        merged.extend(self._unreadable(listed, seen))
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
                     f"kvmfleet: VM {identity.name} (pid {pid}) has no readable source: "
                     f"{self.usability().reason}")
            found.append(VMReading(identity, "none"))
        return found

    def close(self) -> None:
        self.debugfs.close()
        self.statsfd.close()


def _match_key(key: VMKey) -> tuple[int, int]:
    return key.pid, key.vm_fd
