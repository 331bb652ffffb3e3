"""Nothing lost: an InfluxDB outage, a collectd restart during one, and a server that never answers."""

from __future__ import annotations

import os
import stat
import statistics
import time
from pathlib import Path
from typing import Any

from tests.collectd.cdhelpers import HOSTNAME, Collectd, unmatched, wait_for
from tests.collectd.conftest import Guests
from tests.collectd.test_collectd_ship import secrets_nowhere, v1_options
from tests.server.shiphelpers import INFLUX_PASSWORD
from tests.support.servers import BlackholeServer, InfluxDB1

from kvmfleet.ship.spool import load_spool

OUTAGE_S = 120.0


def stored_times(db: InfluxDB1, measurement: str = "kvm") -> list[int]:
    rows = db.rows(f"SELECT exits FROM \"{measurement}\" WHERE host = '{HOSTNAME}'", db="kvm") \
        if measurement == "kvm" else db.rows(f"SELECT * FROM \"{measurement}\" WHERE host = '{HOSTNAME}'", db="kvm")
    return sorted(r["time"] for r in rows)


def samples_since(cd: Collectd, t: float) -> list[int]:
    """The times (ms) of the samples collectd took after ``t`` (epoch seconds)."""
    return [ms for ms in cd.sample_times_ms() if ms > t * 1000]


def all_arrived(db: InfluxDB1, cd: Collectd) -> bool:
    samples = cd.sample_times_ms()
    return bool(samples) and not unmatched(samples, stored_times(db))


def check_complete(db: InfluxDB1, cd: Collectd, guests: Guests) -> list[int]:
    """Every sample collectd took (csv) is in InfluxDB: host, each test VM, facts and agent point, once each."""
    samples = cd.sample_times_ms()
    times = stored_times(db)
    assert not unmatched(samples, times), f"{len(unmatched(samples, times))} of {len(samples)} samples missing"
    assert len(times) == len(samples)
    for name in guests.names:
        rows = db.rows(f"SELECT halt_exits, mmio_exits FROM kvm_vm WHERE host = '{HOSTNAME}' AND vm = '{name}'",
                       db="kvm")
        assert sorted(r["time"] for r in rows) == times, name
        assert all({"halt_exits": r["halt_exits"], "mmio_exits": r["mmio_exits"]} == guests.expected[name]
                   for r in rows)
    assert stored_times(db, "kvm_host") == times and stored_times(db, "kvmfleet_agent") == times
    return times


def test_outage_of_two_minutes_loses_no_sample(guests: Guests, influxdb: InfluxDB1, password_file: str,
                                               tmp_path: Path) -> None:
    cd = Collectd(tmp_path / "cd", v1_options(influxdb.url, password_file, tmp_path, RetryMax=3))
    with cd:
        wait_for("first points", lambda: len(stored_times(influxdb)) >= 3, 60)
        influxdb.stop()
        down_at = time.time()
        time.sleep(OUTAGE_S)
        influxdb.start()
        up_at = time.time()
        wait_for("every sample in InfluxDB", lambda: all_arrived(influxdb, cd), 60, every=1)
        cd.stop()
    times = check_complete(influxdb, cd, guests)
    during = [t for t in times if down_at * 1e9 < t < up_at * 1e9]
    assert len(during) >= OUTAGE_S - 5, len(during)
    gaps = [(b - a) / 1e9 for a, b in zip(times, times[1:])]
    assert max(gaps) < 1.9, max(gaps)  # Interval 1: no sample missing anywhere (a missing one: a 2 s gap)
    log = cd.log()
    assert "will retry" in log and "delivery resumed" in log
    assert " 0 lost" in cd.log_lines("kvmfleet: stopped:")[0]


def test_restart_while_influxdb_is_down_spools_and_delivers(guests: Guests, influxdb: InfluxDB1,
                                                            password_file: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool" / "ship.spool"
    opts = v1_options(influxdb.url, password_file, tmp_path)
    first = Collectd(tmp_path / "cd", opts)
    with first:
        wait_for("first points", lambda: len(stored_times(influxdb)) >= 2, 60)
        influxdb.stop(kill=True)
        down_at = time.time()
        wait_for("4 samples taken while InfluxDB is down", lambda: samples_since(first, down_at), 30,
                 until=lambda ts: len(ts) >= 4)  # 5 lines or more each: what the spool must hold
        first.stop()
    spooled = first.log_lines("spooled")
    assert spooled and str(spool) in spooled[0], first.log()
    assert stat.S_IMODE(os.stat(spool).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(spool.parent).st_mode) == 0o700
    assert INFLUX_PASSWORD not in spool.read_text()
    lines = load_spool(str(spool))  # reading leaves it in place (it is removed once delivered)
    assert len(lines) >= 4 * 5 and all(text.split(",", 1)[0] in ("kvm", "kvm_vm", "kvm_vcpu", "kvm_host",
                                                                 "kvmfleet_agent") for text in lines)

    second = Collectd(tmp_path / "cd", opts)  # same config, same csv dir: the samples of both runs
    started_at = time.time()
    with second:
        wait_for("spool loaded", lambda: second.log_lines("spool: loaded"), 30)
        wait_for("3 samples of the second run while InfluxDB is still down", lambda: samples_since(second, started_at),
                 30, until=lambda ts: len(ts) >= 3)
        influxdb.start()
        wait_for("samples of both runs in InfluxDB", lambda: all_arrived(influxdb, second), 60, every=1)
        second.stop()
    assert not spool.exists()
    check_complete(influxdb, second, guests)
    secrets_nowhere(INFLUX_PASSWORD, [tmp_path], {password_file}, second)


def test_blackhole_keeps_cadence_and_bounded_memory(guests: Guests, tmp_path: Path) -> None:
    with BlackholeServer() as hole:
        opts: list[tuple[str, list[Any]]] = [
            ("PerVCPU", [True]), ("InfluxURL", [hole.url]), ("Database", ["kvm"]), ("BufferLines", [60]),
            ("BatchLines", [20]), ("Timeout", [2]), ("RetryMin", [0.2]), ("RetryMax", [0.5]),
            ("SpoolPath", [str(tmp_path / "ship.spool")]),
        ]
        cd = Collectd(tmp_path / "cd", opts)
        rss: list[tuple[float, int]] = []
        with cd:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 30:
                time.sleep(1)
                rss.append((time.monotonic() - t0, cd.rss_kb()))
            took = cd.stop()
        assert hole.accepted >= 3  # the sender kept trying, each time into the hole
    assert took < 8, took  # shutdown does not hang on the blackhole (Timeout 2)
    times = [t / 1000 for t in cd.sample_times_ms()]
    gaps = [b - a for a, b in zip(times, times[1:])]
    # a read that waited on the sender would take Timeout (2 s) or more; collectd schedules reads on a fixed grid,
    # so a read delayed by load shows as one longer gap then one shorter
    assert len(times) >= 27 and max(gaps) < 1.6 and min(gaps) > 0.4, gaps
    assert abs(statistics.mean(gaps) - 1.0) < 0.05, gaps
    dropped = cd.csv_values("kvmfleet", "derive-dropped")
    assert dropped and dropped[-1][1] > 0  # the small buffer overflowed: oldest lines dropped and counted
    buffered = cd.csv_values("kvmfleet", "gauge-buffered")
    assert max(v for _, v in buffered) <= 60 + 20
    steady = [kb for t, kb in rss if t >= 10]
    assert max(steady) - steady[0] < 4096, rss  # kB: bounded, not growing with the samples
    assert cd.log_lines("[warning] kvmfleet-ship") or cd.log_lines("kvmfleet-ship:"), cd.log()
    assert len(load_spool(str(tmp_path / "ship.spool"))) <= 60
