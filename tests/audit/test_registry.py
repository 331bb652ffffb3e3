"""The rule units' registry against rules.yaml and the query pack: one set of rule ids, detail queries that exist,
VM columns the pack selects, thresholds each rule reads that rules.yaml defines."""

from __future__ import annotations

import re

import pytest

from kvmfleet.audit.rules import FLEET, HOST, REGISTRY, ThresholdRule, Units, rule_ids, wanted_rules
from kvmfleet.audit.rules.threshold import Floor
from kvmfleet.querypack import QueryParams, get_query, load_queries, load_rules

RULES = load_rules()


def _select_items(query: str) -> set[str]:
    stmt = get_query(query).filled(QueryParams())[0]
    items = stmt[len("SELECT"):stmt.index("FROM")]
    return {re.sub(r".*\bAS\s+", "", item.strip()) for item in items.split(",")}


def test_registry_and_rules_yaml_name_the_same_rules() -> None:
    ids = rule_ids()
    assert len(ids) == len(set(ids)), "a rule id registered twice"
    assert set(ids) == set(RULES), ("registry only: " + ", ".join(sorted(set(ids) - set(RULES))) + "; rules.yaml only: "
                                    + ", ".join(sorted(set(RULES) - set(ids))))


def test_derived_rules_match_derived_from() -> None:
    derived = {rid: unit.id for unit in REGISTRY for rid in unit.derived}
    assert derived == {rid: r.derived_from for rid, r in RULES.items() if r.derived_from}


def test_every_detail_query_exists_and_is_named_by_its_rule() -> None:
    queries = load_queries()
    for unit in REGISTRY:
        if unit.detail_query is not None:
            assert unit.detail_query in queries, (unit.id, unit.detail_query)
            assert get_query(unit.detail_query).stage == "detail"
            assert unit.detail_query in RULES[unit.id].queries, unit.id


def test_every_vm_column_is_selected_by_vm_counters() -> None:
    selected = _select_items("vm_counters")
    for unit in REGISTRY:
        assert set(unit.vm_columns) <= selected, (unit.id, set(unit.vm_columns) - selected)


@pytest.mark.parametrize("unit", [u for u in REGISTRY if issubclass(u, ThresholdRule)], ids=lambda u: u.id)
def test_threshold_rules_read_thresholds_rules_yaml_defines(unit: type[ThresholdRule]) -> None:
    defined = set(RULES[unit.id].thresholds)
    read = {g.threshold for g in unit.gates if isinstance(g, Floor)}
    read |= {f"{level}_{t.suffix}" for t in unit.tests for level in ("warning", "critical")}
    assert read <= defined, read - defined
    assert any(isinstance(g, Floor) for g in unit.gates)


def test_scopes_and_units_made_for_an_audit() -> None:
    assert {u.scope for u in REGISTRY} == {HOST, FLEET}
    units = Units.make(RULES, wanted_rules(None))
    assert [u.id for u in units.host] == ["shadow-paging", "tdp-disabled", "emulated-io", "irq-injection",
                                          "insn-emulation", "halt-polling", "exit-reason-storm"]
    assert [u.id for u in units.fleet] == ["exit-load"]
    # the TDP pair runs when either is wanted; nested-shadow comes with shadow-paging, never alone
    assert [u.id for u in Units.make(RULES, wanted_rules(["tdp-unavailable"])).host] == ["tdp-disabled"]
    assert wanted_rules(["shadow-paging"]) == {"shadow-paging", "nested-shadow"}
    assert Units.make(RULES, wanted_rules(["nested-shadow"])).all == []
