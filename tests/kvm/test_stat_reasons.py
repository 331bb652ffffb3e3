"""``kvmfleet stat --json --reasons`` gives the exact exits by reason of real guests, per VM and host-wide.

``stat`` starts first (its default mechanism, bpf here, counts every process from the moment it loads), then
guests with known halts, MMIO stores and port writes run to their end and never enter KVM_RUN again: each VM object
must carry exactly :func:`~kvmfleet.guestvmm.guests.expected_userspace_exits`, and the host object exactly the sum
of every VM's (nothing else exits to a VMM while the test runs; a VM that is not ours counts in both).
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections import Counter
from typing import Any

from kvmfleet.exitreasons import ExitReasonSource
from kvmfleet.guestvmm import launch
from kvmfleet.guestvmm.guests import expected_userspace_exits

GUESTS = (("halt", 2, 300), ("mmio", 1, 450), ("pio", 3, 125))
DEADLINE = 60.0


def json_lines(proc: subprocess.Popen[str], deadline: float) -> Any:
    """The samples ``proc`` prints, one JSON object each, until ``deadline`` (monotonic)."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                line = proc.stdout.readline()
                assert line, f"stat ended: {proc.wait(5)}"
                yield json.loads(line)


def reasons(obj: dict[str, Any]) -> dict[str, int]:
    return dict(obj.get("exit_reasons", {}).get("kvm_userspace_exit", {}))


def test_stat_json_reasons_exact_per_vm_and_host_wide() -> None:
    with ExitReasonSource() as source:
        assert source.usability(), source.usability().reason
        mechanism = source.mechanism_name
    assert mechanism == "bpf"  # counts a guest whole even before stat first sees it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "kvmfleet.cli", "stat", "--json", "--reasons", "--vm",
                             "--source", "statsfd", "-i", "0.3", "-f", "^exits$"],
                            stdout=subprocess.PIPE, text=True, env=env)
    guests = []
    try:
        deadline = time.monotonic() + DEADLINE
        first = next(json_lines(proc, deadline))  # counting from here on
        assert first["exit_reasons_source"] == {"usable": True, "reason": ""}
        for workload, vcpus, loops in GUESTS:
            guests.append((launch(f"t-reasons-{workload}", vcpus=vcpus, workload=workload, loops=loops),
                           expected_userspace_exits(workload, loops, vcpus)))
        for guest, _ in guests:
            assert guest.wait_ready(30).get("state") == "done"
        want = {guest.pid: expected for guest, expected in guests}
        last: dict[str, Any] = {}
        for sample in json_lines(proc, deadline):
            last = sample
            got = {vm["pid"]: reasons(vm) for vm in sample["vms"] if vm["pid"] in want}
            if got == want:
                break
        got = {vm["pid"]: reasons(vm) for vm in last["vms"] if vm["pid"] in want}
        assert got == want
        every_vm: Counter[str] = Counter()
        for vm in last["vms"]:
            every_vm.update(reasons(vm))
        assert reasons(last) == dict(every_vm)
        assert set(reasons(last)) == {"KVM_EXIT_HLT", "KVM_EXIT_MMIO", "KVM_EXIT_IO"}
    finally:
        proc.terminate()
        proc.wait(10)
        for guest, _ in guests:
            guest.stop()
