"""tdp-disabled and tdp-unavailable, one evaluation judged from the host's facts (``kvm_host.tdp_state``), each
finding saying whether the shadow-only counters agree."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...querypack import Rule
from ...tdp import TDP_DISABLED, TDP_ENABLED
from ..model import HostData, Outcome, ratio, rounded
from .base import HostRule, fmt
from .shadow import NO_TDP, shadow_events_rate

ANY_TDP = "tdp-*"  # the rule named where a host cannot be judged by either
FACTS = ("tdp_state", "cpu_ept", "cpu_npt", "ept_param", "npt_param", "tdp_mmu", "nested", "is_guest", "kvm_module",
         "lockdown", "vms", "vcpus")


class TDPFacts(HostRule):
    id = "tdp-disabled"
    also = ("tdp-unavailable",)
    needs_facts = True

    def __init__(self, rules: Mapping[str, Rule]) -> None:
        super().__init__(rules)
        self.unavailable = rules["tdp-unavailable"]
        self.shadow = rules["shadow-paging"]  # its floor of shadow events says whether the counters agree

    def screen(self, h: HostData) -> bool:
        return h.has_facts and h.fact("tdp_state") in NO_TDP

    def unpicked(self, h: HostData) -> Outcome | None:
        return self.evaluate(h)  # no facts, or facts without a finding: said all the same

    def evaluate(self, h: HostData) -> Outcome:
        if not h.has_facts:
            return self.skip(h, "no kvm_host facts in the window", ANY_TDP)
        state = h.fact("tdp_state")
        if state == TDP_ENABLED:
            return Outcome()
        if state not in NO_TDP:
            return self.skip(h, f"kvm_host tdp_state={state or 'absent'}", ANY_TDP)
        evidence: dict[str, Any] = {k: h.fact(k) for k in FACTS if h.fact(k) is not None}
        events = shadow_events_rate(h)
        if events is not None:
            evidence["shadow_events_per_s"] = rounded(events)
        if h.rate("exits") is not None:
            evidence["exits_per_s"] = rounded(h.rate("exits"))
        return self._disabled(h, evidence) if state == TDP_DISABLED else self._unavailable(h, evidence)

    def _disabled(self, h: HostData, evidence: dict[str, Any]) -> Outcome:
        cpu = "EPT" if h.fact("cpu_ept") else "NPT" if h.fact("cpu_npt") else "EPT/NPT"
        param = ("kvm_intel.ept=N" if h.fact("ept_param") is False else "kvm_amd.npt=0"
                 if h.fact("npt_param") is False else "the module parameter off")
        notes = [self._agreement(h)]
        if h.fact("cpu_ept") is False and h.fact("cpu_npt") is False:
            notes.append("facts disagree with themselves: tdp_state=disabled but cpu_ept and cpu_npt are false")
        return Outcome([self.finding(h.host, self.rule.severity, f"the CPU offers {cpu} but KVM runs with {param}",
                                     evidence, [], notes)])

    def _unavailable(self, h: HostData, evidence: dict[str, Any]) -> Outcome:
        why = []
        if h.fact("is_guest"):
            why.append("this hypervisor is itself a VM whose parent exposes no EPT/NPT")
        if h.fact("kvm_module") == "kvm_pvm":
            why.append("the KVM backend is kvm_pvm, which has no EPT/NPT")
        if h.fact("cpu_ept") is False and h.fact("cpu_npt") is False and not why:
            why.append("the CPU flags show neither EPT nor NPT")
        summary = "no EPT/NPT: every VM runs on shadow page tables" + (f" ({'; '.join(why)})" if why else "")
        return Outcome([self.finding(h.host, self.unavailable.severity, summary, evidence, [], [self._agreement(h)],
                                     rule=self.unavailable)])

    def _agreement(self, h: HostData) -> str:
        """Whether the shadow-only counters agree with the facts."""
        events = shadow_events_rate(h)
        exits = h.rate("exits")
        if events is None:
            return "the shadow-only counters are not reported, so the counters cannot confirm it"
        if events >= self.shadow.thresholds["min_events_per_s"]:
            return (f"counters agree: {fmt(events)} shadow MMU events/s"
                    + (f" ({fmt(ratio(events, exits))} per exit)" if exits else ""))
        if not exits:
            return "the guests made no exits in the window (no VM running?), so the counters show nothing either way"
        return (f"counters show no shadow MMU work in the window ({fmt(events)} events/s against {fmt(exits)} "
                "exits/s): the guests are idle or do not touch their page tables; the facts still stand")
