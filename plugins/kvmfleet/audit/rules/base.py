"""What every audit rule is: a :class:`RuleUnit`, with the arithmetic helpers the rules share.

A unit says which rules of ``querypack/rules.yaml`` it judges (:attr:`~RuleUnit.id`, :attr:`~RuleUnit.also`,
:attr:`~RuleUnit.derived`), its :attr:`~RuleUnit.scope`, the detail query it needs, the ``kvm_vm`` columns its
findings show, whether it needs the hosts' vCPU counts or facts; it is made for one audit with the rules as loaded
(thresholds after the operator's overrides) and keeps its own :class:`~kvmfleet.querypack.Rule`.

* :class:`HostRule` (scope ``host``): a *screen* on the fleet-wide numbers of the first stage picks the hosts that
  need the detail query; *evaluate* judges each picked host with all its numbers, *unpicked* may say something
  about the others.
* :class:`FleetRule` (scope ``fleet``): judged over the whole fleet at once; the hosts it flags get VM detail.

Every function tolerates missing fields (None), zero exits, zero spans and unknown vCPU counts: a host a rule
cannot judge gets a :class:`~kvmfleet.audit.model.Skipped` with the reason instead of a finding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

from ...querypack import Rule
from ...schema import M_VM
from ...severity import capped
from ..model import Finding, FleetOutcome, HostData, Outcome, Skipped, VMData, rounded

HOST = "host"  # screened and judged host by host
FLEET = "fleet"  # judged over the whole fleet at once
UNKNOWN_VCPUS = "vCPU count unknown (no kvm_host vcpus, or 0): the load per vCPU cannot be judged"


class RuleUnit:
    """One audit rule: everything the engine needs to know of it, and its :class:`Rule` from rules.yaml."""

    id: ClassVar[str]  # its rule in rules.yaml
    also: ClassVar[tuple[str, ...]] = ()  # more rules.yaml rules the same evaluation judges (a pair)
    derived: ClassVar[tuple[str, ...]] = ()  # rules.yaml rules ``derived_from`` it: wanted whenever it is
    scope: ClassVar[str]  # HOST or FLEET
    detail_query: ClassVar[str | None] = None  # the pack query with its own numbers, for the hosts it picks
    vm_columns: ClassVar[tuple[str, ...]] = ()  # the vm_counters columns its findings name VMs by
    needs_vcpus: ClassVar[bool] = False  # hosts without a vCPU count are listed as not judged
    needs_facts: ClassVar[bool] = False  # the hosts it picks get every kvm_host fact (host_facts)
    names_exit_reasons: ClassVar[bool] = False  # its findings are about exits: they name the host's top reasons

    def __init__(self, rules: Mapping[str, Rule]) -> None:
        self.rule = rules[self.id]

    @classmethod
    def judges(cls) -> tuple[str, ...]:
        """The rules whose wanting runs this unit."""
        return (cls.id, *cls.also)

    @classmethod
    def rule_ids(cls) -> tuple[str, ...]:
        """Every rule it gives findings under."""
        return (cls.id, *cls.also, *cls.derived)

    def finding(self, host: str, severity: str, summary: str, evidence: dict[str, Any],
                vms: Sequence[dict[str, Any]] = (), notes: Sequence[str] = (), rule: Rule | None = None) -> Finding:
        """A finding of ``rule`` (its own by default), no more severe than the rule allows."""
        rule = rule or self.rule
        return Finding(host, rule.id, capped(severity, rule.severity), rule.title, summary, evidence, list(vms),
                       list(notes), list(rule.counters))

    def skip(self, h: HostData, reason: str, rule_id: str | None = None) -> Outcome:
        return Outcome([], [Skipped(h.host, rule_id or self.id, reason)])


class HostRule(RuleUnit):
    scope = HOST

    def screen(self, h: HostData) -> bool:
        """On the fleet-wide numbers: does ``h`` need this rule's detail?"""
        raise NotImplementedError

    def evaluate(self, h: HostData) -> Outcome:
        """A host the screen picked, with its detail."""
        raise NotImplementedError

    def unpicked(self, h: HostData) -> Outcome | None:
        """What the rule says of a host its screen did not pick (nothing by default)."""
        return None


class FleetRule(RuleUnit):
    scope = FLEET

    def evaluate_fleet(self, hosts: Mapping[str, HostData]) -> FleetOutcome:
        raise NotImplementedError

    def pick(self, hosts: Mapping[str, HostData]) -> list[str]:
        """The hosts it flags on the fleet-wide numbers (they get VM detail before the evaluation)."""
        return sorted({f.host for f in self.evaluate_fleet(hosts).findings})


# ------------------------------------------------------------------------------------------------ arithmetic
def level(warning: bool, critical: bool) -> str | None:
    return "critical" if critical else "warning" if warning else None


def ge(value: float | None, threshold: float) -> bool:
    return value is not None and value >= threshold


def ge_or_unknown(value: float | None, threshold: float) -> bool:
    return value is None or value >= threshold


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        text = f"{value:.3g}"
    elif abs(value) >= 100:
        text = f"{value:,.0f}"
    else:
        text = f"{value:.3g}"
    return text + unit


def total(values: Iterable[float | None]) -> float | None:
    """The sum of the known values; None if none is known."""
    vals = [v for v in values if v is not None]
    return sum(vals) if vals else None


def known(evidence: Mapping[str, Any]) -> dict[str, Any]:
    """Evidence as shown: numbers rounded, unknown ones left out."""
    return {k: rounded(v) for k, v in evidence.items() if v is not None}


# ------------------------------------------------------------------------------------------------ VM detail
def vm_rows(h: HostData, metric: Callable[[VMData], float | None], columns: Sequence[str], limit: int = 5
            ) -> list[dict[str, Any]]:
    """The VMs of ``h`` with the largest ``metric`` (> 0), with their rates of ``columns``."""
    span = h.span_s
    scored = []
    for vm in h.vms.values():
        score = metric(vm)
        if score is not None and score > 0:
            scored.append((score, vm))
    scored.sort(key=lambda sv: (-sv[0], sv[1].vm))
    rows = []
    for _, vm in scored[:limit]:
        row: dict[str, Any] = {"vm": vm.vm}
        for c in columns:
            if c in vm.instant:
                if vm.instant[c] is not None:
                    row[c] = rounded(vm.instant[c])
            elif vm.rate(c, span) is not None:
                row[f"{c}_per_s"] = rounded(vm.rate(c, span))
        if vm.reset:
            row["note"] = "counter reset in the window (VM restarted?): rates understated"
        if vm.source != M_VM:
            row["source"] = vm.source
        rows.append(row)
    if len(scored) > limit:
        rows.append({"vm": f"... and {len(scored) - limit} more"})
    return rows

