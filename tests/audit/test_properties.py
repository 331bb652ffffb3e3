"""Property tests: over generated fleets the rules never crash, whatever gaps, counter resets, zero exits, missing
fields, old names or absent facts they meet; hosts whose counters follow the EPT/NPT pattern are never flagged
shadow-paging; every output format renders and the JSON has finite numbers only.

The first two run the rules on generated host numbers (many examples, no server); the last writes generated fleets
into a real InfluxDB 1.6 and runs the whole audit (fewer examples, marked ``server``).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tests.audit.conftest import audit, write_fleet
from tests.support import synthetic as sy
from tests.support.servers import InfluxDB1

from kvmfleet.audit.client import AuditError
from kvmfleet.audit.engine import AuditResult
from kvmfleet.audit.model import HostData, VMData
from kvmfleet.audit.report import render, to_dict
from kvmfleet.audit.rules import Units, wanted_rules
from kvmfleet.querypack import load_rules

RULES = load_rules()
UNITS = Units.make(RULES, wanted_rules(None))
COUNTERS = ("exits", "mmu_pte_write", "mmu_pte_updated", "mmu_flooded", "mmu_pde_zapped", "invlpg", "pf_guest",
            "nested_run", "pf_fixed", "mmu_shadow_zapped", "mmu_cache_miss", "io_exits", "mmio_exits",
            "irq_injections", "irq_exits", "irq_window_exits", "irq_window", "insn_emulation", "insn_emulation_fail",
            "halt_poll_fail_ns", "halt_poll_success_ns", "halt_attempted_poll", "halt_successful_poll")
numbers = st.one_of(st.none(), st.just(0.0), st.floats(min_value=0, max_value=1e15, allow_nan=False),
                    st.floats(min_value=-1e9, max_value=-1e-9))
facts = st.one_of(st.none(), st.fixed_dictionaries({
    "tdp_state": st.sampled_from(["enabled", "disabled", "unsupported", "unknown", None, "garbage"]),
    "vcpus": st.one_of(st.none(), st.integers(-1, 512), st.just("8")),
    "nested": st.sampled_from([True, False, None]),
    "cpu_ept": st.sampled_from([True, False, None]),
    "ept_param": st.sampled_from([True, False, None]),
    "is_guest": st.sampled_from([True, False, None]),
    "kvm_module": st.sampled_from(["kvm_intel", "kvm_amd", "kvm_pvm", None]),
}))


@st.composite
def host_data(draw: Any, name: str) -> HostData:
    h = HostData(name)
    t0 = draw(st.one_of(st.none(), st.floats(0, 2e9)))
    h.t_first = t0
    h.t_last = None if t0 is None else t0 + draw(st.sampled_from([0.0, 1e-6, 10.0, 3600.0]))
    for c in draw(st.sets(st.sampled_from(COUNTERS))):
        v = draw(numbers)
        h.increases[c] = None if v is None or v < 0 else v
        if v is not None and v < 0:
            h.reset = True
    if draw(st.booleans()):
        h.exact_rates = {c: draw(numbers) for c in draw(st.sets(st.sampled_from(COUNTERS[:8])))}
    h.instant["mmu_unsync"] = draw(st.one_of(st.none(), st.floats(0, 1e6)))
    f = draw(facts)
    if f is not None:
        h.has_facts = True
        h.facts = {k: v for k, v in f.items() if v is not None}
    for i in range(draw(st.integers(0, 3))):
        h.vms[f"vm{i}"] = VMData(f"vm{i}", increases={c: draw(numbers) for c in
                                                      draw(st.sets(st.sampled_from(COUNTERS[:10])))},
                                 reset=draw(st.booleans()))
    return h


def _all_finite(obj: Any) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_all_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_all_finite(v) for v in obj)
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=12, unique=True).flatmap(
    lambda ids: st.tuples(*[host_data(f"h{i}") for i in ids])))
def test_rules_never_crash_on_any_host_numbers(hosts: tuple[HostData, ...]) -> None:
    fleet = {h.host: h for h in hosts}
    findings, skipped = [], []
    for h in hosts:
        for unit in UNITS.host:  # every rule on every host, picked by its screen or not
            unit.screen(h)
            for o in (unit.evaluate(h), unit.unpicked(h)):
                if o is not None:
                    findings += o.findings
                    skipped += o.skipped
    (exit_load,) = UNITS.fleet
    exit_load.pick(fleet)
    el = exit_load.evaluate_fleet(fleet)
    findings += el.findings
    for f in findings:
        assert f.severity in ("info", "warning", "critical") and f.host in fleet and f.summary
    result = AuditResult(window="1h", window_s=3600, host_regex=".*", source="x", hosts=fleet, findings=findings,
                         skipped=skipped, top_exit_rate=el.top, fleet=el.fleet, rules=RULES, queries=[],
                         requests=0, elapsed_s=0.0, started_at=0.0)
    doc = to_dict(result)
    assert _all_finite(doc)
    json.loads(json.dumps(doc, allow_nan=False))
    for fmt in ("table", "markdown", "html"):
        assert render(result, fmt)


EPT_PATTERN = ("ept", "ept-idle", "ept-busy", "ept-memory", "silent", "emulated-io", "legacy-irq", "insn-emulation",
               "halt-poll-waste", "hot")
ALL_PROFILES = (*EPT_PATTERN, "shadow", "shadow-idle", "nested")


@st.composite
def fleet_specs(draw: Any) -> list[sy.HostSpec]:
    hosts = []
    for i in range(draw(st.integers(1, 5))):
        profile = draw(st.sampled_from(ALL_PROFILES))
        minutes = 10
        gaps = draw(st.lists(st.tuples(st.integers(0, minutes * 60), st.integers(10, 300)), max_size=2))
        resets = draw(st.lists(st.integers(0, minutes * 60), max_size=2))
        fields = draw(st.one_of(st.none(), st.sets(st.sampled_from(COUNTERS[:12]), min_size=1)))
        no_facts = draw(st.booleans())
        facts = None if no_facts else draw(st.sampled_from(
            [None, sy.FACTS_EPT, sy.FACTS_EPT_OFF, sy.FACTS_NO_TDP, sy.FACTS_NPT]))
        hosts.append(sy.make_host(
            f"p{i}-{profile}", profile, n_vms=draw(st.integers(0, 2)), vcpus=draw(st.integers(1, 3)),
            facts=facts, no_facts=no_facts, per_vm=draw(st.booleans()), per_vcpu=draw(st.booleans()),
            old_names=draw(st.booleans()), fields=None if fields is None else sorted(fields),
            gaps=[(a, a + d) for a, d in gaps], resets=resets, jitter=draw(st.sampled_from([0.0, 0.1, 0.9]))))
    return hosts


@pytest.mark.server
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(fleet_specs())
@example([sy.make_host("p0-ept", "ept", n_vms=0, no_facts=True, fields=["mmu_pte_updated"])])  # writes nothing
def test_whole_audit_on_generated_fleets_in_influxdb(audit_influx: InfluxDB1, hosts: list[sy.HostSpec]) -> None:
    db = write_fleet(audit_influx, hosts, minutes=10)
    if not audit_influx.rows('SELECT count(*) FROM "kvm"', db=db):
        # the fleet wrote no host sample at all (no VM and no field it knows): the audit fails closed
        with pytest.raises(AuditError, match="no kvm samples"):
            audit(audit_influx, db, charts=True)
        return
    result = audit(audit_influx, db, charts=True)
    doc = to_dict(result)
    assert _all_finite(doc)
    json.loads(json.dumps(doc, allow_nan=False))
    for fmt in ("table", "markdown", "html"):
        render(result, fmt)
    profile = {h.name: h.vms[0].profile if h.vms else "silent" for h in hosts}
    for f in result.findings:
        if f.rule == "shadow-paging":
            # the shadow-only counters never move on EPT/NPT-pattern hosts, so they are never flagged
            assert profile[f.host] in ("shadow", "shadow-idle", "nested"), (f.host, f.summary)
