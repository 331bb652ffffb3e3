"""The writers against tests/support/faultserver.py: every misbehaviour ends within the deadline, as a retry or a
rejection, and a 200 that is not a write's answer is not taken for a delivery."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from tests.server.shiphelpers import secret_file
from tests.support.faultserver import FaultServer
from tests.support.servers import BlackholeServer

from kvmfleet.ship.writers import ConfigWriteError, PermanentWriteError, RetryableWriteError, V1Writer, V2Writer

pytestmark = pytest.mark.server


def v2(url: str, tmp_path: Path, timeout: float) -> V2Writer:
    return V2Writer(url, org="o", bucket="kvm", token_file=secret_file(tmp_path, "token", "tok"), timeout=timeout)


def writers(url: str, tmp_path: Path, timeout: float = 5.0) -> list[V1Writer | V2Writer]:
    return [V1Writer(url, "kvm", timeout=timeout), v2(url, tmp_path, timeout)]


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_a_server_answering_a_byte_a_second_is_cut_off_at_the_deadline(api: str, tmp_path: Path) -> None:
    """Each byte comes within the per-read timeout: only the deadline of the whole write ends it."""
    with FaultServer(["trickle"]) as server:
        writer = writers(server.url, tmp_path, timeout=1.5)[api == "v2"]
        t0 = time.monotonic()
        with pytest.raises(RetryableWriteError, match=r"within 1\.5s") as exc:
            writer.write(["m x=1i 1"])
        took = time.monotonic() - t0
    assert 1.4 < took < 2.5, took
    assert exc.value.retryable


def test_v2_abort_ends_a_write_stuck_in_a_blackhole(tmp_path: Path) -> None:
    with BlackholeServer() as hole:
        writer = v2(hole.url, tmp_path, timeout=30)
        threading.Timer(0.5, writer.abort).start()
        t0 = time.monotonic()
        with pytest.raises(RetryableWriteError):
            writer.write(["m x=1i 1"])
    assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_a_200_with_a_body_is_not_a_delivery(api: str, tmp_path: Path) -> None:
    with FaultServer(["garbage"]) as server:
        writer = writers(server.url, tmp_path)[api == "v2"]
        with pytest.raises(RetryableWriteError, match=r"HTTP 200 with a body of \d+ bytes, not a write's answer"):
            writer.write(["m x=1i 1"])
        assert server.stored == []
        server.fault = "ok"
        writer.write(["m x=1i 1"])
        assert server.stored == ["m x=1i 1"]


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_each_fault_is_a_retry_or_a_rejection(api: str, tmp_path: Path) -> None:
    expected = {"partial": PermanentWriteError, "all-or-nothing": PermanentWriteError, "413": PermanentWriteError,
                "429": RetryableWriteError, "500": RetryableWriteError, "huge": RetryableWriteError,
                "redirect": ConfigWriteError}
    for fault, error in expected.items():
        with FaultServer([fault], huge_bytes=4 << 20) as server:
            writer = writers(server.url, tmp_path)[api == "v2"]
            with pytest.raises(error) as exc:
                writer.write(["a x=1i 1", "bBAD x=2i 2"])
            assert type(exc.value) is error, (fault, exc.value)
            if fault == "429":
                assert exc.value.retry_after == 1.0
            if fault == "redirect":
                assert "redirected" in str(exc.value)
