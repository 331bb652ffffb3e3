"""Helpers for tests that run real KVM guests."""

from __future__ import annotations

from kvmfleet import procfs
from kvmfleet.model import Usability
from kvmfleet.sources.base import Source


class OnlyPids(Source):
    """A source seen through a filter, so host totals count only the test's own VMs (other tests or
    a developer's guests may run on the same machine)."""

    def __init__(self, inner: Source, pids) -> None:
        self.inner = inner
        self.pids = pids
        self.name = inner.name

    def read(self):
        return [r for r in self.inner.read() if r.identity.key.pid in self.pids]

    def usability(self) -> Usability:
        return self.inner.usability()

    def close(self) -> None:
        self.inner.close()


def open_fds() -> int:
    return procfs.borrowed_fd_count()
