#!/usr/bin/env python3
"""collectd with the plugin for a long run while VMs start and stop: do its memory and its fds stay flat?

Starts a real InfluxDB 1.6 (Debian's ``influxd``), VMS guest VMs of VCPUS vCPUs (``halt``, bounded loops: each
holds its stats fds and never exits on its own) and Debian's collectd with the plugin: ``Interval 1``, per VM and per
vCPU on, shipping v1 to the InfluxDB, every other option at its default (exit reasons host-wide with bpf). For
MINUTES, every CHURN seconds one guest (the oldest) is stopped and a new one, never seen before, is started, so the
host always runs VMS VMs and the plugin keeps meeting new VMs and retiring old ones (the collector's retired sums, the
series caches, the borrowed fds, the exit reasons' per-process keys).

Every EVERY seconds, just before a churn step (VMS VMs alive, each started guest ready): collectd's RSS
(``VmRSS``) and open fds (``/proc/<pid>/fd``). The first WARMUP minutes are the start-up (imports, caches filling,
the buffer's first lines, the allocator's arenas); the reference is then the median RSS of the readings in the
minute after WARMUP, the end the median of the last minute; the fds are compared at the first reading after WARMUP
and the last one (both with VMS VMs).

Prints a table (minute, VMs started so far, RSS MB, fds, samples in InfluxDB), then ``rss_growth_mb=`` (end -
reference, MB), ``fds_growth=`` (last - first after warm-up), ``vm_starts=``, ``samples=`` (kvmfleet_agent points
in InfluxDB: the plugin really sampled every second) and ``samples_expected=``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import deque

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # tests.support, tests.collectd

from tests.collectd.cdhelpers import HOSTNAME, Collectd  # noqa: E402
from tests.support.guestfleet import launch_fleet  # noqa: E402
from tests.support.servers import InfluxDB1  # noqa: E402

from kvmfleet.guestvmm import launch  # noqa: E402
from kvmfleet.guestvmm.launcher import GuestProcess  # noqa: E402


def fds_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def agent_points(server: InfluxDB1) -> int:
    rows = server.rows(f"SELECT count(points) FROM kvmfleet_agent WHERE host = '{HOSTNAME}'", db="kvm")
    return int(rows[0]["count"]) if rows else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=200)
    ap.add_argument("--vcpus", type=int, default=4)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--warmup", type=float, default=5, help="minutes before the reference readings")
    ap.add_argument("--churn", type=float, default=15, help="seconds between one VM stopped and one started")
    ap.add_argument("--every", type=float, default=10, help="seconds between readings")
    args = ap.parse_args()
    if args.minutes <= args.warmup + 2:
        ap.error("--minutes must leave at least two minutes after --warmup")

    workdir = tempfile.mkdtemp(prefix="kvmfleet-soak-")
    server = InfluxDB1(workdir=os.path.join(workdir, "influxdb"))
    server.start()
    server.create_database("kvm")
    fleet = launch_fleet(args.vms, vcpus=args.vcpus, workload="halt", loops=100, name_prefix="soak")
    alive: deque[GuestProcess] = deque(fleet.members)
    starts = len(alive)
    cd = Collectd(os.path.join(workdir, "cd"), [
        ("PerVCPU", [True]), ("InfluxURL", [server.url]), ("Database", ["kvm"]),
        ("SpoolPath", [os.path.join(workdir, "spool", "ship.spool")]),
    ], csv=False, interval=1)
    readings: list[tuple[float, int, int, int]] = []  # (minutes since start, VMs started, RSS kB, fds)
    try:
        fleet.wait_ready(300)
        cd.start()
        t0 = time.monotonic()
        next_churn = next_reading = t0
        print(f"{args.vms} VMs x {args.vcpus} vCPUs, collectd Interval 1 s, per VM and per vCPU, one VM replaced "
              f"every {args.churn:g} s, {args.minutes:g} minutes ({workdir})")
        print(f"{'minute':>7} {'VMs started':>11} {'RSS MB':>8} {'fds':>6} {'samples':>8}")
        while (now := time.monotonic()) < t0 + args.minutes * 60:
            if now >= next_reading:  # before the churn step: VMS VMs alive, every one ready
                minute = (now - t0) / 60
                readings.append((minute, starts, cd.rss_kb(), fds_of(cd.pid)))
                if len(readings) % max(1, round(60 / args.every)) == 1:
                    print(f"{minute:>7.1f} {starts:>11} {readings[-1][2] / 1024:>8.1f} {readings[-1][3]:>6} "
                          f"{agent_points(server):>8}", flush=True)
                next_reading += args.every
            if now >= next_churn:
                alive.popleft().stop()
                guest = launch(f"soak-n{starts:05d}", vcpus=args.vcpus, workload="halt", loops=100)
                guest.wait_ready(60)
                alive.append(guest)
                starts += 1
                next_churn += args.churn
            time.sleep(max(0.0, min(next_churn, next_reading) - time.monotonic()))
        expected = int(args.minutes * 60)
        deadline = time.monotonic() + 10  # the last sample's point may still be on its way to InfluxDB
        while (samples := agent_points(server)) < expected and time.monotonic() < deadline:
            time.sleep(0.2)
        cd.stop()
    finally:
        if cd.proc is not None and cd.proc.poll() is None:
            cd.stop()
        for guest in alive:
            guest.stop()
        server.stop()

    after = [r for r in readings if r[0] >= args.warmup]
    reference = statistics.median(r[2] for r in after if r[0] < args.warmup + 1)
    end = statistics.median(r[2] for r in readings if r[0] >= args.minutes - 1)
    print(f"RSS: {reference / 1024:.1f} MB in the minute after the warm-up, {end / 1024:.1f} MB in the last minute; "
          f"fds {after[0][3]} after the warm-up, {after[-1][3]} at the end; {starts} VMs started in all")
    print(f"rss_growth_mb={(end - reference) / 1024:.2f}")
    print(f"fds_growth={after[-1][3] - after[0][3]}")
    print(f"vm_starts={starts}")
    print(f"samples={samples}")
    print(f"samples_expected={expected}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
