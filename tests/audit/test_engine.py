"""The engine's stages on a fake query runner that answers canned series per query name (no server): which jobs
each stage asks for which hosts and columns, and what comes of the answers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from kvmfleet.audit.client import AuditError, Series
from kvmfleet.audit.engine import RESET_NOTE, STAGES, AuditOptions, AuditResult, audit_with
from kvmfleet.audit.rules import UNKNOWN_VCPUS
from kvmfleet.audit.runner import Answers, Job
from kvmfleet.querypack import PackError, load_rules

T0, SPAN = 1_700_000_000, 3600
FLEET_COLUMNS = ("exits", "mmu_pte_write", "invlpg", "io_exits", "mmio_exits", "irq_injections", "insn_emulation",
                 "halt_poll_fail_ns")
DETAIL = ("shadow_paging", "emulated_io", "irq_injection", "insn_emulation", "halt_polling")
SHADOW = {"exits": 24000, "mmu_pte_write": 3600, "invlpg": 1200, "mmu_flooded": 120, "mmu_pde_zapped": 240,
          "pf_guest": 2000, "nested_run": 0}
EPT = {"exits": 8000, "mmu_pte_write": 0, "invlpg": 0, "io_exits": 40, "mmio_exits": 20, "irq_injections": 100,
       "insn_emulation": 30, "halt_poll_fail_ns": 1e6, "nested_run": 0}


def _pair(tags: dict[str, str], rates: dict[str, float], reset: bool = False) -> tuple[Series, Series]:
    """First and last sample of counters growing at ``rates`` over SPAN (``reset``: restarted from 0 meanwhile)."""
    cols = ["time", *rates]
    first = [T0, *(1e9 + r * 10 for r in rates.values())]
    last = [T0 + SPAN, *((r * SPAN / 2) if reset else (1e9 + r * 10 + r * SPAN) for r in rates.values())]
    return Series("m", dict(tags), cols, [first]), Series("m", dict(tags), cols, [last])


@dataclass
class Canned:
    """A fleet as canned answers per query name, built host by host."""

    answers: dict[str, list[list[Series]]] = field(default_factory=dict)

    def add(self, query: str, *statements: Series) -> None:
        stmts = self.answers.setdefault(query, [[] for _ in statements])
        for i, s in enumerate(statements):
            stmts[i].append(s)

    def host(self, name: str, rates: dict[str, float], facts: dict[str, Any] | None = None,
             vms: dict[str, dict[str, float]] | None = None, reset: bool = False, measurement: str = "kvm_vm"
             ) -> Canned:
        first, last = _pair({"host": name}, {k: v for k, v in rates.items() if k in FLEET_COLUMNS}, reset)
        self.add("fleet_counters", first, last)
        for q in DETAIL:
            self.add(q, *_pair({"host": name}, rates, reset))
        if reset:
            self.add("exact_rates", Series("kvm", {"host": name}, ["time", *rates], [[0, *rates.values()]]))
        if facts is not None:
            self.add("host_tdp", Series("kvm_host", {"host": name}, ["time", "tdp_state", "vcpus"],
                                        [[T0 + SPAN, facts.get("tdp_state"), facts.get("vcpus")]]))
            self.add("host_facts", Series("kvm_host", {"host": name}, ["time", *facts], [[T0 + SPAN, *facts.values()]]))
        for vm, vm_rates in (vms or {}).items():
            query = "vm_counters" if measurement == "kvm_vm" else "vcpu_counters"
            self.add(query, *_pair({"host": name, "vm": vm}, vm_rates))
        return self


class FakeRunner:
    """A QueryRunner answering each job with the canned series of its query, cut to its hosts and columns."""

    def __init__(self, canned: Canned) -> None:
        self.canned = canned.answers
        self.batches: list[list[Job]] = []
        self.requests = 0

    def run(self, jobs: Sequence[Job]) -> Answers:
        self.batches.append(list(jobs))
        self.requests += len(jobs)
        return {job.key: [[self._cut(s, job) for s in stmt if job.hosts is None or s.tags["host"] in job.hosts]
                          for stmt in self.canned.get(job.query, [])] for job in jobs}

    @staticmethod
    def _cut(s: Series, job: Job) -> Series:
        if job.columns is None:
            return s
        keep = [i for i, c in enumerate(s.columns) if c == "time" or c in job.columns]
        return Series(s.name, s.tags, [s.columns[i] for i in keep], [[row[i] for i in keep] for row in s.values])

    def asked(self) -> list[list[tuple[str, Any, Any]]]:
        """Per batch: (query, hosts, columns) of each job."""
        return [[(j.query, None if j.hosts is None else list(j.hosts), None if j.columns is None else list(j.columns))
                 for j in batch] for batch in self.batches]


def run(canned: Canned, **kw: Any) -> tuple[AuditResult, FakeRunner]:
    """The audit of ``canned`` just after its last samples (no host stale, unless ``now`` says otherwise)."""
    runner = FakeRunner(canned)
    return audit_with(runner, AuditOptions(rules=load_rules(), **{"now": T0 + SPAN + 10, **kw}), source="fake"), runner


def triples(result: AuditResult) -> set[tuple[str, str, str]]:
    return {(f.host, f.rule, f.severity) for f in result.findings}


FLEET_STAGE = [("fleet_counters", None, None), ("host_tdp", None, None), ("exit_reasons", None, None)]
SHADOW_VM_COLUMNS = sorted(["mmu_pte_write", "invlpg", "mmu_flooded", "mmu_pde_zapped", "pf_guest", "nested_run",
                            "mmu_unsync", "exits"])
NO_TDP = {"tdp_state": "unsupported", "vcpus": 4, "cpu_ept": False, "cpu_npt": False, "is_guest": True}
TDP = {"tdp_state": "enabled", "vcpus": 4, "cpu_ept": True, "ept_param": True}


def test_the_stages_by_name() -> None:
    assert [name for name, _ in STAGES] == ["fleet", "fresh", "resets", "screen", "detail", "vms", "evaluate",
                                            "charts"]


def test_shadow_paging_host() -> None:
    canned = Canned().host("sp", SHADOW, NO_TDP, vms={"busy": SHADOW, "idle": {"exits": 10, "mmu_pte_write": 0}})
    canned.host("ept", EPT, TDP, vms={"e0": EPT})
    result, runner = run(canned)
    assert triples(result) == {("sp", "shadow-paging", "critical"), ("sp", "tdp-unavailable", "warning")}
    assert runner.asked() == [FLEET_STAGE, [("shadow_paging", ["sp"], None), ("host_facts", ["sp"], None),
                                            ("vm_counters", ["sp"], SHADOW_VM_COLUMNS)]]
    sp = next(f for f in result.findings if f.rule == "shadow-paging")
    assert [v["vm"] for v in sp.vms] == ["busy"] and sp.evidence["tdp_state"] == "unsupported"
    assert sp.evidence["mmu_pte_write_per_s"] == 3600 and sp.evidence["shadow_events_per_exit"] == 0.215
    assert "agree" in sp.summary
    tdp = next(f for f in result.findings if f.rule == "tdp-unavailable")
    assert "is itself a VM" in tdp.summary and tdp.evidence["is_guest"] is True  # host_facts merged
    assert result.skipped == [] and result.requests == 6
    assert [q["query"] for q in result.queries] == ["fleet_counters", "host_tdp", "exit_reasons", "shadow_paging",
                                                    "host_facts", "vm_counters"]


def test_host_with_a_reset_gets_exact_rates() -> None:
    canned = Canned().host("rst", SHADOW, NO_TDP, reset=True).host("ept", EPT, TDP)
    result, runner = run(canned, only=["shadow-paging"])
    assert runner.asked()[1] == [("exact_rates", ["rst"], None)]
    assert result.hosts["rst"].exact_rates["mmu_pte_write"] == 3600 and not result.hosts["ept"].exact_rates
    (f,) = result.findings
    assert (f.host, f.rule, f.severity) == ("rst", "shadow-paging", "critical")
    assert f.evidence["mmu_pte_write_per_s"] == 3600 and f.notes == [RESET_NOTE]


def test_host_without_facts() -> None:
    rates = dict(SHADOW, irq_injections=9000, io_exits=9000, halt_poll_fail_ns=2e9)
    canned = Canned().host("nf", rates, facts=None, vms={"v": SHADOW})
    result, runner = run(canned)
    assert ("nf", "shadow-paging", "critical") in triples(result)
    shadow = next(f for f in result.findings if f.rule == "shadow-paging")
    assert "no kvm_host facts: judged from the counters alone" in shadow.notes
    assert all(query != "host_facts" for batch in runner.asked() for query, _, _ in batch)  # no facts to fetch
    assert {(s.host, s.rule, s.reason) for s in result.skipped} >= {
        ("nf", "irq-injection", UNKNOWN_VCPUS), ("nf", "halt-polling", UNKNOWN_VCPUS),
        ("nf", "tdp-*", "no kvm_host facts in the window")}
    assert not any(f.rule in ("irq-injection", "halt-polling") for f in result.findings)  # never picked


def test_exit_load_over_a_few_hosts() -> None:
    canned = Canned()
    for i in range(6):
        canned.host(f"plain-{i}", dict(EPT, exits=8000 + 200 * i), TDP, vms={f"plain-{i}-vm": EPT})
    canned.host("hot", dict(EPT, exits=200000), TDP, vms={"noisy": {"exits": 190000}, "calm": {"exits": 100}})
    result, runner = run(canned, only=["exit-load"])
    assert triples(result) == {("hot", "exit-load", "critical")}
    assert runner.asked() == [FLEET_STAGE, [("vm_counters", ["hot"], ["exits"])]]
    assert [v["vm"] for v in result.findings[0].vms] == ["noisy", "calm"]
    assert [t["host"] for t in result.top_exit_rate] == ["hot", "plain-5", "plain-4", "plain-3", "plain-2"]
    assert result.fleet["hosts"] == 7 and result.fleet["hosts_judged_per_vcpu"] == 7


def test_vm_columns_grouped_and_vcpu_counters_where_no_kvm_vm() -> None:
    canned = Canned()
    for i in range(6):
        canned.host(f"plain-{i}", dict(EPT, exits=8000 + 200 * i), TDP)
    canned.host("hot", dict(EPT, exits=200000), TDP, vms={"noisy": {"exits": 190000}})
    canned.host("io", dict(EPT, io_exits=4000, mmio_exits=2000, exits=12000), TDP,
                vms={"io-vm": {"io_exits": 4000, "mmio_exits": 2000, "exits": 12000}}, measurement="kvm_vcpu")
    result, runner = run(canned)
    assert triples(result) == {("hot", "exit-load", "critical"), ("io", "emulated-io", "critical")}
    detail, vms = runner.asked()[1:]
    assert detail == [("emulated_io", ["io"], None), ("vm_counters", ["io"], ["exits", "io_exits", "mmio_exits"]),
                      ("vm_counters", ["hot"], ["exits"])]
    assert vms == [("vcpu_counters", ["io"], ["exits", "io_exits", "mmio_exits"])]  # no kvm_vm for io
    io = next(f for f in result.findings if f.host == "io")
    assert io.vms == [{"vm": "io-vm", "io_exits_per_s": 4000.0, "mmio_exits_per_s": 2000.0, "exits_per_s": 12000.0,
                       "source": "kvm_vcpu"}]


def test_charts_for_the_hosts_with_findings() -> None:
    canned = Canned().host("sp", SHADOW, NO_TDP).host("ept", EPT, TDP)
    rows = [[T0 + 60 * i, 3600.0 + i, 1200.0] for i in range(4)]
    canned.add("counter_rates", Series("kvm", {"host": "sp"}, ["time", "mmu_pte_write", "invlpg"], rows))
    result, runner = run(canned, only=["shadow-paging"], charts=True, chart_buckets=60)
    query, hosts, columns = runner.asked()[-1][0]
    assert (query, hosts) == ("counter_rates", ["sp"])
    assert columns == ["exits", "invlpg", "mmu_flooded", "mmu_pde_zapped", "mmu_pte_write", "pf_guest"]
    assert runner.batches[-1][0].interval == "60s"  # the data's span (SPAN) over 60 buckets
    assert result.charts == {"sp": {"mmu_pte_write": [(T0 + 60 * i, 3600.0 + i) for i in range(3)],
                                    "invlpg": [(T0 + 60 * i, 1200.0) for i in range(3)]}}  # last bucket dropped


def test_no_hosts_and_bad_options() -> None:
    runner = FakeRunner(Canned())
    with pytest.raises(AuditError, match=r"^no kvm samples for hosts matching \^hv- in the last 2h in fake: are the "
                                         r"collectors running\? is the database \(and retention policy\) right\?$"):
        audit_with(runner, AuditOptions(rules=load_rules(), window="2h", host_regex="^hv-"), source="fake")
    assert runner.asked() == [FLEET_STAGE]  # nothing seen: not a clean fleet, and nothing more asked
    runner = FakeRunner(Canned())
    with pytest.raises(AuditError, match="without a definition: nope"):
        audit_with(runner, AuditOptions(rules=load_rules(), only=["nope"]))
    with pytest.raises(PackError, match="invalid regular expression"):
        audit_with(runner, AuditOptions(rules=load_rules(), host_regex="("))
    assert runner.batches == []  # refused before any request
