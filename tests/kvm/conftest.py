"""Real KVM guests for tests: they run wherever /dev/kvm exists (and fail, not skip, there)."""

from __future__ import annotations

import os

import pytest
from tests.support.realkvm import mark_directory, need_kvm_and_root

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(items):
    mark_directory(items, HERE, pytest.mark.kvm)


_need_kvm = need_kvm_and_root("real-KVM tests need root (borrowing fds needs CAP_SYS_PTRACE)")
