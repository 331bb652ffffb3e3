"""The generated sections of the docs are up to date with their sources (scripts/generate --check): the plugin's
options (kvmfleet.options), the schema's fields and renamed counters (kvmfleet.schema), the roles' variables
(meta/argument_specs.yml, which must name the same variables as defaults/main.yml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_docs_are_up_to_date() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate"), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
