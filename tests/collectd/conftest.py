"""Real collectd + real servers + real KVM guests: every test here is marked ``server`` and ``kvm``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.server.shiphelpers import INFLUX_PASSWORD, secret_file
from tests.support.fixtures import influxdb, victoria  # noqa: F401  (shared fixtures)
from tests.support.realkvm import mark_directory, need_kvm_and_root

from kvmfleet.guestvmm import launch
from kvmfleet.guestvmm.launcher import GuestProcess

HERE = os.path.dirname(os.path.abspath(__file__))

# The test guests: (suffix, vcpus, workload, loops). Each stops after its loops and keeps its stats fds, so
# its halt_exits / mmio_exits stay exactly loops per vCPU for as long as it lives.
GUESTS = (("halt-a", 2, "halt", 700), ("halt-b", 1, "halt", 1234), ("mmio-a", 2, "mmio", 321))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_directory(items, HERE, pytest.mark.server, pytest.mark.kvm)


_need_kvm_and_root = need_kvm_and_root("the collectd tests need root (the plugin borrows stats fds with pidfd_getfd)")


class Guests:
    """The running test guests: ``names``, ``expected[name] = {"halt_exits": .., "mmio_exits": ..}`` per VM,
    ``vcpus[name]``, ``loops[name]``."""

    def __init__(self, prefix: str, members: list[tuple[GuestProcess, int, str, int]]) -> None:
        self.prefix = prefix
        self.members = members
        self.names = [g.name for g, *_ in members]
        self.vcpus = {g.name: v for g, v, _, _ in members}
        self.loops = {g.name: n for g, _, _, n in members}
        self.uuids = {g.name: g.uuid for g, *_ in members}
        self.expected = {g.name: {"halt_exits": n * v if w == "halt" else 0, "mmio_exits": n * v if w == "mmio"
                                  else 0} for g, v, w, n in members}


@pytest.fixture(scope="module")
def guests() -> Iterator[Guests]:
    prefix = f"cdt{os.getpid()}"
    members: list[tuple[GuestProcess, int, str, int]] = []
    try:
        for suffix, vcpus, workload, loops in GUESTS:
            g = launch(f"{prefix}-{suffix}", vcpus=vcpus, workload=workload, loops=loops)
            members.append((g, vcpus, workload, loops))
        for g, *_ in members:
            info = g.wait_ready(60)
            assert info.get("state") == "done", info
        yield Guests(prefix, members)
    finally:
        for g, *_ in members:
            g.stop()


@pytest.fixture
def password_file(tmp_path: Path) -> str:
    return secret_file(tmp_path, "influx.pass", INFLUX_PASSWORD)
