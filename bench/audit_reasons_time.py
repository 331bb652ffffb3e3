#!/usr/bin/env python3
"""What the exit reason queries cost the audit: a synthetic fleet with ``kvm_exit_reason`` in a real InfluxDB 1.6.

Writes HOSTS hypervisors (``tests.support.synthetic.mixed_fleet``, 2 VMs each, 1 h at 10 s), each with host-wide
series of 17 exit reasons (15 VMX, 2 userspace) at fixed made-up rates, every tenth host with an agent restart at
30 minutes, and per-VM reason series. Once influxd has settled, times (median of 5) ``fleet_counters``,
``exit_reasons`` and ``exit_reason_resets`` over every host, then the whole audit (median of 3 after a warm-up),
which asks ``exit_reason_resets`` only for the restarted hosts. The rates are not a realistic mix: the findings
printed say nothing about the thresholds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # tests.support

from tests.support import synthetic  # noqa: E402
from tests.support.benchinflux import settle, write_fleet  # noqa: E402
from tests.support.servers import InfluxDB1  # noqa: E402

from kvmfleet.audit.client import Connection, InfluxQLClient  # noqa: E402
from kvmfleet.audit.engine import AuditOptions, run_audit  # noqa: E402
from kvmfleet.querypack import QueryParams, get_query, load_rules  # noqa: E402

VMX = ("EXCEPTION_NMI", "EXTERNAL_INTERRUPT", "INTERRUPT_WINDOW", "CPUID", "HLT", "INVLPG", "CR_ACCESS",
       "IO_INSTRUCTION", "MSR_READ", "MSR_WRITE", "PAUSE_INSTRUCTION", "APIC_ACCESS", "APIC_WRITE", "EPT_VIOLATION",
       "EPT_MISCONFIG")
REASONS = [("vmx", r) for r in VMX] + [("userspace", "KVM_EXIT_IO"), ("userspace", "KVM_EXIT_MMIO")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=200)
    args = ap.parse_args()
    server = InfluxDB1(workdir=tempfile.mkdtemp(prefix="kvmfleet-reasons-bench-"))
    server.start()
    try:
        server.create_database("kvm")
        hosts = synthetic.mixed_fleet(args.hosts, n_vms=2)
        for i, h in enumerate(hosts):
            h.reasons = {k: 10.0 + (i * 7 + j * 13) % 500 for j, k in enumerate(REASONS)}
            h.reason_restarts = [1800] if i % 10 == 0 else []
        points, took = write_fleet(server.url, "kvm", hosts, 3600, 10)
        print(f"wrote {points:,} points in {took:.1f}s")
        assert server.proc is not None
        settle(server.proc.pid)
        client = InfluxQLClient(Connection(url=server.url, database="kvm", timeout=300))

        def timed(statements: Sequence[str]) -> float:
            t0 = time.perf_counter()
            for s in statements:
                client.query(s)
            return time.perf_counter() - t0

        for name in ("fleet_counters", "exit_reasons", "exit_reason_resets"):
            statements = get_query(name).filled(QueryParams(window="1h"))
            runs = [timed(statements) for _ in range(5)]
            print(f"{name}: median {statistics.median(runs):.3f}s over every host")
        rules = load_rules()
        runs = []
        for _ in range(4):
            t0 = time.perf_counter()
            result = run_audit(client, AuditOptions(window="1h", rules=rules), source=server.url)
            runs.append(time.perf_counter() - t0)
        resets = [q["hosts"] for q in result.queries if q["query"] == "exit_reason_resets"]
        print(f"whole audit: median {statistics.median(runs[1:]):.3f}s, {result.requests} requests, "
              f"exit_reason_resets for {resets} hosts")
        print(f"findings by rule: {dict(Counter(f.rule for f in result.findings))}")
        client.close()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
