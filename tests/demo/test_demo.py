"""`make demo` end to end: the simulated fleet, the real playbook, real guests, InfluxDB and the audit's JSON.

The paging host must be flagged `shadow-paging`, the halting and MMIO hosts not; `scripts/demo --stop` must leave
no process, mount or file behind. The demo runs twice, so a re-run over a finished one is covered too.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAKE_DEMO = ["make", "demo"]  # the README's command, as a newcomer types it
MAKE_DEMO_STOP = ["make", "demo-stop"]
FLEET = "kvmtestdemo"

pytestmark = [pytest.mark.kvm, pytest.mark.server]


@pytest.fixture
def demo_env(tmp_path):
    if not os.path.exists("/dev/kvm") or os.geteuid() != 0:
        pytest.skip("needs /dev/kvm and root")
    env = dict(os.environ, KVMFLEET_DEMO_FLEET=FLEET, KVMFLEET_DEMO_STATE=str(tmp_path / "state"))
    yield env
    subprocess.run(MAKE_DEMO_STOP, cwd=ROOT, env=env, check=False, capture_output=True)


def leftovers(env):
    """Processes, mounts and files of the demo fleet still on the machine."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"/fleet/{FLEET}/" in cmd:
            found.append(f"process {pid}: {cmd}")
    with open("/proc/self/mountinfo") as f:
        found += [f"mount: {line.strip()}" for line in f if f"/{FLEET}/" in line]
    fleet_root = os.environ.get("KVMFLEET_FLEET_ROOT", "/var/lib/kvmfleet/fleet")
    for path in (os.path.join(fleet_root, FLEET), env["KVMFLEET_DEMO_STATE"]):
        if os.path.exists(path):
            found.append(f"file: {path}")
    return found


def test_demo_flags_the_paging_host_only_and_stops_clean(demo_env):
    path = os.path.join(demo_env["KVMFLEET_DEMO_STATE"], "audit.json")
    for run in (1, 2):
        proc = subprocess.run(MAKE_DEMO, cwd=ROOT, env=demo_env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"run {run}:\n{proc.stderr[-4000:]}"
        assert f"HTML report:   {os.path.dirname(path)}/audit.html" in proc.stderr  # it says where things are
        with open(path) as f:
            report = json.load(f)
        flagged = {x["host"] for x in report["findings"] if x["rule"] == "shadow-paging"}
        assert flagged == {f"{FLEET}-hv1"}, (run, report["findings"])
        hosts = {x["host"] for x in report["findings"]}
        assert {f"{FLEET}-hv2", f"{FLEET}-hv3"} <= hosts, report["findings"]  # judged, just not shadow-paging
        assert os.path.exists(os.path.join(os.path.dirname(path), "audit.html"))
        with open(os.path.join(os.path.dirname(path), "capacity.json")) as f:
            capacity = json.load(f)
        # the real guests the demo starts (scripts/demo GUESTS), on this machine's CPUs (every host shares them)
        cpus = os.sysconf("SC_NPROCESSORS_ONLN")
        seen = {h["host"]: (h["vms"], h["vcpus"], h["cpus"]) for h in capacity["hosts"]}
        assert seen == {f"{FLEET}-hv1": (1, 2, cpus), f"{FLEET}-hv2": (2, 4, cpus), f"{FLEET}-hv3": (2, 2, cpus)}, seen
        assert capacity["fleet"]["vcpus"] == 8 and capacity["fleet"]["cpus"] == 3 * cpus
        assert capacity["missing"] == [] and capacity["stale"] == []
        assert all(h["exits_per_s"] > 0 for h in capacity["hosts"]), capacity["hosts"]
    subprocess.run(MAKE_DEMO_STOP, cwd=ROOT, env=demo_env, check=True, capture_output=True, timeout=120)
    assert leftovers(demo_env) == []
