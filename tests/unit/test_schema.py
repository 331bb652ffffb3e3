"""kvmfleet.schema is the one source of the InfluxDB names: the agent writes them, the query pack reads only them,
docs/schema.md names them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvmfleet import schema
from kvmfleet.agent import Agent
from kvmfleet.facts import HostFacts
from kvmfleet.options import AgentConfig
from kvmfleet.points import facts_fields
from kvmfleet.querypack import load_counters, load_queries

DOCS = Path(__file__).resolve().parents[2] / "docs"
KNOWN_COUNTERS = set(load_counters()) | {old for olds in schema.OLD_NAMES.values() for old in olds}
SHIP_STATS = {"sent": 0, "buffered": 0, "dropped": 0, "dropped_rejected": 0, "retries": 0, "last_error": None,
              "spool_loaded": 0}


def test_the_agent_writes_exactly_the_schema_fields() -> None:
    assert set(facts_fields(HostFacts())) | {"vms", "vcpus"} == {f.name for f in schema.FACT_FIELDS}
    agent = Agent(AgentConfig())
    assert set(agent.agent_fields(SHIP_STATS)) == {f.name for f in schema.AGENT_FIELDS}
    assert set(agent.agent_fields(None)) == {f.name for f in schema.AGENT_FIELDS} - set(schema.AGENT_SHIP_FIELDS)
    dispatched = schema.AGENT_GAUGES + schema.AGENT_SHIP_GAUGES + schema.AGENT_SHIP_DERIVES
    assert set(dispatched) <= {f.name for f in schema.AGENT_FIELDS}


def test_every_renamed_counter_has_notes() -> None:
    counters = load_counters()
    for name in [*schema.OLD_NAMES, *schema.OLD_ONLY]:
        assert name in counters, f"{name} is in kvmfleet.schema but has no notes in querypack/counters.yaml"
    assert schema.current_name("largepages") == "pages_2m" and schema.names_of("pages_2m") == ("pages_2m",
                                                                                               "largepages")


def _selects(statement: str) -> list[tuple[str, str, str]]:
    """(select list, measurement, rest) of every SELECT that reads a measurement directly (subqueries included)."""
    found = []
    for m in re.finditer(r"SELECT\s+(.*?)\s+FROM\s+\$\{rp\}\"(\w+)\"(.*?)(?=\n\s*\)|$)", statement, re.S):
        found.append((m.group(1), m.group(2), m.group(3)))
    return found


def _fields(select_list: str) -> set[str]:
    text = re.sub(r"\bAS\s+\"?\w+\"?", "", select_list)  # aliases are the pack's own names
    text = re.sub(r"\b\d+[a-z]+\b", "", text)  # durations: 1s
    return {t for t in re.findall(r"\"?\b([a-z_][a-z0-9_]*)\b\"?(?!\s*\()", text)}


@pytest.mark.parametrize("query", list(load_queries().values()), ids=lambda q: q.name)
def test_every_query_reads_only_schema_names(query) -> None:  # type: ignore[no-untyped-def]
    selects = [s for statement in query.statements for s in _selects(statement)]
    assert selects, f"{query.name}: no SELECT ... FROM ${{rp}}\"measurement\" found"
    assert query.measurement in schema.MEASUREMENTS, query.name
    for select_list, measurement, rest in selects:
        assert measurement in schema.MEASUREMENTS, (query.name, measurement)
        known = {f.name for f in schema.FIELDS[measurement]} if measurement in schema.FIELDS else KNOWN_COUNTERS
        unknown = _fields(select_list) - known
        assert not unknown, f"{query.name} selects {sorted(unknown)} from {measurement}: not in the schema"
        tags = set(re.findall(r"\"(\w+)\"\s*(?:=~|=|,|\s|$)", rest)) - {measurement}
        assert tags <= set(schema.TAGS[measurement]), (query.name, tags - set(schema.TAGS[measurement]))


def test_docs_schema_names_every_measurement_tag_and_field() -> None:
    text = (DOCS / "schema.md").read_text()
    names = set(schema.MEASUREMENTS) | {t for tags in schema.TAGS.values() for t in tags}
    names |= {f.name for fields in schema.FIELDS.values() for f in fields}
    missing = sorted(n for n in names if f"`{n}`" not in text)
    assert not missing, f"docs/schema.md does not name {missing}"
