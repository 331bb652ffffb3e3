"""playbooks/audit.yml with the real ansible-playbook against a real InfluxDB 1.6 (auth on): the report is written,
the secret goes through a temp 0600 file that is removed, the play fails on findings unless told otherwise, and
always when the audit could not tell (exit 2), with the audit's own line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support import synthetic as sy
from tests.support.servers import InfluxDB1, MissingBinary

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parent.parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def auth_influx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxDB1]:
    try:
        server = InfluxDB1(workdir=tmp_path_factory.mktemp("audit-playbook-influx"), auth=True)
    except MissingBinary as e:
        pytest.fail(str(e))
    server.start()
    try:
        server.create_database("kvm")
        hosts = [sy.make_host("pb-shadow", "shadow"), sy.make_host("pb-ept", "ept")]
        sy.post_lines(server.url, "kvm", sy.fleet_lines(hosts, int(time.time()) // 10 * 10, 600),
                      username=server.admin_user, password=server.admin_password)
        yield server
    finally:
        server.close()


def _play(tmp_path: Path, server: InfluxDB1, **extra: object) -> subprocess.CompletedProcess[str]:
    exe = BIN / "ansible-playbook"
    if not exe.exists():
        pytest.fail("ansible-playbook is not installed in the venv (pip install ansible-core)")
    evars = {"kvmfleet_audit_url": server.url, "kvmfleet_audit_database": "kvm",
             "kvmfleet_audit_username": server.admin_user, "kvmfleet_audit_password": server.admin_password,
             "kvmfleet_audit_window": "15m", "kvmfleet_audit_command": str(BIN / "kvmfleet"),
             "ansible_python_interpreter": sys.executable, **extra}
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", ANSIBLE_NOCOLOR="1",
               ANSIBLE_LOCALHOST_WARNING="false", ANSIBLE_INVENTORY_UNPARSED_WARNING="false",
               ANSIBLE_HOME=str(tmp_path / "ansible-home"), TMPDIR=str(tmp_path))
    return subprocess.run([str(exe), "-i", "localhost,", "-c", "local", str(ROOT / "playbooks" / "audit.yml"),
                           "-e", json.dumps(evars)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)


def test_playbook_writes_the_report_and_fails_on_findings(auth_influx: InfluxDB1, tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    r = _play(tmp_path, auth_influx, kvmfleet_audit_report=str(report))
    assert r.returncode != 0, r.stdout
    assert "found something at or above warning" in r.stdout, r.stdout[-3000:]
    html = report.read_text()
    assert "pb-shadow" in html and "shadow-paging" in html and "<svg" in html
    assert auth_influx.admin_password not in r.stdout + r.stderr
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and auth_influx.admin_password in
                 p.read_text(errors="replace")]
    assert leftovers == []  # the temp password file is gone

    report_json = tmp_path / "report.json"
    r = _play(tmp_path, auth_influx, kvmfleet_audit_report=str(report_json), kvmfleet_audit_format="json",
              kvmfleet_audit_fail_on_findings=False,
              kvmfleet_audit_thresholds={"shadow-paging": {"critical_per_exit": 0.9}})
    assert r.returncode == 0, r.stdout[-3000:]
    doc = json.loads(report_json.read_text())
    assert [(f["host"], f["severity"]) for f in doc["findings"] if f["rule"] == "shadow-paging"] == [
        ("pb-shadow", "warning")]
    assert doc["thresholds_overridden"] == {"shadow-paging": {"critical_per_exit": 0.9}}


def test_playbook_fails_with_the_audits_line_when_it_cannot_tell(auth_influx: InfluxDB1, tmp_path: Path) -> None:
    """Exit 2 (no data, a stale host) fails the play with the audit's own line, even when findings would not."""
    r = _play(tmp_path, auth_influx, kvmfleet_audit_host_regex="^nothing-here$", kvmfleet_audit_fail_on_findings=False,
              kvmfleet_audit_report=str(tmp_path / "none.html"))
    assert r.returncode != 0, r.stdout[-3000:]
    assert ("kvmfleet audit could not tell (exit status 2): kvmfleet audit: error: no kvm samples for hosts matching "
            "^nothing-here$ in the last 15m") in r.stdout, r.stdout[-3000:]
    r = _play(tmp_path, auth_influx, kvmfleet_audit_stale_after="1s", kvmfleet_audit_fail_on_findings=False,
              kvmfleet_audit_report=str(tmp_path / "stale.json"), kvmfleet_audit_format="json")
    assert r.returncode != 0, r.stdout[-3000:]
    assert ("kvmfleet audit could not tell (exit status 2): kvmfleet audit: error: 2 of 2 hosts stale (no sample "
            "in the last 1s): pb-ept, pb-shadow") in r.stdout, r.stdout[-3000:]
    assert [s["host"] for s in json.loads((tmp_path / "stale.json").read_text())["stale"]] == ["pb-ept", "pb-shadow"]


def test_playbook_fails_clearly_on_errors(auth_influx: InfluxDB1, tmp_path: Path) -> None:
    r = _play(tmp_path, auth_influx, kvmfleet_audit_password="wrong")
    assert r.returncode != 0 and "HTTP 401" in r.stdout, r.stdout[-3000:]
    r = _play(tmp_path, auth_influx, kvmfleet_audit_database="")
    assert r.returncode != 0 and "set kvmfleet_audit_url" in r.stdout
    assert shutil.which("true")  # the play ran with the venv's tools on PATH
