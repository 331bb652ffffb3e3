"""The audit fails closed: ``kvmfleet audit`` as a cron job or a CI step runs it (a process of its own).

Exit 1 means findings and nothing else. A server that misbehaves (every fault of the fault server), no data at
all, a stale host: exit 2 with exactly one line on stderr, in bounded time. Host names that hold a newline, escape
sequences or 64 KiB are judged like any host and reach no report raw.
"""

from __future__ import annotations

import html
import json
import os
import subprocess
import sys
import time
import uuid

import pytest
from tests.audit.conftest import audit, triples, write_fleet
from tests.support import synthetic as sy
from tests.support.faultserver import FaultServer
from tests.support.servers import InfluxDB1

from kvmfleet.audit.engine import AuditResult
from kvmfleet.audit.report import render
from kvmfleet.textsafe import for_markdown, for_terminal

pytestmark = pytest.mark.server

TIMEOUT = 2  # --timeout of the fault runs: each request's whole exchange


def run_audit(*args: str) -> tuple[int, str, list[str], float]:
    """``kvmfleet audit ARGS`` in a process of its own: (exit status, stdout, stderr lines, seconds)."""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "kvmfleet.cli", "audit", *args], capture_output=True, text=True,
                       timeout=120, env=os.environ, stdin=subprocess.DEVNULL)
    return r.returncode, r.stdout, r.stderr.splitlines(), time.monotonic() - t0


def one_error_line(err: list[str]) -> str:
    assert len(err) == 1, err
    assert err[0].startswith("kvmfleet audit: error: ") and err[0].isprintable(), err
    return err[0]


# ---------------------------------------------------------------------------------------------- a bad server
FAULT_WORDS = {
    "ok": "no kvm samples for hosts matching .* in the last 1h in http://",  # an empty answer: nothing seen
    "413": "HTTP 413 for query fleet_counters: Request Entity Too Large",
    "429": "HTTP 429 for query fleet_counters: too many requests",
    "500": "HTTP 500 for query fleet_counters: internal error",
    "trickle": f"no complete answer to query fleet_counters within {TIMEOUT}s",
    "huge": "HTTP 500 for query fleet_counters: xxxxxxxx",
    "garbage": "the answer to query fleet_counters is not an InfluxDB answer: no results list",
    "redirect": "HTTP 307 for query fleet_counters: redirected to http://127.0.0.1:9/write, which is not followed",
}


@pytest.mark.parametrize("fault", list(FAULT_WORDS))
def test_every_fault_of_the_server_is_exit_2_with_one_line(fault: str) -> None:
    with FaultServer([fault]) as server:
        rc, out, err, took = run_audit("--url", server.url, "--database", "kvm", "--timeout", str(TIMEOUT))
    assert (rc, out) == (2, ""), err
    line = one_error_line(err)
    assert FAULT_WORDS[fault] in line and len(line) < 1000, line
    assert took < 4 * TIMEOUT + 10, took  # a byte a second for ever: cut at --timeout, not per read


# ---------------------------------------------------------------------------------------------- no data, stale data
def test_an_empty_database_and_a_regex_matching_nothing_are_exit_2(audit_influx: InfluxDB1) -> None:
    audit_influx.create_database("empty_db")
    rc, out, err, _ = run_audit("--url", audit_influx.url, "--database", "empty_db", "--window", "30m")
    assert (rc, out) == (2, "")
    assert one_error_line(err) == (
        f"kvmfleet audit: error: no kvm samples for hosts matching .* in the last 30m in {audit_influx.url} "
        "database empty_db: are the collectors running? is the database (and retention policy) right?")
    db = write_fleet(audit_influx, [sy.make_host("hv-1", "ept")], minutes=5)
    rc, out, err, _ = run_audit("--url", audit_influx.url, "--database", db, "--host-regex", "^nope-")
    assert (rc, out) == (2, "") and "no kvm samples for hosts matching ^nope- in the last 1h" in one_error_line(err)
    rc, _, err, _ = run_audit("--url", audit_influx.url, "--database", "no_such_db")
    assert rc == 2 and "database not found: no_such_db" in one_error_line(err)


def test_a_fleet_whose_samples_stopped_30_minutes_ago_is_exit_2(audit_influx: InfluxDB1) -> None:
    hosts = [sy.make_host("gone-shadow", "shadow"), sy.make_host("gone-ept-1", "ept"),
             sy.make_host("gone-ept-2", "ept")]
    db = write_fleet(audit_influx, hosts, minutes=20, ago=1800)
    rc, out, err, _ = run_audit("--url", audit_influx.url, "--database", db, "--format", "json")
    assert rc == 2
    assert one_error_line(err) == (
        "kvmfleet audit: error: 3 of 3 hosts stale (no sample in the last 5m): gone-ept-1, gone-ept-2, gone-shadow: "
        "the audit cannot tell whether they are clean (1 critical, 1 warning found)")
    doc = json.loads(out)
    assert [s["host"] for s in doc["stale"]] == ["gone-ept-1", "gone-ept-2", "gone-shadow"]
    assert all(1790 <= s["age_s"] <= 1900 for s in doc["stale"]) and doc["summary"]["stale"] == 3
    assert doc["stale_after"] == "5m"
    shadow = next(f for f in doc["findings"] if f["rule"] == "shadow-paging")
    assert any(n.startswith("stale: newest sample ") for n in shadow["notes"])  # judged on what it sent, and said


def test_one_stopped_host_among_fresh_ones_is_named_in_every_format(audit_influx: InfluxDB1, tmp_path: object
                                                                    ) -> None:
    fresh = [sy.make_host("live-shadow", "shadow"), sy.make_host("live-ept-1", "ept"),
             sy.make_host("live-ept-2", "ept")]
    db = write_fleet(audit_influx, fresh, minutes=20)
    before = audit(audit_influx, db)
    write_fleet(audit_influx, [sy.make_host("stopped-ept", "ept")], minutes=20, db=db, ago=1800)
    after = audit(audit_influx, db)
    assert [s.host for s in after.stale] == ["stopped-ept"] and before.stale == []
    assert triples(after) == triples(before)  # the fresh hosts judged as before; the stopped one looks clean...
    for fmt, shown in (("table", "Stale: 1 host sent no sample in the last 5m (stale)"), ("markdown", "## Stale hosts"),
                       ("html", "<h2>Stale hosts</h2>"), ("json", '"host": "stopped-ept"')):
        text = render(after, fmt, "warning")
        assert shown in text and "stopped-ept" in text.split(shown, 1)[1], fmt  # ... yet it is named
    rc, _, err, _ = run_audit("--url", audit_influx.url, "--database", db)
    assert rc == 2 and one_error_line(err).startswith(
        "kvmfleet audit: error: 1 of 4 hosts stale (no sample in the last 5m): stopped-ept: the audit cannot tell "
        "whether it is clean (")
    rc, _, err, _ = run_audit("--url", audit_influx.url, "--database", db, "--stale-after", "1h")
    assert (rc, err) == (1, [])  # an older newest sample allowed: findings (live-shadow), nothing else


# ---------------------------------------------------------------------------------------------- hostile names
NL_HOST = "nl-\\\n-name"  # a backslash and a newline: what line protocol can store (the backslash escapes it)
ESC_HOST = "esc\x1b[2K\x1b[1A\x1b]0;owned\x07-hidden"
BIG_HOST = "big-" + "x" * 65_396  # 65,400 characters: about all that InfluxDB's 65,535-byte series key leaves
NORMAL = [sy.make_host("n-shadow", "shadow"), sy.make_host("n-ept-1", "ept"), sy.make_host("n-ept-2", "ept"),
          sy.make_host("n-io", "emulated-io"), sy.make_host("n-nested", "nested"),
          sy.make_host("n-halt", "halt-poll-waste"), sy.make_host("n-irq", "legacy-irq")]
ALL_BUT_EXIT_LOAD = ["shadow-paging", "tdp-disabled", "tdp-unavailable", "nested-shadow", "emulated-io",
                     "irq-injection", "insn-emulation", "halt-polling"]


def _hostile_lines(end: int) -> list[str]:
    """The hostile hosts (shadow paging) as line protocol; the newline goes in raw, escaped by a backslash."""
    big = sy.HostSpec(BIG_HOST, [sy.VMSpec("big-vm0", "shadow", 2, uuid=str(uuid.uuid4()))], facts=sy.FACTS_NO_TDP)
    hosts = [sy.make_host("nl-@NL@-name", "shadow"), sy.make_host(ESC_HOST, "shadow"), big]
    return [line.replace("@NL@", "\\\n") for line in sy.fleet_lines(hosts, end, 20 * 60)]


def _printable(text: str) -> bool:
    return all(ch == "\n" or ch.isprintable() for ch in text)


def test_hostile_host_names_are_judged_and_reach_no_report_raw(audit_influx: InfluxDB1) -> None:
    plain = write_fleet(audit_influx, NORMAL, minutes=20)
    hostile = write_fleet(audit_influx, NORMAL, minutes=20)
    sy.post_lines(audit_influx.url, hostile, _hostile_lines(int(time.time()) // 10 * 10))
    before = audit(audit_influx, plain, only=ALL_BUT_EXIT_LOAD)
    result: AuditResult = audit(audit_influx, hostile, only=ALL_BUT_EXIT_LOAD)
    assert set(result.hosts) == {h.name for h in NORMAL} | {NL_HOST, ESC_HOST, BIG_HOST}
    assert {t for t in triples(result) if t[0] in before.hosts} == triples(before)  # the others as before
    for name in (NL_HOST, ESC_HOST, BIG_HOST):  # and the hostile ones judged like any host
        assert (name, "shadow-paging", "critical") in triples(result)
    assert for_terminal(NL_HOST) == "nl-\\\\\\n-name"  # the backslash doubled, the newline written \n
    for fmt, shown in (("table", for_terminal), ("markdown", for_markdown),
                       ("html", lambda name: html.escape(for_terminal(name)))):
        text = render(result, fmt, "warning")
        assert _printable(text) and "\x1b" not in text, fmt
        assert shown(NL_HOST) in text and shown(ESC_HOST) in text and "(65400 characters)" in text, fmt
    doc = json.loads(render(result, "json", "warning"))
    assert {NL_HOST, ESC_HOST, BIG_HOST} <= {f["host"] for f in doc["findings"]}  # JSON keeps the real names
    rc, out, err, _ = run_audit("--url", audit_influx.url, "--database", hostile)  # every rule, the table
    assert (rc, err) == (1, []) and _printable(out) and "(65400 characters)" in out
