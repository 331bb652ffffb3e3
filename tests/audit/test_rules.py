"""Each rule's arithmetic on hand-made host numbers (no server): triggers, non-triggers, nested guests, facts
that disagree with the counters, missing fields, zero exits and unknown vCPU counts; and every output format."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kvmfleet.audit.engine import AuditResult
from kvmfleet.audit.model import Finding, HostData, Outcome, VMData
from kvmfleet.audit.report import render
from kvmfleet.audit.rules import EmulatedIO, ExitLoad, HaltPolling, InsnEmulation, IrqInjection, ShadowPaging, TDPFacts
from kvmfleet.querypack import load_rules

RULES = load_rules()
SPAN = 3600.0
SHADOW, TDP, IO, IRQ, INSN, HALT = (unit(RULES) for unit in (ShadowPaging, TDPFacts, EmulatedIO, IrqInjection,
                                                             InsnEmulation, HaltPolling))
EXIT_LOAD = ExitLoad(RULES)


def hd(host: str = "h", vcpus: int | None = 4, tdp: str | None = "enabled", facts: dict[str, Any] | None = None,
       vms: dict[str, dict[str, float]] | None = None, **rates: float | None) -> HostData:
    """A host whose counters grew at ``rates`` per second over an hour (None: field not reported)."""
    h = HostData(host, t_first=1000.0, t_last=1000.0 + SPAN)
    for k, v in rates.items():
        if k == "mmu_unsync":
            h.instant[k] = v
        else:
            h.increases[k] = None if v is None else v * SPAN
    if tdp is not None or facts:
        h.has_facts = True
        h.facts = {"tdp_state": tdp, **({"vcpus": vcpus} if vcpus is not None else {}), **(facts or {})}
    for name, vr in (vms or {}).items():
        h.vms[name] = VMData(name, increases={k: v * SPAN for k, v in vr.items()})
    return h


def shadow(h: HostData) -> Outcome:
    return SHADOW.evaluate(h)


def rules_sev(out: Outcome) -> list[tuple[str, str]]:
    return [(f.rule, f.severity) for f in out.findings]


# ---------------------------------------------------------------------------------------------- shadow paging
def test_shadow_paging_busy_host_is_critical_with_mmu_evidence() -> None:
    h = hd(tdp="unsupported", exits=24000, mmu_pte_write=3600, invlpg=1200, mmu_flooded=120, mmu_pde_zapped=240,
           pf_guest=2000, mmu_unsync=160, nested_run=0, pf_fixed=4800, mmu_cache_miss=1200,
           vms={"web-1": {"mmu_pte_write": 3000, "invlpg": 1000, "exits": 20000, "nested_run": 0},
                "db-1": {"mmu_pte_write": 600, "invlpg": 200, "exits": 4000, "nested_run": 0},
                "idle-1": {"mmu_pte_write": 0, "invlpg": 0, "exits": 10, "nested_run": 0}})
    out = shadow(h)
    assert rules_sev(out) == [("shadow-paging", "critical")]
    f = out.findings[0]
    assert f.evidence["mmu_pte_write_per_s"] == 3600 and f.evidence["invlpg_per_s"] == 1200
    assert f.evidence["shadow_events_per_exit"] == pytest.approx(5160 / 24000, rel=1e-3)
    assert f.evidence["shadow_events_per_vcpu_s"] == 1290
    assert [v["vm"] for v in f.vms] == ["web-1", "db-1"]  # idle-1 does no shadow work
    assert "agree" in f.summary


def test_shadow_paging_idle_host_is_flagged_alike_at_warning() -> None:
    out = shadow(hd(tdp="unsupported", exits=720, mmu_pte_write=24, invlpg=12, nested_run=0))
    assert rules_sev(out) == [("shadow-paging", "warning")]


@pytest.mark.parametrize("rates", [
    dict(exits=80000, pf_fixed=3600, mmu_shadow_zapped=320, mmu_cache_miss=480, pf_guest=12, mmu_pte_write=0,
         invlpg=0, nested_run=0),  # busy EPT: faults fixed through EPT, TDP pages counted by the old MMU
    dict(exits=600, pf_fixed=8, mmu_cache_miss=2, pf_guest=0.2, mmu_pte_write=0, invlpg=0),  # idle EPT
    dict(exits=5000, pf_fixed=50000, mmu_shadow_zapped=50000, mmu_cache_miss=50000, pf_guest=3000,
         mmu_pte_write=0, mmu_flooded=0, invlpg=0),  # pf_* and MMU page churn alone never flag
    dict(exits=5000, mmu_pte_write=0.5, invlpg=0.2),  # a trickle below the floor
    dict(exits=0, mmu_pte_write=0, invlpg=0),  # zero exits
])
def test_ept_patterns_are_never_shadow_paging(rates: dict[str, float]) -> None:
    for tdp in ("enabled", None, "unknown"):
        assert shadow(hd(tdp=tdp, **rates)).findings == []


def test_nested_guests_on_a_tdp_host_are_info_not_shadow_paging() -> None:
    h = hd(tdp="enabled", facts={"nested": True}, exits=36000, nested_run=10000, mmu_pte_write=1200,
           mmu_flooded=20, mmu_pde_zapped=80, invlpg=0, mmu_unsync=30)
    out = shadow(h)
    assert rules_sev(out) == [("nested-shadow", "info")]
    assert "L2" in out.findings[0].summary
    # without facts, nested_run still explains it
    assert rules_sev(shadow(hd(tdp=None, exits=36000, nested_run=10000, mmu_pte_write=1200))) == [
        ("nested-shadow", "info")]
    # an old kernel without nested_run, facts say nested is allowed on a TDP host: still nested
    assert rules_sev(shadow(hd(tdp="enabled", facts={"nested": True}, exits=36000, nested_run=None,
                               mmu_pte_write=1200))) == [("nested-shadow", "info")]


def test_nested_host_without_facts_names_vms_doing_shadow_work_without_l2() -> None:
    h = hd(tdp=None, exits=36000, nested_run=5000, mmu_pte_write=2400, invlpg=600,
           vms={"l1-hv": {"nested_run": 5000, "mmu_pte_write": 1200, "exits": 18000},
                "plain": {"nested_run": 0, "mmu_pte_write": 1200, "invlpg": 600, "exits": 18000}})
    out = shadow(h)
    assert rules_sev(out) == [("shadow-paging", "critical")]
    assert [v["vm"] for v in out.findings[0].vms] == ["plain"]


def test_facts_enabled_but_shadow_counters_say_they_disagree() -> None:
    out = shadow(hd(tdp="enabled", exits=24000, mmu_pte_write=3600, invlpg=1200, nested_run=0))
    assert rules_sev(out) == [("shadow-paging", "critical")]
    assert any("disagree" in n for n in out.findings[0].notes)


def test_facts_disabled_plus_nested_is_still_shadow_paging() -> None:
    out = shadow(hd(tdp="disabled", exits=24000, mmu_pte_write=3600, nested_run=500))
    assert rules_sev(out) == [("shadow-paging", "critical")]
    assert any("L2" in n for n in out.findings[0].notes)


def test_shadow_paging_from_kvm_alone_and_old_names() -> None:
    # no kvm_host, no vCPUs, old kernel (mmu_pte_updated only): judged per exit
    out = shadow(hd(tdp=None, vcpus=None, exits=10000, mmu_pte_write=None, mmu_pte_updated=900, invlpg=300))
    assert rules_sev(out) == [("shadow-paging", "critical")]
    assert any("counters alone" in n for n in out.findings[0].notes)
    # neither shadow field reported: skipped with a reason, no finding
    out = shadow(hd(tdp=None, exits=10000))
    assert out.findings == [] and "reported" in out.skipped[0].reason


def test_shadow_with_unknown_exits_and_vcpus_still_flags() -> None:
    out = shadow(hd(tdp=None, vcpus=None, exits=None, mmu_pte_write=500, invlpg=100))
    assert rules_sev(out) == [("shadow-paging", "warning")]


# ---------------------------------------------------------------------------------------------- TDP facts
def test_tdp_disabled_and_unavailable() -> None:
    h = hd(tdp="disabled", facts={"cpu_ept": True, "ept_param": False, "kvm_module": "kvm_intel"}, exits=20000,
           mmu_pte_write=3000, invlpg=1000)
    out = TDP.evaluate(h)
    assert rules_sev(out) == [("tdp-disabled", "critical")]
    assert "kvm_intel.ept=N" in out.findings[0].summary and "agree" in out.findings[0].notes[0]
    idle = hd(tdp="unsupported", facts={"is_guest": True, "kvm_module": "kvm_pvm"}, exits=300, mmu_pte_write=0,
              invlpg=0)
    out = TDP.evaluate(idle)
    assert rules_sev(out) == [("tdp-unavailable", "warning")]
    assert "kvm_pvm" in out.findings[0].summary
    assert "no shadow MMU work" in out.findings[0].notes[0]  # facts and counters disagree: said
    assert TDP.evaluate(hd(tdp="enabled", exits=100)).findings == []
    assert TDP.evaluate(hd(tdp=None, exits=100)).skipped[0].reason == "no kvm_host facts in the window"
    assert "unknown" in TDP.evaluate(hd(tdp="unknown", exits=100)).skipped[0].reason


# ---------------------------------------------------------------------------------------------- other rules
def test_emulated_io() -> None:
    assert rules_sev(IO.evaluate(hd(exits=36000, io_exits=12000, mmio_exits=6400))) == [
        ("emulated-io", "critical")]
    assert rules_sev(IO.evaluate(hd(exits=36000, io_exits=2000, mmio_exits=400))) == [
        ("emulated-io", "warning")]
    assert IO.evaluate(hd(exits=8000, io_exits=80, mmio_exits=40)).findings == []
    assert IO.evaluate(hd(exits=0, io_exits=0, mmio_exits=0)).findings == []
    assert IO.evaluate(hd(exits=8000)).skipped


def test_irq_injection_needs_io_exits_per_injection() -> None:
    legacy = hd(exits=36000, irq_injections=8800, io_exits=9600, mmio_exits=40, irq_window_exits=2400)
    out = IRQ.evaluate(legacy)
    assert rules_sev(out) == [("irq-injection", "critical")]
    assert out.findings[0].evidence["irq_window_exits_per_injection"] == pytest.approx(2400 / 8800, rel=1e-3)
    old = hd(exits=36000, irq_injections=8800, io_exits=9600, irq_window=2400)  # old name tolerated
    assert IRQ.evaluate(old).findings[0].evidence["irq_window_exits_per_injection"] > 0.2
    msi = hd(exits=36000, irq_injections=8800, io_exits=200, mmio_exits=100)  # many interrupts, no ISR reads
    assert IRQ.evaluate(msi).findings == []


def test_insn_emulation_and_causes() -> None:
    out = INSN.evaluate(hd(exits=28000, insn_emulation=20800, mmio_exits=2400, insn_emulation_fail=1))
    assert rules_sev(out) == [("insn-emulation", "critical")]
    assert any("insn_emulation_fail" in n for n in out.findings[0].notes)
    assert INSN.evaluate(hd(exits=8000, insn_emulation=60)).findings == []


def test_halt_polling() -> None:
    out = HALT.evaluate(hd(halt_poll_fail_ns=1.8e9, halt_poll_success_ns=6e6, halt_attempted_poll=9600,
                           halt_successful_poll=360))
    assert rules_sev(out) == [("halt-polling", "critical")]
    assert out.findings[0].evidence["failed_poll_cpus"] == 1.8
    # lots of polling but mostly successful: not flagged
    assert HALT.evaluate(hd(halt_poll_fail_ns=0.4e9, halt_poll_success_ns=2e9)).findings == []
    assert HALT.evaluate(hd()).skipped


def test_exit_load_outliers_against_the_fleet() -> None:
    hosts = {f"h{i}": hd(f"h{i}", exits=8000 + 100 * i) for i in range(20)}
    hosts["hot"] = hd("hot", exits=200000, vms={"noisy": {"exits": 190000}})
    hosts["warm"] = hd("warm", exits=30000)
    hosts["novcpu"] = hd("novcpu", vcpus=None, tdp=None, exits=999999)  # judged with per-host peers only
    res = EXIT_LOAD.evaluate_fleet(hosts)
    assert [(f.host, f.severity) for f in res.findings] == [("hot", "critical"), ("warm", "warning")]
    assert res.findings[0].vms[0]["vm"] == "noisy"
    assert [t["host"] for t in res.top] == ["novcpu", "hot", "warm", "h19", "h18"]
    # a fleet too small or all alike: no outliers, still a top list
    assert EXIT_LOAD.evaluate_fleet({"a": hd("a", exits=1), "b": hd("b", exits=100)}).findings == []
    same = {f"s{i}": hd(f"s{i}", exits=5000) for i in range(10)}
    assert EXIT_LOAD.evaluate_fleet(same).findings == []


# ---------------------------------------------------------------------------------------------- outputs
def _result(findings: list[Finding], hosts: dict[str, HostData]) -> AuditResult:
    return AuditResult(window="1h", window_s=3600, host_regex=".*", source="http://x db", hosts=hosts,
                       findings=findings, skipped=[], top_exit_rate=[{"host": "a", "exits_per_s": 1.0,
                                                                      "exits_per_vcpu_s": None, "vcpus": None}],
                       fleet={}, rules=RULES, queries=[], requests=3, elapsed_s=0.1, started_at=0.0,
                       charts={"a": {"mmu_pte_write": [(0.0, 1.0), (60.0, 5.0), (120.0, 2.0)]}})


@pytest.mark.parametrize("fmt", ["table", "json", "markdown", "html"])
def test_every_format_renders_findings(fmt: str) -> None:
    h = hd("a", tdp="unsupported", exits=24000, mmu_pte_write=3600, invlpg=1200, nested_run=0,
           vms={"vm<1>": {"mmu_pte_write": 3600, "invlpg": 1200, "exits": 24000}})
    out = shadow(h)
    text = render(_result(out.findings, {"a": h}), fmt, "warning")
    assert "shadow-paging" in text
    if fmt == "json":
        doc = json.loads(text)
        f = doc["findings"][0]
        assert {"host", "rule", "severity", "evidence", "vms"} <= set(f)
        assert doc["summary"]["critical"] == 1
    if fmt == "html":
        assert "<svg" in text and "<polyline" in text and "<script" not in text
        assert "vm&lt;1&gt;" in text
