"""Statistics sources behind one interface, and the factory that picks one by name."""

from __future__ import annotations

from ..logsay import SayOnce
from .auto import AutoSource
from .base import Source
from .debugfs import DebugfsSource
from .libvirt import DEFAULT_URI, LibvirtSource
from .statsfd import StatsfdSource

SOURCE_NAMES = ("auto", "statsfd", "debugfs", "libvirt")

__all__ = ["DEFAULT_URI", "SOURCE_NAMES", "AutoSource", "DebugfsSource", "LibvirtSource", "Source", "StatsfdSource",
           "make_source"]


def make_source(name: str, say: SayOnce | None = None, libvirt_uri: str = DEFAULT_URI) -> Source:
    """A source by its configuration name (``auto``, ``statsfd``, ``debugfs``, ``libvirt``)."""
    if name == "auto":
        return AutoSource(say=say, libvirt_uri=libvirt_uri)
    if name == "statsfd":
        return StatsfdSource(say=say)
    if name == "debugfs":
        return DebugfsSource(say=say)
    if name == "libvirt":
        return LibvirtSource(libvirt_uri, say=say)
    raise ValueError(f"unknown source {name!r}: expected one of {', '.join(SOURCE_NAMES)}")
