"""What the directories of real-KVM tests share (their conftest.py uses it): every test in the directory gets its
markers, and an autouse fixture skips it only where /dev/kvm or root is missing. Where /dev/kvm exists,
tests/conftest.py turns such a skip into a failure."""

from __future__ import annotations

import os
from typing import Callable

import pytest


def mark_directory(items: list[pytest.Item], directory: str, *marks: pytest.MarkDecorator) -> None:
    """Add ``marks`` to every collected test under ``directory``."""
    for item in items:
        if str(item.path).startswith(directory):
            for mark in marks:
                item.add_marker(mark)


def need_kvm_and_root(why_root: str) -> Callable[[], None]:
    """An autouse fixture: skip without /dev/kvm, or without root (``why_root`` says why root is needed)."""

    @pytest.fixture(autouse=True)
    def _need_kvm_and_root() -> None:
        if not os.path.exists("/dev/kvm"):
            pytest.skip("no /dev/kvm on this machine")
        if os.geteuid() != 0:
            pytest.skip(why_root)

    return _need_kvm_and_root
