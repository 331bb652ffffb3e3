"""Every source against real KVM guests: exact counts, identity, monotonic totals, no leaked fds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from tests.support.guestfleet import launch_fleet
from tests.support.kvmtools import OnlyPids, open_fds
from tests.support.waiting import wait_for

from kvmfleet.collector import Collector, vm_sample
from kvmfleet.guestvmm import launch
from kvmfleet.guestvmm.guests import expected_counts
from kvmfleet.sources import AutoSource, DebugfsSource, StatsfdSource

UUID = "5b0c7a52-8f1e-4a49-9a11-0123456789ab"


def by_pid(readings):
    return {r.identity.key.pid: r for r in readings}


def test_statsfd_exact_halt_and_mmio_per_vcpu_vm_and_host():
    with launch("t-halt", vcpus=4, workload="halt", loops=1000, uuid=UUID) as halt, \
            launch("t-mmio", vcpus=2, workload="mmio", loops=250) as mmio:
        halt.wait_ready(30)
        mmio.wait_ready(30)
        with Collector(OnlyPids(StatsfdSource(), {halt.pid, mmio.pid})) as collector:
            sample = collector.sample()
        vms = {vm.identity.name: vm for vm in sample.vms}
        assert set(vms) == {"t-halt", "t-mmio"}
        h, m = vms["t-halt"], vms["t-mmio"]
        assert (h.identity.vmm, h.identity.uuid, h.identity.key.pid) == ("kvmfleet-guestvmm", UUID, halt.pid)
        for vm, workload, loops in ((h, "halt", 1000), (m, "mmio", 250)):
            want = expected_counts(workload, loops)
            for stats in vm.vcpus.values():
                assert {k: stats[k] for k in ("halt_exits", "mmio_exits")} == {
                    k: want[k] for k in ("halt_exits", "mmio_exits")}
                assert stats["exits"] >= loops + 1  # plus host interrupts and preemptions: not exact
        assert sorted(h.vcpus) == [0, 1, 2, 3] and sorted(m.vcpus) == [0, 1]
        assert h.stats["halt_exits"] == 4000 and h.stats["exits"] == sum(v["exits"] for v in h.vcpus.values())
        assert m.stats["mmio_exits"] == 500 and m.stats["halt_exits"] == 0
        assert sample.host["halt_exits"] == 4000
        assert sample.host["mmio_exits"] == 500
        assert sample.host["exits"] == h.stats["exits"] + m.stats["exits"]
        # VM-level stats (from the VM stats fd) are there too, typed
        assert "pages_4k" in h.stats or "mmu_shadow_zapped" in h.stats
        assert h.descs["halt_exits"].type.name == "CUMULATIVE"


def test_paging_guest_moves_shadow_paging_counters():
    with launch("t-paging", vcpus=2, workload="paging", loops=20000) as guest:
        guest.wait_ready(60)
        with StatsfdSource() as source:
            vm = vm_sample(by_pid(source.read())[guest.pid])
    assert vm.stats["mmu_pte_write"] >= 20000
    assert all(stats["invlpg"] >= 20000 for stats in vm.vcpus.values())
    assert vm.stats["invlpg"] >= 40000


def test_debugfs_under_lockdown_is_unusable_with_reason_and_auto_still_reads():
    with launch("t-auto", vcpus=2, workload="halt", loops=300) as guest:
        guest.wait_ready(30)
        debugfs = DebugfsSource()
        readings = by_pid(debugfs.read())
        state = debugfs.usability()
        if state.usable:  # a host without lockdown: debugfs must then be exact as well
            assert readings[guest.pid].vm_stats["halt_exits"] == 600
        else:
            assert "lockdown" in state.reason or "not present" in state.reason
        with AutoSource() as auto:
            vm = vm_sample(by_pid(auto.read())[guest.pid])
        assert vm.stats["halt_exits"] == 600
        assert {v: s["halt_exits"] for v, s in vm.vcpus.items()} == {0: 300, 1: 300}
        assert vm.source in ("statsfd", "debugfs+statsfd")


def test_vmm_without_stats_fds_is_reported_not_counted():
    with launch("t-nofds", vcpus=1, workload="halt", loops=10, stats_fds="none") as guest:
        guest.wait_ready(30)
        statsfd = StatsfdSource()
        assert guest.pid not in by_pid(statsfd.read())
        only = StatsfdSource(only_pids={guest.pid})
        only.read()
        assert not only.usability().usable and "hold no KVM stats fds" in only.usability().reason
        auto = AutoSource()
        seen = by_pid(auto.read()).get(guest.pid)
        if os.path.isdir("/sys/kernel/debug/kvm"):  # debugfs names the VM even under lockdown
            assert seen is not None and seen.identity.name == "t-nofds"
            assert seen.source in ("none", "debugfs") and ("halt_exits" in seen.vm_stats) == (seen.source == "debugfs")
        statsfd.close()
        only.close()
        auto.close()


def test_vcpus_of_a_vm_no_stats_fd_reads_are_counted_from_debugfs():
    """kvm_host's vcpus counts a VM whatever reads it: here one whose VMM holds no stats fds, named by debugfs alone
    under lockdown (its vcpuN directories can be listed), read from debugfs elsewhere."""
    if not os.path.isdir("/sys/kernel/debug/kvm"):
        return  # no debugfs: nothing names such a VM (test_vmm_without_stats_fds_is_reported_not_counted)
    with launch("t-count", vcpus=3, workload="halt", loops=10, stats_fds="none") as guest:
        guest.wait_ready(30)
        with AutoSource(only_pids={guest.pid}) as auto, Collector(auto) as collector:
            sample = collector.sample()
        (vm,) = sample.vms
        listed = DebugfsSource().vcpus_listed(guest.pid, vm.identity.key.vm_fd)
    assert vm.source in ("none", "debugfs") and not vm.vcpus
    assert (listed, vm.vcpu_count, sample.vcpu_count) == (3, 3, 3)


def test_vm_exit_keeps_host_totals_monotonic_and_closes_borrowed_fds():
    a = launch("t-a", vcpus=2, workload="halt", loops=1000)
    b = launch("t-b", vcpus=1, workload="halt", loops=500)
    try:
        a.wait_ready(30)
        b.wait_ready(30)
        baseline = open_fds()
        source = StatsfdSource(only_pids={a.pid, b.pid})
        collector = Collector(source)
        first = collector.sample()
        assert first.host["halt_exits"] == 2500
        assert open_fds() == baseline + 3 + 2 + 2  # a: vm + 2 vcpu fds + pidfd; b: vm + vcpu + pidfd
        a.stop()
        second = collector.sample()  # the first sample after a's exit closes its fds
        assert [vm.identity.name for vm in second.vms] == ["t-b"]
        assert second.host["halt_exits"] == 2500 and second.retired_vms == 1
        assert open_fds() == baseline + 2 + 1
        b.stop()
        third = collector.sample()
        assert third.host["halt_exits"] == 2500 and third.vms == []
        assert open_fds() == baseline
        assert source.held_fds() == 0
    finally:
        a.stop()
        b.stop()


def test_fifty_vms_started_and_stopped_while_sampling_leak_nothing():
    baseline = open_fds()
    pids: set[int] = set()
    source = StatsfdSource(only_pids=pids)
    collector = Collector(source)
    errors: list[BaseException] = []
    sampled: set[int] = set()  # every pid a sample has read
    done = threading.Event()

    def sample_loop():
        try:
            while not done.is_set():
                sampled.update(vm.identity.key.pid for vm in collector.sample().vms)
                time.sleep(0.01)
        except BaseException as err:
            errors.append(err)

    sampler = threading.Thread(target=sample_loop)
    sampler.start()
    try:
        for batch in range(5):
            with launch_fleet(10, vcpus=2, workload="halt", loops=100, name_prefix=f"t-churn{batch}") as fleet:
                pids.update(fleet.pids)
                fleet.wait_ready(60)
                # stopped only once sampled: the sampler holds their fds when they go
                wait_for(f"a sample that read every VM of batch {batch}", lambda: set(fleet.pids) - sampled, 30,
                         every=0.01, until=lambda missing: not missing or errors)
    finally:
        done.set()
        sampler.join()
    assert errors == []
    collector.sample()
    assert source.held_fds() == 0
    assert open_fds() == baseline


def test_stat_cli_json_names_the_vm_with_exact_counts():
    with launch("t-cli", vcpus=2, workload="mmio", loops=77, uuid=UUID) as guest:
        guest.wait_ready(30)
        out = subprocess.run([sys.executable, "-m", "kvmfleet.cli", "stat", "--json", "-n", "1", "--vm", "--vcpu",
                              "--source", "statsfd", "-f", "mmio_exits"],
                             capture_output=True, text=True, check=True, timeout=60).stdout
    obj = json.loads(out)
    assert obj["source"] == "statsfd"
    vm = next(vm for vm in obj["vms"] if vm["pid"] == guest.pid)
    assert (vm["name"], vm["uuid"], vm["vmm"]) == ("t-cli", UUID, "kvmfleet-guestvmm")
    assert vm["stats"] == {"mmio_exits": 154}
    assert [(v["id"], v["stats"]) for v in vm["vcpus"]] == [(0, {"mmio_exits": 77}), (1, {"mmio_exits": 77})]
    assert obj["host"]["mmio_exits"] >= 154


def test_another_collectors_borrowed_fds_are_not_a_vm():
    """A collector holding a guest's borrowed stats fds (collectd's plugin beside `kvmfleet stat`) is no VMM: the
    guest is listed once, the collector not at all, and the host totals count the guest once."""
    with launch("t-borrowed", vcpus=2, workload="mmio", loops=91) as guest:
        guest.wait_ready(30)
        with StatsfdSource(only_pids={guest.pid}) as holder:
            holder.read()
            assert holder.held_fds() == 4  # the VM stats fd, two vCPU stats fds and the pidfd
            out = subprocess.run([sys.executable, "-m", "kvmfleet.cli", "stat", "--json", "-n", "1", "--vm",
                                  "--source", "statsfd", "-f", "^mmio_exits$"],
                                 capture_output=True, text=True, check=True, timeout=60).stdout
    obj = json.loads(out)
    pids = [vm["pid"] for vm in obj["vms"]]
    assert os.getpid() not in pids
    assert pids.count(guest.pid) == 1
    assert sum(vm["stats"]["mmio_exits"] for vm in obj["vms"]) == obj["host"]["mmio_exits"]
    assert next(vm for vm in obj["vms"] if vm["pid"] == guest.pid)["stats"] == {"mmio_exits": 182}


def test_selftest_passes_on_this_host():
    run = subprocess.run([sys.executable, "-m", "kvmfleet.cli", "selftest", "--json"],
                         capture_output=True, text=True, timeout=120)
    result = json.loads(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    checks = {c["source"]: c for c in result["checks"]}
    assert checks["statsfd"]["status"] == "ok" and checks["auto"]["status"] == "ok"
    assert checks["release"]["status"] == "ok"
    assert checks["debugfs"]["status"] in ("ok", "unusable")
