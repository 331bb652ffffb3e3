"""Real libvirtd 9.0 and QEMU 7.2 domains: every test here is marked ``kvm`` and ``server`` (never skips here)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from tests.support.libvirtd import Domain, Libvirtd, domstats
from tests.support.realkvm import mark_directory, need_kvm_and_root
from tests.support.waiting import wait_for

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_directory(items, HERE, pytest.mark.server, pytest.mark.kvm)


_need_kvm_and_root = need_kvm_and_root("libvirtd and its domains need root here")


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[Libvirtd]:
    with Libvirtd() as daemon:
        yield daemon


@pytest.fixture(scope="module")
def paused(libvirtd: Libvirtd) -> Iterator[Domain]:
    """A 2-vCPU domain that ran SeaBIOS for a moment, then paused: its counters stay put."""
    dom = libvirtd.domain(f"kft{os.getpid()}-paused", vcpus=2)
    try:
        # SeaBIOS runs on vCPU 0: once it counted exits, the counters are not all zero
        wait_for("SeaBIOS to count some exits", lambda: domstats(dom.name, "vcpu").get("vcpu.0.exits.sum", 0), 30,
                 every=0.1)
        dom.suspend()
        yield dom
    finally:
        libvirtd.remove(dom)
