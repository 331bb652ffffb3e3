"""The roles against the one table of plugin options (kvmfleet.options.OPTIONS) and their own argument specs.

* every plugin option has a role variable in meta/argument_specs.yml of the right type, choices and default (or a
  note saying why the role sets it itself), and every variable that says it is a plugin option is one;
* the role's template, rendered by Ansible with every such variable set, gives a fragment that the plugin's own
  parser reads back to exactly those values;
* the roles' validation (Ansible's argument specs, then the role's own assertions) accepts every value a variable
  with choices allows, and refuses a wrong one naming the variable.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.support.collectdconf import module_entries

from kvmfleet.options import OPTIONS, Option, parse_config

from .conftest import ROOT, require_tool

ROLES = ("kvmfleet_collectd", "kvmfleet_influxdb", "kvmfleet_audit")
SPEC_TYPES = {"bool": {"bool"}, "choice": {"str"}, "seconds": {"float"}, "count": {"int"}, "regex": {"list"},
              "tag": {"dict"}, "string": {"str"}, "url": {"str"}, "cafile": {"path", "str"},
              "spoolpath": {"path", "str"}}


def spec_options(role: str) -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load((ROOT / "roles" / role / "meta" / "argument_specs.yml").read_text())
    options: dict[str, dict[str, Any]] = doc["argument_specs"]["main"]["options"]
    return options


# ---------------------------------------------------------------------------------------------- specs vs table
@pytest.mark.parametrize("opt", OPTIONS, ids=[o.name for o in OPTIONS])
def test_every_plugin_option_has_a_role_variable_of_its_kind(opt: Option) -> None:
    if opt.role_var is None:
        assert opt.role_note, f"{opt.name}: no role variable and no role_note saying why"
        return
    spec = spec_options("kvmfleet_collectd").get(opt.role_var)
    assert spec is not None, f"{opt.name}: {opt.role_var} is not in kvmfleet_collectd's meta/argument_specs.yml"
    assert spec.get("type", "str") in SPEC_TYPES[opt.kind], (opt.name, spec.get("type"))
    assert f"Plugin option {opt.name}" in str(spec.get("description")), (opt.name, spec.get("description"))
    if opt.kind == "choice":
        assert spec.get("choices") == list(opt.choices), (opt.name, spec.get("choices"), opt.choices)
    if opt.default is not None:  # None: no default in the plugin; the role may choose one ("" leaves it out)
        want = list(opt.default) if isinstance(opt.default, tuple) else opt.default
        assert spec.get("default") == want, (opt.name, spec.get("default"), want)


def test_every_variable_that_says_it_is_a_plugin_option_is_one() -> None:
    by_var = {o.role_var: o for o in OPTIONS if o.role_var}
    for var, spec in spec_options("kvmfleet_collectd").items():
        m = re.match(r"Plugin option (\w+)", str(spec.get("description", "")))
        if m:
            assert var in by_var and by_var[var].name == m.group(1), (var, m.group(1))


# ---------------------------------------------------------------------------------------------- the template
def sample_value(opt: Option) -> Any:
    """A value for the option that is not its default (so a template that leaves it out shows)."""
    return {
        "bool": lambda: not opt.default, "choice": lambda: opt.choices[-1], "seconds": lambda: 7.5,
        "count": lambda: 1234, "regex": lambda: ["^halt_", "exits$"], "tag": lambda: {"rack": "r 7", "dc": 'e"u'},
        "string": lambda: f"value-of-{opt.name.lower()}", "url": lambda: "https://db.example:8086/influx",
        "cafile": lambda: "/etc/ssl/kvm-ca.pem", "spoolpath": lambda: "/var/lib/kvmfleet/spool/other.spool",
    }[opt.kind]()


def parsed(value: Any, opt: Option) -> Any:
    """What parse_config makes of ``value`` for ``opt``."""
    if opt.kind == "regex":
        return [p.pattern for p in value]
    return value


def template_cases() -> dict[str, dict[str, Any]]:
    internals = {"__kvmfleet_collectd_site_packages": "/opt/kvmfleet/venv/lib/python3.11/site-packages",
                 "__kvmfleet_collectd_password_file": "/etc/kvmfleet/influxdb.password",
                 "__kvmfleet_collectd_token_file": "/etc/kvmfleet/influxdb.token",
                 "__kvmfleet_collectd_use_libvirt": True}
    everything = {o.role_var: sample_value(o) for o in OPTIONS if o.role_var}
    v1 = dict(everything, kvmfleet_collectd_influx_api="v1", kvmfleet_collectd_influx_password="pw")
    v2 = dict(everything, kvmfleet_collectd_influx_api="v2", kvmfleet_collectd_influx_token="tok",
              kvmfleet_collectd_source="statsfd")
    return {"defaults": dict(internals), "v1": dict(internals, **v1), "v2": dict(internals, **v2)}


def render_template(tmp_path: Path, env: dict[str, str], cases: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Each case's vars rendered through the role's template by Ansible's template module."""
    role = ROOT / "roles" / "kvmfleet_collectd"
    defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text())
    plays = []
    for name, case in cases.items():
        plays.append({"name": name, "hosts": "localhost", "gather_facts": False, "vars": {**defaults, **case},
                      "tasks": [{"ansible.builtin.template": {"src": str(role / "templates" / "kvmfleet.conf.j2"),
                                                              "dest": str(tmp_path / f"{name}.conf"),
                                                              "mode": "0600"}}]})
    run_plays(tmp_path, env, plays)
    return {name: (tmp_path / f"{name}.conf").read_text() for name in cases}


def run_plays(tmp_path: Path, env: dict[str, str], plays: list[dict[str, Any]],
              check: bool = True) -> subprocess.CompletedProcess[str]:
    book = tmp_path / f"play-{len(list(tmp_path.glob('play-*')))}.yml"
    book.write_text(json.dumps(plays))  # JSON is YAML
    proc = subprocess.run([require_tool("ansible-playbook"), "-i", "localhost,", "-c", "local",
                           "-e", f"ansible_python_interpreter={sys.executable}", str(book)],
                          cwd=ROOT, env=dict(env, ANSIBLE_ROLES_PATH=str(ROOT / "roles")), capture_output=True,
                          text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def test_the_template_writes_every_option_the_plugin_reads_back(tmp_path: Path, tool_env: dict[str, str]) -> None:
    cases = template_cases()
    texts = render_template(tmp_path, tool_env, cases)
    defaults = parse_config(module_entries(texts["defaults"]), check_files=False)
    for opt in OPTIONS:
        if not opt.shipping:
            assert getattr(defaults, opt.attr) == opt.default or opt.name == "LibvirtURI", opt.name
    assert defaults.ship is None
    for api in ("v1", "v2"):
        case = cases[api]
        cfg = parse_config(module_entries(texts[api]), check_files=False)
        assert cfg.ship is not None
        for opt in OPTIONS:
            if opt.role_var is None or (opt.api and opt.api != api):
                continue
            got = getattr(cfg.ship if opt.shipping else cfg, opt.attr)
            assert parsed(got, opt) == case[opt.role_var], (api, opt.name, got, case[opt.role_var])
        secret = cfg.ship.password_file if api == "v1" else cfg.ship.token_file
        assert secret == case[f"__kvmfleet_collectd_{'password' if api == 'v1' else 'token'}_file"]
        assert "pw" not in texts[api].split() and "tok" not in texts[api].split()  # names of files, never secrets


# ---------------------------------------------------------------------------------------------- validation
def choice_cases(role: str) -> list[tuple[str, Any]]:
    """(variable, value) for every value every variable with choices allows (list elements' choices too)."""
    cases: list[tuple[str, Any]] = []
    for var, spec in spec_options(role).items():
        cases += [(var, value) for value in spec.get("choices") or ()]
        for sub, sub_spec in (spec.get("options") or {}).items():
            for value in sub_spec.get("choices") or ():
                cases.append((var, [{"name": "u", "password": "p", sub: value}]))
    return cases


# A value that is valid only with others beside it (checked by the role's own assertions): those others.
COMPANIONS: dict[tuple[str, str], dict[str, str]] = {
    ("kvmfleet_influxdb_api", "v2"): {"kvmfleet_influxdb_org": "ops", "kvmfleet_influxdb_token": "t0ken"},
    ("kvmfleet_audit_state", "present"): {"kvmfleet_audit_url": "https://db.example:8086"},
}


def validate_play(role: str, cases: list[tuple[str, Any]]) -> dict[str, Any]:
    tasks = [{"name": f"{var}={json.dumps(value)}", "ansible.builtin.include_role": {"name": role,
                                                                                       "tasks_from": "validate"},
              "vars": {var: value, **COMPANIONS.get((var, json.dumps(value).strip('"')), {})}}
             for var, value in cases]
    return {"name": f"validate {role}", "hosts": "localhost", "gather_facts": False, "tasks": tasks}


@pytest.mark.parametrize("role", ROLES)
def test_validation_accepts_every_allowed_choice(role: str, tmp_path: Path, tool_env: dict[str, str]) -> None:
    cases = choice_cases(role)
    assert cases, f"{role} has no variable with choices"
    proc = run_plays(tmp_path, tool_env, [validate_play(role, cases)])
    recap = re.search(r"localhost\s*:\s*ok=(\d+)\s+changed=\d+\s+unreachable=0\s+failed=0", proc.stdout)
    assert recap is not None, proc.stdout[-3000:]


@pytest.mark.parametrize(("role", "var", "value", "needle"), [
    ("kvmfleet_collectd", "kvmfleet_collectd_source", "proc", "kvmfleet_collectd_source"),
    ("kvmfleet_collectd", "kvmfleet_collectd_state", "gone", "kvmfleet_collectd_state"),
    ("kvmfleet_collectd", "kvmfleet_collectd_retry_min", 120, "kvmfleet_collectd_retry_min"),
    ("kvmfleet_influxdb", "kvmfleet_influxdb_api", "v3", "kvmfleet_influxdb_api"),
    ("kvmfleet_influxdb", "kvmfleet_influxdb_users", [{"name": "u", "password": "p", "privilege": "OWNER"}],
     "privilege"),
    ("kvmfleet_influxdb", "kvmfleet_influxdb_retention_duration", "30x", "kvmfleet_influxdb_retention_duration"),
    ("kvmfleet_audit", "kvmfleet_audit_state", "gone", "kvmfleet_audit_state"),
    ("kvmfleet_audit", "kvmfleet_audit_url", "db.example:8086", "kvmfleet_audit_url"),
    ("kvmfleet_audit", "kvmfleet_audit_install_dir", "/opt", "kvmfleet_audit_install_dir"),
])
def test_validation_refuses_a_wrong_value_naming_the_variable(role: str, var: str, value: Any, needle: str,
                                                              tmp_path: Path, tool_env: dict[str, str]) -> None:
    proc = run_plays(tmp_path, tool_env, [validate_play(role, [(var, value)])], check=False)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert needle in proc.stdout + proc.stderr, proc.stdout[-3000:]


def test_v2_without_org_bucket_token_fails_with_one_clear_line(tmp_path: Path, tool_env: dict[str, str]) -> None:
    play = validate_play("kvmfleet_collectd", [("kvmfleet_collectd_influx_api", "v2")])
    play["tasks"][0]["vars"]["kvmfleet_collectd_influx_url"] = "https://db.example:8086"
    proc = run_plays(tmp_path, tool_env, [play], check=False)
    assert proc.returncode != 0
    assert "kvmfleet_collectd_influx_api v2 needs kvmfleet_collectd_influx_org" in proc.stdout, proc.stdout[-3000:]
