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


@pytest.mark.server
@pytest.mark.kvm
def test_molecule_default_scenario(tool_env, tmp_path):
    if not os.path.exists("/dev/kvm"):
        pytest.skip("needs /dev/kvm")
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, mounts)")
    molecule = require_tool("molecule")
    env = dict(tool_env, KVMFLEET_MOLECULE_FLEET=f"mol{os.getpid()}")
    log = tmp_path / "molecule.log"
    with log.open("w") as out:
        proc = subprocess.run([molecule, "test"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=1800)
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text())
    keep = Path(os.environ.get("KVMFLEET_TEST_LOGS", "/tmp")) / "kvmfleet-molecule-test.log"
    keep.write_text(text)
    assert proc.returncode == 0, f"molecule test failed (log: {keep}):\n" + text[-8000:]
    for step in STEPS:
        assert re.search(rf"default (?:➜|>) {step}(?:\]|:) Executed: Successful", text), \
            f"{step} did not succeed (log: {keep})"
    # every host's guests arrived with their exact counts
    assert text.count("expected halt_exits") >= 2 and "expected mmio_exits" in text
    # the second check (--check on converged hosts) would change nothing anywhere
    checks = re.split(r"default (?:➜|>) check(?:\]|:) Executing", text)
    assert len(checks) == 3, "expected two check steps"
    second = checks[2].split("Executed:")[0]
    recap = re.findall(r"^\W*(\S+)\s+: ok=\d+\s+changed=(\d+)", second, re.M)
    assert {host for host, _ in recap} >= {"kvmf-hv1", "kvmf-hv2", "kvmf-hv3", "kvmf-influx"}, recap
    assert all(changed == "0" for _, changed in recap), f"--check on converged hosts reports changes: {recap}"
