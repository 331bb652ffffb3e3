"""Crash chaos: collectd killed with SIGKILL at random moments (during an outage, right after a start with a spool
present, in the middle of a flush) loses only what kvmfleet.ship.journal says a kill -9 can lose: the samples of
the last seconds before each kill. Every older sample reaches InfluxDB, and the agent's counters say that nothing
else was dropped or rejected."""

from __future__ import annotations

import glob
import os
import random
import signal
import time
from pathlib import Path

from tests.collectd.cdhelpers import HOSTNAME, Collectd, unmatched, wait_for
from tests.collectd.conftest import Guests
from tests.collectd.test_collectd_ship import v1_options
from tests.support.servers import InfluxDB1

from kvmfleet.ship.journal import KILL_BOUND

SEED = 20261201
ROUNDS = 5  # each: a kill during an outage, one right after the start that loads the spool, one mid-flush
SLACK = 1.0  # seconds: scheduling, and collectd's read happening a little after the sample's time
MEASUREMENTS = ("kvm", "kvm_host", "kvmfleet_agent")


class Chaos:
    """One collectd, killed and started again; remembers when each kill happened (wall clock)."""

    def __init__(self, cd: Collectd, db: InfluxDB1, rng: random.Random) -> None:
        self.cd, self.db, self.rng = cd, db, rng
        self.kills: list[float] = []

    def kill(self) -> None:
        assert self.cd.proc is not None and self.cd.running()
        self.kills.append(time.time())
        os.kill(self.cd.pid, signal.SIGKILL)
        self.cd.proc.wait(10)

    def restart(self) -> int:
        """Start collectd again; returns how many "spool: loaded" lines its log had before."""
        loaded = len(self.cd.log_lines("spool: loaded"))
        self.cd.start()
        wait_for("the plugin active again", lambda: len(self.cd.log_lines("kvmfleet: active on host")) >
                 len(self.kills), 30, every=0.05)
        return loaded

    def stored(self, since: float = 0.0) -> int:
        """Host points in InfluxDB with a time after ``since`` (wall clock)."""
        rows = self.db.query(f"SELECT count(exits) FROM kvm WHERE host = '{HOSTNAME}' "
                             f"AND time > {int(since * 1e9)}", db="kvm")
        series = rows[0].get("series") if rows else None
        return int(series[0]["values"][0][1]) if series else 0

    def round(self) -> None:
        self.db.stop(kill=True)  # an outage
        down = time.time()
        time.sleep(KILL_BOUND + self.rng.uniform(2.0, 4.0))  # lines older than the bound wait: in the journal
        self.kill()  # during the outage: the buffer and the journal hold the lines
        loaded = self.restart()
        wait_for("the spool loaded", lambda: len(self.cd.log_lines("spool: loaded")) > loaded, 30, every=0.05)
        time.sleep(self.rng.uniform(0.0, 1.5))
        self.kill()  # right after a start with a spool present
        self.restart()
        time.sleep(self.rng.uniform(2.0, 4.0))
        self.db.start()
        wait_for("the flush of what waited under way", lambda: self.stored(since=down), 30, every=0.02)
        time.sleep(self.rng.uniform(0.0, 0.3))
        self.kill()  # in the middle of the flush of what waited
        self.restart()


def sample_times_ms(cd: Collectd) -> list[int]:
    """Every sample collectd took (csv), skipping a row a kill cut short."""
    times = []
    for path in glob.glob(str(cd.csv_dir / HOSTNAME / "kvm" / "derive-exits-*")):
        for row in Path(path).read_text().splitlines():
            parts = row.split(",")
            if len(parts) == 2 and parts[0][:1].isdigit():
                times.append(round(float(parts[0]) * 1000))
    return sorted(times)


def stored_ns(db: InfluxDB1, measurement: str, where: str = "") -> list[int]:
    rows = db.rows(f"SELECT * FROM \"{measurement}\" WHERE host = '{HOSTNAME}' {where}", db="kvm")
    return sorted(r["time"] for r in rows)


def outside_kill_windows(missing_ms: list[int], kills: list[float]) -> list[int]:
    """The missing samples that no kill explains: taken more than KILL_BOUND (+ SLACK) before every kill after
    them."""
    return [t for t in missing_ms
            if not any(k - KILL_BOUND - SLACK <= t / 1000 <= k + 0.1 for k in kills)]


def test_sigkill_at_random_moments_loses_only_the_last_seconds(guests: Guests, influxdb: InfluxDB1,
                                                               password_file: str, tmp_path: Path) -> None:
    opts = v1_options(influxdb.url, password_file, tmp_path, RetryMin=0.2, RetryMax=1, Timeout=2, BatchLines=20)
    cd = Collectd(tmp_path / "cd", opts)
    chaos = Chaos(cd, influxdb, random.Random(SEED))
    t0 = time.monotonic()
    cd.start()
    try:
        wait_for("first points", lambda: chaos.stored() >= 3, 60)
        for _ in range(ROUNDS):
            chaos.round()
        last_kill = chaos.kills[-1]
        wait_for("every sample but those of the kill windows in InfluxDB",
                 lambda: not outside_kill_windows(unmatched(sample_times_ms(cd), stored_ns(influxdb, "kvm")),
                                                  chaos.kills) and time.time() > last_kill + 5, 60, every=1)
        cd.stop()
    finally:
        if cd.running():
            cd.stop()
    took = time.monotonic() - t0

    samples = sample_times_ms(cd)
    assert len(chaos.kills) == 3 * ROUNDS and len(samples) > 40
    lost: set[int] = set()
    for measurement in MEASUREMENTS:
        missing = unmatched(samples, stored_ns(influxdb, measurement))
        assert not outside_kill_windows(missing, chaos.kills), (measurement, missing, chaos.kills)
        lost |= set(missing)
    for name in guests.names:
        missing = unmatched(samples, stored_ns(influxdb, "kvm_vm", f"AND vm = '{name}'"))
        assert not outside_kill_windows(missing, chaos.kills), (name, missing, chaos.kills)
    per_kill = KILL_BOUND + SLACK + 1
    assert len(lost) <= per_kill * len(chaos.kills), (len(lost), chaos.kills)

    # the agent's own counters: nothing dropped (buffer full) or rejected, so the kills explain every gap;
    # the spool gave back what each kill during an outage left
    agent = influxdb.rows(f"SELECT dropped, dropped_rejected, spool_loaded FROM kvmfleet_agent "
                          f"WHERE host = '{HOSTNAME}'", db="kvm")
    assert agent and all(r["dropped"] == 0 and r["dropped_rejected"] == 0 for r in agent)
    assert sum(1 for r in agent if r["spool_loaded"]) >= ROUNDS
    assert not [line for line in cd.log_lines("[error]") if "spool" in line], cd.log()[-3000:]
    assert len(cd.log_lines("spool: loaded")) >= 2 * ROUNDS
    assert not (tmp_path / "spool" / "ship.spool").exists()  # all delivered at the clean stop
    assert took < 180, took
