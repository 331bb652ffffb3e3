"""Statistics sources behind one interface, and the factory that picks one by name."""

from __future__ import annotations

from ..logsay import SayOnce
from .auto import AutoSource
from .base import Source
from .debugfs import DebugfsSource
from .statsfd import StatsfdSource

SOURCE_NAMES = ("auto", "statsfd", "debugfs")

__all__ = ["SOURCE_NAMES", "AutoSource", "DebugfsSource", "Source", "StatsfdSource", "make_source"]


def make_source(name: str, say: SayOnce | None = None) -> Source:
    """A source by its configuration name (``auto``, ``statsfd``, ``debugfs``)."""
    if name == "auto":
        return AutoSource(say=say)
    if name == "statsfd":
        return StatsfdSource(say=say)
    if name == "debugfs":
        return DebugfsSource(say=say)
    raise ValueError(f"unknown source {name!r}: expected one of {', '.join(SOURCE_NAMES)}")
