"""`molecule test` of the default scenario: a simulated fleet of real Debian 12 and 13 hosts with real guests.

Runs create, prepare, check, converge, idempotence (zero changed), check, verify, destroy (see molecule/default and
docs/roles.md). The base trees are built by debootstrap on first use and cached under /var/cache/kvmfleet; the run
then takes about 4-6 minutes on 2 cores.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from .conftest import ROOT, require_tool

STEPS = ("create", "prepare", "check", "converge", "idempotence", "verify", "destroy")


def run_scenario(scenario: str, fleet: str, tool_env: dict[str, str], tmp_path: Path) -> str:
    """`molecule test -s SCENARIO` on a fleet of its own; the log without colours (also kept for a look)."""
    if not os.path.exists("/dev/kvm"):
        pytest.skip("needs /dev/kvm")
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, mounts)")
    molecule = require_tool("molecule")
    env = dict(tool_env, KVMFLEET_MOLECULE_FLEET=f"{fleet}{os.getpid()}")
    log = tmp_path / "molecule.log"
    with log.open("w") as out:
        proc = subprocess.run([molecule, "test", "-s", scenario], cwd=ROOT, env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=1800)
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text())
    name = "kvmfleet-molecule-test.log" if scenario == "default" else f"kvmfleet-molecule-{scenario}.log"
    keep = Path(os.environ.get("KVMFLEET_TEST_LOGS", "/tmp")) / name
    keep.write_text(text)
    assert proc.returncode == 0, f"molecule test -s {scenario} failed (log: {keep}):\n" + text[-8000:]
    for step in STEPS:
        assert re.search(rf"{scenario} (?:➜|>) {step}(?:\]|:) Executed: Successful", text), \
            f"{step} did not succeed (log: {keep})"
    return text


def assert_second_check_changes_nothing(text: str, scenario: str, hosts: set[str]) -> None:
    """The second check step (--check on converged hosts) would change nothing anywhere."""
    checks = re.split(rf"{scenario} (?:➜|>) check(?:\]|:) Executing", text)
    assert len(checks) == 3, "expected two check steps"
    second = checks[2].split("Executed:")[0]
    recap = re.findall(r"^\W*(\S+)\s+: ok=\d+\s+changed=(\d+)", second, re.M)
    assert {host for host, _ in recap} >= hosts, recap
    assert all(changed == "0" for _, changed in recap), f"--check on converged hosts reports changes: {recap}"


@pytest.mark.server
@pytest.mark.kvm
def test_molecule_default_scenario(tool_env, tmp_path):
    text = run_scenario("default", "mol", tool_env, tmp_path)
    # every host's guests arrived with their exact counts
    assert text.count("expected halt_exits") >= 2 and "expected mmio_exits" in text
    assert_second_check_changes_nothing(text, "default", {"kvmf-hv1", "kvmf-hv2", "kvmf-hv3", "kvmf-influx"})


@pytest.mark.server
@pytest.mark.kvm
def test_molecule_systemd_scenario(tool_env, tmp_path):
    """Debian 13 (libvirt 11, QEMU 10) and Debian 12 (libvirtd 9, QEMU 7.2) booting systemd, InfluxDB beside them:
    see molecule/systemd. Each assert below names a play of its verify that must have run and passed."""
    text = run_scenario("systemd", "msd", tool_env, tmp_path)
    flat = re.sub(r"\s*\n\s*(?:│\s*)?", " ", text)  # Ansible's messages, wrapped lines joined
    assert "expected halt_exits = 1200" in flat and "expected mmio_exits = 400" in flat
    assert_second_check_changes_nothing(text, "systemd", {"kvms-d13", "kvms-d12", "kvms-influx"})
    for host in ("kvms-d13", "kvms-d12"):
        assert f"selftest {host}: statsfd ok, debugfs unusable, auto ok, release ok" in flat
        assert re.search(rf"facts {host}: seccomp \w+, pidfd_getfd allowed, lockdown \w+, libvirt", flat), host
        assert re.search(rf"unit {host}: collectd enabled, active, main pid \d+ before and after", flat), host
        source = "libvirt+statsfd" if host == "kvms-d13" else "libvirt"
        assert re.search(rf"merge {host}: lv-{host} listed once, via {re.escape(source)},", flat), host
        assert re.search(rf"defined again {host}: lv-{host} \S+ via {re.escape(source)}", flat), host
        assert re.search(rf"spool {host}: \d+ samples of the outage before the SIGKILL", flat), host
    assert re.search(r"kvms-d13: around the libvirtd restart vCPU 0 has \d+ points at most [12] s apart", flat)
