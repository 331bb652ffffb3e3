"""The query pack's own files (package data) and the one error the pack raises."""

from __future__ import annotations

import importlib
from importlib import resources
from typing import Any

PACKAGE = __name__.rpartition(".")[0]


class PackError(ValueError):
    """A query, rule file, override or parameter that cannot be used; the message says which and why."""


def read_data(name: str) -> str:
    """A file of the pack (``rules.yaml``, ``counters.yaml``, ``*.influxql``)."""
    return resources.files(PACKAGE).joinpath(name).read_text(encoding="utf-8")


def yaml_load(text: str, what: str) -> Any:
    """YAML ``text`` (PyYAML); :class:`PackError` naming ``what`` when it is not valid."""
    try:
        yaml: Any = importlib.import_module("yaml")  # PyYAML (untyped; no stubs needed)
    except ImportError as e:  # pragma: no cover - PyYAML is a dependency
        raise PackError("PyYAML is needed to read rules (pip install PyYAML)") from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PackError(f"{what}: not valid YAML: {e}") from None
