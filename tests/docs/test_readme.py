"""Every command in the README runs.

The README's ``sh`` blocks are read from the file itself and run as bash scripts (``set -euo pipefail``), each
with only the substitutions listed in :data:`SUBSTITUTIONS` (host names and paths that only exist on a real fleet,
a loop that runs forever). A block this file does not know fails the suite, so a command added to the README
without a way to run it here is caught. The first block (``make demo``, ``make test``) runs elsewhere:
``make demo`` in tests/demo/test_demo.py, ``make test`` is what CI runs; here only their recipes are checked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.support import synthetic
from tests.support.servers import InfluxDB1

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent


def sh_blocks() -> dict[str, str]:
    """The README's ``sh`` blocks, keyed by their first command."""
    blocks = re.findall(r"^```sh\n(.*?)^```", README.read_text(), re.MULTILINE | re.DOTALL)
    return {block.split("#")[0].split("\n")[0].strip(): block for block in blocks}


# block (by its first command) -> [(README text, what runs here instead)]
SUBSTITUTIONS: dict[str, list[tuple[str, str]]] = {
    "make demo": [],
    "make install && . .venv/bin/activate": [
        ("https://influx01.example.net:8086", "{influx_url}"),  # a real InfluxDB of the test's
        ("ansible-playbook -i inventories/prod playbooks/deploy.yml",  # the hosts are example.net names
         "ansible-playbook -i inventories/prod playbooks/deploy.yml --syntax-check"),
    ],
    "kvmfleet selftest": [
        ("kvmfleet stat -i 2 --vcpu", "kvmfleet stat -i 2 --vcpu -n 2"),  # without -n it runs until ^C
    ],
    "/usr/bin/python3 -m venv /opt/kvmfleet && /opt/kvmfleet/bin/pip install /path/to/kvmfleet": [
        ("/opt/kvmfleet", "{tmp}/opt/kvmfleet"),
        ("/path/to/kvmfleet", str(ROOT)),
        ("/etc/", "{tmp}/etc/"),
        ("&& service collectd restart", ""),  # this machine's own collectd is not the test's to restart
    ],
}


def run_block(key: str, tmp: Path, env: dict[str, str], **fmt: str) -> subprocess.CompletedProcess[str]:
    script = sh_blocks()[key]
    for old, new in SUBSTITUTIONS[key]:
        assert old in script, f"the README no longer says {old!r}: update SUBSTITUTIONS"
        script = script.replace(old, new.format(tmp=tmp, **fmt))
    proc = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], env=env, cwd=env.get("PWD", tmp),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"README block {key!r} failed:\n{script}\n--- stderr\n{proc.stderr[-4000:]}"
    return proc


def test_every_block_has_a_way_to_run() -> None:
    assert set(sh_blocks()) == set(SUBSTITUTIONS)


def make_n(*args: str) -> str:
    """What ``make -n ARGS`` would run, as a newcomer's shell sees it (not as a sub-make of ``make test``)."""
    inherited = ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES", "PYTEST_ARGS")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    return subprocess.run(["make", "--no-print-directory", "-n", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=True).stdout


def test_make_demo_and_make_test_recipes() -> None:
    """``make demo`` runs the demo (tests/demo runs it for real), ``make test`` the whole suite, unfiltered."""
    assert sh_blocks()["make demo"].split("\n")[:2] == [
        "make demo   # a fleet of 3 simulated hypervisors on this machine, deployed by the real playbook, then audited",
        "make test   # installs what the suite needs and runs every test (lint, types, unit, real KVM, QEMU, servers,"
        " Ansible)"]
    demo = make_n("demo")
    assert demo.splitlines()[-1].strip() == "./scripts/demo"
    assert "./scripts/install-deps" in demo  # it installs what it needs
    assert make_n("demo", "STOP=1").strip() == "./scripts/demo --stop"
    test = make_n("test")
    pytest_line = [line for line in test.splitlines() if "pytest" in line]
    assert pytest_line == [".venv/bin/pytest -q "], test  # no -k, -m or path: every test
    assert "./scripts/install-deps" in test
    from tests.demo import test_demo
    assert test_demo.MAKE_DEMO == ["make", "demo"]


@pytest.mark.server
def test_fleet_path(tmp_path: Path) -> None:
    """The 5-minute fleet path: inventory copy, vault secrets from stdin, the playbook (syntax), the audit."""
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("Makefile", "setup.cfg", "pyproject.toml", "requirements-ansible.txt", ".venv", "plugins",
                 "roles", "playbooks", "ansible.cfg"):
        if (ROOT / name).exists():
            (work / name).symlink_to(ROOT / name)
    shutil.copytree(ROOT / "inventories", work / "inventories")
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), PWD=str(work))
    env.pop("ANSIBLE_VAULT_PASSWORD_FILE", None)
    with InfluxDB1(tmp_path / "influx") as influx:
        influx.create_database("kvm")  # the playbook's kvmfleet_influxdb role would have made it
        # ten minutes of a healthy hypervisor, as its collector would have written (an empty database fails closed)
        now = int(time.time()) // 10 * 10
        synthetic.post_lines(influx.url, "kvm", synthetic.fleet_lines([synthetic.make_host("hv01", "ept-idle")],
                                                                        now, 600))
        run_block("make install && . .venv/bin/activate", tmp_path, env, influx_url=influx.url)

    for name in (".kvmfleet-vault.pass", ".kvmfleet-admin.pass"):
        assert stat.S_IMODE((home / name).stat().st_mode) == 0o600, name
    vault_yml = work / "inventories" / "prod" / "group_vars" / "all" / "vault.yml"
    admin_pw = (home / ".kvmfleet-admin.pass").read_text().strip()
    assert admin_pw not in vault_yml.read_text()  # encrypted
    shown = subprocess.run(
        [str(BIN / "ansible"), "-i", "inventories/prod", "influx01.example.net", "-c", "local", "-m",
         "ansible.builtin.debug", "-a", "var=kvmfleet_influxdb_admin_password"],
        cwd=work, env=dict(env, ANSIBLE_VAULT_PASSWORD_FILE=str(home / ".kvmfleet-vault.pass")),
        capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert admin_pw in shown.stdout  # the inventory decrypts to the password the audit reads
    report = (work / "audit.html").read_text()
    assert report.startswith("<!DOCTYPE html>") and "kvmfleet audit" in report


@pytest.mark.kvm
def test_one_hypervisor_commands(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/kvm"):
        pytest.skip("needs root and /dev/kvm")
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    out = run_block("kvmfleet selftest", tmp_path, env).stdout
    assert "selftest passed" in out, out[:2000]
    last = json.loads(out.strip().splitlines()[-1])  # `kvmfleet stat --json -n 1`
    assert {"host", "vms"} <= set(last), sorted(last)


@pytest.mark.server
def test_collectd_by_hand(tmp_path: Path) -> None:
    """The by-hand install: a venv with the package, the password file, the drop-in, `collectd -T` on it."""
    collectd_dir = tmp_path / "etc" / "collectd"
    (collectd_dir / "collectd.conf.d").mkdir(parents=True)
    (collectd_dir / "collectd.conf").write_text(
        f'Interval 10\n<Include "{collectd_dir}/collectd.conf.d">\n  Filter "*.conf"\n</Include>\n')
    run_block("/usr/bin/python3 -m venv /opt/kvmfleet && /opt/kvmfleet/bin/pip install /path/to/kvmfleet",
              tmp_path, dict(os.environ))
    secret = tmp_path / "etc" / "kvmfleet" / "influx.password"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    dropin = (collectd_dir / "collectd.conf.d" / "kvmfleet.conf").read_text()
    assert f'PasswordFile "{secret}"' in dropin and "kvmfleet.collectd_plugin" in dropin
