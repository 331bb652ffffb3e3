"""The audit rules, each one unit (:class:`~.base.RuleUnit`), registered once in :data:`REGISTRY`.

The thresholds, severities and texts of each rule are in ``querypack/rules.yaml``; a unit holds the rest: its
screen, its evaluation, the detail query it needs, the VM columns it shows. Which rules exist, which detail
queries and VM columns an audit needs: all of it comes from the registry (a test checks it against rules.yaml).

* :mod:`.base` -- what a unit is (host-wide or fleet-wide) and the helpers the rules share;
* :mod:`.shadow` -- shadow-paging and the nested-shadow derived from it;
* :mod:`.tdp` -- tdp-disabled and tdp-unavailable, judged from the facts;
* :mod:`.threshold` -- emulated-io, irq-injection, insn-emulation, halt-polling: one shape of thresholds;
* :mod:`.storm` -- exit-reason-storm, judged from the exit reasons (kvm_exit_reason);
* :mod:`.exitload` -- exit-load, judged over the whole fleet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ...querypack import Rule
from .base import FLEET, HOST, UNKNOWN_VCPUS, FleetRule, HostRule, RuleUnit
from .exitload import ExitLoad
from .shadow import ShadowPaging
from .storm import ExitReasonStorm
from .tdp import TDPFacts
from .threshold import EmulatedIO, HaltPolling, InsnEmulation, IrqInjection, ThresholdRule

# In the order the rules are judged and their reasons for not judging a host are listed.
REGISTRY: tuple[type[HostRule] | type[FleetRule], ...] = (
    ShadowPaging, TDPFacts, EmulatedIO, IrqInjection, InsnEmulation, HaltPolling, ExitReasonStorm, ExitLoad)


def rule_ids() -> tuple[str, ...]:
    """Every rule id the registry gives findings under."""
    return tuple(rid for unit in REGISTRY for rid in unit.rule_ids())


def wanted_rules(only: Sequence[str] | None) -> set[str]:
    """The rule ids an audit of ``only`` (None: all) reports: those, and the rules derived from them."""
    wanted = set(only) if only else set(rule_ids())
    for unit in REGISTRY:
        if unit.id in wanted:
            wanted.update(unit.derived)
    return wanted


@dataclass
class Units:
    """The units one audit runs, made with its rules (thresholds as overridden), in registry order."""

    host: list[HostRule]
    fleet: list[FleetRule]

    @classmethod
    def make(cls, rules: Mapping[str, Rule], wanted: set[str]) -> Units:
        chosen = [unit(rules) for unit in REGISTRY if wanted & set(unit.judges())]
        return cls([u for u in chosen if isinstance(u, HostRule)], [u for u in chosen if isinstance(u, FleetRule)])

    @property
    def all(self) -> list[RuleUnit]:
        return [*self.host, *self.fleet]


__all__ = [
    "FLEET", "HOST", "REGISTRY", "UNKNOWN_VCPUS", "EmulatedIO", "ExitLoad", "ExitReasonStorm", "FleetRule",
    "HaltPolling", "HostRule", "InsnEmulation", "IrqInjection", "RuleUnit", "ShadowPaging", "TDPFacts",
    "ThresholdRule", "Units", "rule_ids", "wanted_rules",
]
