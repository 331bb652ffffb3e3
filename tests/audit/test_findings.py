"""``--write-findings``: the exact lines of findings and runs, and findings written to a real InfluxDB 1.6 (with a
user that may write the findings database only) and to VictoriaMetrics (the v2 write API), then read back."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.support import synthetic as sy
from tests.support.fixtures import running
from tests.support.servers import InfluxDB1, VictoriaMetrics

from kvmfleet.audit.findings import (
    DEFAULT_FINDINGS_DATABASE,
    FindingsWriteError,
    add_write_findings_args,
    evidence_fields,
    finding_lines,
    run_line,
    write_findings,
)
from kvmfleet.audit.model import Finding

TS = 1_700_000_000

SHADOW = Finding("kvmf-hv1", "shadow-paging", "critical", "Shadow paging", "42 shadow events/s",
                 {"shadow_events_per_s": 42.5, "vcpus": 4, "tdp_enabled": False, "tdp_state": "disabled",
                  "nested": {"runs_per_s": 1, "note": "x"}, "unknown": None, "per_vm": [1, 2]})
HOSTILE = Finding('h,1 =x\n"y"\\', "exit-load", "warning", "t", 'a "quoted" summary, with \\ and\nnewline',
                  {"exits_per_s": 1e-05, "summary": 7, "nan": float("nan")})


# ---------------------------------------------------------------------------------------------- lines
def test_a_finding_is_one_line_with_its_tags_summary_and_numeric_evidence() -> None:
    assert finding_lines([SHADOW], TS + 0.9) == [
        "kvmfleet_finding,host=kvmf-hv1,rule=shadow-paging,severity=critical "
        'nested_runs_per_s=1,shadow_events_per_s=42.5,summary="42 shadow events/s",vcpus=4 1700000000000000000'
    ]


def test_hostile_names_and_summaries_are_escaped_and_evidence_cannot_take_the_summary() -> None:
    assert finding_lines([HOSTILE], TS) == [
        "kvmfleet_finding,host=h\\,1\\ \\=x\\n\"y\"\uff3c,rule=exit-load,severity=warning "
        'exits_per_s=1e-05,summary="a \\"quoted\\" summary, with \\\\ and\nnewline" 1700000000000000000'
    ]


def test_evidence_becomes_floats_with_stable_names() -> None:
    assert evidence_fields(SHADOW.evidence) == {"shadow_events_per_s": 42.5, "vcpus": 4.0, "nested_runs_per_s": 1.0}
    assert all(type(v) is float for v in evidence_fields(SHADOW.evidence).values())


def test_the_run_line_counts_findings_even_when_there_are_none() -> None:
    assert run_line("audit", [SHADOW, HOSTILE], TS, hosts=3, elapsed_s=1.5) == (
        "kvmfleet_audit_run,command=audit critical=1i,elapsed_s=1.5,findings=2i,hosts=3i,stale_hosts=0i,warning=1i "
        "1700000000000000000")
    assert run_line("audit", [], TS, hosts=3, elapsed_s=0.25, stale_hosts=1) == (
        "kvmfleet_audit_run,command=audit critical=0i,elapsed_s=0.25,findings=0i,hosts=3i,stale_hosts=1i,warning=0i "
        "1700000000000000000")


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--url")
    p.add_argument("--ca-file")
    p.add_argument("--no-verify-tls", action="store_true")
    p.add_argument("--allow-plain-http", action="store_true")
    p.add_argument("--timeout", type=float, default=10.0)
    add_write_findings_args(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize(("argv", "words"), [
    (["--write-username", "w"], "--write-username needs --write-password-file"),
    (["--write-bucket", "b"], "--write-bucket needs --write-org"),
    (["--write-token-file", "/etc/hostname"], "--write-token-file goes with --write-bucket"),
    (["--write-username", "w", "--write-password-file", "/nonexistent/pw"], "'/nonexistent/pw' does not exist"),
])
def test_bad_write_options_fail_before_anything_is_sent(argv: list[str], words: str) -> None:
    with pytest.raises(FindingsWriteError, match=words):
        write_findings(_args("--url", "http://127.0.0.1:9", "--write-findings", *argv), "audit", [SHADOW], TS, 1, 1.0)


def test_the_audit_refuses_bad_write_options_before_it_asks_anything() -> None:
    r = _audit("--url", "http://127.0.0.1:9", "--database", "kvm", "--write-findings", "--write-bucket", "b")
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == "kvmfleet audit: error: --write-bucket needs --write-org\n"


def test_without_write_findings_nothing_is_written() -> None:
    assert write_findings(_args("--url", "http://127.0.0.1:9"), "audit", [SHADOW], TS, 1, 1.0) == 0


# ---------------------------------------------------------------------------------------------- real servers
WRITER, WRITER_PASSWORD = "findings_writer", "w'ri\"ter-secret"


@pytest.fixture
def findings_influx(tmp_path: Path) -> object:
    """InfluxDB 1.6 with auth: the fleet in one database, a findings database that only ``findings_writer``
    may write (and read nothing), and a reader of the fleet."""
    with running(lambda: InfluxDB1(workdir=tmp_path / "influx", auth=True)) as server:
        server.create_database(DEFAULT_FINDINGS_DATABASE)
        server.query(f"CREATE USER {WRITER} WITH PASSWORD 'w\\'ri\"ter-secret'")
        server.query(f'GRANT WRITE ON "{DEFAULT_FINDINGS_DATABASE}" TO {WRITER}')
        server.query("CREATE USER reader WITH PASSWORD 'reader-secret'")
        yield server


def _fleet(server: InfluxDB1, db: str, hosts: list[sy.HostSpec]) -> str:
    """``hosts`` over the last 20 minutes in a new database ``db``, written as the admin."""
    server.create_database(db)
    end = int(time.time()) // 10 * 10
    sy.post_lines(server.url, db, sy.fleet_lines(hosts, end, 1200, 10), username=server.admin_user,
                  password=server.admin_password)
    return db


def _secret(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text + "\n")
    path.chmod(0o600)
    return str(path)


def _audit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmfleet.cli", "audit", *args], capture_output=True, text=True,
                          timeout=120, env=os.environ, stdin=subprocess.DEVNULL)


@pytest.mark.server
def test_audit_writes_its_findings_with_a_write_only_user_and_a_query_returns_them(
        findings_influx: InfluxDB1, tmp_path: Path) -> None:
    server = findings_influx
    db = _fleet(server, "fleet", [sy.make_host("f-shadow", "shadow"), sy.make_host("f-ept-1", "ept"),
                                  sy.make_host("f-ept-2", "ept")])
    server.query(f'GRANT READ ON "{db}" TO reader')
    read = ["--url", server.url, "--database", db, "--username", "reader",
            "--password-file", _secret(tmp_path, "reader.pw", "reader-secret")]
    write = ["--write-findings", "--write-username", WRITER,
             "--write-password-file", _secret(tmp_path, "writer.pw", WRITER_PASSWORD)]
    direct = _audit(*read, "--format", "json")
    assert direct.returncode == 1, direct.stderr
    expected = {(f["host"], f["rule"], f["severity"]) for f in json.loads(direct.stdout)["findings"]}
    assert ("f-shadow", "shadow-paging", "critical") in expected

    t0 = int(time.time())
    r = _audit(*read, *write, "--format", "json")
    assert (r.returncode, r.stderr) == (1, ""), r.stderr
    assert json.loads(r.stdout)["findings"]  # the report is printed as without --write-findings
    rows = server.rows('SELECT * FROM "kvmfleet_finding"', db=DEFAULT_FINDINGS_DATABASE)
    assert {(row["host"], row["rule"], row["severity"]) for row in rows} == expected
    assert len({row["time"] for row in rows}) == 1 and t0 - 1 <= rows[0]["time"] // 10**9 <= time.time()
    shadow = next(row for row in rows if row["rule"] == "shadow-paging")
    assert shadow["summary"] and shadow["shadow_events_per_s"] > 0
    [run] = server.rows('SELECT * FROM "kvmfleet_audit_run"', db=DEFAULT_FINDINGS_DATABASE)
    assert (run["command"], run["findings"], run["hosts"], run["stale_hosts"]) == ("audit", len(expected), 3, 0)
    # a finding that clears is not written again: a run where none is found writes only its run point (a second
    # later: a run's points are stamped in whole seconds, two runs in the same second would share them)
    time.sleep(1.1)
    r = _audit(*read, *write, "--rules", "emulated-io")
    assert r.returncode == 0, r.stderr
    runs = server.rows('SELECT "findings" FROM "kvmfleet_audit_run"', db=DEFAULT_FINDINGS_DATABASE)
    assert [row["findings"] for row in runs][-1] == 0
    latest = runs[-1]["time"]
    assert server.rows(f'SELECT * FROM "kvmfleet_finding" WHERE time >= {latest}',
                       db=DEFAULT_FINDINGS_DATABASE) == []


@pytest.mark.server
def test_a_write_the_server_refuses_is_exit_2_with_one_line_after_the_report(
        findings_influx: InfluxDB1, tmp_path: Path) -> None:
    server = findings_influx
    db = _fleet(server, "fleet", [sy.make_host("r-shadow", "shadow"), sy.make_host("r-ept", "ept")])
    # the writer may write the findings database only: writing the fleet's database is refused
    r = _audit("--url", server.url, "--database", db, "--username", "admin",
               "--password-file", _secret(tmp_path, "admin.pw", server.admin_password),
               "--write-findings", "--write-database", db, "--write-username", WRITER,
               "--write-password-file", _secret(tmp_path, "writer.pw", WRITER_PASSWORD), "--format", "json")
    assert r.returncode == 2
    assert json.loads(r.stdout)["findings"]
    [line] = r.stderr.splitlines()
    assert line.startswith("kvmfleet audit: error: the findings were not written: ") and "403" in line, line
    assert WRITER_PASSWORD not in r.stderr and "reader-secret" not in r.stderr
    assert server.rows("SELECT * FROM \"kvmfleet_finding\"", db=db) == []


@pytest.mark.server
def test_findings_through_the_v2_write_api_reach_victoriametrics(tmp_path: Path) -> None:
    with running(lambda: VictoriaMetrics(workdir=tmp_path / "vm")) as vm:
        args = _args("--url", "http://127.0.0.1:9", "--write-findings", "--write-url", vm.url,
                     "--write-bucket", "findings", "--write-org", "kvmfleet",
                     "--write-token-file", _secret(tmp_path, "token", "vm-ignores-it"))
        now = int(time.time()) - 60
        assert write_findings(args, "audit", [SHADOW], now, hosts=1, elapsed_s=0.5) == 2
        vm.force_flush()
        got = {(s["metric"]["__name__"], s["metric"].get("host"), s["metric"].get("severity")): s["values"]
               for s in vm.export('{__name__=~"kvmfleet_.*"}', min_samples=6)}
        assert got[("kvmfleet_finding_shadow_events_per_s", "kvmf-hv1", "critical")] == [42.5]
        assert got[("kvmfleet_audit_run_findings", None, None)] == [1]
