"""The whole audit against a real InfluxDB 1.6, on fleets written straight in the plugin's schema: exact findings,
the pack's queries unchanged, the command line's formats, exit codes, credentials and TLS."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from tests.audit.conftest import audit, triples, write_fleet
from tests.support import synthetic as sy
from tests.support.servers import InfluxDB1, StubHTTPServer, free_port, make_self_signed_cert

from kvmfleet.audit.client import AuditError
from kvmfleet.cli import main
from kvmfleet.querypack import QueryParams, load_queries

pytestmark = pytest.mark.server

SCENARIO = [
    sy.make_host("ept-idle-1", "ept-idle"),
    sy.make_host("ept-1", "ept", reasons={("vmx", "HLT"): 100, ("vmx", "EPT_VIOLATION"): 50}),  # kvm_exit_reason
    sy.make_host("ept-2", "ept"), sy.make_host("ept-3", "ept"),
    sy.make_host("ept-busy-1", "ept-busy"),
    sy.make_host("ept-memory-1", "ept-memory"),  # pf_fixed, mmu_cache_miss, mmu_shadow_zapped high
    sy.make_host("ept-memory-old-mmu", "ept-memory", facts=dict(sy.FACTS_EPT, tdp_mmu=False)),
    sy.make_host("npt-1", "ept", facts=sy.FACTS_NPT),
    sy.make_host("kvm-only-1", "ept-busy", no_facts=True, per_vm=False),  # other collectors: kvm alone
    sy.make_host("shadow-1", "shadow"),
    sy.make_host("shadow-idle-1", "shadow-idle"),
    sy.make_host("eptoff-1", "shadow", facts=sy.FACTS_EPT_OFF),
    sy.make_host("nested-1", "nested"),
    sy.make_host("nested-nofacts-1", "nested", no_facts=True),
    sy.make_host("io-1", "emulated-io"),
    sy.make_host("irq-1", "legacy-irq"),
    sy.make_host("insn-1", "insn-emulation"),
    sy.make_host("halt-1", "halt-poll-waste"),
    sy.make_host("old-ept-1", "ept", old_names=True),
    sy.make_host("old-shadow-1", "shadow", old_names=True, no_facts=True),
    sy.make_host("old-irq-1", "legacy-irq", old_names=True),
    sy.make_host("min-1", "ept", fields=["exits", "halt_exits", "io_exits"]),
    sy.make_host("reset-1", "shadow", resets=[1800]),
    sy.make_host("gap-1", "ept", gaps=[(600, 1800)]),
    sy.make_host("gap-shadow-1", "shadow", gaps=[(0, 2400)]),
    sy.make_host("silent-1", "silent"),
    sy.make_host("vcpu-only-1", "shadow", per_vm=False, per_vcpu=True),
]

EXPECTED = {
    ("shadow-1", "shadow-paging", "critical"), ("shadow-1", "tdp-unavailable", "warning"),
    ("shadow-idle-1", "shadow-paging", "warning"), ("shadow-idle-1", "tdp-unavailable", "warning"),
    ("eptoff-1", "shadow-paging", "critical"), ("eptoff-1", "tdp-disabled", "critical"),
    ("nested-1", "nested-shadow", "info"), ("nested-nofacts-1", "nested-shadow", "info"),
    ("io-1", "emulated-io", "critical"),
    ("irq-1", "irq-injection", "critical"), ("irq-1", "emulated-io", "critical"),
    ("insn-1", "insn-emulation", "critical"),
    ("halt-1", "halt-polling", "critical"),
    ("old-shadow-1", "shadow-paging", "critical"),
    ("old-irq-1", "irq-injection", "critical"), ("old-irq-1", "emulated-io", "critical"),
    ("reset-1", "shadow-paging", "critical"), ("reset-1", "tdp-unavailable", "warning"),
    ("gap-shadow-1", "shadow-paging", "critical"), ("gap-shadow-1", "tdp-unavailable", "warning"),
    ("vcpu-only-1", "shadow-paging", "critical"), ("vcpu-only-1", "tdp-unavailable", "warning"),
}
NOT_SHADOW = {"ept-idle-1", "ept-1", "ept-2", "ept-3", "ept-busy-1", "ept-memory-1", "ept-memory-old-mmu", "npt-1",
              "kvm-only-1", "nested-1", "nested-nofacts-1", "io-1", "irq-1", "insn-1", "halt-1", "old-ept-1",
              "old-irq-1", "min-1", "gap-1", "silent-1"}
RULES_BUT_EXIT_LOAD = ["shadow-paging", "tdp-disabled", "tdp-unavailable", "emulated-io", "irq-injection",
                       "insn-emulation", "halt-polling"]


@pytest.fixture(scope="module")
def scenario(audit_influx: InfluxDB1) -> str:
    return write_fleet(audit_influx, SCENARIO)


def test_scenario_exact_findings(audit_influx: InfluxDB1, scenario: str) -> None:
    result = audit(audit_influx, scenario, only=RULES_BUT_EXIT_LOAD)
    assert triples(result) == EXPECTED
    flagged_shadow = {f.host for f in result.findings if f.rule == "shadow-paging"}
    assert not flagged_shadow & NOT_SHADOW
    by = {(f.host, f.rule): f for f in result.findings}
    # shadow paging evidence: the shadow-only counters, per second, per exit, per vCPU-second, and the VMs
    f = by[("shadow-1", "shadow-paging")]
    assert f.evidence["mmu_pte_write_per_s"] == pytest.approx(900 * 4, rel=0.15)
    assert f.evidence["invlpg_per_s"] == pytest.approx(300 * 4, rel=0.15)
    assert f.evidence["shadow_events_per_exit"] == pytest.approx((900 + 300 + 30 + 60) / 6000, rel=0.15)
    assert f.evidence["tdp_state"] == "unsupported"
    assert {v["vm"] for v in f.vms} == {"shadow-1-vm0", "shadow-1-vm1"}
    # the same from kvm_vcpu when there is no kvm_vm
    vf = by[("vcpu-only-1", "shadow-paging")]
    assert {v["vm"] for v in vf.vms} == {"vcpu-only-1-vm0", "vcpu-only-1-vm1"}
    assert all(v.get("source") == "kvm_vcpu" for v in vf.vms)
    # old kernels: judged from mmu_pte_updated's sibling counters and irq_window
    assert by[("old-shadow-1", "shadow-paging")].evidence["mmu_pte_write_per_s"] > 1000
    assert any("counters alone" in n for n in by[("old-shadow-1", "shadow-paging")].notes)
    assert by[("old-irq-1", "irq-injection")].evidence["irq_window_exits_per_injection"] > 0.2
    # a counter reset in the window: rates still right (exact_rates), and said
    rf = by[("reset-1", "shadow-paging")]
    assert rf.evidence["mmu_pte_write_per_s"] == pytest.approx(3600, rel=0.15)
    assert any("went down" in n for n in rf.notes)
    # a host with a gap still has the right rate
    assert by[("gap-shadow-1", "shadow-paging")].evidence["exits_per_s"] == pytest.approx(24000, rel=0.15)
    # tdp findings say whether the counters agree
    assert "agree" in by[("eptoff-1", "tdp-disabled")].notes[0]
    assert "kvm_intel.ept=N" in by[("eptoff-1", "tdp-disabled")].summary
    # nested: info, with nested_run evidence
    assert by[("nested-1", "nested-shadow")].evidence["nested_run_per_s"] > 1000
    # what could not be judged is listed
    assert any(s.host == "min-1" and s.rule == "shadow-paging" for s in result.skipped)
    assert any(s.host == "kvm-only-1" and s.rule == "tdp-*" for s in result.skipped)


def test_exit_load_flags_only_the_hot_host(audit_influx: InfluxDB1) -> None:
    hosts = [sy.make_host(f"plain-{i}", "ept", scale=1 + i / 40) for i in range(12)] + [
        sy.make_host("hot-1", "hot"), sy.make_host("idle-0", "ept-idle")]
    db = write_fleet(audit_influx, hosts, minutes=20)
    result = audit(audit_influx, db, only=["exit-load"])
    assert triples(result) == {("hot-1", "exit-load", "critical")}
    assert result.top_exit_rate[0]["host"] == "hot-1"
    assert {v["vm"] for v in result.findings[0].vms} == {"hot-1-vm0", "hot-1-vm1"}


def test_every_pack_query_runs_unchanged_on_influxdb16(audit_influx: InfluxDB1, scenario: str) -> None:
    params = QueryParams(window="1h", host_regex=".*", interval="1m")
    for q in load_queries().values():
        for stmt in q.filled(params):
            results = audit_influx.query(stmt, db=scenario)  # raises on any error
            assert results[0].get("series"), (q.name, stmt)


def test_host_regex_and_retention_policy(audit_influx: InfluxDB1) -> None:
    hosts = [sy.make_host("dc1-shadow", "shadow"), sy.make_host("dc2-shadow", "shadow"),
             sy.make_host("dc1-ept", "ept")]
    db = write_fleet(audit_influx, hosts, minutes=10, rp="rp1")
    result = audit(audit_influx, db, host_regex="^dc1-", retention_policy="rp1", only=["shadow-paging"])
    assert triples(result) == {("dc1-shadow", "shadow-paging", "critical")}
    assert set(result.hosts) == {"dc1-shadow", "dc1-ept"}
    # the default retention policy of that database is empty: nothing seen is an error, not a clean fleet
    with pytest.raises(AuditError, match=r"no kvm samples for hosts matching \.\* in the last 1h .*retention policy"):
        audit(audit_influx, db)


# ---------------------------------------------------------------------------------------------- command line
def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_formats_and_exit_codes(audit_influx: InfluxDB1, scenario: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    base = ["audit", "--url", audit_influx.url, "--database", scenario, "--window", "1h"]
    rc, out, _ = _cli(capsys, *base, "--format", "json")
    assert rc == 1
    doc = json.loads(out)
    assert {(f["host"], f["rule"], f["severity"]) for f in doc["findings"]} >= EXPECTED
    for f in doc["findings"]:
        assert {"host", "rule", "severity", "evidence"} <= set(f) and f["evidence"]
    assert doc["summary"]["hosts"] == len(SCENARIO)
    assert doc["top_exit_rate"] and doc["skipped"]
    # --fail-on critical with only warnings and infos: 0
    rc, out, _ = _cli(capsys, *base, "--host-regex", "^(shadow-idle-1|nested-1)$", "--fail-on", "critical")
    assert rc == 0 and "shadow-idle-1" in out and "nested-shadow" in out
    rc, out, _ = _cli(capsys, *base, "--host-regex", "^(shadow-idle-1|nested-1)$")
    assert rc == 1  # --fail-on warning (the default)
    rc, out, _ = _cli(capsys, *base, "--host-regex", "^ept-[0-9]$")
    assert rc == 0 and "No findings." in out
    # overrides: critical made harder to reach
    rc, out, _ = _cli(capsys, *base, "--host-regex", "^shadow-1$", "--rules", "shadow-paging", "--format", "json",
                      "--set", "shadow-paging.critical_per_exit=0.9")
    assert [f["severity"] for f in json.loads(out)["findings"]] == ["warning"]
    # markdown
    rc, out, _ = _cli(capsys, *base, "--format", "markdown")
    assert rc == 1 and out.startswith("# kvmfleet audit") and "| critical | eptoff-1 | tdp-disabled |" in out
    # table
    rc, out, _ = _cli(capsys, *base)
    assert re.search(r"^critical\s+shadow-1\s+shadow-paging\s", out, re.M)
    assert "evidence: shadow_events_per_s=" in out and "Top hosts by exit rate" in out


def test_cli_html_report_is_self_contained_with_charts(audit_influx: InfluxDB1, scenario: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "audit.html"
    rc, _, err = _cli(capsys, "audit", "--url", audit_influx.url, "--database", scenario, "--format", "html",
                      "-o", str(report), "--rules", "shadow-paging,tdp-unavailable,halt-polling")
    assert rc == 1 and "report written" in err
    html = report.read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert "<script" not in html and "<link" not in html and "<img" not in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    section = html[html.index('id="host-shadow-1"'):]
    section = section[:section.index("</section>")]
    assert section.count("<svg") >= 3 and "mmu_pte_write /s" in section and "invlpg /s" in section
    assert "<polyline" in section
    assert 'id="host-halt-1"' in html and "halt_poll_fail_ns /s" in html


def test_cli_output_follows_no_link(audit_influx: InfluxDB1, scenario: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """--output: links planted at the report's path and at the temp name the audit once used are not followed."""
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    report = tmp_path / "audit.json"
    report.symlink_to(victim)
    (tmp_path / f"audit.json.tmp{os.getpid()}").symlink_to(victim)
    rc, out, err = _cli(capsys, "audit", "--url", audit_influx.url, "--database", scenario, "--format", "json",
                        "-o", str(report))
    assert rc == 1 and out == ""
    assert re.fullmatch(rf"kvmfleet audit: report written to {re.escape(str(report))}: \d+ critical, \d+ warning\n",
                        err), err
    assert victim.read_text() == "keep me\n"
    assert not report.is_symlink() and json.loads(report.read_text())["findings"]
    umask = os.umask(0)
    os.umask(umask)
    assert report.stat().st_mode & 0o777 == 0o644 & ~umask


def test_cli_errors_exit_2(audit_influx: InfluxDB1, scenario: str, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    url = audit_influx.url
    rc, _, err = _cli(capsys, "audit", "--url", f"http://127.0.0.1:{free_port()}", "--database", "x")
    assert rc == 2 and "cannot reach InfluxDB" in err
    rc, _, err = _cli(capsys, "audit", "--url", url, "--database", "no_such_db")
    assert rc == 2 and "database not found" in err
    rc, _, err = _cli(capsys, "audit", "--url", url, "--database", scenario, "--host-regex", "(")
    assert rc == 2 and "invalid regular expression" in err
    rc, _, err = _cli(capsys, "audit", "--url", url, "--database", scenario, "--window", "an hour")
    assert rc == 2 and "not a duration" in err
    rc, _, err = _cli(capsys, "audit", "--url", url, "--database", scenario, "--rules", "shadow")
    assert rc == 2 and "unknown rule" in err
    rc, _, err = _cli(capsys, "audit", "--url", url, "--database", scenario, "--set", "shadow-paging.nope=1")
    assert rc == 2 and "has no threshold 'nope'" in err
    rc, _, err = _cli(capsys, "audit", "--url", "http://u:p@127.0.0.1:1", "--database", scenario)
    assert rc == 2 and "must not carry credentials" in err
    rc, _, err = _cli(capsys, "audit", "--url", url, "--bucket", "b")
    assert rc == 2 and "--bucket needs --org" in err
    rc, _, err = _cli(capsys, "audit", "--url", url, "--database", scenario, "--username", "u")
    assert rc == 2 and "--password-file" in err
    rc, _, err = _cli(capsys, "audit", "--url", url, "--database", scenario, "--token-file",
                      str(tmp_path / "missing"))
    assert rc == 2 and "cannot be read" in err
    with pytest.raises(SystemExit) as e:  # argparse: missing --url
        main(["audit", "--database", "x"])
    assert e.value.code == 2


def _secret(tmp_path: Path, name: str, value: str) -> str:
    p = tmp_path / name
    p.write_text(value + "\n")
    os.chmod(p, 0o600)
    return str(p)


def test_cli_user_and_password_file_against_auth_influxdb(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    server = InfluxDB1(workdir=tmp_path_factory.mktemp("audit-auth"), auth=True)
    server.start()
    try:
        server.create_database("kvm")
        end = 0
        lines = sy.fleet_lines([sy.make_host("s1", "shadow")], end or __import__("time").time().__int__() // 10 * 10,
                               600)
        sy.post_lines(server.url, "kvm", lines, username=server.admin_user, password=server.admin_password)
        good = _secret(tmp_path, "pw", server.admin_password)
        rc, out, err = _cli(capsys, "audit", "--url", server.url, "--database", "kvm", "--username",
                            server.admin_user, "--password-file", good, "--format", "json")
        assert rc == 1, err
        assert ("s1", "shadow-paging") in {(f["host"], f["rule"]) for f in json.loads(out)["findings"]}
        bad = _secret(tmp_path, "bad", "wrong-password")
        rc, _, err = _cli(capsys, "audit", "--url", server.url, "--database", "kvm", "--username",
                          server.admin_user, "--password-file", bad)
        assert rc == 2 and "HTTP 401" in err and "wrong-password" not in err
        rc, _, err = _cli(capsys, "audit", "--url", server.url, "--database", "kvm")
        assert rc == 2 and "HTTP 401" in err
    finally:
        server.close()


def _canned_query_server(seen: list[tuple[str, str, dict[str, str], bytes]], certfile: str | None = None,
                         keyfile: str | None = None) -> StubHTTPServer:
    body = json.dumps({"results": [{"statement_id": 0}]}).encode()

    def handler(req: tuple[str, str, dict[str, str], bytes]) -> tuple[int, dict[str, str], bytes]:
        seen.append(req)
        return 200, {"Content-Type": "application/json"}, body

    return StubHTTPServer(handler, certfile=certfile, keyfile=keyfile)


def test_bucket_token_and_tls_verification(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """InfluxDB 2.x style: --bucket/--org/--token-file through /query; TLS verified unless told otherwise."""
    import urllib.parse

    cert, key = make_self_signed_cert(tmp_path)
    token = _secret(tmp_path, "token", "s3cr3t-token")
    seen: list[tuple[str, str, dict[str, str], bytes]] = []
    with _canned_query_server(seen, cert, key) as stub:
        args = ["audit", "--url", stub.url + "/influx", "--bucket", "kvm/autogen", "--org", "ops", "--token-file",
                token]
        rc, _, err = _cli(capsys, *args)
        assert rc == 2 and "TLS" in err and not seen  # self-signed: refused
        rc, _, err = _cli(capsys, *args, "--ca-file", cert)
        assert rc == 2 and "no kvm samples for hosts matching" in err, err  # verified, asked, and answered: empty
        method, path, headers, body = seen[0]
        assert method == "POST" and path == "/influx/query"
        assert headers.get("Authorization") == "Token s3cr3t-token"
        form = urllib.parse.parse_qs(body.decode())
        assert form["db"] == ["kvm/autogen"] and "s3cr3t" not in path and "s3cr3t" not in body.decode()
        rc, _, err = _cli(capsys, *args, "--no-verify-tls")
        assert rc == 2 and "no kvm samples" in err, err
