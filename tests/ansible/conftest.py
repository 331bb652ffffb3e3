"""Helpers for the Ansible tests: the venv's tools on PATH, the repository root."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def tool_env() -> dict[str, str]:
    """The environment for ansible-*, molecule and yamllint: the venv's bin first on PATH, no colours."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["ANSIBLE_FORCE_COLOR"] = "0"
    env["NO_COLOR"] = "1"
    env["PY_COLORS"] = "0"
    env.pop("ANSIBLE_CONFIG", None)
    return env


def require_tool(name: str) -> str:
    path = VENV_BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in {VENV_BIN}: pip install -r requirements-ansible.txt")
    return str(path)
