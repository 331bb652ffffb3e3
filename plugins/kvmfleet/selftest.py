"""``kvmfleet selftest``: prove on this hypervisor that each usable source reads exact counts.

A tiny real VM runs in a child process that holds its stats fds the way QEMU >= 8.1 does, executes
a known number of ``hlt`` per vCPU, then stops running. Every source that says it is usable must
then read exactly that many ``halt_exits`` per vCPU and per VM; a source that is unusable says why.
The test passes when at least one source is usable and no usable source is wrong, and it also
checks that borrowed fds are released once the VM is gone.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from .collector import vm_sample
from .logsay import SayOnce
from .procfs import borrowed_fd_count
from .sources import AutoSource, DebugfsSource, Source, StatsfdSource

COUNTER = "halt_exits"


@dataclass
class Check:
    source: str
    status: str  # "ok", "wrong", "unusable"
    detail: str


@dataclass
class SelftestResult:
    checks: list[Check] = field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        if self.error:
            return False
        statuses = [check.status for check in self.checks]
        return "ok" in statuses and "wrong" not in statuses

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "error": self.error,
                "checks": [{"source": c.source, "status": c.status, "detail": c.detail} for c in self.checks]}

    def text(self) -> str:
        lines = [f"{check.source:<8} {check.status:<9} {check.detail}" for check in self.checks]
        if self.error:
            lines.append(f"error: {self.error}")
        if self.ok:
            lines.append("selftest passed: kvmfleet can collect KVM statistics on this host")
        elif not self.error:
            usable = [c for c in self.checks if c.status != "unusable"]
            lines.append("selftest FAILED: " + ("a source read wrong counts" if usable else
                                                 "no source can read KVM statistics on this host"))
        return "\n".join(lines)


def _sources(pid: int, say: SayOnce) -> list[Source]:
    """Each source, looking only at the test VM where it can (a real host may run hundreds of VMs)."""
    return [StatsfdSource(only_pids={pid}, say=say), DebugfsSource(say=say), AutoSource(say=say, only_pids={pid})]


def _check_source(source: Source, pid: int, loops: int, vcpus: int) -> Check:
    name = source.name
    with source:
        readings = [r for r in source.read() if r.identity.key.pid == pid]
        state = source.usability()
        if not state.usable:
            return Check(name, "unusable", state.reason)
        if not readings:
            return Check(name, "wrong", f"usable ({state.reason}) but did not see the test VM (pid {pid})")
        vm = vm_sample(readings[0])
        want_vm = loops * vcpus
        got_vm = vm.stats.get(COUNTER)
        problems = []
        if got_vm != want_vm:
            problems.append(f"VM {COUNTER} {got_vm}, expected {want_vm}")
        if vm.vcpus:
            got = {vcpu: stats.get(COUNTER) for vcpu, stats in sorted(vm.vcpus.items())}
            if got != dict.fromkeys(range(vcpus), loops):
                problems.append(f"per-vCPU {COUNTER} {got}, expected {loops} on each of {vcpus}")
        if problems:
            return Check(name, "wrong", "; ".join(problems))
        detail = f"{COUNTER} {got_vm} = {vcpus} vCPUs x {loops}"
        if vm.vcpus:
            detail += ", per vCPU exact"
        return Check(name, "ok", f"{detail} (via {readings[0].source})")


def _check_release(pid: int, stop: Callable[[], object], say: SayOnce) -> Check:
    """The statsfd source must close what it borrowed within one sample of the VMM's exit."""
    with StatsfdSource(only_pids={pid}, say=say) as source:
        before = borrowed_fd_count()
        source.read()
        held = source.held_fds()
        if not source.usability().usable or not held:
            return Check("release", "unusable", "statsfd unusable: nothing borrowed to release")
        stop()
        source.read()
        after = borrowed_fd_count()
        if source.held_fds() or after != before:
            return Check("release", "wrong", f"{held} fds borrowed; {after - before} still open one sample "
                                              "after the VM exited")
        return Check("release", "ok", f"{held} borrowed fds closed one sample after the VM exited")


def run_selftest(loops: int = 1000, vcpus: int = 2, timeout: float = 30.0) -> SelftestResult:
    from .guestvmm import launch

    result = SelftestResult()
    if not os.path.exists("/dev/kvm"):
        result.error = "/dev/kvm is missing: no KVM module loaded, or not passed into this container"
        return result
    name = f"kvmfleet-selftest-{os.getpid()}"
    try:
        guest = launch(name=name, vcpus=vcpus, workload="halt", loops=loops, stats_fds="all",
                       uuid=str(uuid.uuid4()))
    except Exception as err:  # the VMM reports every failure as one line: show it
        result.error = f"could not start the test VM: {err}"
        return result
    try:
        guest.wait_ready(timeout)
        say = SayOnce(quiet=True)  # the result lines say why a source is unusable
        for source in _sources(guest.pid, say):
            result.checks.append(_check_source(source, guest.pid, loops, vcpus))
        result.checks.append(_check_release(guest.pid, guest.stop, say))
    except Exception as err:
        result.error = f"test VM failed: {err}"
    finally:
        guest.stop()
    return result
