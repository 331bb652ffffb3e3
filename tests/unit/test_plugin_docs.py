"""docs/plugin.md documents every option of the plugin, docs/schema.md every field the agent writes itself."""

from __future__ import annotations

import re
from pathlib import Path

from kvmfleet import agent as ag
from kvmfleet import options as op
from kvmfleet import points as pt
from kvmfleet import schema
from kvmfleet.facts import HostFacts

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_option_is_in_the_options_table() -> None:
    text = (DOCS / "plugin.md").read_text()
    table = {m.group(1) for m in re.finditer(r"^\| `([A-Za-z]+)` \|", text, re.MULTILINE)}
    missing = [o.name for o in op.OPTIONS if o.name not in table]
    assert not missing, f"options not documented in docs/plugin.md: {missing}"
    extra = table - {o.name for o in op.OPTIONS}
    assert not extra, f"docs/plugin.md documents options the plugin does not have: {extra}"


def test_every_default_in_the_table_matches_the_code() -> None:
    text = (DOCS / "plugin.md").read_text()
    for opt in op.OPTIONS:
        row = re.search(rf"^\| `{opt.name}` \|.*$", text, re.MULTILINE)
        assert row is not None, opt.name
        cells = re.split(r"(?<!\\)\|", row.group(0))  # | name | type | default | meaning |
        default = cells[3]
        if isinstance(opt.default, bool):
            assert f"`{str(opt.default).lower()}`" in default, (opt.name, default)
        elif isinstance(opt.default, (int, float)) and not isinstance(opt.default, bool):
            assert f"`{opt.default:g}`" in default, (opt.name, default)
        elif isinstance(opt.default, str):
            assert f'`"{opt.default}"`' in default, (opt.name, default)


def test_every_field_of_kvm_host_and_kvmfleet_agent_is_in_the_schema() -> None:
    text = (DOCS / "schema.md").read_text()
    agent = ag.Agent(op.AgentConfig())
    stats = {"sent": 0, "buffered": 0, "dropped": 0, "dropped_rejected": 0, "retries": 0, "last_error": None,
             "spool_loaded": 0}
    names = set(pt.facts_fields(HostFacts())) | {"vms", "vcpus"} | set(agent.agent_fields(stats))
    missing = [n for n in sorted(names) if f"`{n}`" not in text]
    assert not missing, f"fields not documented in docs/schema.md: {missing}"
    for measurement in schema.MEASUREMENTS:
        assert f"`{measurement}`" in text
