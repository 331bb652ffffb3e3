"""Constants and helpers shared by the shipping tests (imported by conftest and the test modules)."""

from __future__ import annotations

import os
from pathlib import Path

INFLUX_USER = "kvmwriter"
INFLUX_PASSWORD = "s3cr3t-Pa55word-xyz"


def secret_file(directory: Path, name: str, secret: str, mode: int = 0o600) -> str:
    """A secret file as an operator would make it (mode 0600 unless told otherwise)."""
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    os.chmod(path, mode)
    return str(path)
