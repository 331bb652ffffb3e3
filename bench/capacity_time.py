#!/usr/bin/env python3
"""What ``kvmfleet capacity`` costs on a big fleet, against one grouped count over the same data, in the same run;
and whether its cost per host stays flat from 100 to 1,000 hosts.

Starts a real InfluxDB 1.6 (Debian's ``influxd``) in a temp dir and writes two databases of synthetic hypervisors
(``tests.support.synthetic.mixed_fleet``: mostly EPT hosts, a few percent shadow paging, polling-heavy, hot; one
host in ten grows by a VM halfway through), SMALL and HOSTS hosts, VMS VMs each, every STEP seconds over HOURS
(default 24 h at 10 s), timestamps ending now: ``kvm``, ``kvm_host`` and ``kvm_vm`` with the counters capacity and
the audit read (``--all-fields``: every counter, as an agent writes them). Lines are made in a child process and
posted in batches of 10,000 over one keep-alive connection. Once influxd has settled (its compactions done), in
each database, alternately REPEAT times each after one warm-up:

* baseline: ``SELECT count(exits) FROM kvm WHERE time > now()-24h GROUP BY host`` (one request);
* capacity: the whole report in this process (``run_capacity`` + rendering the table), ``--place 200``.

Prints the medians and last, one per line: ``capacity_ratio=`` (capacity / baseline at HOSTS, target <= 5),
``per_host_ms_small=`` and ``per_host_ms=`` (capacity per host at SMALL and HOSTS) and ``per_host_growth=``
(their ratio: flat is about 1, target <= 1.5).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # tests.support

from tests.support import synthetic  # noqa: E402
from tests.support.benchinflux import settle, write_fleet  # noqa: E402
from tests.support.servers import InfluxDB1  # noqa: E402

from kvmfleet.audit.capacity import CapacityOptions, CapacityResult, run_capacity  # noqa: E402
from kvmfleet.audit.capacity_report import render  # noqa: E402
from kvmfleet.audit.client import Connection, InfluxQLClient  # noqa: E402

# What capacity reads, and what the audit's first stage reads beside it (a database that holds only what one
# report reads would flatter neither).
FIELDS = ("exits", "halt_poll_success_ns", "halt_poll_fail_ns", "pages_4k", "pages_2m", "pages_1g", "mmu_pte_write",
          "invlpg", "io_exits", "mmio_exits", "irq_injections", "insn_emulation")


def fleet(n: int, vms: int, duration: int, all_fields: bool) -> list[synthetic.HostSpec]:
    hosts = synthetic.mixed_fleet(n, n_vms=vms)
    for i, h in enumerate(hosts):
        if not all_fields:
            h.fields = FIELDS
        if i % 10 == 0:  # growth for the trends to find
            h.vms.append(synthetic.VMSpec(f"{h.name}-new", h.vms[0].profile, 4, start_s=duration / 2))
    return hosts


def median_runs(fn: Callable[[], float], repeat: int) -> tuple[float, list[float]]:
    fn()
    runs = [fn() for _ in range(repeat)]
    return statistics.median(runs), runs


def measure(server: InfluxDB1, db: str, hosts: int, window: str, repeat: int, parallel: int, stale_after: str
            ) -> tuple[float, float, CapacityResult]:
    """(baseline median, capacity median, the last report) in ``db``, alternating the two."""
    client = InfluxQLClient(Connection(url=server.url, database=db, timeout=600))
    baseline_q = f"SELECT count(exits) FROM kvm WHERE time > now()-{window} GROUP BY host"
    last: dict[str, CapacityResult] = {}

    def baseline() -> float:
        t0 = time.perf_counter()
        ans = client.query(baseline_q, what="baseline")
        took = time.perf_counter() - t0
        assert len(ans[0]) == hosts, f"baseline saw {len(ans[0])} hosts"
        return took

    def capacity() -> float:
        t0 = time.perf_counter()
        result = run_capacity(client, CapacityOptions(window=window, place=200, parallel=parallel,
                                                      stale_after=stale_after), source=server.url)
        render(result, "table")
        took = time.perf_counter() - t0
        assert len(result.hosts) == hosts and not result.missing and not result.stale, (
            len(result.hosts), result.missing[:3], result.stale[:3])
        last["result"] = result
        return took

    baseline()
    capacity()
    base_runs, cap_runs = [], []
    for _ in range(repeat):
        base_runs.append(baseline())
        cap_runs.append(capacity())
    client.close()
    b, c = statistics.median(base_runs), statistics.median(cap_runs)
    runs = "; ".join(f"{x:.3f}/{y:.3f}" for x, y in zip(base_runs, cap_runs))
    print(f"{hosts} hosts, baseline/capacity runs (s): {runs}")
    return b, c, last["result"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--small", type=int, default=100, help="the smaller fleet the per-host cost is compared with")
    ap.add_argument("--vms", type=int, default=2, help="VMs per host (kvm_vm series)")
    ap.add_argument("--hours", type=int, default=24)
    ap.add_argument("--step", type=int, default=10, help="seconds between samples")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--parallel", type=int, default=4, help="capacity's requests in flight")
    ap.add_argument("--all-fields", action="store_true", help="write every counter, as an agent does (slower)")
    args = ap.parse_args()

    duration, window = args.hours * 3600, f"{args.hours}h"
    workdir = tempfile.mkdtemp(prefix="kvmfleet-capacity-bench-")
    server = InfluxDB1(workdir=workdir)
    server.start()
    assert server.proc is not None
    try:
        rows = []
        started = time.time()
        for n in (args.small, args.hosts):
            db = f"kvm{n}"
            server.create_database(db)
            points, took = write_fleet(server.url, db, fleet(n, args.vms, duration, args.all_fields), duration,
                                       args.step)
            print(f"{db}: wrote {points:,} points ({n} hosts x {duration // args.step + 1} samples x (kvm + kvm_host "
                  f"+ {args.vms}+ kvm_vm)) in {took:.0f}s: {points / took:,.0f} points/s")
        print(f"influxd settled after {settle(server.proc.pid):.0f}s")
        # the data ends when its write began: no host may look stale for the time the writes took
        stale_after = f"{int(time.time() - started) + 600}s"
        for n in (args.small, args.hosts):
            b, c, result = measure(server, f"kvm{n}", n, window, args.repeat, args.parallel, stale_after)
            rows.append((n, b, c, result))
        print()
        print(f"{'hosts':>7}  {'baseline s':>10}  {'capacity s':>10}  {'ratio':>6}  {'ms/host':>8}  (medians)")
        for n, b, c, _ in rows:
            print(f"{n:>7}  {b:>10.3f}  {c:>10.3f}  {c / b:>6.2f}  {c / n * 1000:>8.2f}")
        big = rows[-1][3]
        print(f"capacity at {args.hosts} hosts: {big.requests} requests; queries: "
              + ", ".join(f"{q['query']} ({q['hosts']})" for q in big.queries))
        totals = big.fleet
        print(f"findings: {len(big.findings)}; fleet: {totals['vcpus']:.0f} vCPUs on {totals['cpus']:.0f} CPUs, "
              f"{totals['vcpus_per_day']:+.0f} vCPUs/day, {totals['exits_per_s']:,.0f} exits/s")
        (ns, _, cs, _), (nb, bb, cb, _) = rows
        print(f"capacity_ratio={cb / bb:.2f}")
        print(f"per_host_ms_small={cs / ns * 1000:.3f}")
        print(f"per_host_ms={cb / nb * 1000:.3f}")
        print(f"per_host_growth={(cb / nb) / (cs / ns):.2f}")
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
