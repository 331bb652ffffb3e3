"""Real collectd against tests/support/faultserver.py cycling through every fault: reads keep their cadence, memory
stays flat, and every sample reaches the server once it behaves."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from tests.collectd.cdhelpers import HOSTNAME, Collectd, unmatched, wait_for
from tests.collectd.conftest import Guests
from tests.support.faultserver import FaultServer

FAULTS = ["partial", "all-or-nothing", "413", "429", "500", "trickle", "huge", "garbage", "redirect", "ok"]
FAULT_SECONDS = 25


def host_times_ns(server: FaultServer) -> list[int]:
    """The times of the host points (measurement ``kvm``) the server stored."""
    prefix = f"kvm,host={HOSTNAME}"
    with server._lock:
        lines = list(server.stored)
    return sorted({int(text.rsplit(" ", 1)[1]) for text in lines if text.startswith(prefix)})


def test_collectd_against_a_faulty_server_keeps_cadence_memory_and_every_sample(guests: Guests,
                                                                                tmp_path: Path) -> None:
    with FaultServer(FAULTS, huge_bytes=4 << 20) as server:
        opts: list[tuple[str, list[Any]]] = [
            ("PerVCPU", [True]), ("InfluxURL", [server.url]), ("Database", ["kvm"]), ("Timeout", [1]),
            ("BatchLines", [50]), ("RetryMin", [0.1]), ("RetryMax", [0.5]),
            ("SpoolPath", [str(tmp_path / "spool" / "ship.spool")]),
        ]
        cd = Collectd(tmp_path / "cd", opts)
        rss: list[tuple[float, int]] = []
        with cd:
            t0 = time.monotonic()
            while time.monotonic() - t0 < FAULT_SECONDS:
                time.sleep(1)
                rss.append((time.monotonic() - t0, cd.rss_kb()))
            server.fault = "ok"
            wait_for("every sample at the server", lambda: not unmatched(cd.sample_times_ms(),
                                                                         host_times_ns(server)), 60, every=1)
            cd.stop()
        assert {fault for _, fault in server.requests} == set(FAULTS)
    times = [t / 1000 for t in cd.sample_times_ms()]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(times) >= FAULT_SECONDS and max(gaps) < 1.6 and min(gaps) > 0.4, gaps
    assert abs(statistics.mean(gaps) - 1.0) < 0.05, gaps
    steady = [kb for t, kb in rss if t >= 8]
    assert max(steady) - steady[0] < 8192, rss  # kB: no growth with the faults or the samples
    stopped = cd.log_lines("kvmfleet: stopped:")
    assert stopped and " 0 dropped (buffer full), 0 rejected, 0 lost" in stopped[0], stopped
    assert not (tmp_path / "spool" / "ship.spool").exists()
