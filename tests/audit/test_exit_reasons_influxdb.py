"""Exit reasons (kvm_exit_reason) through the whole audit against a real InfluxDB 1.6, on synthetic hosts with
exactly known rates: the top reasons named in findings, the shadow-paging witness on VMX and SVM, the
exit-reason-storm rule, counts that restart, per-VM series left out, and hosts without reasons unchanged."""

from __future__ import annotations

import json
from typing import Any

import pytest
from tests.audit.conftest import audit, triples, write_fleet
from tests.audit.test_queries_influx_cli import assert_clean, piped
from tests.support import synthetic as sy
from tests.support.servers import InfluxDB1

from kvmfleet.audit.engine import AuditResult
from kvmfleet.audit.model import Finding
from kvmfleet.querypack import load_rules

pytestmark = pytest.mark.server

MINUTES = 50  # samples from end - 3000 s to end: the whole series inside a 1h window
SPAN = MINUTES * 60


def shadow(name: str, reasons: dict[tuple[str, str], float], **kw: Any) -> sy.HostSpec:
    return sy.make_host(name, "shadow", reasons=reasons, **kw)


VMX_SHADOW = {("vmx", "EXCEPTION_NMI"): 500, ("vmx", "CR_ACCESS"): 300, ("vmx", "INVLPG"): 200, ("vmx", "HLT"): 100}
SVM_SHADOW = {("svm", "PF excp"): 400, ("svm", "invlpg"): 100, ("svm", "write_cr3"): 100, ("svm", "read_cr3"): 50,
              ("svm", "hlt"): 50}
USERSPACE = {("userspace", "KVM_EXIT_MMIO"): 30, ("userspace", "KVM_EXIT_IO"): 20, ("userspace", "KVM_EXIT_HLT"): 10}

FLEET = [
    shadow("vmx-yes", VMX_SHADOW),
    shadow("vmx-no", {("vmx", "EPT_VIOLATION"): 400, ("vmx", "HLT"): 200, ("vmx", "EXTERNAL_INTERRUPT"): 100}),
    shadow("vmx-absent", USERSPACE),  # this machine kind: kvm_exit never fires, kvm_userspace_exit does
    shadow("svm-yes", SVM_SHADOW),
    shadow("svm-no", {("svm", "npf"): 300, ("svm", "PF excp"): 100, ("svm", "hlt"): 100}),
    sy.make_host("shadow-plain", "shadow"),  # no reasons at all
    sy.make_host("nested-reasons", "nested", reasons={("vmx", "EPT_VIOLATION"): 300, ("vmx", "VMRESUME"): 200,
                                                      ("vmx", "HLT"): 100}),
    sy.make_host("io-reasons", "emulated-io", reasons={
        ("vmx", "IO_INSTRUCTION"): 5000, ("vmx", "EPT_MISCONFIG"): 2000, ("vmx", "HLT"): 1000,
        ("userspace", "KVM_EXIT_IO"): 4000, ("userspace", "KVM_EXIT_MMIO"): 1000}),
    sy.make_host("io-plain", "emulated-io"),
    sy.make_host("msr-at", "ept", reasons={("vmx", "MSR_WRITE"): 2400, ("vmx", "MSR_READ"): 600,
                                          ("vmx", "HLT"): 2000}),
    sy.make_host("pause-above", "ept", reasons={("vmx", "PAUSE_INSTRUCTION"): 12000, ("vmx", "HLT"): 1000}),
    sy.make_host("apic-below", "ept", reasons={("vmx", "APIC_ACCESS"): 400, ("vmx", "HLT"): 100}),  # < min_per_s
    # the agent restarted at 1500 s; PAUSE_INSTRUCTION first seen at 600 s, MSR_WRITE counted since before
    sy.make_host("restart", "ept", reasons={("vmx", "MSR_WRITE"): 3000, ("vmx", "HLT"): 2000,
                                           ("vmx", "PAUSE_INSTRUCTION"): 100},
                 reason_since={("vmx", "PAUSE_INSTRUCTION"): 600}, reason_restarts=[1500]),
    sy.make_host("late", "ept", reasons={("vmx", "MSR_WRITE"): 3000, ("vmx", "HLT"): 1000},
                 reason_since={("vmx", "MSR_WRITE"): 1200}),
    # 8,000 exits/s (no jitter), 3,000 of them port I/O and MMIO handed to the VMM
    sy.make_host("vmm-io", "ept", jitter=0.0, reasons={("userspace", "KVM_EXIT_IO"): 2500,
                                                       ("userspace", "KVM_EXIT_MMIO"): 500,
                                                       ("userspace", "KVM_EXIT_HLT"): 100}),
]


@pytest.fixture(scope="module")
def reasons_db(audit_influx: InfluxDB1) -> str:
    return write_fleet(audit_influx, FLEET, minutes=MINUTES)


@pytest.fixture(scope="module")
def result(audit_influx: InfluxDB1, reasons_db: str) -> AuditResult:
    return audit(audit_influx, reasons_db)


def one(result: AuditResult, host: str, rule: str) -> Finding:
    (f,) = [f for f in result.findings if (f.host, f.rule) == (host, rule)]
    return f


def test_rates_are_exact_and_per_vm_series_left_out(result: AuditResult) -> None:
    rates = result.hosts["vmx-yes"].reason_rates()
    assert rates == {k: float(v) for k, v in VMX_SHADOW.items()}  # per-VM series (vm tag) would double them
    assert result.hosts["shadow-plain"].reason_hits == {}
    assert result.hosts["late"].reason_rates() == {("vmx", "MSR_WRITE"): 3000 * (SPAN - 1200) / SPAN,
                                                   ("vmx", "HLT"): 1000.0}


def test_restarted_counts_are_taken_from_every_sample(result: AuditResult) -> None:
    h = result.hosts["restart"]
    assert h.reason_reset and not h.reset  # the agent restarted; KVM's own counters did not
    # the interval of the restart (10 s) is left out; PAUSE_INSTRUCTION counted from 600 s on
    assert h.reason_hits == {("vmx", "MSR_WRITE"): 3000 * (SPAN - 10), ("vmx", "HLT"): 2000 * (SPAN - 10),
                             ("vmx", "PAUSE_INSTRUCTION"): 100 * (SPAN - 600 - 10)}
    assert [q["hosts"] for q in result.queries if q["query"] == "exit_reason_resets"] == [1]
    f = one(result, "restart", "exit-reason-storm")
    assert f.evidence["families"]["msr"]["per_s"] == 2990 and any("restarted" in n for n in f.notes)


def test_shadow_paging_witness_on_vmx_and_svm(result: AuditResult) -> None:
    yes = one(result, "vmx-yes", "shadow-paging")
    assert yes.severity == "critical" and yes.evidence["paging_witness"] == {
        "shows": "shadow", "isa": "vmx", "corroborates": "yes",
        "shadow_intercepts_per_s": {"EXCEPTION_NMI": 500.0, "INVLPG": 200.0, "CR_ACCESS": 300.0},
        "tdp_exits_per_s": {"EPT_VIOLATION": 0.0, "EPT_MISCONFIG": 0.0}}
    assert ("; exit reasons corroborate: EXCEPTION_NMI 500/s, INVLPG 200/s, CR_ACCESS 300/s, no "
            "EPT_VIOLATION/EPT_MISCONFIG exits; top kvm_exit reasons (vmx): EXCEPTION_NMI 45%, CR_ACCESS 27%, "
            "INVLPG 18%") in yes.summary
    no = one(result, "vmx-no", "shadow-paging")
    assert no.severity == "critical" and no.evidence["paging_witness"]["corroborates"] == "no"
    assert "exit reasons do not corroborate: EPT_VIOLATION 400/s (guest memory mapped through EPT/NPT) and no " \
           "EXCEPTION_NMI/INVLPG/CR_ACCESS exits" in no.summary
    assert any("contradict the MMU counters" in n for n in no.notes)
    absent = one(result, "vmx-absent", "shadow-paging")
    assert absent.evidence["paging_witness"] == {"shows": "absent", "corroborates": "absent"}
    assert "no kvm_exit reasons for this host (the tracepoint did not fire, or was not counted): the counters are " \
           "the only witness" in absent.summary
    assert absent.summary.endswith("; top kvm_userspace_exit reasons: KVM_EXIT_MMIO 50%, KVM_EXIT_IO 33%, "
                                   "KVM_EXIT_HLT 17%")
    svm_yes = one(result, "svm-yes", "shadow-paging")
    assert svm_yes.evidence["paging_witness"]["corroborates"] == "yes"
    assert svm_yes.evidence["paging_witness"]["tdp_exits_per_s"] == {"npf": 0.0}
    assert "exit reasons corroborate: PF excp 400/s, invlpg 100/s, read_cr3 50/s, write_cr3 100/s, no npf exits" \
        in svm_yes.summary
    nested = one(result, "nested-reasons", "nested-shadow")  # L1 on EPT: its EPT exits, and no verdict
    assert nested.evidence["paging_witness"] == {"shows": "tdp", "isa": "vmx", "shadow_intercepts_per_s": {
        "EXCEPTION_NMI": 0.0, "INVLPG": 0.0, "CR_ACCESS": 0.0}, "tdp_exits_per_s": {"EPT_VIOLATION": 300.0,
                                                                                   "EPT_MISCONFIG": 0.0}}
    assert "; exit reasons show tdp: EPT_VIOLATION 300/s; top kvm_exit reasons (vmx): EPT_VIOLATION 50%, VMRESUME " \
           "33%, HLT 17%" in nested.summary
    svm_no = one(result, "svm-no", "shadow-paging")
    assert svm_no.evidence["paging_witness"]["shows"] == "both"
    assert "exit reasons do not corroborate: npf 300/s (guest memory mapped through EPT/NPT) alongside PF excp " \
           "100/s" in svm_no.summary


def test_hosts_without_reasons_are_judged_and_worded_as_before(result: AuditResult, audit_influx: InfluxDB1) -> None:
    plain = {h for h in result.hosts if not result.hosts[h].reason_hits}
    assert plain == {"shadow-plain", "io-plain"}
    assert not [s for s in result.skipped if s.rule == "exit-reason-storm"]
    # the same hosts in a database without kvm_exit_reason at all: the same findings, word for word
    alone = audit(audit_influx, write_fleet(audit_influx, [h for h in FLEET if h.name in plain], minutes=MINUTES))
    assert [q["query"] for q in alone.queries][:3] == ["fleet_counters", "host_tdp", "exit_reasons"]
    assert all(not h.reason_hits for h in alone.hosts.values())  # no series: no reasons, no error

    def host_findings(r: AuditResult) -> list[tuple[str, str, str, str, Any]]:
        return sorted((f.host, f.rule, f.severity, f.summary, json.dumps(f.evidence, sort_keys=True))
                      for f in r.findings if f.host in plain and f.rule != "exit-load")

    assert host_findings(result) == host_findings(alone)
    assert {(h, r, s) for h, r, s, _, _ in host_findings(alone)} == {
        ("shadow-plain", "shadow-paging", "critical"), ("shadow-plain", "tdp-unavailable", "warning"),
        ("io-plain", "emulated-io", "critical")}
    assert all("reason" not in summary for _, _, _, summary, _ in host_findings(alone))


def test_findings_about_exits_name_the_top_reasons(result: AuditResult) -> None:
    f = one(result, "io-reasons", "emulated-io")
    assert f.summary.endswith("; top kvm_exit reasons (vmx): IO_INSTRUCTION 62%, EPT_MISCONFIG 25%, HLT 12%; "
                              "top kvm_userspace_exit reasons: KVM_EXIT_IO 80%, KVM_EXIT_MMIO 20%")
    assert f.evidence["exit_reasons"]["kvm_exit"] == {"isa": "vmx", "exits_per_s": 8000.0, "top": {
        "IO_INSTRUCTION": {"per_s": 5000.0, "share": 0.625}, "EPT_MISCONFIG": {"per_s": 2000.0, "share": 0.25},
        "HLT": {"per_s": 1000.0, "share": 0.125}}}
    halt = [f for f in result.findings if f.rule in ("halt-polling", "tdp-unavailable")]
    assert halt and all("exit_reasons" not in f.evidence for f in halt)  # not about exits


def test_exit_reason_storm_at_below_and_above(result: AuditResult, audit_influx: InfluxDB1, reasons_db: str) -> None:
    storms = {(f.host, f.severity) for f in result.findings if f.rule == "exit-reason-storm"}
    assert storms == {("msr-at", "warning"), ("pause-above", "critical"), ("io-reasons", "warning"),
                      ("restart", "warning"), ("late", "warning"), ("vmm-io", "warning")}
    vmm = one(result, "vmm-io", "exit-reason-storm")
    assert vmm.summary.startswith("port I/O and MMIO exits to the VMM are 38% of all exits (3,000/s, 750 per vCPU-s: "
                                  "KVM_EXIT_IO 2,500/s, KVM_EXIT_MMIO 500/s): userspace-io")
    io = one(result, "io-reasons", "exit-reason-storm")  # 5,000 of its 36,000 exits/s to the VMM: 14 %
    assert "device-io" in io.summary and "userspace-io" not in io.summary
    msr = one(result, "msr-at", "exit-reason-storm")
    assert msr.summary.startswith("MSR accesses are 60% of kvm_exit exits (3,000/s, 750 per vCPU-s: MSR_WRITE "
                                  "2,400/s, MSR_READ 600/s): msr")
    assert msr.evidence["families"]["msr"] == {"per_s": 3000.0, "share": 0.6, "per_vcpu_s": 750.0, "level": "warning",
                                               "reasons_per_s": {"MSR_WRITE": 2400.0, "MSR_READ": 600.0}}
    at = audit(audit_influx, reasons_db, only=["exit-reason-storm"], host_regex="^msr-at$",
               rules=load_rules(sets=["exit-reason-storm.critical_per_vcpu_s=750"]))
    assert triples(at) == {("msr-at", "exit-reason-storm", "critical")}
    below = audit(audit_influx, reasons_db, only=["exit-reason-storm"], host_regex="^msr-at$",
                  rules=load_rules(sets=["exit-reason-storm.warning_share=0.61"]))
    assert below.findings == []


def test_exit_reasons_query_runs_alone_through_the_influx_shell(audit_influx: InfluxDB1, reasons_db: str) -> None:
    done = piped(audit_influx, reasons_db, "exit_reasons", "--window", "1h", "--host-regex", "^vmx-yes$")
    assert_clean(done)
    (doc,) = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    rows: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for res in doc["results"]:  # the first rows, then the last ones (the shell leaves out statement ids)
        for s in res.get("series", []):
            assert s["tags"]["host"] == "vmx-yes" and not s["tags"].get("vm")
            rows.setdefault((s["tags"]["isa"], s["tags"]["reason"]), []).extend(map(tuple, s["values"]))
    assert set(rows) == set(VMX_SHADOW) and all(len(r) == 2 for r in rows.values())
    assert {k: max(r)[1] - min(r)[1] for k, r in rows.items()} == {k: rate * SPAN for k, rate in VMX_SHADOW.items()}
