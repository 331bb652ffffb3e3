"""The libvirt source and auto against a real libvirtd 9.0 and real QEMU 7.2 KVM domains (exact values)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests.support.libvirtd import Domain, Libvirtd, domstats
from tests.support.waiting import wait_for

from kvmfleet.collector import Collector
from kvmfleet.guestvmm import launch
from kvmfleet.sources import AutoSource, LibvirtSource
from kvmfleet.sources.libvirt import NOT_INSTALLED

LIBVIRT_OWN = ("state", "time", "wait", "delay", "halted")


def split_domstats(stats: dict[str, int]) -> tuple[dict[str, int], dict[int, dict[str, int]]]:
    """virsh's keys as (VM stats, per-vCPU stats) named like kvmfleet names them (suffix dropped)."""
    vm: dict[str, int] = {}
    vcpus: dict[int, dict[str, int]] = {}
    for key, value in stats.items():
        parts = key.split(".")
        if parts[0] == "vm" and len(parts) == 3:
            vm[parts[1]] = value
        elif parts[0] == "vcpu" and len(parts) == 4 and parts[1].isdigit():
            vcpus.setdefault(int(parts[1]), {})[parts[2]] = value
    return vm, vcpus


def vcpu_sums(vcpus: dict[int, dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for stats in vcpus.values():
        for name, value in stats.items():
            total[name] = total.get(name, 0) + value
    return total


def test_stat_json_shows_the_paused_domain_by_name_and_uuid_with_virsh_domstats_values(paused: Domain) -> None:
    done = subprocess.run([sys.executable, "-m", "kvmfleet.cli", "stat", "--json", "-n", "1", "--vm", "--vcpu"],
                          capture_output=True, text=True, timeout=120, check=True)
    virsh_vm, virsh_vcpus = split_domstats(domstats(paused.name, "vm", "vcpu"))
    sample = json.loads(done.stdout)
    ours = [vm for vm in sample["vms"] if vm["name"] == paused.name]
    assert len(ours) == 1, [vm["name"] for vm in sample["vms"]]
    vm = ours[0]
    assert (vm["uuid"], vm["vmm"], vm["pid"]) == (paused.uuid, "qemu", paused.pid)
    assert vm["source"] == "libvirt"  # debugfs locked down, QEMU 7.2 holds no stats fds
    assert vm["vm_fd"] > 0  # the anon_inode:kvm-vm fd: the same key debugfs and statsfd give this VM
    assert sample["sources"]["libvirt"]["usable"] is True

    assert {"mmu_cache_miss", "mmu_shadow_zapped", "pages_4k", "mmu_pte_write"} <= set(virsh_vm)
    assert {name: vm["stats"][name] for name in virsh_vm} == virsh_vm  # every vm.* key, exact
    sums = vcpu_sums(virsh_vcpus)
    assert sums["exits"] > 0 and "guest_mode" in sums
    assert {name: vm["stats"][name] for name in sums} == sums  # every KVM vcpu.N.* key summed, exact
    assert set(vm["stats"]) == set(virsh_vm) | set(sums)  # nothing else: libvirt's own vCPU fields are left out
    assert not set(vm["stats"]) & set(LIBVIRT_OWN)
    assert {v["id"]: v["stats"] for v in vm["vcpus"]} == virsh_vcpus  # and per vCPU


def test_libvirt_source_alone_reads_every_key_typed(paused: Domain) -> None:
    with LibvirtSource(only_pids={paused.pid}) as source:
        readings = source.read()
        virsh_vm, virsh_vcpus = split_domstats(domstats(paused.name, "vm", "vcpu"))
        assert source.usability().usable
        facts = source.facts()
    assert [(r.identity.name, r.identity.uuid) for r in readings] == [(paused.name, paused.uuid)]
    reading = readings[0]
    assert dict(reading.vm_stats) == virsh_vm
    assert {n: dict(s) for n, s in reading.vcpus.items()} == virsh_vcpus
    assert reading.descs["mmu_cache_miss"].type.name == "CUMULATIVE"
    assert reading.descs["pages_4k"].type.name == "INSTANT"
    assert reading.descs["max_mmu_rmap_size"].type.name == "PEAK"
    assert (reading.descs["guest_mode"].type.name, reading.descs["guest_mode"].unit.name) == ("INSTANT", "BOOLEAN")
    assert reading.vcpus[0]["guest_mode"] == 0  # libvirt sends guest_mode.cur as a boolean: paused, not in guest
    assert not any(name.endswith("_hist") for name in reading.descs)  # libvirt 9.0 passes no histograms
    assert facts["daemon_version"] == "9.0.0" and facts["vm_stats_group"].startswith("yes (a running domain")


def test_auto_without_debugfs_or_stats_fds_reports_every_counter_once(paused: Domain) -> None:
    with Collector(AutoSource(only_pids={paused.pid})) as collector:
        sample = collector.sample()
        sources = collector.source.sources_used()
    virsh_vm, virsh_vcpus = split_domstats(domstats(paused.name, "vm", "vcpu"))
    assert not sources["debugfs"].usable  # this machine: kernel lockdown
    assert sources["libvirt"].usable
    assert [(vm.identity.name, vm.identity.uuid, vm.source) for vm in sample.vms] == [
        (paused.name, paused.uuid, "libvirt")]
    vm = sample.vms[0]
    want = {**virsh_vm, **vcpu_sums(virsh_vcpus)}
    assert dict(vm.stats) == want
    assert dict(sample.host) == want  # the only VM in scope: host totals are its values, counted once
    assert sample.vcpu_count == 2


def test_libvirtd_stopped_during_sampling_then_back(libvirtd: Libvirtd) -> None:
    assert libvirtd.owned, "libvirtd was running before the tests: this test only stops a daemon it started"
    dom = libvirtd.domain(f"kft{os.getpid()}-restart", vcpus=1)
    guest = launch(f"kft{os.getpid()}-other", vcpus=1, workload="halt", loops=100)
    try:
        guest.wait_ready(30)
        pids = {dom.pid, guest.pid}
        libvirt = LibvirtSource(only_pids=pids, retry_min_s=0.2, retry_max_s=1.0, optional=True)
        auto = AutoSource(only_pids=pids, libvirt=libvirt)
        with Collector(auto) as collector:
            names = {vm.identity.name: vm.source for vm in collector.sample().vms}
            assert names == {dom.name: "libvirt", guest.name: "statsfd"}

            libvirtd.stop_libvirtd()
            t0 = time.monotonic()
            sample = collector.sample()  # no exception, and fast
            assert time.monotonic() - t0 < 5
            state = auto.sources_used()["libvirt"]
            assert not state.usable and ("failed" in state.reason or "cannot connect" in state.reason), state
            # the domain is still named (debugfs lists it) but nothing can read it now; the other source goes on
            vms = {vm.identity.name: vm for vm in sample.vms}
            assert {name: vm.source for name, vm in vms.items()} == {dom.name: "none", guest.name: "statsfd"}
            assert not vms[dom.name].stats
            assert vms[guest.name].stats["halt_exits"] == 100
            alone = LibvirtSource()
            assert alone.read() == [] and "cannot connect to qemu:///system" in alone.usability().reason
            alone.close()

            libvirtd.start()
            # the domain is listed all along (source "none"): wait until it is read through libvirt again
            want = {dom.name: "libvirt", guest.name: "statsfd"}
            names = wait_for("the domain read through libvirt again and the guest through its stats fds",
                             lambda: {vm.identity.name: vm.source for vm in collector.sample().vms}, 30, every=0.2,
                             until=lambda names: names == want and auto.sources_used()["libvirt"].usable)
            assert names == want  # the domain survived the restart
            assert auto.sources_used()["libvirt"].usable
    finally:
        guest.stop()
        libvirtd.remove(dom)


def test_without_the_binding_the_source_is_unusable_with_the_reason() -> None:
    code = (
        "import sys, json\n"
        "sys.modules['libvirt'] = None\n"  # import libvirt now raises ImportError
        "from kvmfleet.sources import AutoSource, LibvirtSource, make_source\n"
        "s = LibvirtSource()\n"
        "r = s.read()\n"
        "a = make_source('auto')\n"
        "a.read()\n"
        "print(json.dumps([r, s.usability().usable, s.usability().reason, a.sources_used()['libvirt'].reason,"
        " sorted(a.sources_used())]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    readings, usable, reason, auto_reason, parts = json.loads(done.stdout)
    assert (readings, usable, reason, auto_reason) == ([], False, NOT_INSTALLED, NOT_INSTALLED)
    assert reason.startswith("python3-libvirt not installed")
    assert parts == ["debugfs", "libvirt", "statsfd"]  # auto read with its other parts, no exception
    assert "Traceback" not in done.stderr
