"""Acceptance: real collectd + the kvmfleet plugin + real KVM guests -> a real InfluxDB 1.6 -> ``kvmfleet audit``.

On this one machine a "host" is a collectd instance with its own ``Hostname``, run together with its guests in a
PID namespace of its own (``unshare --pid --fork --mount-proc``, see nshost.py), so that the plugin sees only
that host's guests through /proc (it finds VMs by their processes; debugfs is locked down here). Two hosts:

* ``acc-paging``: a guest whose vCPU rewrites its own page-table entry and runs invlpg in a loop (workload
  ``paging``), plus one that only halts;
* ``acc-halt``: guests that only halt.

Expected here (PVM backend: no EPT/NPT, every VM on shadow paging): acc-paging is flagged ``shadow-paging`` with
``mmu_pte_write`` and ``invlpg`` evidence naming the paging guest, and ``tdp-unavailable``; acc-halt is not flagged
``shadow-paging`` (its guests touch no page tables) but is ``tdp-unavailable`` too. On a host with EPT/NPT the
paging guest writes its page tables without trapping: then neither host may be flagged ``shadow-paging``.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.audit.conftest import audit
from tests.collectd.cdhelpers import Collectd, wait_for
from tests.support.servers import InfluxDB1

from kvmfleet.cli import main
from kvmfleet.facts import gather

pytestmark = [pytest.mark.server, pytest.mark.kvm]
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
HOSTS = {
    "acc-paging": ["accpg-paging:1:paging", "accpg-halt:1:halt"],
    "acc-halt": ["acchl-halt-a:1:halt", "acchl-halt-b:2:halt"],
}


@pytest.fixture(autouse=True)
def _need_kvm_root_unshare() -> None:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this machine")
    if os.geteuid() != 0:
        pytest.skip("needs root (PID namespaces, borrowing stats fds)")
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is missing")


class NamespaceHost:
    def __init__(self, name: str, guests: list[str], workdir: Path, influx_url: str, db: str) -> None:
        self.name = name
        self.cd = Collectd(workdir, [("InfluxURL", [influx_url]), ("Database", [db]),
                                     ("SpoolPath", [str(workdir / "spool" / "ship.spool")]),
                                     ("RetryMin", [0.2]), ("RetryMax", [2])],
                           csv=False, interval=1, hostname=name)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "plugins"), str(ROOT)]))
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGTERM", sys.executable,
             str(HERE / "nshost.py"), str(self.cd.conf_path), *guests],
            stdout=subprocess.PIPE, stderr=open(workdir / "nshost.stderr", "wb"), env=env,  # noqa: SIM115
            start_new_session=True)
        self.ready: dict[str, object] = {}

    def wait_ready(self, timeout: float = 90) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise AssertionError(f"{self.name} not ready: {self.stderr()}")
            if select.select([self.proc.stdout], [], [], left)[0]:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    raise AssertionError(f"{self.name} exited: {self.stderr()}")
                line += chunk
        assert line.startswith(b"ready "), line
        self.ready = json.loads(line[6:])

    def stderr(self) -> str:
        try:
            return (self.cd.dir / "nshost.stderr").read_text(errors="replace")[-3000:] + self.cd.log()[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            # unshare --fork itself ignores SIGTERM: signal the session it leads (unshare, nshost, collectd and the
            # guests, all started by this test); nshost then stops collectd (which flushes) and the guests
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def fleet(audit_influx: InfluxDB1, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NamespaceHost]]:
    db = "acceptance"
    audit_influx.create_database(db)
    hosts: dict[str, NamespaceHost] = {}
    try:
        for name, guests in HOSTS.items():
            hosts[name] = NamespaceHost(name, guests, tmp_path_factory.mktemp(name), audit_influx.url, db)
        for h in hosts.values():
            h.wait_ready()
        for name in hosts:
            wait_for(f"20 samples of {name}", lambda n=name: len(audit_influx.rows(
                f"SELECT exits FROM kvm WHERE host = '{n}'", db=db)) >= 20, 90)
        yield hosts
    finally:
        for h in hosts.values():
            h.stop()


def test_paging_host_is_shadow_paging_and_halt_host_is_not(audit_influx: InfluxDB1,
                                                           fleet: dict[str, NamespaceHost]) -> None:
    db = "acceptance"
    # each collectd saw only its own guests (PID namespaces)
    vms = audit_influx.rows('SELECT last(exits) FROM kvm_vm GROUP BY "host", "vm"', db=db)
    seen = {(r["host"], r["vm"]) for r in vms}
    assert seen == {(h, g.split(":")[0]) for h, gs in HOSTS.items() for g in gs}, seen
    result = audit(audit_influx, db, window="5m")
    assert set(result.hosts) == set(HOSTS)
    found = {(f.host, f.rule): f for f in result.findings}
    tdp = gather().tdp["state"]
    facts = audit_influx.rows('SELECT last(tdp_state) AS tdp_state FROM kvm_host GROUP BY "host"', db=db)
    assert {r["tdp_state"] for r in facts} == {tdp}
    if tdp == "enabled":
        assert not any(rule == "shadow-paging" for _, rule in found), found
        return
    for f in result.findings:
        print(f"{f.host} {f.rule} {f.severity}: {f.summary}")  # shown with pytest -s
    sp = found.get(("acc-paging", "shadow-paging"))
    assert sp is not None, [f.to_dict() for f in result.findings]
    assert sp.evidence["mmu_pte_write_per_s"] > 1000 and sp.evidence["invlpg_per_s"] > 1000, sp.evidence
    assert sp.severity == "critical"
    assert sp.vms and sp.vms[0]["vm"] == "accpg-paging" and sp.vms[0]["mmu_pte_write_per_s"] > 1000
    assert "accpg-halt" not in {v["vm"] for v in sp.vms}
    assert ("acc-halt", "shadow-paging") not in found
    assert ("acc-halt", "nested-shadow") not in found
    if tdp == "unsupported":
        for host in HOSTS:
            f = found[(host, "tdp-unavailable")]
            assert f.evidence["tdp_state"] == "unsupported"
        assert "agree" in found[("acc-paging", "tdp-unavailable")].notes[0]
        assert "no shadow MMU work" in found[("acc-halt", "tdp-unavailable")].notes[0]
    elif tdp == "disabled":
        assert ("acc-paging", "tdp-disabled") in found


def test_html_report_from_real_collectd_data(audit_influx: InfluxDB1, fleet: dict[str, NamespaceHost],
                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.html"
    rc = main(["audit", "--url", audit_influx.url, "--database", "acceptance", "--window", "5m", "--format", "html",
               "-o", str(out)])
    capsys.readouterr()
    assert rc in (0, 1)
    html = out.read_text()
    if gather().tdp["state"] != "enabled":
        section = html[html.index('id="host-acc-paging"'):]
        section = section[:section.index("</section>")]
        assert "mmu_pte_write /s" in section and "invlpg /s" in section and "<polyline" in section
