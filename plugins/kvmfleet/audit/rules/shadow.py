"""shadow-paging, and nested-shadow derived from it: do the guests run on shadow page tables?

The shadow-only counters (mmu_pte_write, mmu_flooded, mmu_pde_zapped, invlpg) move only when KVM shadows guest
page tables: a host without EPT/NPT, or nested (L2) guests. The evaluation decides which of the two the numbers
and the facts point at (docs/queries.md walks through every case). Where the host counts exit reasons, they are a
second, independent witness (:func:`~kvmfleet.audit.reasons.paging_witness`): the finding says whether they
corroborate the counters; they never change its severity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...querypack import Rule
from ...tdp import TDP_DISABLED, TDP_ENABLED, TDP_UNKNOWN, TDP_UNSUPPORTED
from ..model import Finding, HostData, Outcome, VMData, ratio
from ..reasons import SHOWS_ABSENT, SHOWS_BOTH, SHOWS_NEITHER, SHOWS_SHADOW, SHOWS_TDP, PagingWitness, paging_witness
from .base import HostRule, fmt, ge, ge_or_unknown, known, level, total, vm_rows

SHADOW_FIELDS = ("mmu_pte_write", "mmu_flooded", "mmu_pde_zapped", "invlpg")
NO_TDP = (TDP_DISABLED, TDP_UNSUPPORTED)  # the tdp_state of hosts where no guest has EPT/NPT


def shadow_events_rate(h: HostData) -> float | None:
    pte = h.rate("mmu_pte_write")
    if pte is None:
        pte = h.rate("mmu_pte_updated")
    return total([pte, h.rate("mmu_flooded"), h.rate("mmu_pde_zapped"), h.rate("invlpg")])


def _vm_shadow(vm: VMData, span: float | None) -> float | None:
    return total([vm.rate(f, span) for f in SHADOW_FIELDS])


@dataclass
class _Seen:
    """What the evaluation saw on a host with shadow work at a warning level or above."""

    h: HostData
    severity: str
    numbers: str  # the events and their shares, for the summary
    evidence: dict[str, Any]
    vms: list[dict[str, Any]]
    nested: float | None  # nested_run per second
    nested_on: bool  # L2 guests run
    tdp: Any  # tdp_state of the facts (None without facts)
    l1_shadow: list[VMData]  # VMs with shadow work but no L2 entries of their own


class ShadowPaging(HostRule):
    id = "shadow-paging"
    derived = ("nested-shadow",)
    detail_query = "shadow_paging"
    vm_columns = ("mmu_pte_write", "invlpg", "mmu_flooded", "mmu_pde_zapped", "pf_guest", "nested_run",
                  "mmu_unsync", "exits")
    needs_facts = True
    names_exit_reasons = True

    def __init__(self, rules: Mapping[str, Rule]) -> None:
        super().__init__(rules)
        self.nested_rule = rules["nested-shadow"]

    def screen(self, h: HostData) -> bool:
        events = total([h.rate("mmu_pte_write"), h.rate("invlpg")])
        return events is not None and events >= 0.25 * self.rule.thresholds["min_events_per_s"]

    def unpicked(self, h: HostData) -> Outcome | None:
        if h.span_s is not None and not h.has("mmu_pte_write") and not h.has("invlpg"):
            return self.skip(h, "neither mmu_pte_write nor invlpg is reported")
        return None

    def evaluate(self, h: HostData) -> Outcome:
        th = self.rule.thresholds
        events = shadow_events_rate(h)
        if events is None:
            return self.skip(h, "none of mmu_pte_write, mmu_flooded, mmu_pde_zapped, invlpg is reported")
        if events < th["min_events_per_s"]:
            return Outcome()
        per_exit = ratio(events, h.rate("exits"))
        per_vcpu = h.per_vcpu(events)
        warning = ge(per_exit, th["warning_per_exit"]) or ge(per_vcpu, th["warning_per_vcpu_s"]) or (
            per_exit is None and per_vcpu is None)  # shadow events with neither exits nor vCPUs known: still shadow
        critical = ge(per_exit, th["critical_per_exit"]) and ge_or_unknown(per_vcpu, th["critical_per_vcpu_s"])
        severity = level(warning, critical)
        if severity is None:
            return Outcome()
        finding = self._verdict(self._seen(h, severity, events, per_exit, per_vcpu))
        witness = paging_witness(h)
        if witness is not None:
            self._witnessed(finding, witness)
        return Outcome([finding])

    def _witnessed(self, f: Finding, w: PagingWitness) -> None:
        """What the exit reasons say, in the evidence and the summary; the severity stays (the counters are exact
        counts of shadow work; the reasons a second witness that may cover less: a restarted agent, a source
        switched on late)."""
        evidence = w.evidence()
        shows = w.shows
        if f.rule == self.rule.id:
            corroborates = {SHOWS_SHADOW: "yes", SHOWS_ABSENT: "absent"}.get(shows, "no")
            evidence["corroborates"] = corroborates
            text = {
                SHOWS_SHADOW: f"exit reasons corroborate: {w.numbers(SHOWS_SHADOW)}, no {w.names(SHOWS_TDP)} exits",
                SHOWS_TDP: f"exit reasons do not corroborate: {w.numbers(SHOWS_TDP)} (guest memory mapped through "
                           f"EPT/NPT) and no {w.names(SHOWS_SHADOW)} exits",
                SHOWS_BOTH: f"exit reasons do not corroborate: {w.numbers(SHOWS_TDP)} (guest memory mapped through "
                            f"EPT/NPT) alongside {w.numbers(SHOWS_SHADOW)}",
                SHOWS_NEITHER: f"exit reasons do not corroborate: no {w.names(SHOWS_SHADOW)} exits among the "
                               f"{w.isa} exit reasons",
                SHOWS_ABSENT: "no kvm_exit reasons for this host (the tracepoint did not fire, or was not counted): "
                              "the counters are the only witness",
            }[shows]
            if corroborates == "no":
                f.notes.append("the exit reasons contradict the MMU counters: check whether EPT/NPT was switched on "
                               "or off during the window (module reloaded, facts stale), whether L2 guests run, and "
                               "whether the agent counted reasons for the whole window")
        else:  # nested-shadow: L1 on EPT/NPT shows its EPT/NPT exits, L2's shadow work does not exit to L0 as such
            text = f"exit reasons show {shows}" + (
                f": {w.numbers(SHOWS_TDP) or w.numbers(SHOWS_SHADOW)}" if shows not in (SHOWS_ABSENT, SHOWS_NEITHER)
                else "")
        f.evidence["paging_witness"] = evidence
        f.summary = f"{f.summary}; {text}"

    def _seen(self, h: HostData, severity: str, events: float, per_exit: float | None, per_vcpu: float | None
              ) -> _Seen:
        th = self.rule.thresholds
        nested = h.rate("nested_run")
        tdp = h.fact("tdp_state") if h.has_facts else None
        span = h.span_s
        l1_shadow = [vm for vm in h.vms.values() if (_vm_shadow(vm, span) or 0) >= th["min_events_per_s"]
                     and not ((vm.rate("nested_run", span) or 0) >= th["nested_run_min_per_s"])
                     and vm.increases.get("nested_run") is not None]
        numbers = (f"{fmt(events)} shadow MMU events/s ({fmt(per_exit)} per exit"
                   + (f", {fmt(per_vcpu)} per vCPU-s" if per_vcpu is not None else "") + ")")
        return _Seen(h, severity, numbers, self._evidence(h, events, per_exit, per_vcpu, tdp),
                     vm_rows(h, lambda vm: _vm_shadow(vm, span), self.vm_columns), nested,
                     nested is not None and nested >= th["nested_run_min_per_s"], tdp, l1_shadow)

    @staticmethod
    def _evidence(h: HostData, events: float, per_exit: float | None, per_vcpu: float | None, tdp: Any
                  ) -> dict[str, Any]:
        exits = h.rate("exits")
        return known({
            "shadow_events_per_s": events,
            "shadow_events_per_exit": per_exit,
            "shadow_events_per_vcpu_s": per_vcpu,
            "mmu_pte_write_per_s": h.rate("mmu_pte_write") if h.has("mmu_pte_write") else h.rate("mmu_pte_updated"),
            "invlpg_per_s": h.rate("invlpg"),
            "mmu_flooded_per_s": h.rate("mmu_flooded"),
            "mmu_pde_zapped_per_s": h.rate("mmu_pde_zapped"),
            "mmu_unsync": h.instant.get("mmu_unsync"),
            "pf_guest_per_s": h.rate("pf_guest"),
            "pf_guest_per_exit": ratio(h.rate("pf_guest"), exits),
            "exits_per_s": exits,
            "nested_run_per_s": h.rate("nested_run"),
            "pf_fixed_per_s": h.rate("pf_fixed"),
            "mmu_shadow_zapped_per_s": h.rate("mmu_shadow_zapped"),
            "mmu_cache_miss_per_s": h.rate("mmu_cache_miss"),
            "vcpus": h.vcpus,
            "tdp_state": tdp,
        })

    def _verdict(self, s: _Seen) -> Finding:
        if s.tdp in NO_TDP:
            return self._no_tdp(s)
        nested_explains = s.nested_on or (s.nested is None and s.tdp == TDP_ENABLED and s.h.fact("nested") is True)
        if nested_explains and not (s.tdp != TDP_ENABLED and s.l1_shadow):
            return self._nested(s)
        return self._shadow(s)

    def _no_tdp(self, s: _Seen) -> Finding:
        """The facts say no guest has EPT/NPT: shadow paging, whatever nested_run says."""
        notes = []
        if s.nested_on:
            notes.append(f"nested_run moves ({fmt(s.nested)}/s): part of the shadow work may belong to L2 guests, "
                         "but the host has no EPT/NPT for any guest")
        return self.finding(s.h.host, s.severity, f"{s.numbers}; kvm_host says tdp_state={s.tdp}: counters and "
                            "facts agree", s.evidence, s.vms, notes)

    def _nested(self, s: _Seen) -> Finding:
        """L2 guests explain the shadow work: nested-shadow (info)."""
        why = (f"nested_run {fmt(s.nested)}/s" if s.nested_on else "nested_run is not reported but kvm_host says "
               "nested=true")
        notes = []
        if s.tdp == TDP_ENABLED:
            notes.append("kvm_host says EPT/NPT is enabled: the shadow work is the L2 guests' (expected)")
            if s.l1_shadow:
                notes.append("counters and facts disagree for VMs without L2 entries that still do shadow work: "
                             + ", ".join(vm.vm for vm in s.l1_shadow[:5]))
        elif s.tdp is None or s.tdp == TDP_UNKNOWN:
            notes.append("no EPT/NPT facts for this host: if its L1 guests ran on shadow paging too, the per-VM "
                         "detail (kvm_vm) would show VMs with shadow work and no nested_run")
        return self.finding(s.h.host, "info", f"{s.numbers} with {why}: L2 guests' page tables are shadowed",
                            s.evidence, s.vms, notes, rule=self.nested_rule)

    def _shadow(self, s: _Seen) -> Finding:
        """Shadow paging from the counters, with what the facts say about it."""
        notes = []
        if s.tdp == TDP_ENABLED:
            notes.append("counters and facts disagree: kvm_host says tdp_state=enabled, yet shadow-only counters "
                         "move " + ("and no VM runs L2 guests" if s.nested is not None else
                                    "(nested_run is not reported)")
                         + "; the facts may be stale (module reloaded since) or L2 guests are not counted")
        elif s.tdp is None:
            notes.append("no kvm_host facts: judged from the counters alone")
        elif s.tdp == TDP_UNKNOWN:
            notes.append("kvm_host tdp_state=unknown: judged from the counters alone")
        vms = s.vms
        if s.l1_shadow and s.nested_on:
            names = {vm.vm for vm in s.l1_shadow}
            notes.append("VMs doing shadow work without L2 entries: " + ", ".join(vm.vm for vm in s.l1_shadow[:5]))
            vms = [r for r in vms if r["vm"] in names] or vms
        return self.finding(s.h.host, s.severity, s.numbers, s.evidence, vms, notes)
