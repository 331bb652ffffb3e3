"""Real KVM guests for tests: they run wherever /dev/kvm exists (and fail, not skip, there)."""

from __future__ import annotations

import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(items):
    for item in items:
        if str(item.path).startswith(HERE):
            item.add_marker(pytest.mark.kvm)


@pytest.fixture(autouse=True)
def _need_kvm():
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this machine")
    if os.geteuid() != 0:
        pytest.skip("real-KVM tests need root (borrowing fds needs CAP_SYS_PTRACE)")
