"""The libvirt source's connects never hold a sample longer than they must (pure logic, a fake binding).

A socket-activated libvirtd that restarts accepts the connection at once and answers seconds later; the sample must
not wait for it (the other sources' counters of that interval would be lost). The real case runs in molecule's
systemd scenario (`systemctl restart libvirtd` while collectd samples).
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from kvmfleet.sources import libvirt as lvsource


class FakeError(Exception):
    def get_error_message(self) -> str:
        return str(self)


class FakeConn:
    def __init__(self, lv: FakeLibvirt) -> None:
        self.lv = lv
        self.closed = False

    def getLibVersion(self) -> int:
        return 11_003_000

    def getVersion(self) -> int:
        return 10_000_013

    def getAllDomainStats(self, *_: Any) -> list[Any]:
        if self.lv.broken:
            raise FakeError("Cannot write data: Broken pipe")
        return []

    def close(self) -> int:
        self.closed = True
        return 0


class FakeLibvirt(SimpleNamespace):
    """What the source uses of the binding; ``open`` blocks while ``answer`` is clear."""

    VIR_DOMAIN_STATS_VM = 1 << 11
    VIR_DOMAIN_STATS_VCPU = 1 << 3
    VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE = 1 << 4
    libvirtError = FakeError

    def __init__(self) -> None:
        super().__init__()
        self.answer = threading.Event()
        self.answer.set()
        self.broken = False
        self.opened: list[FakeConn] = []

    def getVersion(self) -> int:
        return 11_003_000

    def open(self, _uri: str) -> FakeConn:
        if not self.answer.wait(30):
            raise FakeError("never answered")
        conn = FakeConn(self)
        self.opened.append(conn)
        return conn


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeLibvirt:
    lv = FakeLibvirt()
    monkeypatch.setattr(lvsource, "import_libvirt", lambda: lv)
    return lv


def timed_read(source: lvsource.LibvirtSource) -> float:
    began = time.monotonic()
    source.read()
    return time.monotonic() - began


def test_a_reconnect_to_a_libvirtd_that_is_starting_does_not_hold_the_sample(fake: FakeLibvirt) -> None:
    now = [0.0]
    source = lvsource.LibvirtSource(timeout_s=5.0, retry_min_s=1.0, clock=lambda: now[0], optional=True)
    source.read()
    assert source.usability().usable
    fake.broken = True  # libvirtd restarts: the kept connection breaks ...
    source.read()
    assert "Broken pipe" in source.usability().reason
    fake.broken = False
    fake.answer.clear()  # ... and the new one is accepted but not answered yet
    now[0] += 1.0
    waits = [timed_read(source) for _ in range(3)]
    assert max(waits) < 0.25 + 0.2, waits
    assert source.usability().reason == "connecting to qemu:///system (libvirtd starting?)"
    fake.answer.set()  # libvirtd is up
    deadline = time.monotonic() + 5
    while not (source.read() is not None and source.usability().reason == "no running domains with KVM stats"):
        assert time.monotonic() < deadline, source.usability()
    assert len(fake.opened) == 2
    assert fake.opened[0].closed and not fake.opened[1].closed


def test_the_first_connect_is_waited_for(fake: FakeLibvirt) -> None:
    fake.answer.clear()
    threading.Timer(0.5, fake.answer.set).start()
    source = lvsource.LibvirtSource(timeout_s=5.0, optional=True)
    assert 0.4 < timed_read(source) < 2.0
    assert source.usability().reason == "no running domains with KVM stats"


def test_a_connect_that_never_answers_gives_up_after_timeout_and_closes_what_it_opens_late(fake: FakeLibvirt) -> None:
    now = [0.0]
    fake.answer.clear()
    source = lvsource.LibvirtSource(timeout_s=0.3, retry_min_s=1.0, clock=lambda: now[0], optional=True)
    assert timed_read(source) < 0.6
    assert source.usability().reason == "cannot connect to qemu:///system: libvirtd did not answer within 0.3 s"
    fake.answer.set()  # the given-up connect completes late
    deadline = time.monotonic() + 5
    while len(fake.opened) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    now[0] += 1.0
    deadline = time.monotonic() + 5
    while not source.usability().usable:
        assert time.monotonic() < deadline, source.usability()
        source.read()
    assert fake.opened[0].closed  # the late one, closed
    assert len(fake.opened) == 2 and not fake.opened[1].closed
