"""Config mistakes seen by a real collectd, and ``kvmfleet collectd-config`` fragments that collectd accepts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tests.collectd.cdhelpers import HOSTNAME, Collectd, wait_for
from tests.server.shiphelpers import secret_file
from tests.support.servers import free_port

from kvmfleet.collectd_config import default_module_paths, quote

SECRET = "hunter2-Inline-Secret-0xC0FFEE"


def raw_fragment(module_lines: list[str]) -> str:
    """The plugin blocks with the <Module> lines written as given (no validation: mistakes included)."""
    paths = "\n".join(f"  ModulePath {quote(p)}" for p in default_module_paths())
    body = "\n".join("    " + line for line in module_lines)
    return (f"<LoadPlugin python>\n  Globals true\n</LoadPlugin>\n<Plugin python>\n{paths}\n  LogTraces true\n"
            f'  Import "kvmfleet.collectd_plugin"\n  <Module "kvmfleet.collectd_plugin">\n{body}\n  </Module>\n'
            f"</Plugin>\nLoadPlugin load\n")


URL = "http://127.0.0.1:9"
MISTAKES = {
    "unknown-key": (['Foo "bar"'], ['unknown option Foo "bar": expected one of Source, PerVM, PerVCPU']),
    "wrong-type": (["PerVM 5"], ["option PerVM 5: expected a boolean: true or false"]),
    "wrong-arity": (['Tag "rack"'], ['option Tag "rack": expected two quoted strings: Tag "KEY" "VALUE"']),
    "bad-choice": (['Source "proc"'], ['option Source "proc": expected one of "auto", "statsfd", "debugfs"']),
    "bad-number": (['Timeout "ten"', f'InfluxURL "{URL}"', 'Database "kvm"'],
                   ['option Timeout "ten": expected a number of seconds > 0']),
    "bad-regex": (['Exclude "halt_(poll"'], ['option Exclude "halt_(poll": expected a valid regular expression']),
    "v1-without-database": ([f'InfluxURL "{URL}"'], ['option Database is missing: expected it with InfluxAPI "v1"']),
    "v2-without-bucket-org-token": ([f'InfluxURL "{URL}"', 'InfluxAPI "v2"'],
                                    ["option Bucket is missing", "option Org is missing",
                                     "option TokenFile is missing"]),
    "password-without-username": ([f'InfluxURL "{URL}"', 'Database "kvm"', 'PasswordFile "/etc/kvmfleet/p"'],
                                  ['option PasswordFile "/etc/kvmfleet/p": expected Username as well']),
    "unreadable-secret": ([f'InfluxURL "{URL}"', 'InfluxAPI "v2"', 'Org "o"', 'Bucket "b"',
                           'TokenFile "/nonexistent/kvmfleet.token"'],
                          ['option TokenFile "/nonexistent/kvmfleet.token": expected a readable file holding the '
                           'token alone on one line (the file cannot be read: directory /nonexistent: No such file '
                           'or directory)']),
    "inline-secret": ([f'Password "{SECRET}"'], ['unknown option Password "***"']),
    "block": (['<Include "x">', '  Pattern "y"', "</Include>"],
              ['option Include "x": expected a simple option line, not a block']),
}


@pytest.mark.parametrize("kind", sorted(MISTAKES))
def test_each_mistake_is_one_clear_error_and_the_plugin_stays_inactive(kind: str, tmp_path: Path) -> None:
    lines, errors = MISTAKES[kind]
    cd = Collectd(tmp_path, raw_module=raw_fragment(lines))
    done = cd.run_once()
    log = cd.log()
    assert done.returncode == 0, done.stderr + log  # collectd itself runs on: only the plugin is off
    for error in errors:
        assert f"[error] kvmfleet: config: {error}" in log, log
    inactive = cd.log_lines("kvmfleet: plugin inactive")
    assert len(inactive) == 1 and f"{len(errors)} configuration error(s)" in inactive[0], log
    assert len(cd.log_lines("[error]")) == len(errors) + 1, log
    assert "kvmfleet: active" not in log and "Traceback" not in log
    assert not (cd.csv_dir / HOSTNAME / "kvm").exists() and not (cd.csv_dir / HOSTNAME / "kvmfleet").exists()
    # other plugins still ran (collectd -T may exit before its write threads store what the reads dispatched,
    # and then says how many value lists it left: here only the load plugin's one)
    left = cd.log_lines("left after shutting down the write threads")
    assert (cd.csv_dir / HOSTNAME / "load").is_dir() or (left and "1 value list was left" in left[0]), log
    assert SECRET not in log + done.stdout + done.stderr


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmfleet.cli", "collectd-config", *args], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_collectd_config_fragment_loads_in_collectd(api: str, tmp_path: Path) -> None:
    port = free_port()  # nothing listens: the lines are spooled at shutdown
    args = ["--influx-url", f"http://127.0.0.1:{port}", "--api", api, "--per-vcpu", "--interval", "2",
            "--tag", 'rack=r "7"\\b', "--tag", "dc=eu west", "--spool-path", str(tmp_path / "spool" / "s.spool")]
    if api == "v1":
        args += ["--database", "kvm", "--username", "kvmwriter", "--password-file",
                 secret_file(tmp_path, "pass", "p4ss-word")]
    else:
        args += ["--bucket", "kvm", "--org", "ops", "--token-file", secret_file(tmp_path, "token", "t0ken")]
    out = run_cli(*args)
    assert out.returncode == 0, out.stderr
    fragment = out.stdout
    assert fragment.startswith("<LoadPlugin python>\n  Globals true\n</LoadPlugin>")
    assert 'Import "kvmfleet.collectd_plugin"' in fragment and 'Tag "rack" "r \\"7\\"\\\\b"' in fragment
    for path in default_module_paths():
        assert f"ModulePath {quote(path)}" in fragment
    cd = Collectd(tmp_path / "cd", raw_module=fragment)
    # collectd 5.12's -t exits 0 without even reading the file (it cannot fail); -T parses the config, runs the
    # config and init callbacks, one read and the shutdown: that is the real check
    checked = cd.test_config()
    assert checked.returncode == 0, checked.stderr
    done = cd.run_once()
    log = cd.log()
    assert done.returncode == 0 and "[error]" not in log, done.stderr + log
    active = cd.log_lines("kvmfleet: active on host")
    assert active and 'tags dc=eu west,rack=r "7"\\b' in active[0] and "interval 2s" in active[0]
    assert f"shipping {api} to http://127.0.0.1:{port}" in active[0]
    assert cd.log_lines("kvmfleet: stopped:") and (tmp_path / "spool" / "s.spool").exists()
    # and running for real, it reads every 2 s and dispatches (its own metrics at least: no guest runs here)
    with cd:
        wait_for("values in csv", lambda: len(cd.csv_values("kvmfleet", "gauge-sample_duration_s")) >= 3, 30)
    times = [t for t, _ in cd.csv_values("kvmfleet", "gauge-sample_duration_s")]
    assert 1.7 < times[2] - times[1] < 2.3  # (the first read comes early, then every Interval)
    assert "[error]" not in cd.log()


def test_collectd_config_refuses_what_the_plugin_would_refuse() -> None:
    out = run_cli("--influx-url", "http://x:8086", "--api", "v2", "--bucket", "b")
    assert out.returncode == 2 and out.stdout == ""
    assert "option Org is missing" in out.stderr and "option TokenFile is missing" in out.stderr
    out = run_cli("--tag", "nokey")
    assert out.returncode == 2 and "--tag 'nokey': expected KEY=VALUE" in out.stderr
    out = run_cli("--tag", "rack=a\tb")
    assert out.returncode == 2 and 'option Tag "rack" "a\\tb"' in out.stderr and "no tab or newline" in out.stderr
    out = run_cli("--influx-url", "http://x:8086", "--database", "kv\nm")
    assert out.returncode == 2 and "control characters" in out.stderr
    out = run_cli("--database", "kvm")
    assert out.returncode == 2 and "--database needs --influx-url" in out.stderr
    out = run_cli("--module-path", "/usr/lib/collectd")
    assert out.returncode == 2 and "must not be on ModulePath" in out.stderr
