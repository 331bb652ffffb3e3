"""The role's helper programs on their own: the collectd config validator (real collectd) and the wheel builder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from .conftest import ROOT

FILES = ROOT / "roles" / "kvmfleet_collectd" / "files"
VALIDATE = FILES / "kvmfleet-collectd-validate"
BUILD = FILES / "kvmfleet_build_wheels.py"

# A python module checking its config like kvmfleet's plugin does (an error logged, no exception) or raising.
MODULE = textwrap.dedent("""
    import collectd
    def config(conf):
        for child in conf.children:
            if child.key == "Good":
                continue
            if child.key == "Raise":
                raise ValueError("bad key Raise")
            collectd.error("fakemod: config: unknown option %s" % child.key)
    def init():
        open(MARKER, "w").write("init ran")
    collectd.register_config(config)
    collectd.register_init(init)
""")


def dropin(module_path: Path, body: str, module: str = "fakemod") -> str:
    return textwrap.dedent(f"""\
        <LoadPlugin python>
          Globals true
        </LoadPlugin>
        <Plugin python>
          ModulePath "{module_path}"
          Import "{module}"
          <Module "{module}">
            {body}
          </Module>
        </Plugin>
        """)


@pytest.fixture
def collectd_env(tmp_path):
    if shutil.which("collectd") is None and not Path("/usr/sbin/collectd").exists():
        pytest.fail("collectd is not installed (apt-get install collectd-core; scripts/install-deps does)")
    mod = tmp_path / "mod"
    mod.mkdir()
    marker = tmp_path / "init-ran"
    (mod / "fakemod.py").write_text(MODULE.replace("MARKER", repr(str(marker))))
    return mod, marker


def validate(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(VALIDATE), *args, str(path)], capture_output=True, text=True, timeout=120)


@pytest.mark.server
def test_collectd_t_validates_nothing_in_this_collectd(tmp_path):
    """Why the role has its own validator: collectd 5.12's -t accepts even a file that does not exist."""
    proc = subprocess.run(["/usr/sbin/collectd", "-t", "-C", str(tmp_path / "no-such-file.conf")],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        pytest.skip("this collectd's -t does validate: the wrapper is still correct, only no longer needed")


@pytest.mark.server
@pytest.mark.parametrize("body, valid", [
    ("Good 1", True),
    ("Good 1\n    Typo 2", False),            # the module logs an error: invalid
    ("Raise 1", False),                        # the config callback raises: invalid
])
def test_validator_runs_the_module_config_callback(collectd_env, tmp_path, body, valid):
    mod, marker = collectd_env
    conf = tmp_path / "kvmfleet.conf"
    conf.write_text(dropin(mod, body))
    proc = validate(conf)
    assert (proc.returncode == 0) == valid, proc.stderr
    assert not marker.exists(), "the validator let collectd run init callbacks"


@pytest.mark.server
def test_validator_rejects_syntax_errors_missing_modules_and_files(collectd_env, tmp_path):
    mod, _ = collectd_env
    broken = tmp_path / "broken.conf"
    broken.write_text(dropin(mod, "Good 1").replace("</Plugin>", ""))
    assert validate(broken).returncode == 1
    missing = tmp_path / "missing.conf"
    missing.write_text(dropin(mod, "Good 1", module="no_such_module"))
    assert validate(missing).returncode == 1
    assert validate(tmp_path / "absent.conf").returncode == 2


@pytest.mark.server
def test_validator_main_mode_judges_parse_errors(collectd_env, tmp_path):
    mod, marker = collectd_env
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "kvmfleet.conf").write_text(dropin(mod, "Good 1"))
    main = tmp_path / "collectd.conf"
    main.write_text(f'Interval 10\nLoadPlugin logfile\n<Plugin logfile>\n  File "{tmp_path}/log"\n</Plugin>\n'
                    f'<Include "{tmp_path}/d">\n  Filter "*.conf"\n</Include>\n')
    assert validate(main, "--main").returncode == 0
    main.write_text(main.read_text() + "<Plugin oops>\n")
    assert validate(main, "--main").returncode == 1
    assert not marker.exists()


def test_wheel_builder_is_reproducible_and_cached(tmp_path):
    """Two builds of the same source give byte-identical wheels; a third run is served from the cache."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "plugins", src / "plugins", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))

    def build(cache: Path) -> dict:
        proc = subprocess.run([sys.executable, str(BUILD), "--source", str(src), "--cache", str(cache),
                               "--python-version", "3.13", "--machine", "x86_64", "--glibc", "2.41"],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    a, b = build(tmp_path / "a"), build(tmp_path / "b")
    assert a["changed"] and b["changed"]
    assert a["key"] == "cp313-x86_64-glibc2.41"
    names = {w.split("-")[0].lower() for w in a["wheels"]}
    assert {"kvmfleet", "influxdb_client", "reactivex", "urllib3", "certifi", "python_dateutil"} <= names
    assert all(w.endswith(".whl") for w in a["wheels"])
    sums_a = (Path(a["dir"]) / "SHA256SUMS").read_text()
    assert sums_a == (Path(b["dir"]) / "SHA256SUMS").read_text()
    tar_a = (Path(a["dir"]) / "wheels.tar").read_bytes()
    assert tar_a == (Path(b["dir"]) / "wheels.tar").read_bytes()  # the hosts get it only when a wheel changed
    with tarfile.open(Path(a["dir"]) / "wheels.tar") as tar:
        assert sorted(tar.getnames()) == sorted([*a["wheels"], "requirements.txt"])
    assert any(r.startswith("kvmfleet==") for r in a["requirements"])
    again = build(tmp_path / "a")
    assert not again["changed"]
    (src / "plugins" / "kvmfleet" / "__init__.py").write_text(
        (src / "plugins" / "kvmfleet" / "__init__.py").read_text() + "\n# changed\n")
    changed = build(tmp_path / "a")
    assert changed["changed"]
    assert (Path(changed["dir"]) / "SHA256SUMS").read_text() != sums_a
