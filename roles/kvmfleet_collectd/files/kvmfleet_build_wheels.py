#!/usr/bin/env python3
"""Build the wheels a hypervisor needs for kvmfleet, on the Ansible controller (stdlib only).

    kvmfleet_build_wheels.py --source REPO --cache DIR --python-version 3.11 --machine x86_64 --glibc 2.36
                             [--pip-arg ARG]... [--requirement SPEC]... [--force]

Builds the kvmfleet wheel from the source tree (a copy of it: the tree is never written to) with a fixed
SOURCE_DATE_EPOCH, so the same source always gives the same bytes, and downloads the wheels of its
dependencies (and pip's own) for the *target's* Python version, CPU and glibc (``pip download --only-binary=:all:``:
pure-Python wheels and manylinux wheels both work; a dependency with no wheel for the target fails
clearly). The result lives in ``DIR/cpXY-MACHINE-glibcG/``: ``wheels/*.whl``, ``requirements.txt``
(``name==version`` per wheel), ``SHA256SUMS`` (of the wheels), ``manifest.json`` (the same plus the stamp) and
``wheels.tar`` (the wheels and requirements.txt in one file: one transfer per host instead of one per wheel).

The build is skipped when the manifest's stamp (a hash of the source files, the target and the pip
arguments) matches and every wheel is intact, so a re-run costs no network and no time. Prints one JSON
object: ``{"changed": bool, "dir": ..., "key": ..., "wheels": [...], "requirements": [...]}``;
``changed`` is true only when the set or bytes of the wheels differ from what was there.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

BUILDER_VERSION = 3
SOURCE_DATE_EPOCH = "315532800"  # 1980-01-01, the earliest date a zip file can hold
ROOT_FILES = ("setup.cfg", "setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "LICENSE")
SOURCE_DIRS = ("plugins",)
SKIP_PARTS = {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache", "build", "dist"}


def source_files(source: Path) -> list[Path]:
    files = [source / name for name in ROOT_FILES if (source / name).is_file()]
    for top in SOURCE_DIRS:
        for path in sorted((source / top).rglob("*")):
            rel = path.relative_to(source)
            if any(p in SKIP_PARTS or p.endswith(".egg-info") for p in rel.parts):
                continue
            if path.is_file() and not path.name.endswith((".pyc", ".pyo")):
                files.append(path)
    return sorted(files)


def fingerprint(source: Path) -> str:
    h = hashlib.sha256()
    for path in source_files(source):
        h.update(str(path.relative_to(source)).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def platform_tags(machine: str, glibc: str) -> list[str]:
    m = re.fullmatch(r"2\.(\d+)", glibc)
    minor = int(m.group(1)) if m else 17
    tags = [f"manylinux_2_{n}_{machine}" for n in range(minor, 4, -1)]
    if machine in ("x86_64", "i686"):
        tags += [f"manylinux2014_{machine}", f"manylinux2010_{machine}", f"manylinux1_{machine}"]
    elif machine in ("aarch64", "ppc64le", "s390x", "armv7l"):
        tags.append(f"manylinux2014_{machine}")
    return tags


def wheel_name_version(filename: str) -> tuple[str, str]:
    parts = filename[: -len(".whl")].split("-")
    name = re.sub(r"[-_.]+", "-", parts[0]).lower()
    return name, parts[1]


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:])
        raise SystemExit(f"kvmfleet_build_wheels: command failed ({proc.returncode}): {' '.join(cmd)}")


def load_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def intact(out: Path, manifest: dict | None) -> bool:
    if not manifest:
        return False
    for name, digest in manifest.get("wheels", {}).items():
        p = out / "wheels" / name
        if not p.is_file() or sha256(p) != digest:
            return False
    return all((out / name).is_file() for name in ("requirements.txt", "SHA256SUMS", "wheels.tar"))


def write_tar(path: Path, files: list[Path]) -> None:
    """An uncompressed tar of ``files`` (flat), with fixed owners and times so equal inputs give equal bytes."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for f in files:
            info = tar.gettarinfo(str(f), arcname=f.name)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mode = 0o644
            info.mtime = int(SOURCE_DATE_EPOCH)
            with open(f, "rb") as data:
                tar.addfile(info, data)


def build(args: argparse.Namespace, stamp: dict, tmp: Path) -> dict:
    src = tmp / "src"
    wheels = tmp / "out" / "wheels"
    wheels.mkdir(parents=True)
    for path in source_files(args.source):
        dst = src / path.relative_to(args.source)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dst)
    env = dict(os.environ, SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH, PIP_DISABLE_PIP_VERSION_CHECK="1")
    pip = [sys.executable, "-m", "pip"]
    run([*pip, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), *args.pip_arg, str(src)], env)
    built = sorted(wheels.glob("*.whl"))
    if len(built) != 1:
        raise SystemExit(f"kvmfleet_build_wheels: expected one wheel from {args.source}, got {built}")
    py = args.python_version
    cmd = [*pip, "download", "--quiet", "--only-binary=:all:", "--dest", str(wheels),
           "--python-version", py, "--implementation", "cp", "--abi", "cp" + py.replace(".", ""), "--abi", "abi3",
           "--abi", "none"]
    for tag in platform_tags(args.machine, args.glibc):
        cmd += ["--platform", tag]
    # pip's own wheel too: the host runs pip straight from it (python pip-X.whl/pip install ...) into a venv made
    # --without-pip, so it needs neither ensurepip (Debian's python3-venv) nor an index
    cmd += [*args.pip_arg, str(built[0]), "pip", *args.requirement]
    run(cmd, env)
    files = sorted(p for p in wheels.iterdir())
    bad = [p.name for p in files if not p.name.endswith(".whl")]
    if bad:
        raise SystemExit(f"kvmfleet_build_wheels: not wheels: {bad}")
    reqs = sorted("{}=={}".format(*wheel_name_version(p.name)) for p in files)
    (tmp / "out" / "requirements.txt").write_text("".join(r + "\n" for r in reqs))
    manifest = {"stamp": stamp, "wheels": {p.name: sha256(p) for p in files}, "requirements": reqs}
    (tmp / "out" / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    # what the hosts get next to the wheels: changes exactly when a wheel does
    (tmp / "out" / "SHA256SUMS").write_text("".join(f"{d}  {n}\n" for n, d in sorted(manifest["wheels"].items())))
    write_tar(tmp / "out" / "wheels.tar", [*files, tmp / "out" / "requirements.txt"])
    return manifest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, required=True)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--python-version", required=True)
    ap.add_argument("--machine", default="x86_64")
    ap.add_argument("--glibc", default="2.17")
    ap.add_argument("--pip-arg", action="append", default=[])
    ap.add_argument("--requirement", action="append", default=[])
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    if not re.fullmatch(r"3\.\d+", args.python_version):
        ap.error(f"bad --python-version {args.python_version!r}")
    args.source = args.source.resolve()
    if not (args.source / "setup.cfg").is_file() and not (args.source / "pyproject.toml").is_file():
        ap.error(f"{args.source} is not the kvmfleet source tree")

    key = f"cp{args.python_version.replace('.', '')}-{args.machine}-glibc{args.glibc}"
    stamp = {"builder": BUILDER_VERSION, "source": fingerprint(args.source), "python": args.python_version,
             "machine": args.machine, "glibc": args.glibc, "pip_args": args.pip_arg, "requirements": args.requirement}
    args.cache.mkdir(parents=True, exist_ok=True)
    out = args.cache / key
    with open(args.cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = load_manifest(out / "manifest.json")
        if not args.force and old and old.get("stamp") == stamp and intact(out, old):
            manifest, changed = old, False
        else:
            with tempfile.TemporaryDirectory(dir=args.cache, prefix=f".{key}.") as t:
                tmp = Path(t)
                manifest = build(args, stamp, tmp)
                changed = not old or old.get("wheels") != manifest["wheels"]
                if out.exists():
                    shutil.rmtree(out)
                (tmp / "out").rename(out)
    json.dump({"changed": changed, "key": key, "dir": str(out), "wheels": sorted(manifest["wheels"]),
               "requirements": manifest["requirements"]}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
