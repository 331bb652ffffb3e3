"""`kvmfleet queries` through Debian's `influx` shell 1.6 (package influxdb-client) against a real InfluxDB 1.6.

The shell runs what it is given in two ways: piped on stdin (not a terminal) it sends the whole input to the server
as one query, which parses comments and newlines itself; pasted at its prompt, and with ``-execute``, it runs one
line at a time (``-execute`` goes through the prompt's own line parser), so a statement wrapped over several lines
fails there ("found EOF"). ``-execute`` is what these tests use for the line-at-a-time case: it prints one JSON
document per line, which lets every statement's answer be counted.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import urllib.parse
from typing import Any

import pytest
from tests.audit.conftest import write_fleet
from tests.support import synthetic as sy
from tests.support.servers import InfluxDB1, require_binary

import kvmfleet
from kvmfleet.audit.client import Connection, InfluxQLClient
from kvmfleet.querypack import QueryParams, get_query, load_queries

pytestmark = pytest.mark.server

FLEET = [
    sy.make_host("hv-ept", "ept"),
    sy.make_host("hv-shadow", "shadow"),
    sy.make_host("hv-io", "emulated-io"),
    sy.make_host("hv-vcpu", "ept-busy", per_vm=False, per_vcpu=True),  # vcpu_counters has rows to return
]
HOSTS = {h.name for h in FLEET}
# this checkout's kvmfleet, whatever the venv's editable install points at
ENV = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(kvmfleet.__file__)))}
BAD_WORDS = ("error", "ERR", "found EOF", "empty input")


@pytest.fixture(scope="module")
def fleet_db(audit_influx: InfluxDB1) -> str:
    return write_fleet(audit_influx, FLEET, minutes=20)


def influx_argv(server: InfluxDB1, db: str) -> list[str]:
    where = urllib.parse.urlsplit(server.url)
    return [require_binary("influx", "influxdb-client"), "-host", str(where.hostname), "-port", str(where.port),
            "-database", db, "-format", "json"]


def kvmfleet_queries(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "kvmfleet.cli", "queries", *args], env=ENV, capture_output=True,
                          text=True, timeout=60, check=True)
    return done.stdout


def piped(server: InfluxDB1, db: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``kvmfleet queries ARGS | influx ...``, as a shell runs it."""
    kvmfleet_cmd = shlex.join([sys.executable, "-m", "kvmfleet.cli", "queries", *args])
    line = f"set -o pipefail; {kvmfleet_cmd} | {shlex.join(influx_argv(server, db))}"
    return subprocess.run(["bash", "-c", line], env=ENV, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def executed(server: InfluxDB1, db: str, text: str) -> subprocess.CompletedProcess[str]:
    """``influx -execute "$(TEXT)"``: a line at a time, as at the shell's prompt (``$(...)`` drops the last
    newline, which ``-execute`` would take for an empty line: "empty input")."""
    return subprocess.run([*influx_argv(server, db), "-execute", text.rstrip("\n")], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def assert_clean(done: subprocess.CompletedProcess[str]) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-2000:]
    assert not any(word in output for word in BAD_WORDS), output[-2000:]


def rows_by_host(results: list[dict[str, Any]], time_divisor: int = 1) -> dict[str, list[dict[str, Any]]]:
    """Each host's rows (a chunked answer splits one statement's series over several results)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        for series in result.get("series", []):
            rows = [dict(zip(series["columns"], values)) for values in series["values"]]
            for row in rows:
                row["time"] //= time_divisor
            out.setdefault(series["tags"]["host"], []).extend(rows)
    return out


def test_whole_pack_piped_into_influx_runs(audit_influx: InfluxDB1, fleet_db: str) -> None:
    done = piped(audit_influx, fleet_db, "--window", "1h")
    assert_clean(done)
    docs = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert len(docs) == 1 and docs[0]["results"]  # the whole input went as one query
    assert set(rows_by_host(docs[0]["results"])) == HOSTS


def test_whole_pack_line_at_a_time_answers_every_statement(audit_influx: InfluxDB1, fleet_db: str) -> None:
    text = kvmfleet_queries("--window", "1h")
    lines = text.splitlines()
    done = executed(audit_influx, fleet_db, text)
    assert_clean(done)
    answers = done.stdout.splitlines()
    assert len(answers) == len(lines)  # one JSON document per line given, comment lines included
    statement_answers = [json.loads(a) for line, a in zip(lines, answers) if not line.startswith("--")]
    assert all(json.loads(a) == {} for line, a in zip(lines, answers) if line.startswith("--"))
    queries = load_queries()  # whatever the pack holds today
    assert len(statement_answers) == sum(len(q.statements) for q in queries.values())
    assert all(isinstance(doc.get("results"), list) and doc["results"] for doc in statement_answers)
    # the audit's fleet-wide queries see every host (queries added later may ask for fields this fleet lacks)
    at = 0
    for q in queries.values():
        for _ in q.statements:
            hosts = set(rows_by_host(statement_answers[at]["results"]))
            assert hosts == HOSTS if q.name in ("fleet_counters", "host_tdp") else hosts <= HOSTS, q.name
            at += 1


def test_fleet_counters_through_the_shell_equal_the_audit_clients_answer(audit_influx: InfluxDB1,
                                                                          fleet_db: str) -> None:
    q = get_query("fleet_counters")
    done = executed(audit_influx, fleet_db, kvmfleet_queries("fleet_counters", "--window", "1h", "--no-comments"))
    assert_clean(done)
    shell = [rows_by_host(json.loads(a)["results"], time_divisor=10**9) for a in done.stdout.splitlines()]
    client = InfluxQLClient(Connection(url=audit_influx.url, database=fleet_db))
    try:
        answers = client.query(q.filled(QueryParams(window="1h")), what=q.name)
    finally:
        client.close()
    audit = [{s.tags["host"]: s.rows() for s in series} for series in answers]
    assert len(shell) == len(q.statements) == 2
    assert shell == audit
    assert set(shell[0]) == HOSTS and all(len(rows) == 1 for rows in shell[0].values())
    assert all(shell[1][h][0]["exits"] > shell[0][h][0]["exits"] for h in HOSTS)  # last sample after the first


def test_one_query_through_the_shell(audit_influx: InfluxDB1, fleet_db: str) -> None:
    done = piped(audit_influx, fleet_db, "host_tdp", "--window", "1h")
    assert_clean(done)
    tdp = rows_by_host(json.loads(done.stdout)["results"])
    assert {h: rows[0]["tdp_state"] for h, rows in tdp.items()} == {
        "hv-ept": "enabled", "hv-shadow": "unsupported", "hv-io": "enabled", "hv-vcpu": "enabled"}
    done = executed(audit_influx, fleet_db, kvmfleet_queries("host_tdp", "--window", "1h"))
    assert_clean(done)
    assert set(rows_by_host(json.loads(done.stdout.splitlines()[-1])["results"])) == HOSTS


def test_wrapped_layout_fails_a_line_at_a_time(audit_influx: InfluxDB1, fleet_db: str) -> None:
    """Why the default is one line: the shell's prompt ends a statement at the end of its line."""
    done = executed(audit_influx, fleet_db, kvmfleet_queries("host_tdp", "--window", "1h", "--wrapped"))
    assert done.returncode != 0
    assert "found EOF" in done.stdout + done.stderr
