"""The rules judged by thresholds on a few numbers of a host: emulated-io, irq-injection, insn-emulation,
halt-polling.

They share one shape, said once in :class:`ThresholdRule`: the host's *numbers*; *gates* in order (a number that
must be known, else the host is not judged; a floor below which there is nothing to judge); the *tests* of the
warning and critical levels (every test of a level must hold; a threshold ``<level>_<suffix>`` of rules.yaml);
then evidence, the VMs with the largest share and a summary. The screen is the floor and the warning tests known
from the fleet-wide numbers. Each rule says only its numbers, gates, tests and texts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ...querypack import Rule
from ..model import HostData, Outcome, VMData, ratio
from .base import UNKNOWN_VCPUS, HostRule, fmt, ge, ge_or_unknown, known, level, total, vm_rows

Numbers = dict[str, "float | None"]


@dataclass(frozen=True)
class Need:
    """The number must be known, else the host is listed as not judged for ``reason``."""

    number: str
    reason: str


@dataclass(frozen=True)
class Floor:
    """Below the threshold ``threshold`` the number gives nothing to judge."""

    number: str
    threshold: str


@dataclass(frozen=True)
class Test:
    """One condition of a level: ``number`` >= the threshold ``<level>_<suffix>``."""

    number: str
    suffix: str
    unknown_passes: bool = False  # an unknown number (no vCPU count) does not stop the level
    screened: bool = True  # known from the fleet-wide numbers: part of the screen


class ThresholdRule(HostRule):
    gates: ClassVar[tuple[Need | Floor, ...]]
    tests: ClassVar[tuple[Test, ...]]

    def __init__(self, rules: Mapping[str, Rule]) -> None:
        super().__init__(rules)
        self._checks_made: dict[tuple[str, bool], list[tuple[str, Any, Any]]] = {}

    def numbers(self, h: HostData) -> Numbers:
        raise NotImplementedError

    def vm_metric(self, vm: VMData, span: float | None) -> float | None:
        """What orders the VMs of a finding."""
        raise NotImplementedError

    def evidence(self, h: HostData, n: Numbers) -> dict[str, Any]:
        raise NotImplementedError

    def summary(self, h: HostData, n: Numbers) -> str:
        raise NotImplementedError

    def notes(self, h: HostData, n: Numbers) -> list[str]:
        return []

    def _holds(self, lvl: str, n: Numbers, screen: bool = False) -> bool:
        return all(compare(n[number], limit) for number, compare, limit in self._checks(lvl, screen))

    def _checks(self, lvl: str, screen: bool) -> list[tuple[str, Any, Any]]:
        """(number, comparison, threshold) of each test of a level, made once per rule: the screen asks them of
        every host of the fleet."""
        checks = self._checks_made.get((lvl, screen))
        if checks is None:
            th = self.rule.thresholds
            checks = self._checks_made[(lvl, screen)] = [
                (t.number, ge_or_unknown if t.unknown_passes else ge, th[f"{lvl}_{t.suffix}"])
                for t in self.tests if t.screened or not screen]
        return checks

    def screen(self, h: HostData) -> bool:
        n = self.numbers(h)
        th = self.rule.thresholds
        return all(ge(n[g.number], th[g.threshold]) for g in self.gates if isinstance(g, Floor)) and self._holds(
            "warning", n, screen=True)

    def evaluate(self, h: HostData) -> Outcome:
        n = self.numbers(h)
        for gate in self.gates:
            if isinstance(gate, Need) and n[gate.number] is None:
                return self.skip(h, gate.reason)
            if isinstance(gate, Floor) and not ge(n[gate.number], self.rule.thresholds[gate.threshold]):
                return Outcome()
        severity = level(self._holds("warning", n), self._holds("critical", n))
        if severity is None:
            return Outcome()
        span = h.span_s
        vms = vm_rows(h, lambda vm: self.vm_metric(vm, span), self.vm_columns)
        return Outcome([self.finding(h.host, severity, self.summary(h, n), known(self.evidence(h, n)), vms,
                                     self.notes(h, n))])


def _pct(share: float | None) -> str:
    return fmt(100 * share if share is not None else None)


def _per_vcpu_text(per_vcpu: float | None) -> str:
    return f", {fmt(per_vcpu)} per vCPU-s" if per_vcpu is not None else ""


# ------------------------------------------------------------------------------------------------ emulated I/O
NO_IO = "neither io_exits nor mmio_exits is reported"
NO_EXITS = "exits is not reported"


class EmulatedIO(ThresholdRule):
    id = "emulated-io"
    detail_query = "emulated_io"
    vm_columns = ("io_exits", "mmio_exits", "exits")
    names_exit_reasons = True
    gates = (Need("io", NO_IO), Need("exits", NO_EXITS), Floor("io", "min_per_s"))
    tests = (Test("share", "share"), Test("per_vcpu", "per_vcpu_s", unknown_passes=True))

    def numbers(self, h: HostData) -> Numbers:
        io = total([h.rate("io_exits"), h.rate("mmio_exits")])
        return {"io": io, "exits": h.rate("exits"), "share": ratio(io, h.rate("exits")), "per_vcpu": h.per_vcpu(io)}

    def vm_metric(self, vm: VMData, span: float | None) -> float | None:
        return total([vm.rate("io_exits", span), vm.rate("mmio_exits", span)])

    def evidence(self, h: HostData, n: Numbers) -> dict[str, Any]:
        return {"io_exits_per_s": h.rate("io_exits"), "mmio_exits_per_s": h.rate("mmio_exits"),
                "io_mmio_share_of_exits": n["share"], "io_mmio_per_vcpu_s": n["per_vcpu"], "exits_per_s": n["exits"],
                "insn_emulation_per_s": h.rate("insn_emulation"), "vcpus": h.vcpus}

    def summary(self, h: HostData, n: Numbers) -> str:
        return (f"{fmt(n['io'])} port I/O + MMIO exits/s, {_pct(n['share'])}% of exits"
                + _per_vcpu_text(n["per_vcpu"]))

    def notes(self, h: HostData, n: Numbers) -> list[str]:
        return [] if n["per_vcpu"] is not None else ["vCPU count unknown: judged by the share of exits alone"]


# ------------------------------------------------------------------------------------------------ interrupts
class IrqInjection(ThresholdRule):
    id = "irq-injection"
    detail_query = "irq_injection"
    vm_columns = ("irq_injections", "io_exits", "mmio_exits")
    needs_vcpus = True
    names_exit_reasons = True
    gates = (Need("inj", "irq_injections is not reported"), Floor("inj", "min_per_s"), Need("io_per", NO_IO),
             Need("per_vcpu", UNKNOWN_VCPUS))
    tests = (Test("per_vcpu", "per_vcpu_s"), Test("io_per", "io_per_injection"))

    def numbers(self, h: HostData) -> Numbers:
        inj = h.rate("irq_injections")
        io = total([h.rate("io_exits"), h.rate("mmio_exits")])
        return {"inj": inj, "per_vcpu": h.per_vcpu(inj), "io_per": ratio(io, inj)}

    def vm_metric(self, vm: VMData, span: float | None) -> float | None:
        return vm.rate("irq_injections", span)

    def evidence(self, h: HostData, n: Numbers) -> dict[str, Any]:
        return {"irq_injections_per_s": n["inj"], "irq_injections_per_vcpu_s": n["per_vcpu"],
                "io_mmio_exits_per_injection": n["io_per"],
                "irq_window_exits_per_injection": ratio(h.rate("irq_window_exits"), n["inj"]),
                "irq_exits_per_s": h.rate("irq_exits"), "request_irq_exits_per_s": h.rate("request_irq_exits"),
                "exits_per_s": h.rate("exits"), "vcpus": h.vcpus}

    def summary(self, h: HostData, n: Numbers) -> str:
        return (f"{fmt(n['inj'])} injected interrupts/s ({fmt(n['per_vcpu'])} per vCPU-s), each followed by "
                f"{fmt(n['io_per'])} port I/O or MMIO exits: the pattern of shared INTx lines")


# ------------------------------------------------------------------------------------------------ emulation
class InsnEmulation(ThresholdRule):
    id = "insn-emulation"
    detail_query = "insn_emulation"
    vm_columns = ("insn_emulation", "mmio_exits", "exits")
    names_exit_reasons = True
    gates = (Need("insn", "insn_emulation is not reported"), Need("exits", NO_EXITS), Floor("insn", "min_per_s"))
    tests = (Test("per_exit", "per_exit"), Test("per_vcpu", "per_vcpu_s", unknown_passes=True))

    def numbers(self, h: HostData) -> Numbers:
        insn = h.rate("insn_emulation")
        return {"insn": insn, "exits": h.rate("exits"), "per_exit": ratio(insn, h.rate("exits")),
                "per_vcpu": h.per_vcpu(insn), "mmio_share": ratio(h.rate("mmio_exits"), insn),
                "pte_share": ratio(h.rate("mmu_pte_write"), insn)}

    def vm_metric(self, vm: VMData, span: float | None) -> float | None:
        return vm.rate("insn_emulation", span)

    def evidence(self, h: HostData, n: Numbers) -> dict[str, Any]:
        return {"insn_emulation_per_s": n["insn"], "insn_emulation_per_exit": n["per_exit"],
                "insn_emulation_per_vcpu_s": n["per_vcpu"], "insn_emulation_fail_per_s": h.rate("insn_emulation_fail"),
                "share_from_mmio_exits": n["mmio_share"], "share_from_shadow_pte_writes": n["pte_share"],
                "exits_per_s": n["exits"], "vcpus": h.vcpus}

    def summary(self, h: HostData, n: Numbers) -> str:
        causes = []
        for share, what in ((n["mmio_share"], "MMIO exits account for"), (n["pte_share"],
                                                                          "shadow page-table writes for")):
            if share is not None and share >= 0.1:
                causes.append(f"{what} {min(100.0, 100 * share):.0f}%")
        return (f"{fmt(n['insn'])} emulated instructions/s, {fmt(n['per_exit'])} per exit"
                + _per_vcpu_text(n["per_vcpu"]) + (f" ({'; '.join(causes)})" if causes else ""))

    def notes(self, h: HostData, n: Numbers) -> list[str]:
        fails = h.rate("insn_emulation_fail")
        return [f"insn_emulation_fail moves ({fmt(fails)}/s): instructions KVM could not emulate"] if fails else []


# ------------------------------------------------------------------------------------------------ halt polling
class HaltPolling(ThresholdRule):
    id = "halt-polling"
    detail_query = "halt_polling"
    vm_columns = ("halt_poll_fail_ns", "halt_poll_success_ns")
    needs_vcpus = True
    gates = (Need("fail_cpus", "halt_poll_fail_ns is not reported (kernel before 5.8?)"),
             Floor("fail_cpus", "min_fail_cpus"), Need("per_vcpu", UNKNOWN_VCPUS))
    # the failed share needs halt_poll_success_ns, which only the detail query reads
    tests = (Test("per_vcpu", "fail_cpu_per_vcpu"), Test("share", "fail_share", screened=False))

    def numbers(self, h: HostData) -> Numbers:
        fail_ns = h.rate("halt_poll_fail_ns")
        fail_cpus = fail_ns / 1e9 if fail_ns is not None else None
        success_ns = h.rate("halt_poll_success_ns")
        share = ratio(fail_ns, total([fail_ns, success_ns]))
        if share is None and success_ns is None:
            share = 1.0
        return {"fail_cpus": fail_cpus, "per_vcpu": h.per_vcpu(fail_cpus), "share": share}

    def vm_metric(self, vm: VMData, span: float | None) -> float | None:
        return vm.rate("halt_poll_fail_ns", span)

    def evidence(self, h: HostData, n: Numbers) -> dict[str, Any]:
        success = h.rate("halt_poll_success_ns")
        return {"failed_poll_cpus": n["fail_cpus"], "failed_poll_cpus_per_vcpu": n["per_vcpu"],
                "failed_share_of_poll_time": n["share"],
                "halt_poll_success_cpus": (success or 0) / 1e9 if h.has("halt_poll_success_ns") else None,
                "successful_poll_ratio": ratio(h.rate("halt_successful_poll"), h.rate("halt_attempted_poll")),
                "halt_poll_invalid_per_s": h.rate("halt_poll_invalid"), "halt_exits_per_s": h.rate("halt_exits"),
                "vcpus": h.vcpus}

    def summary(self, h: HostData, n: Numbers) -> str:
        return (f"{fmt(n['fail_cpus'])} host CPUs burnt in halt polls that ended without a wakeup"
                f" ({fmt(n['per_vcpu'])} per vCPU), {_pct(n['share'])}% of all polling time")

    def notes(self, h: HostData, n: Numbers) -> list[str]:
        return [] if h.has("halt_poll_success_ns") else ["halt_poll_success_ns is not reported: all polling "
                                                         "counted as failed"]
