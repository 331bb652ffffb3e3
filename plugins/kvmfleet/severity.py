"""Severities of audit findings, in one order: ``info`` < ``warning`` < ``critical``."""

from __future__ import annotations

SEVERITIES = ("info", "warning", "critical")


def severity_rank(severity: str) -> int:
    """The position of ``severity`` in :data:`SEVERITIES` (-1 for an unknown word)."""
    return SEVERITIES.index(severity) if severity in SEVERITIES else -1


def capped(severity: str, ceiling: str) -> str:
    """``severity``, but no higher than ``ceiling`` (a rule's own ``severity`` in rules.yaml)."""
    return severity if severity_rank(severity) <= severity_rank(ceiling) else ceiling
