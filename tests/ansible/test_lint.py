"""The Ansible parts pass ansible-lint (production profile) and yamllint; the playbooks parse."""

from __future__ import annotations

import subprocess

from .conftest import ROOT, require_tool

ANSIBLE_PATHS = ["roles", "playbooks", "inventories", "molecule"]


def run(cmd: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_yamllint(tool_env):
    proc = run([require_tool("yamllint"), "-s", "-f", "parsable", *ANSIBLE_PATHS, ".yamllint", ".ansible-lint"],
               tool_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ansible_lint_production_profile(tool_env):
    proc = run([require_tool("ansible-lint"), "--profile", "production", "--nocolor", *ANSIBLE_PATHS], tool_env)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert "Profile 'production' was required, and it passed" in proc.stdout + proc.stderr


def test_playbook_syntax_with_the_example_inventory(tool_env, tmp_path):
    vault_pass = tmp_path / "vault-pass"
    vault_pass.write_text("kvmfleet-example\n")
    env = dict(tool_env, ANSIBLE_ROLES_PATH=str(ROOT / "roles"))
    proc = run([require_tool("ansible-playbook"), "--syntax-check", "-i", "inventories/example",
                "--vault-password-file", str(vault_pass), "playbooks/deploy.yml"], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_example_vault_secrets_decrypt(tool_env, tmp_path):
    vault_pass = tmp_path / "vault-pass"
    vault_pass.write_text("kvmfleet-example\n")
    proc = run([require_tool("ansible"), "-i", "inventories/example", "--vault-password-file", str(vault_pass),
                "hv01.example.net", "-c", "local", "-m", "ansible.builtin.debug",
                "-a", "msg={{ kvmfleet_collectd_influx_password | length > 0 }}"], tool_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '"msg": true' in proc.stdout

