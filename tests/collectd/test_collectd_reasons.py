"""collectd with ``ExitReasons vm`` on real guests ships their exact exits by reason to InfluxDB 1.6 and dispatches
them into collectd (plugin ``kvm_exit_reason``).

The guests start after the plugin counts with the bpf mechanism, which counts every process from the moment it
loads (perf-count counts a VM from the sample that first sees it: a guest done before then would show nothing).
Each runs a known number of halts, MMIO stores or port writes, then never enters KVM_RUN again, so its
``kvm:kvm_userspace_exit`` counts are exact and stay so (kvmfleet.guestvmm.guests.expected_userspace_exits).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from tests.collectd.cdhelpers import HOSTNAME, Collectd, wait_for
from tests.collectd.test_collectd_ship import influx_points, v1_options
from tests.support.servers import InfluxDB1

from kvmfleet.guestvmm import launch
from kvmfleet.guestvmm.guests import expected_userspace_exits

# (suffix, vcpus, workload, loops): every userspace exit reason the guests can make, in different amounts
REASON_GUESTS = (("rs-halt", 2, "halt", 300), ("rs-mmio", 1, "mmio", 450), ("rs-pio", 3, "pio", 125))


def reason_rows(db: InfluxDB1, where: str = "") -> list[dict[str, Any]]:
    return [r for r in influx_points(db, "kvm_exit_reason", where) if r["isa"] == "userspace"]


def latest_with_all(rows: list[dict[str, Any]], names: set[str]) -> list[dict[str, Any]]:
    """The rows of the latest sample that has a point of every VM in ``names`` ([] if none has)."""
    by_time: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_time[row["time"]].append(row)
    complete = [t for t, sample in by_time.items() if names <= {r["vm"] for r in sample}]
    return by_time[max(complete)] if complete else []


def test_exit_reasons_exact_per_vm_and_host_wide_in_influxdb_and_collectd(influxdb: InfluxDB1, password_file: str,
                                                                         tmp_path: Path) -> None:
    cd = Collectd(tmp_path / "cd", v1_options(influxdb.url, password_file, tmp_path, PerVCPU=False,
                                              ExitReasons="vm", ExitReasonsMechanism="bpf",
                                              DispatchPerVM=True))
    guests = []
    with cd:
        wait_for("the plugin counting exits by reason", lambda: cd.log_lines("kvmfleet: exit reasons: counting"), 60)
        try:
            for suffix, vcpus, workload, loops in REASON_GUESTS:
                guests.append((launch(f"{suffix}-{os.getpid()}", vcpus=vcpus, workload=workload,
                                      loops=loops), vcpus, workload, loops))
            for g, *_ in guests:
                assert g.wait_ready(60).get("state") == "done"
            expected = {g.name: expected_userspace_exits(w, n, v) for g, v, w, n in guests}

            def per_vm_exact() -> bool:
                last = latest_with_all(reason_rows(influxdb), set(expected))
                return {name: {r["reason"]: r["count"] for r in last if r["vm"] == name} for name in expected} \
                    == expected

            wait_for("every guest's exact exits by reason in InfluxDB", per_vm_exact, 60)
        finally:
            for g, *_ in guests:
                g.stop()
        cd.stop()
    log = cd.log()
    assert "[error]" not in log, log
    (counting,) = cd.log_lines("kvmfleet: exit reasons: counting")
    assert "host-wide and per VM with " in counting

    rows = reason_rows(influxdb)
    last = latest_with_all(rows, set(expected))
    # per VM: exactly the guest's exits, only the reasons it made, the tags the schema names
    for name, want in expected.items():
        got = {r["reason"]: r["count"] for r in last if r["vm"] == name}
        assert got == want, (name, got)
    # host-wide (no vm tag): every VM's counts at that sample added up, nothing more (nothing else ran a guest)
    host = {r["reason"]: r["count"] for r in last if not r["vm"]}
    per_vm_sum: dict[str, int] = defaultdict(int)
    for r in last:
        if r["vm"]:
            per_vm_sum[r["reason"]] += r["count"]
    assert host == dict(per_vm_sum)
    for reason, count in (("KVM_EXIT_HLT", 600), ("KVM_EXIT_MMIO", 450), ("KVM_EXIT_IO", 2 + 1 + 3 * 126)):
        assert host[reason] >= count
    assert all(isinstance(r["count"], int) and r["host"] == HOSTNAME for r in rows)

    # the same counts went into collectd (per VM too: DispatchPerVM true): derives of plugin kvm_exit_reason, type
    # instance the reason
    pio = next(g.name for g, _, w, _ in guests if w == "pio")
    csv = cd.csv_values(f"kvm_exit_reason-{pio}", "derive-KVM_EXIT_IO")
    assert csv and csv[-1][1] == expected[pio]["KVM_EXIT_IO"]
    host_csv = cd.csv_values("kvm_exit_reason", "derive-KVM_EXIT_MMIO")
    assert host_csv and host_csv[-1][1] >= 450
