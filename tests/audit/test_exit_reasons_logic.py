"""The pure logic of exit reasons in the audit: merging exit_reasons and exit_reason_resets answers, shares and
top lists, the paging witness, the exit-reason-storm levels (no database: canned series and HostData)."""

from __future__ import annotations

from typing import Any

import pytest

from kvmfleet.audit.client import Series
from kvmfleet.audit.merge import merge_exit_reasons, merge_reason_resets
from kvmfleet.audit.model import Finding, HostData
from kvmfleet.audit.reasons import (
    KVM_EXIT,
    USERSPACE_EXIT,
    name_top_reasons,
    paging_witness,
    ranked,
    reasons_text,
    tracepoint_rate,
)
from kvmfleet.audit.rules.storm import ExitReasonStorm
from kvmfleet.querypack import load_rules

T0, SPAN = 1_000_000.0, 1000.0


def host(rates: dict[tuple[str, str], float], vcpus: int | None = 4, exits: float | None = None) -> HostData:
    h = HostData("h", t_first=T0, t_last=T0 + SPAN, facts={"vcpus": vcpus} if vcpus else {})
    h.reason_hits = {k: r * SPAN for k, r in rates.items()}
    if exits is not None:
        h.increases["exits"] = exits * SPAN
    return h


def series(isa: str, reason: str, t: float, count: float, host_name: str = "h") -> Series:
    return Series("kvm_exit_reason", {"host": host_name, "isa": isa, "reason": reason}, ["time", "count"],
                  [[t, count]])


def merged(*pairs: tuple[Series, Series]) -> HostData:
    h = HostData("h", t_first=T0, t_last=T0 + SPAN)
    merge_exit_reasons({"h": h}, [[p[0] for p in pairs], [p[1] for p in pairs]])
    return h


# ------------------------------------------------------------------------------------------------ merging
def test_first_and_last_rows_give_the_increase() -> None:
    h = merged((series("vmx", "HLT", T0, 5000), series("vmx", "HLT", T0 + SPAN, 8000)))
    assert h.reason_hits == {("vmx", "HLT"): 3000} and not h.reason_reset
    assert h.reason_rates() == {("vmx", "HLT"): 3.0}


def test_a_reason_first_seen_after_the_hosts_first_sample_counts_from_zero() -> None:
    h = merged((series("vmx", "MSR_WRITE", T0 + 400, 70), series("vmx", "MSR_WRITE", T0 + SPAN, 600)))
    assert h.reason_hits == {("vmx", "MSR_WRITE"): 600}


def test_a_count_that_went_down_is_a_restart() -> None:
    h = merged((series("vmx", "HLT", T0, 5000), series("vmx", "HLT", T0 + SPAN, 300)))
    assert h.reason_reset and h.reason_hits == {("vmx", "HLT"): 300}  # until exit_reason_resets says better
    resets = [[Series("kvm_exit_reason", {"host": "h", "isa": "vmx", "reason": "HLT"}, ["time", "count"],
                      [[0, 2900]])]]
    merge_reason_resets({"h": h}, resets)
    assert h.reason_hits == {("vmx", "HLT"): 2900}


def test_resets_add_the_first_count_of_a_late_series() -> None:
    h = merged((series("vmx", "HLT", T0, 5000), series("vmx", "HLT", T0 + SPAN, 300)),
               (series("vmx", "PAUSE_INSTRUCTION", T0 + 600, 40), series("vmx", "PAUSE_INSTRUCTION", T0 + SPAN, 10)))
    merge_reason_resets({"h": h}, [[
        Series("kvm_exit_reason", {"host": "h", "isa": "vmx", "reason": "PAUSE_INSTRUCTION"}, ["time", "count"],
               [[0, 150]])]])
    assert h.reason_hits[("vmx", "PAUSE_INSTRUCTION")] == 190


def test_series_of_unknown_hosts_or_without_tags_or_numbers_are_left_out() -> None:
    h = HostData("h", t_first=T0, t_last=T0 + SPAN)
    stray = Series("kvm_exit_reason", {"host": "other", "isa": "vmx", "reason": "HLT"}, ["time", "count"], [[T0, 1]])
    untagged = Series("kvm_exit_reason", {"host": "h", "isa": "vmx"}, ["time", "count"], [[T0, 1]])
    garbage = Series("kvm_exit_reason", {"host": "h", "isa": "vmx", "reason": "X"}, ["time", "count"], [[T0, "x"]])
    merge_exit_reasons({"h": h}, [[stray, untagged, garbage], [stray, untagged, garbage]])
    assert h.reason_hits == {} and h.reason_first == {}


def test_tags_that_are_no_reason_names_are_left_out_and_said() -> None:
    h = merged((series("vmx", "HLT\x1b[2K<b>", T0, 1), series("vmx", "HLT\x1b[2K<b>", T0 + SPAN, 9)),
               (series("vmx", "x" * 65, T0, 1), series("vmx", "x" * 65, T0 + SPAN, 9)),
               (series("svm", "PF excp", T0, 1), series("svm", "PF excp", T0 + SPAN, 9)))
    assert h.reason_hits == {("svm", "PF excp"): 8}
    assert h.notes == ["exit reason series whose isa or reason tag is not a reason name were left out: 2"]


# ------------------------------------------------------------------------------------------------ ranking
def test_shares_are_of_each_tracepoints_exits() -> None:
    h = host({("vmx", "MSR_WRITE"): 600, ("vmx", "HLT"): 300, ("vmx", "EPT_VIOLATION"): 90, ("vmx", "CPUID"): 10,
              ("userspace", "KVM_EXIT_IO"): 30, ("userspace", "KVM_EXIT_MMIO"): 10})
    by_tp = ranked(h)
    assert [(r.reason, r.per_s, r.share) for r in by_tp[KVM_EXIT]] == [
        ("MSR_WRITE", 600, 0.6), ("HLT", 300, 0.3), ("EPT_VIOLATION", 90, 0.09), ("CPUID", 10, 0.01)]
    assert [(r.reason, r.share) for r in by_tp[USERSPACE_EXIT]] == [("KVM_EXIT_IO", 0.75), ("KVM_EXIT_MMIO", 0.25)]
    assert tracepoint_rate(h, KVM_EXIT) == 1000 and tracepoint_rate(h, USERSPACE_EXIT) == 40
    assert reasons_text(h) == ("top kvm_exit reasons (vmx): MSR_WRITE 60%, HLT 30%, EPT_VIOLATION 9%; "
                               "top kvm_userspace_exit reasons: KVM_EXIT_IO 75%, KVM_EXIT_MMIO 25%")


def test_a_finding_names_the_top_reasons_and_a_host_without_reasons_leaves_it_alone() -> None:
    f = Finding("h", "emulated-io", "critical", "t", "many exits", {"exits_per_s": 1.0})
    name_top_reasons(f, host({}))
    assert f.summary == "many exits" and f.evidence == {"exits_per_s": 1.0}
    name_top_reasons(f, host({("svm", "io"): 75, ("svm", "npf"): 25}))
    assert f.summary == "many exits; top kvm_exit reasons (svm): io 75%, npf 25%"
    assert f.evidence["exit_reasons"] == {KVM_EXIT: {"isa": "svm", "exits_per_s": 100.0, "top": {
        "io": {"per_s": 75.0, "share": 0.75}, "npf": {"per_s": 25.0, "share": 0.25}}}}


# ------------------------------------------------------------------------------------------------ witness
@pytest.mark.parametrize(("rates", "shows"), [
    ({("vmx", "EXCEPTION_NMI"): 5, ("vmx", "INVLPG"): 1, ("vmx", "HLT"): 9}, "shadow"),
    ({("vmx", "EPT_VIOLATION"): 5, ("vmx", "HLT"): 9}, "tdp"),
    ({("vmx", "EPT_MISCONFIG"): 1, ("vmx", "CR_ACCESS"): 3}, "both"),
    ({("vmx", "HLT"): 9}, "neither"),
    ({("svm", "PF excp"): 5, ("svm", "write_cr3"): 2}, "shadow"),
    ({("svm", "npf"): 5, ("svm", "hlt"): 2}, "tdp"),
    ({("userspace", "KVM_EXIT_MMIO"): 5}, "absent"),
])
def test_paging_witness(rates: dict[tuple[str, str], float], shows: str) -> None:
    w = paging_witness(host(rates))
    assert w is not None and w.shows == shows


def test_no_witness_without_reasons_or_without_a_span() -> None:
    assert paging_witness(host({})) is None
    one_sample = host({("vmx", "HLT"): 5})
    one_sample.t_last = one_sample.t_first
    assert paging_witness(one_sample) is None and ranked(one_sample) == {}


# ------------------------------------------------------------------------------------------------ storm
def storm(rates: dict[tuple[str, str], float], vcpus: int | None = 4, exits: float | None = None,
          **overrides: float) -> list[Any]:
    rules = load_rules(sets=[f"exit-reason-storm.{k}={v}" for k, v in overrides.items()])
    out = ExitReasonStorm(rules).evaluate(host(rates, vcpus, exits))
    return [(f.severity, f.summary) for f in out.findings]


MSR = {("vmx", "MSR_WRITE"): 2400, ("vmx", "MSR_READ"): 600, ("vmx", "HLT"): 2000}  # msr: 60 %, 750/vCPU-s


def test_storm_levels_at_below_and_above_thresholds() -> None:
    words = "MSR accesses are 60% of kvm_exit exits (3,000/s, 750 per vCPU-s: MSR_WRITE 2,400/s, MSR_READ 600/s): msr"
    assert storm(MSR) == [("warning", words)]  # per vCPU below critical_per_vcpu_s 2500
    assert storm(MSR, critical_per_vcpu_s=750) == [("critical", words)]  # at both critical thresholds
    assert storm(MSR, critical_per_vcpu_s=750, critical_share=0.61) == [("warning", words)]  # share just below
    assert storm(MSR, warning_share=0.61) == []
    assert storm(MSR, warning_per_vcpu_s=751) == []
    assert storm(MSR, min_per_s=3001) == []  # the floor
    assert storm(MSR, vcpus=None, critical_per_vcpu_s=10**9) == [("critical", words.replace(", 750 per vCPU-s", ""))]


def test_storm_families_and_tracepoints() -> None:
    (only,) = storm({("svm", "avic_unaccelerated_access"): 2000, ("svm", "npf"): 500, ("svm", "hlt"): 500})
    assert only[0] == "warning" and only[1].endswith(": apic")
    (only,) = storm({("vmx", "PAUSE_INSTRUCTION"): 12000, ("vmx", "HLT"): 1000})
    assert only[0] == "critical" and only[1].startswith("PAUSE-loop exits are 92% of kvm_exit exits")
    userspace = {("userspace", "KVM_EXIT_IO"): 800, ("userspace", "KVM_EXIT_MMIO"): 400,
                 ("userspace", "KVM_EXIT_HLT"): 100}
    assert storm(userspace) == []  # without the kvm exits counter: no share of all exits, not judged
    assert storm(userspace, exits=4800.01) == []  # just below a quarter of all exits
    assert storm(userspace, exits=4800) == [(
        "warning", "port I/O and MMIO exits to the VMM are 25% of all exits (1,200/s, 300 per vCPU-s: KVM_EXIT_IO "
                   "800/s, KVM_EXIT_MMIO 400/s): userspace-io")]
    assert storm(userspace, exits=2400, userspace_critical_per_vcpu_s=300)[0][0] == "critical"
    (both,) = storm({("vmx", "IO_INSTRUCTION"): 5000, ("vmx", "EPT_MISCONFIG"): 2000, ("vmx", "HLT"): 1000,
                     ("userspace", "KVM_EXIT_IO"): 4000, ("userspace", "KVM_EXIT_MMIO"): 1000}, exits=9000)
    assert both[0] == "critical"  # userspace-io at 1,250 per vCPU-s; device-io a warning, named too
    assert both[1].index("userspace-io") < both[1].index("device-io")
    assert storm({("vmx", "MSR_WRITE"): 400, ("vmx", "HLT"): 100}) == []  # 80 % but below min_per_s
    assert storm({}) == []


# ------------------------------------------------------------------------------------------------ engine
def test_the_engine_names_reasons_in_fleet_findings_and_asks_resets_only_for_restarted_hosts() -> None:
    from tests.audit.test_engine import EPT, TDP, Canned, run

    canned = Canned()
    for i in range(6):
        canned.host(f"plain-{i}", dict(EPT, exits=8000 + 200 * i), TDP)
    canned.host("hot", dict(EPT, exits=200000), TDP)
    canned.answers["exit_reasons"] = [
        [series("vmx", "MSR_WRITE", 1_700_000_000, 5e6, "hot"), series("vmx", "HLT", 1_700_000_000, 5e6, "hot"),
         series("vmx", "HLT", 1_700_000_000, 5e6, "plain-0")],
        [series("vmx", "MSR_WRITE", 1_700_003_600, 5e6 + 150000 * 3600, "hot"),
         series("vmx", "HLT", 1_700_003_600, 5e6 + 50000 * 3600, "hot"),
         series("vmx", "HLT", 1_700_003_600, 10, "plain-0")]]  # plain-0's agent restarted
    canned.answers["exit_reason_resets"] = [[Series("kvm_exit_reason", {"host": "plain-0", "isa": "vmx",
                                                                        "reason": "HLT"}, ["time", "count"],
                                                    [[0, 900 * 3590]])]]
    result, runner = run(canned, only=["exit-load", "exit-reason-storm"])
    assert runner.asked()[1] == [("exit_reason_resets", ["plain-0"], None)]
    assert result.hosts["plain-0"].reason_rates() == {("vmx", "HLT"): 900 * 3590 / 3600}
    (load,) = [f for f in result.findings if f.rule == "exit-load"]
    assert load.host == "hot" and load.summary.endswith("; top kvm_exit reasons (vmx): MSR_WRITE 75%, HLT 25%")
    (storm_finding,) = [f for f in result.findings if f.rule == "exit-reason-storm"]
    assert storm_finding.host == "hot" and storm_finding.severity == "critical"
    # named once, though the storm rule also names the top reasons
    assert storm_finding.summary.count("top kvm_exit reasons") == 1
