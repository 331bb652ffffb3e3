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

Prints the medians, the findings, hosts per second, the ``kvmfleet audit`` command's wall time as a subprocess
(interpreter start included, for information) and last ``audit_ratio=<audit median / baseline median>`` (target
<= 5).
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--vms", type=int, default=2, help="VMs per host (kvm_vm series)")
    ap.add_argument("--minutes", type=int, default=60)
    ap.add_argument("--step", type=int, default=10, help="seconds between samples")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--parallel", type=int, default=4, help="the audit's requests in flight")
    ap.add_argument("--keep", action="store_true", help="keep the InfluxDB dir (printed)")
    args = ap.parse_args()

    workdir = tempfile.mkdtemp(prefix="kvmfleet-audit-bench-")
    server = InfluxDB1(workdir=workdir)
    server.start()
    try:
        server.create_database("kvm")
        hosts = synthetic.mixed_fleet(args.hosts, n_vms=args.vms)
        points, took = write_fleet(server.url, "kvm", hosts, args.minutes * 60, args.step)
        print(f"wrote {points:,} points ({args.hosts} hosts x {args.minutes * 60 // args.step + 1} samples x "
              f"(kvm + kvm_host + {args.vms} kvm_vm)) in {took:.1f}s: {points / took:,.0f} points/s")
        print(f"fleet mix: {dict(Counter(vm.profile for h in hosts for vm in h.vms[:1]))}")
        assert server.proc is not None
        waited = settle(server.proc.pid)
        print(f"influxd settled (compactions of the fresh write done) after {waited:.0f}s")

        rules = load_rules()
        client = InfluxQLClient(Connection(url=server.url, database="kvm", timeout=300))

        def baseline() -> float:
            t0 = time.perf_counter()
            ans = client.query(BASELINE, what="baseline")
            dt = time.perf_counter() - t0
            assert len(ans[0]) == args.hosts, f"baseline saw {len(ans[0])} hosts"
            return dt

        last = {}

        def audit() -> float:
            t0 = time.perf_counter()
            result = run_audit(client, AuditOptions(window="1h", rules=rules, parallel=args.parallel),
                               source=server.url)
            render(result, "table")
            dt = time.perf_counter() - t0
            last["result"] = result
            return dt

        baseline()
        audit()
        base_runs, audit_runs = [], []
        for _ in range(args.repeat):
            base_runs.append(baseline())
            audit_runs.append(audit())
        result = last["result"]
        b, a = statistics.median(base_runs), statistics.median(audit_runs)
        print(f"baseline count(exits) GROUP BY host: median {b:.3f}s  runs {', '.join(f'{x:.3f}' for x in base_runs)}")
        print(f"whole audit (run_audit + table):     median {a:.3f}s  runs {', '.join(f'{x:.3f}' for x in audit_runs)}")
        print(f"audit requests: {result.requests} cumulative; stages: "
              + "; ".join(f"{q['query']} ({q['hosts']} hosts)" for q in result.queries))
        sev = Counter(f.severity for f in result.findings)
        rules_hit = Counter(f.rule for f in result.findings)
        print(f"findings: {dict(sev)} by rule {dict(rules_hit)}")
        exe = shutil.which("kvmfleet") or os.path.join(os.path.dirname(sys.executable), "kvmfleet")
        if os.path.exists(exe):
            t0 = time.perf_counter()
            proc = subprocess.run([exe, "audit", "--url", server.url, "--database", "kvm", "--window", "1h",
                                   "--format", "json"], capture_output=True, timeout=600)
            print(f"`kvmfleet audit --format json` as a command: {time.perf_counter() - t0:.3f}s wall "
                  f"(exit {proc.returncode}, interpreter start included)")
        client.close()
        print(f"hosts_per_second={args.hosts / a:,.0f}")
        print(f"audit_ratio={a / b:.2f}")
    finally:
        if args.keep:
            server.stop()
            print(f"kept {workdir}")
        else:
            server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
