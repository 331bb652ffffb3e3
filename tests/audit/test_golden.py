"""The whole audit replayed on recorded InfluxDB answers: the same statements sent (text and count) and the same
JSON, table, Markdown and HTML, to the byte, as recorded in ``tests/audit/golden/``.

``golden/answers.json`` holds the answers a real InfluxDB 1.6 gave to every statement the audit sent for a mixed
synthetic fleet (:data:`FLEET`: shadow paging, nested guests, EPT off, emulated I/O, legacy interrupts,
instruction emulation, halt polling, exit-load outliers with and without vCPU counts, old counter names, counter
resets, gaps, hosts without facts, kvm_vcpu instead of kvm_vm); ``golden/<config>/`` the audit's outputs for each
of :data:`CONFIGS`. A statement the recording does not hold fails the test: the queries are pinned too.

To record again (after an intended change of the queries or the outputs), with a real InfluxDB 1.6 installed::

    KVMFLEET_RECORD_GOLDEN=1 python -m pytest -q tests/audit/test_golden.py

and read the diff of ``tests/audit/golden/`` before committing it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from kvmfleet.audit import runner
from kvmfleet.audit.client import InfluxQLClient, Series
from kvmfleet.audit.engine import AuditOptions, AuditResult, run_audit
from kvmfleet.audit.report import render, render_json
from kvmfleet.querypack import load_rules

GOLDEN = Path(__file__).with_name("golden")
RECORD = os.environ.get("KVMFLEET_RECORD_GOLDEN") == "1"

# name -> (AuditOptions keywords, --set overrides, hosts per detail query (None: the engine's), formats)
CONFIGS: dict[str, tuple[dict[str, Any], list[str], int | None, tuple[str, ...]]] = {
    "all": ({}, [], None, ("json", "table", "markdown")),
    "all-charts": ({"charts": True}, [], None, ("json",)),
    "some-rules": ({"only": ["shadow-paging", "tdp-unavailable", "halt-polling"], "charts": True},
                   ["shadow-paging.critical_per_exit=0.9"], None, ("json", "table", "markdown", "html")),
    "exit-load": ({"only": ["exit-load"]}, [], None, ("json", "table")),
    "tdp-disabled-nested": ({"only": ["tdp-disabled", "nested-shadow"]}, [], None, ("json",)),
    "host-regex": ({"host_regex": "^(shadow|nested|hot|io|irq|reset|vcpu)-"}, [], None, ("json",)),
    "small-groups": ({}, [], 3, ("json",)),
}


def _fleet() -> list[Any]:
    from tests.support import synthetic as sy

    return [
        sy.make_host("ept-idle-1", "ept-idle"),
        sy.make_host("ept-1", "ept"), sy.make_host("ept-2", "ept", scale=1.2), sy.make_host("ept-3", "ept", scale=0.8),
        sy.make_host("ept-busy-1", "ept-busy"),
        sy.make_host("ept-memory-1", "ept-memory"),
        sy.make_host("npt-1", "ept", facts=sy.FACTS_NPT),
        sy.make_host("kvm-only-1", "ept-busy", no_facts=True, per_vm=False),
        sy.make_host("shadow-1", "shadow"),
        sy.make_host("shadow-idle-1", "shadow-idle"),
        sy.make_host("eptoff-1", "shadow", facts=sy.FACTS_EPT_OFF),
        sy.make_host("eptoff-idle-1", "ept-idle", facts=sy.FACTS_EPT_OFF),
        sy.make_host("nested-1", "nested"),
        sy.make_host("nested-nofacts-1", "nested", no_facts=True),
        sy.make_host("io-1", "emulated-io"),
        sy.make_host("irq-1", "legacy-irq"),
        sy.make_host("irq-novcpu-1", "legacy-irq", no_facts=True),
        sy.make_host("insn-1", "insn-emulation"),
        sy.make_host("halt-1", "halt-poll-waste"),
        sy.make_host("halt-novcpu-1", "halt-poll-waste", no_facts=True),
        sy.make_host("old-ept-1", "ept", old_names=True),
        sy.make_host("old-shadow-1", "shadow", old_names=True, no_facts=True),
        sy.make_host("old-irq-1", "legacy-irq", old_names=True),
        sy.make_host("min-1", "ept", fields=["exits", "halt_exits", "io_exits"]),
        sy.make_host("reset-1", "shadow", resets=[1500]),
        sy.make_host("reset-ept-1", "ept", resets=[900]),
        sy.make_host("gap-1", "ept", gaps=[(600, 1500)]),
        sy.make_host("gap-shadow-1", "shadow", gaps=[(0, 2000)]),
        sy.make_host("silent-1", "silent"),
        sy.make_host("vcpu-only-1", "shadow", per_vm=False, per_vcpu=True),
        sy.make_host("hot-1", "hot"),
        sy.make_host("hot-novm-1", "hot", per_vm=False),
        sy.make_host("one-sample-1", "ept", gaps=[(0, 3000)]),
        sy.make_host("zero-vcpus-1", "halt-poll-waste", facts=dict(sy.FACTS_EPT, vcpus=0)),
        sy.make_host("tdp-unknown-1", "shadow", facts=dict(sy.FACTS_EPT, tdp_state="unknown")),
        sy.make_host("shadow-factsept-1", "shadow", facts=sy.FACTS_EPT),
        sy.make_host("nofacts-1", "ept", no_facts=True), sy.make_host("nofacts-2", "ept", no_facts=True, scale=1.1),
        sy.make_host("nofacts-3", "ept-idle", no_facts=True), sy.make_host("hot-nofacts-1", "hot", no_facts=True),
    ]


def _series_doc(answer: Sequence[Sequence[Series]]) -> list[list[dict[str, Any]]]:
    return [[{"name": s.name, "tags": s.tags, "columns": s.columns, "values": s.values} for s in stmt]
            for stmt in answer]


class _Client:
    """What the engine needs of :class:`InfluxQLClient`: ``query`` and ``requests``; answers from a recording
    (or, while recording, from a real client), and the statements it was sent."""

    def __init__(self, answers: dict[str, Any], real: InfluxQLClient | None = None) -> None:
        self.answers = answers
        self.real = real
        self.sent: list[str] = []
        self.requests = 0
        self._lock = threading.Lock()

    def query(self, statements: Sequence[str] | str, what: str = "query") -> list[list[Series]]:
        assert isinstance(statements, str), statements
        if self.real is not None:
            answer = self.real.query(statements, what=what)
            with self._lock:
                self.answers.setdefault(statements, _series_doc(answer))
        with self._lock:
            self.sent.append(statements)
            self.requests += 1
        if statements not in self.answers:
            raise AssertionError(f"a statement the recording does not hold ({what}):\n{statements}")
        return [[Series(s["name"], dict(s["tags"]), list(s["columns"]), [list(v) for v in s["values"]])
                 for s in stmt] for stmt in self.answers[statements]]


def _recorded_now(answers: dict[str, Any]) -> float | None:
    """When the recording was made: its newest sample (the fleet ends then), so that no host is stale in the
    replay; None while recording (the real time)."""
    times = [row[s["columns"].index("time")] for stmts in answers.values() for stmt in stmts for s in stmt
             if "time" in s["columns"] for row in s["values"]]
    return max(times) if times and not RECORD else None


def _run(client: _Client, config: str, monkeypatch: pytest.MonkeyPatch) -> AuditResult:
    kw, sets, per_query, _ = CONFIGS[config]
    if per_query is not None:
        monkeypatch.setattr(runner, "HOSTS_PER_QUERY", per_query)
    options = AuditOptions(window="1h", rules=load_rules(sets=sets), now=_recorded_now(client.answers), **kw)
    result = run_audit(client, options, source="http://influxdb.golden:8086 database golden")  # type: ignore[arg-type]
    result.elapsed_s = 0.25  # what varies from run to run
    result.started_at = 1_700_000_000.0
    for entry in result.queries:
        entry["stage_s"] = 0.0
    return result


def _outputs(client: _Client, result: AuditResult, formats: Sequence[str]) -> dict[str, str]:
    out = {"statements.txt": "\n\n".join(sorted(client.sent)) + "\n",
           "requests.txt": f"{client.requests} requests, {result.requests} counted by the audit\n"}
    suffix = {"json": "report.json", "table": "table.txt", "markdown": "report.md", "html": "report.html"}
    for fmt in formats:
        out[suffix[fmt]] = render_json(result, "warning") if fmt == "json" else render(result, fmt, "warning")
    return out


@pytest.mark.server
def _record_golden(audit_influx: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs (before the replays) only with KVMFLEET_RECORD_GOLDEN=1."""
    from tests.audit.conftest import write_fleet

    from kvmfleet.audit.client import Connection

    db = write_fleet(audit_influx, _fleet(), minutes=50)  # 50 minutes in a 1h window: stable for 10 minutes
    real = InfluxQLClient(Connection(url=audit_influx.url, database=db))
    answers: dict[str, Any] = {}
    try:
        for config in CONFIGS:
            with monkeypatch.context() as mp:
                client = _Client(answers, real)
                result = _run(client, config, mp)
                outdir = GOLDEN / config
                outdir.mkdir(parents=True, exist_ok=True)
                for name, text in _outputs(client, result, CONFIGS[config][3]).items():
                    (outdir / name).write_text(text, encoding="utf-8")
    finally:
        real.close()
    (GOLDEN / "answers.json").write_text(json.dumps(answers, indent=0, sort_keys=True) + "\n", encoding="utf-8")


if RECORD:
    test_record_golden = _record_golden


@pytest.mark.parametrize("config", list(CONFIGS))
def test_replay_golden(config: str, monkeypatch: pytest.MonkeyPatch) -> None:
    answers = json.loads((GOLDEN / "answers.json").read_text(encoding="utf-8"))
    client = _Client(answers)
    result = _run(client, config, monkeypatch)
    for name, text in _outputs(client, result, CONFIGS[config][3]).items():
        expected = (GOLDEN / config / name).read_text(encoding="utf-8")
        assert text == expected, f"{config}/{name} differs from the golden file"
