"""References in docstrings point at what exists: a file named in a docstring of plugins/, bench/ or scripts/ is in
the repository, and a :mod:/:func:/:class: reference to kvmfleet names something importable."""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "plugins" / "kvmfleet"
FILE_REF = re.compile(r"(?<![\w/.-])((?:\.\./)?[\w/.-]*\w\.(?:md|py|yml|yaml|influxql|j2|txt|cfg|toml))\b")
SPHINX_REF = re.compile(r":(?:mod|func|class|meth|data|attr):`~?([\w.]+)`")


def sources() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "bench").glob("*.py"))
    files += [p for p in sorted((ROOT / "scripts").iterdir()) if p.read_text(errors="replace").startswith(
        "#!/usr/bin/env python3")]
    return files


def docstrings(path: Path) -> Iterator[str]:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node)
            if text:
                yield text


def file_exists(ref: str, path: Path) -> bool:
    bases = [ROOT, path.parent, PACKAGE, PACKAGE / "querypack", *sorted((ROOT / "roles").iterdir())]
    return any((base / ref).exists() for base in bases)


def resolves(ref: str, path: Path) -> bool:
    if not ref.startswith("kvmfleet"):
        return True  # relative (.client) or a name of the module itself: checked by the module's own tests
    if ref.startswith("kvmfleet.collectd_plugin"):  # imports collectd: only the file is looked for
        return (PACKAGE / "collectd_plugin.py").exists()
    parts = ref.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_docstring_references_exist(path: Path) -> None:
    missing = []
    for text in docstrings(path):
        missing += [ref for ref in FILE_REF.findall(text) if not file_exists(ref, path)]
        missing += [ref for ref in SPHINX_REF.findall(text) if not resolves(ref, path)]
    assert not missing, f"{path.relative_to(ROOT)} refers to what does not exist: {sorted(set(missing))}"
