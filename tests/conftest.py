"""Suite-wide rules: on a machine with /dev/kvm, tests that need KVM, QEMU or a server never skip."""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run: a run that passes passes again (CI lands on one run).
settings.register_profile("kvmfleet", derandomize=True, print_blob=True)
settings.load_profile("kvmfleet")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # tests.support.* helpers

MUST_RUN = ("kvm", "qemu", "server")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.path.exists("/dev/kvm"):
        marks = [name for name in MUST_RUN if item.get_closest_marker(name)]
        if marks:
            report.outcome = "failed"
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
            report.longrepr = (f"test marked {'/'.join(marks)} was skipped on a machine with /dev/kvm; "
                               f"such tests must run here (skip reason: {reason})")
