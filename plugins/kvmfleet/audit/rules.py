"""The arithmetic of each audit rule (the data, thresholds and texts are in querypack/rules.yaml).

Every rule has a *screen* (``screen_*``), run on the fleet-wide numbers of the first stage to pick the hosts that
need the rule's detail query, and an *evaluation* (``eval_*``) on all the numbers of a host. Both tolerate missing
fields (None), zero exits, zero spans and unknown vCPU counts: a host a rule cannot judge gets a
:class:`~.model.Skipped` with the reason instead of a finding.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..querypack import Rule
from ..severity import capped
from .model import Finding, HostData, Skipped, VMData, ratio, rounded

UNKNOWN_VCPUS = "vCPU count unknown (no kvm_host vcpus, or 0): the load per vCPU cannot be judged"
# Rules that need the host's vCPUs; hosts without them are listed as not judged.
NEEDS_VCPUS = ("irq-injection", "halt-polling")
SHADOW_FIELDS = ("mmu_pte_write", "mmu_flooded", "mmu_pde_zapped", "invlpg")
# The vm_counters columns each rule names VMs by.
VM_COLUMNS: dict[str, tuple[str, ...]] = {
    "shadow-paging": ("mmu_pte_write", "invlpg", "mmu_flooded", "mmu_pde_zapped", "pf_guest", "nested_run",
                      "mmu_unsync", "exits"),
    "emulated-io": ("io_exits", "mmio_exits", "exits"),
    "irq-injection": ("irq_injections", "io_exits", "mmio_exits"),
    "insn-emulation": ("insn_emulation", "mmio_exits", "exits"),
    "halt-polling": ("halt_poll_fail_ns", "halt_poll_success_ns"),
    "exit-load": ("exits",),
}


@dataclass
class Outcome:
    findings: list[Finding]
    skipped: list[Skipped]


def _level(warning: bool, critical: bool) -> str | None:
    return "critical" if critical else "warning" if warning else None


def _ge(value: float | None, threshold: float) -> bool:
    return value is not None and value >= threshold


def _ge_or_unknown(value: float | None, threshold: float) -> bool:
    return value is None or value >= threshold


def _cap(severity: str, rule: Rule) -> str:
    return capped(severity, rule.severity)


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        text = f"{value:.3g}"
    elif abs(value) >= 100:
        text = f"{value:,.0f}"
    else:
        text = f"{value:.3g}"
    return text + unit


def _sum(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) if vals else None


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
        if vm.source != "kvm_vm":
            row["source"] = vm.source
        rows.append(row)
    if len(scored) > limit:
        rows.append({"vm": f"... and {len(scored) - limit} more"})
    return rows


# ------------------------------------------------------------------------------------------------ shadow paging
def shadow_events_rate(h: HostData) -> float | None:
    pte = h.rate("mmu_pte_write")
    if pte is None:
        pte = h.rate("mmu_pte_updated")
    return _sum([pte, h.rate("mmu_flooded"), h.rate("mmu_pde_zapped"), h.rate("invlpg")])


def _vm_shadow(vm: VMData, span: float | None) -> float | None:
    return _sum([vm.rate(f, span) for f in SHADOW_FIELDS])


def screen_shadow(h: HostData, rule: Rule) -> bool:
    events = _sum([h.rate("mmu_pte_write"), h.rate("invlpg")])
    return events is not None and events >= 0.25 * rule.thresholds["min_events_per_s"]


def eval_shadow(h: HostData, rule: Rule, nested_rule: Rule | None = None) -> Outcome:
    th = rule.thresholds
    events = shadow_events_rate(h)
    exits = h.rate("exits")
    if events is None:
        return Outcome([], [Skipped(h.host, rule.id, "none of mmu_pte_write, mmu_flooded, mmu_pde_zapped, invlpg "
                                                     "is reported")])
    if events < th["min_events_per_s"]:
        return Outcome([], [])
    per_exit = ratio(events, exits)
    per_vcpu = h.per_vcpu(events)
    warning = _ge(per_exit, th["warning_per_exit"]) or _ge(per_vcpu, th["warning_per_vcpu_s"]) or (
        per_exit is None and per_vcpu is None)  # shadow events with neither exits nor vCPUs known: still shadow
    critical = _ge(per_exit, th["critical_per_exit"]) and _ge_or_unknown(per_vcpu, th["critical_per_vcpu_s"])
    severity = _level(warning, critical)
    if severity is None:
        return Outcome([], [])
    nested = h.rate("nested_run")
    nested_on = nested is not None and nested >= th["nested_run_min_per_s"]
    tdp = h.fact("tdp_state") if h.has_facts else None
    nested_param = h.fact("nested")
    evidence: dict[str, Any] = {
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
        "nested_run_per_s": nested,
        "pf_fixed_per_s": h.rate("pf_fixed"),
        "mmu_shadow_zapped_per_s": h.rate("mmu_shadow_zapped"),
        "mmu_cache_miss_per_s": h.rate("mmu_cache_miss"),
        "vcpus": h.vcpus,
        "tdp_state": tdp,
    }
    evidence = {k: rounded(v) for k, v in evidence.items() if v is not None}
    span = h.span_s
    notes: list[str] = []
    shadow_vms = vm_rows(h, lambda vm: _vm_shadow(vm, span), VM_COLUMNS["shadow-paging"])
    # VMs with shadow work but no L2 entries of their own
    l1_shadow = [vm for vm in h.vms.values() if (_vm_shadow(vm, span) or 0) >= th["min_events_per_s"]
                 and not ((vm.rate("nested_run", span) or 0) >= th["nested_run_min_per_s"])
                 and vm.increases.get("nested_run") is not None]
    summary_numbers = (f"{_fmt(events)} shadow MMU events/s ({_fmt(per_exit)} per exit"
                       + (f", {_fmt(per_vcpu)} per vCPU-s" if per_vcpu is not None else "") + ")")
    if tdp in ("disabled", "unsupported"):
        if nested_on:
            notes.append(f"nested_run moves ({_fmt(nested)}/s): part of the shadow work may belong to L2 guests, "
                         "but the host has no EPT/NPT for any guest")
        return Outcome([Finding(h.host, rule.id, _cap(severity, rule), rule.title,
                                f"{summary_numbers}; kvm_host says tdp_state={tdp}: counters and facts agree",
                                evidence, shadow_vms, notes, list(rule.counters))], [])
    nested_explains = nested_on or (nested is None and tdp == "enabled" and nested_param is True)
    if nested_explains and not (tdp != "enabled" and l1_shadow):
        nid = nested_rule.id if nested_rule else "nested-shadow"
        title = nested_rule.title if nested_rule else "Nested guests run with shadowed page tables"
        why = (f"nested_run {_fmt(nested)}/s" if nested_on else "nested_run is not reported but kvm_host says "
               "nested=true")
        if tdp == "enabled":
            notes.append("kvm_host says EPT/NPT is enabled: the shadow work is the L2 guests' (expected)")
            if l1_shadow:
                notes.append("counters and facts disagree for VMs without L2 entries that still do shadow work: "
                             + ", ".join(vm.vm for vm in l1_shadow[:5]))
        elif tdp is None or tdp == "unknown":
            notes.append("no EPT/NPT facts for this host: if its L1 guests ran on shadow paging too, the per-VM "
                         "detail (kvm_vm) would show VMs with shadow work and no nested_run")
        return Outcome([Finding(h.host, nid, "info", title, f"{summary_numbers} with {why}: L2 guests' page "
                                "tables are shadowed", evidence, shadow_vms, notes,
                                list(nested_rule.counters if nested_rule else rule.counters))], [])
    if tdp == "enabled":
        notes.append("counters and facts disagree: kvm_host says tdp_state=enabled, yet shadow-only counters move "
                     + ("and no VM runs L2 guests" if nested is not None else "(nested_run is not reported)")
                     + "; the facts may be stale (module reloaded since) or L2 guests are not counted")
    elif tdp is None:
        notes.append("no kvm_host facts: judged from the counters alone")
    elif tdp == "unknown":
        notes.append("kvm_host tdp_state=unknown: judged from the counters alone")
    if l1_shadow and nested_on:
        notes.append("VMs doing shadow work without L2 entries: " + ", ".join(vm.vm for vm in l1_shadow[:5]))
        shadow_vms = [r for r in shadow_vms if r["vm"] in {vm.vm for vm in l1_shadow}] or shadow_vms
    return Outcome([Finding(h.host, rule.id, _cap(severity, rule), rule.title, summary_numbers, evidence,
                            shadow_vms, notes, list(rule.counters))], [])


# ------------------------------------------------------------------------------------------------ TDP facts
def screen_tdp(h: HostData) -> bool:
    return h.has_facts and h.fact("tdp_state") in ("disabled", "unsupported")


def _counter_agreement(h: HostData, shadow_rule: Rule) -> str:
    events = shadow_events_rate(h)
    exits = h.rate("exits")
    if events is None:
        return "the shadow-only counters are not reported, so the counters cannot confirm it"
    if events >= shadow_rule.thresholds["min_events_per_s"]:
        return (f"counters agree: {_fmt(events)} shadow MMU events/s"
                + (f" ({_fmt(ratio(events, exits))} per exit)" if exits else ""))
    if not exits:
        return "the guests made no exits in the window (no VM running?), so the counters show nothing either way"
    return (f"counters show no shadow MMU work in the window ({_fmt(events)} events/s against {_fmt(exits)} "
            "exits/s): the guests are idle or do not touch their page tables; the facts still stand")


def eval_tdp(h: HostData, disabled: Rule, unavailable: Rule, shadow_rule: Rule) -> Outcome:
    if not h.has_facts:
        return Outcome([], [Skipped(h.host, "tdp-*", "no kvm_host facts in the window")])
    state = h.fact("tdp_state")
    if state == "enabled":
        return Outcome([], [])
    if state not in ("disabled", "unsupported"):
        return Outcome([], [Skipped(h.host, "tdp-*", f"kvm_host tdp_state={state or 'absent'}")])
    facts = {k: h.fact(k) for k in ("tdp_state", "cpu_ept", "cpu_npt", "ept_param", "npt_param", "tdp_mmu",
                                    "nested", "is_guest", "kvm_module", "lockdown", "vms", "vcpus")
             if h.fact(k) is not None}
    agreement = _counter_agreement(h, shadow_rule)
    evidence: dict[str, Any] = dict(facts)
    events = shadow_events_rate(h)
    if events is not None:
        evidence["shadow_events_per_s"] = rounded(events)
    if h.rate("exits") is not None:
        evidence["exits_per_s"] = rounded(h.rate("exits"))
    if state == "disabled":
        cpu = "EPT" if h.fact("cpu_ept") else "NPT" if h.fact("cpu_npt") else "EPT/NPT"
        param = ("kvm_intel.ept=N" if h.fact("ept_param") is False else "kvm_amd.npt=0"
                 if h.fact("npt_param") is False else "the module parameter off")
        notes = [agreement]
        if h.fact("cpu_ept") is False and h.fact("cpu_npt") is False:
            notes.append("facts disagree with themselves: tdp_state=disabled but cpu_ept and cpu_npt are false")
        return Outcome([Finding(h.host, disabled.id, disabled.severity, disabled.title,
                                f"the CPU offers {cpu} but KVM runs with {param}", evidence, [], notes,
                                list(disabled.counters))], [])
    # unsupported
    why = []
    if h.fact("is_guest"):
        why.append("this hypervisor is itself a VM whose parent exposes no EPT/NPT")
    if h.fact("kvm_module") == "kvm_pvm":
        why.append("the KVM backend is kvm_pvm, which has no EPT/NPT")
    if h.fact("cpu_ept") is False and h.fact("cpu_npt") is False and not why:
        why.append("the CPU flags show neither EPT nor NPT")
    summary = "no EPT/NPT: every VM runs on shadow page tables" + (f" ({'; '.join(why)})" if why else "")
    return Outcome([Finding(h.host, unavailable.id, unavailable.severity, unavailable.title, summary, evidence,
                            [], [agreement], list(unavailable.counters))], [])


# ------------------------------------------------------------------------------------------------ emulated I/O
def _io_numbers(h: HostData) -> tuple[float | None, float | None, float | None]:
    io = _sum([h.rate("io_exits"), h.rate("mmio_exits")])
    return io, ratio(io, h.rate("exits")), h.per_vcpu(io)


def screen_emulated_io(h: HostData, rule: Rule) -> bool:
    th = rule.thresholds
    io, share, per_vcpu = _io_numbers(h)
    return _ge(io, th["min_per_s"]) and _ge(share, th["warning_share"]) and _ge_or_unknown(
        per_vcpu, th["warning_per_vcpu_s"])


def eval_emulated_io(h: HostData, rule: Rule) -> Outcome:
    th = rule.thresholds
    io, share, per_vcpu = _io_numbers(h)
    if io is None:
        return Outcome([], [Skipped(h.host, rule.id, "neither io_exits nor mmio_exits is reported")])
    if h.rate("exits") is None:
        return Outcome([], [Skipped(h.host, rule.id, "exits is not reported")])
    if not _ge(io, th["min_per_s"]):
        return Outcome([], [])
    warning = _ge(share, th["warning_share"]) and _ge_or_unknown(per_vcpu, th["warning_per_vcpu_s"])
    critical = _ge(share, th["critical_share"]) and _ge_or_unknown(per_vcpu, th["critical_per_vcpu_s"])
    severity = _level(warning, critical)
    if severity is None:
        return Outcome([], [])
    evidence = {k: rounded(v) for k, v in {
        "io_exits_per_s": h.rate("io_exits"), "mmio_exits_per_s": h.rate("mmio_exits"),
        "io_mmio_share_of_exits": share, "io_mmio_per_vcpu_s": per_vcpu, "exits_per_s": h.rate("exits"),
        "insn_emulation_per_s": h.rate("insn_emulation"), "vcpus": h.vcpus}.items() if v is not None}
    span = h.span_s
    vms = vm_rows(h, lambda vm: _sum([vm.rate("io_exits", span), vm.rate("mmio_exits", span)]),
                  VM_COLUMNS["emulated-io"])
    summary = (f"{_fmt(io)} port I/O + MMIO exits/s, {_fmt(100 * share if share is not None else None)}% of exits"
               + (f", {_fmt(per_vcpu)} per vCPU-s" if per_vcpu is not None else ""))
    notes = [] if per_vcpu is not None else ["vCPU count unknown: judged by the share of exits alone"]
    return Outcome([Finding(h.host, rule.id, _cap(severity, rule), rule.title, summary, evidence, vms, notes,
                            list(rule.counters))], [])


# ------------------------------------------------------------------------------------------------ interrupts
def _irq_numbers(h: HostData) -> tuple[float | None, float | None, float | None]:
    inj = h.rate("irq_injections")
    io = _sum([h.rate("io_exits"), h.rate("mmio_exits")])
    return inj, h.per_vcpu(inj), ratio(io, inj)


def screen_irq(h: HostData, rule: Rule) -> bool:
    th = rule.thresholds
    inj, per_vcpu, io_per = _irq_numbers(h)
    return _ge(inj, th["min_per_s"]) and _ge(per_vcpu, th["warning_per_vcpu_s"]) and _ge(
        io_per, th["warning_io_per_injection"])


def eval_irq(h: HostData, rule: Rule) -> Outcome:
    th = rule.thresholds
    inj, per_vcpu, io_per = _irq_numbers(h)
    if inj is None:
        return Outcome([], [Skipped(h.host, rule.id, "irq_injections is not reported")])
    if not _ge(inj, th["min_per_s"]):
        return Outcome([], [])
    if io_per is None:
        return Outcome([], [Skipped(h.host, rule.id, "neither io_exits nor mmio_exits is reported")])
    if per_vcpu is None:
        return Outcome([], [Skipped(h.host, rule.id, UNKNOWN_VCPUS)])
    warning = _ge(per_vcpu, th["warning_per_vcpu_s"]) and _ge(io_per, th["warning_io_per_injection"])
    critical = _ge(per_vcpu, th["critical_per_vcpu_s"]) and _ge(io_per, th["critical_io_per_injection"])
    severity = _level(warning, critical)
    if severity is None:
        return Outcome([], [])
    window_exits = h.rate("irq_window_exits")
    evidence = {k: rounded(v) for k, v in {
        "irq_injections_per_s": inj, "irq_injections_per_vcpu_s": per_vcpu, "io_mmio_exits_per_injection": io_per,
        "irq_window_exits_per_injection": ratio(window_exits, inj), "irq_exits_per_s": h.rate("irq_exits"),
        "request_irq_exits_per_s": h.rate("request_irq_exits"), "exits_per_s": h.rate("exits"),
        "vcpus": h.vcpus}.items() if v is not None}
    span = h.span_s
    vms = vm_rows(h, lambda vm: vm.rate("irq_injections", span), VM_COLUMNS["irq-injection"])
    summary = (f"{_fmt(inj)} injected interrupts/s ({_fmt(per_vcpu)} per vCPU-s), each followed by "
               f"{_fmt(io_per)} port I/O or MMIO exits: the pattern of shared INTx lines")
    notes: list[str] = []
    return Outcome([Finding(h.host, rule.id, _cap(severity, rule), rule.title, summary, evidence, vms, notes,
                            list(rule.counters))], [])


# ------------------------------------------------------------------------------------------------ emulation
def _insn_numbers(h: HostData) -> tuple[float | None, float | None, float | None]:
    insn = h.rate("insn_emulation")
    return insn, ratio(insn, h.rate("exits")), h.per_vcpu(insn)


def screen_insn(h: HostData, rule: Rule) -> bool:
    th = rule.thresholds
    insn, per_exit, per_vcpu = _insn_numbers(h)
    return _ge(insn, th["min_per_s"]) and _ge(per_exit, th["warning_per_exit"]) and _ge_or_unknown(
        per_vcpu, th["warning_per_vcpu_s"])


def eval_insn(h: HostData, rule: Rule) -> Outcome:
    th = rule.thresholds
    insn, per_exit, per_vcpu = _insn_numbers(h)
    if insn is None:
        return Outcome([], [Skipped(h.host, rule.id, "insn_emulation is not reported")])
    if h.rate("exits") is None:
        return Outcome([], [Skipped(h.host, rule.id, "exits is not reported")])
    if not _ge(insn, th["min_per_s"]):
        return Outcome([], [])
    warning = _ge(per_exit, th["warning_per_exit"]) and _ge_or_unknown(per_vcpu, th["warning_per_vcpu_s"])
    critical = _ge(per_exit, th["critical_per_exit"]) and _ge_or_unknown(per_vcpu, th["critical_per_vcpu_s"])
    severity = _level(warning, critical)
    if severity is None:
        return Outcome([], [])
    mmio_share = ratio(h.rate("mmio_exits"), insn)
    pte_share = ratio(h.rate("mmu_pte_write"), insn)
    evidence = {k: rounded(v) for k, v in {
        "insn_emulation_per_s": insn, "insn_emulation_per_exit": per_exit, "insn_emulation_per_vcpu_s": per_vcpu,
        "insn_emulation_fail_per_s": h.rate("insn_emulation_fail"), "share_from_mmio_exits": mmio_share,
        "share_from_shadow_pte_writes": pte_share, "exits_per_s": h.rate("exits"),
        "vcpus": h.vcpus}.items() if v is not None}
    causes = []
    if mmio_share is not None and mmio_share >= 0.1:
        causes.append(f"MMIO exits account for {min(100.0, 100 * mmio_share):.0f}%")
    if pte_share is not None and pte_share >= 0.1:
        causes.append(f"shadow page-table writes for {min(100.0, 100 * pte_share):.0f}%")
    span = h.span_s
    vms = vm_rows(h, lambda vm: vm.rate("insn_emulation", span), VM_COLUMNS["insn-emulation"])
    summary = (f"{_fmt(insn)} emulated instructions/s, {_fmt(per_exit)} per exit"
               + (f", {_fmt(per_vcpu)} per vCPU-s" if per_vcpu is not None else "")
               + (f" ({'; '.join(causes)})" if causes else ""))
    notes = []
    fails = h.rate("insn_emulation_fail")
    if fails:
        notes.append(f"insn_emulation_fail moves ({_fmt(fails)}/s): instructions KVM could not emulate")
    return Outcome([Finding(h.host, rule.id, _cap(severity, rule), rule.title, summary, evidence, vms, notes,
                            list(rule.counters))], [])


# ------------------------------------------------------------------------------------------------ halt polling
def _halt_numbers(h: HostData) -> tuple[float | None, float | None, float | None]:
    fail_ns = h.rate("halt_poll_fail_ns")
    fail_cpus = fail_ns / 1e9 if fail_ns is not None else None
    success_ns = h.rate("halt_poll_success_ns")
    share = ratio(fail_ns, _sum([fail_ns, success_ns]))
    return fail_cpus, h.per_vcpu(fail_cpus), share


def screen_halt(h: HostData, rule: Rule) -> bool:
    th = rule.thresholds
    fail_cpus, per_vcpu, _ = _halt_numbers(h)
    return _ge(fail_cpus, th["min_fail_cpus"]) and _ge(per_vcpu, th["warning_fail_cpu_per_vcpu"])


def eval_halt(h: HostData, rule: Rule) -> Outcome:
    th = rule.thresholds
    fail_cpus, per_vcpu, share = _halt_numbers(h)
    if fail_cpus is None:
        return Outcome([], [Skipped(h.host, rule.id, "halt_poll_fail_ns is not reported (kernel before 5.8?)")])
    if not _ge(fail_cpus, th["min_fail_cpus"]):
        return Outcome([], [])
    if per_vcpu is None:
        return Outcome([], [Skipped(h.host, rule.id, UNKNOWN_VCPUS)])
    if share is None:
        share = 1.0 if h.rate("halt_poll_success_ns") is None else None
    warning = _ge(per_vcpu, th["warning_fail_cpu_per_vcpu"]) and _ge(share, th["warning_fail_share"])
    critical = _ge(per_vcpu, th["critical_fail_cpu_per_vcpu"]) and _ge(share, th["critical_fail_share"])
    severity = _level(warning, critical)
    if severity is None:
        return Outcome([], [])
    attempted = h.rate("halt_attempted_poll")
    evidence = {k: rounded(v) for k, v in {
        "failed_poll_cpus": fail_cpus, "failed_poll_cpus_per_vcpu": per_vcpu, "failed_share_of_poll_time": share,
        "halt_poll_success_cpus": (h.rate("halt_poll_success_ns") or 0) / 1e9 if h.has("halt_poll_success_ns")
        else None,
        "successful_poll_ratio": ratio(h.rate("halt_successful_poll"), attempted),
        "halt_poll_invalid_per_s": h.rate("halt_poll_invalid"), "halt_exits_per_s": h.rate("halt_exits"),
        "vcpus": h.vcpus}.items() if v is not None}
    span = h.span_s
    vms = vm_rows(h, lambda vm: vm.rate("halt_poll_fail_ns", span), VM_COLUMNS["halt-polling"])
    summary = (f"{_fmt(fail_cpus)} host CPUs burnt in halt polls that ended without a wakeup"
               f" ({_fmt(per_vcpu)} per vCPU)"
               + f", {_fmt(100 * share if share is not None else None)}% of all polling time")
    notes = [] if h.has("halt_poll_success_ns") else ["halt_poll_success_ns is not reported: all polling counted "
                                                      "as failed"]
    return Outcome([Finding(h.host, rule.id, _cap(severity, rule), rule.title, summary, evidence, vms, notes,
                            list(rule.counters))], [])


# ------------------------------------------------------------------------------------------------ exit load
@dataclass
class ExitLoad:
    findings: list[Finding]
    top: list[dict[str, Any]]
    fleet: dict[str, Any]


def mad_z(values: Sequence[float]) -> tuple[float, float]:
    """(median, robust spread): 1.4826 * MAD, or 1.2533 * mean absolute deviation when the MAD is 0."""
    med = statistics.median(values)
    mad = statistics.median([abs(v - med) for v in values])
    if mad > 0:
        return med, 1.4826 * mad
    meanad = sum(abs(v - med) for v in values) / len(values)
    return med, 1.2533 * meanad


def _vm_exit_rate(span: float | None) -> Callable[[VMData], float | None]:
    return lambda vm: vm.rate("exits", span)


def eval_exit_load(hosts: Mapping[str, HostData], rule: Rule) -> ExitLoad:
    th = rule.thresholds
    rates = {name: h.rate("exits") for name, h in hosts.items()}
    known = {name: r for name, r in rates.items() if r is not None}
    top_n = max(0, int(th["top_n"]))
    top = []
    for name, r in sorted(known.items(), key=lambda kv: (-kv[1], kv[0]))[:top_n]:
        h = hosts[name]
        top.append({"host": name, "exits_per_s": rounded(r), "exits_per_vcpu_s": rounded(h.per_vcpu(r)),
                    "vcpus": h.vcpus})
    findings: list[Finding] = []
    fleet: dict[str, Any] = {"hosts_with_exits": len(known)}
    groups: dict[str, dict[str, float | None]] = {
        "per vCPU": {n: hosts[n].per_vcpu(r) for n, r in known.items() if hosts[n].vcpus is not None},
        "per host": {n: r for n, r in known.items() if hosts[n].vcpus is None},
    }
    for basis, values in groups.items():
        vals = {n: v for n, v in values.items() if v is not None}
        if len(vals) < max(3, int(th["min_hosts"])):
            continue
        med, spread = mad_z(list(vals.values()))
        key = "per_vcpu" if basis == "per vCPU" else "per_host"
        fleet[f"median_exits_{key}_s"] = rounded(med)
        fleet[f"robust_spread_{key}_s"] = rounded(spread)
        fleet[f"hosts_judged_{key}"] = len(vals)
        if spread <= 0 or med < 0:
            continue
        for name, v in sorted(vals.items()):
            z = 0.6745 * (v - med) / (spread / 1.4826)
            if v < th["min_per_vcpu_s"] or z < th["z_warning"]:
                continue
            times = v / med if med > 0 else None
            if times is not None and times < th["warning_ratio_to_median"]:
                continue
            critical = times is None or times >= th["critical_ratio_to_median"]
            h = hosts[name]
            vms = vm_rows(h, _vm_exit_rate(h.span_s), VM_COLUMNS["exit-load"])
            evidence = {k: rounded(x) for k, x in {
                "exits_per_s": known[name], f"exits_{key}_s": v, f"fleet_median_{key}_s": med,
                "times_median": times, "modified_z": z, "vcpus": h.vcpus}.items() if x is not None}
            findings.append(Finding(name, rule.id, _cap("critical" if critical else "warning", rule), rule.title,
                                    f"{_fmt(v)} exits/s {basis}, {_fmt(times)}x the fleet median ({_fmt(med)}), "
                                    f"modified z-score {_fmt(z)}", evidence, vms, [], list(rule.counters)))
    return ExitLoad(findings, top, fleet)
