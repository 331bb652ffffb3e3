#!/usr/bin/env python3
"""How long the whole audit takes on a big fleet, against the cheapest fleet-wide query, in the same run.

Starts a real InfluxDB 1.6 (Debian's ``influxd``) in a temp dir, writes a synthetic fleet of HOSTS hypervisors
(``kvmfleet.audit.synthetic.mixed_fleet``: mostly EPT hosts, a few percent with shadow paging, nested guests, EPT
switched off, emulated I/O, legacy interrupts, instruction emulation, wasted halt polling, hot hosts) with VMS VMs
each: ``kvm`` + ``kvm_host`` + ``kvm_vm`` points every STEP seconds over MINUTES, timestamps ending now; lines are
generated in a child process and posted in batches of 10,000 over one keep-alive connection. Then, alternately
REPEAT times each (after one warm-up of both):

* baseline: ``SELECT count(exits) FROM kvm WHERE time > now()-1h GROUP BY host`` (one request);
* audit: the whole ``kvmfleet audit`` in this process (``run_audit`` + rendering the table), every rule.

Both are measured once influxd has settled (its CPU use below 10 % of a core: the compactions of the fresh bulk
write are done), as on a server that ingests a fleet continuously.

With several ``--hosts`` (``--hosts 1000 10000``) each fleet size goes to a database of its own in the same server
and is measured in turn; ``--runs N`` measures every size N times over the same data. Prints the medians, the
findings, hosts per second, the ``kvmfleet audit`` command's wall time as a subprocess (interpreter start included,
for information), a table per fleet size, ``per_host_growth=`` (the audit's ms per host at the largest size over that
at the smallest: 1 is flat) and last ``audit_ratio=<audit median / baseline median>`` at the largest size (the median
of the runs' ratios; target <= 5).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # tests.support.servers

from tests.support import synthetic  # noqa: E402
from tests.support.benchinflux import settle, write_fleet  # noqa: E402
from tests.support.servers import InfluxDB1  # noqa: E402

from kvmfleet.audit.client import Connection, InfluxQLClient  # noqa: E402
from kvmfleet.audit.engine import AuditOptions, run_audit  # noqa: E402
from kvmfleet.audit.report import render  # noqa: E402
from kvmfleet.querypack import load_rules  # noqa: E402

BASELINE = "SELECT count(exits) FROM kvm WHERE time > now()-1h GROUP BY host"


def measure(server: InfluxDB1, database: str, n_hosts: int, args: argparse.Namespace) -> tuple[float, float]:
    """(baseline median s, audit median s) over ``database``, alternated ``args.repeat`` times after a warm-up."""
    rules = load_rules()
    client = InfluxQLClient(Connection(url=server.url, database=database, timeout=600))
    last = {}

    def baseline() -> float:
        t0 = time.perf_counter()
        ans = client.query(BASELINE, what="baseline")
        dt = time.perf_counter() - t0
        assert len(ans[0]) == n_hosts, f"baseline saw {len(ans[0])} hosts"
        return dt

    def audit() -> float:
        t0 = time.perf_counter()
        result = run_audit(client, AuditOptions(window="1h", rules=rules, parallel=args.parallel),
                           source=server.url)
        render(result, "table")
        dt = time.perf_counter() - t0
        last["result"] = result
        return dt

    try:
        baseline()
        audit()
        base_runs, audit_runs = [], []
        for _ in range(args.repeat):
            base_runs.append(baseline())
            audit_runs.append(audit())
    finally:
        client.close()
    result = last["result"]
    b, a = statistics.median(base_runs), statistics.median(audit_runs)
    print(f"{n_hosts} hosts: baseline count(exits) GROUP BY host median {b:.3f}s "
          f"(runs {', '.join(f'{x:.3f}' for x in base_runs)}); whole audit (run_audit + table) median {a:.3f}s "
          f"(runs {', '.join(f'{x:.3f}' for x in audit_runs)})")
    print(f"  audit requests: {result.requests} cumulative; stages: "
          + "; ".join(f"{q['query']} ({q['hosts']} hosts)" for q in result.queries))
    print(f"  findings: {dict(Counter(f.severity for f in result.findings))} by rule "
          f"{dict(Counter(f.rule for f in result.findings))}")
    return b, a


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, nargs="+", default=[1000],
                    help="fleet sizes, each in a database of its own in the same server (e.g. 1000 10000)")
    ap.add_argument("--vms", type=int, default=2, help="VMs per host (kvm_vm series)")
    ap.add_argument("--minutes", type=int, default=60)
    ap.add_argument("--step", type=int, default=10, help="seconds between samples")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--parallel", type=int, default=4, help="the audit's requests in flight")
    ap.add_argument("--runs", type=int, default=1,
                    help="measurement runs over the same written fleets (writing 10,000 hosts takes minutes): each "
                         "alternates REPEAT baselines and audits; audit_ratio is the median of the runs' ratios")
    ap.add_argument("--keep", action="store_true", help="keep the InfluxDB dir (printed)")
    args = ap.parse_args()
    sizes = sorted(set(args.hosts))

    workdir = tempfile.mkdtemp(prefix="kvmfleet-audit-bench-")
    server = InfluxDB1(workdir=workdir)
    server.start()
    try:
        for n in sizes:
            server.create_database(f"kvm{n}")
            hosts = synthetic.mixed_fleet(n, n_vms=args.vms)
            points, took = write_fleet(server.url, f"kvm{n}", hosts, args.minutes * 60, args.step)
            print(f"wrote {points:,} points ({n} hosts x {args.minutes * 60 // args.step + 1} samples x "
                  f"(kvm + kvm_host + {args.vms} kvm_vm)) in {took:.1f}s: {points / took:,.0f} points/s; "
                  f"fleet mix: {dict(Counter(vm.profile for h in hosts for vm in h.vms[:1]))}")
        assert server.proc is not None
        waited = settle(server.proc.pid)
        print(f"influxd settled (compactions of the fresh writes done) after {waited:.0f}s")
        runs = []
        for run in range(args.runs):
            if args.runs > 1:
                print(f"-- measurement run {run + 1} of {args.runs}")
            runs.append({n: measure(server, f"kvm{n}", n, args) for n in sizes})
        medians = {n: (statistics.median(r[n][0] for r in runs), statistics.median(r[n][1] for r in runs))
                   for n in sizes}

        largest = sizes[-1]
        exe = shutil.which("kvmfleet") or os.path.join(os.path.dirname(sys.executable), "kvmfleet")
        if os.path.exists(exe):
            t0 = time.perf_counter()
            proc = subprocess.run([exe, "audit", "--url", server.url, "--database", f"kvm{largest}", "--window",
                                   "1h", "--stale-after", f"{args.minutes}m", "--format", "json"],
                                  capture_output=True, timeout=1200)
            print(f"`kvmfleet audit --format json` as a command on {largest} hosts: "
                  f"{time.perf_counter() - t0:.3f}s wall (exit {proc.returncode}, interpreter start included)")
        print(f"{'hosts':>7} {'baseline s':>10} {'audit s':>8} {'ratio':>6} {'audit ms/host':>13}")
        for n, (b, a) in medians.items():
            print(f"{n:>7} {b:>10.3f} {a:>8.3f} {a / b:>6.2f} {a / n * 1e3:>13.3f}")
        b, a = medians[largest]
        print(f"hosts_per_second={largest / a:,.0f}")
        if len(sizes) > 1:
            smallest = sizes[0]
            growth = (a / largest) / (medians[smallest][1] / smallest)
            print(f"per_host_growth={growth:.2f}  (audit ms per host at {largest} / at {smallest} hosts)")
        ratios = [r[largest][1] / r[largest][0] for r in runs]
        if len(runs) > 1:
            print(f"audit ratio of each measurement run at {largest} hosts: {', '.join(f'{x:.2f}' for x in ratios)}")
        print(f"audit_ratio={statistics.median(ratios):.2f}")
    finally:
        if args.keep:
            server.stop()
            print(f"kept {workdir}")
        else:
            server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
