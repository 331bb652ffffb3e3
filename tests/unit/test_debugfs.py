import errno
import os

import pytest

from kvmfleet.collector import Collector
from kvmfleet.logsay import SayOnce
from kvmfleet.model import StatType, StatUnit, Usability, VMIdentity, VMKey, VMReading
from kvmfleet.options import AgentConfig
from kvmfleet.points import PointBuilder
from kvmfleet.sources.auto import AutoSource
from kvmfleet.sources.base import Source
from kvmfleet.sources.debugfs import DebugfsSource


@pytest.fixture
def tree(tmp_path):
    """A debugfs kvm/ tree and a /proc with the VMM processes it names."""
    kvm, proc = tmp_path / "kvm", tmp_path / "proc"
    for pid, fd, name in [(100, 11, "web"), (200, 12, "db")]:
        vm = kvm / f"{pid}-{fd}"
        (vm / "vcpu0").mkdir(parents=True)
        (vm / "vcpu0" / "tsc-offset").write_text("123\n")
        for counter, value in [("exits", pid + 1), ("halt_exits", pid + 2), ("halt_wait_ns", 5)]:
            (vm / counter).write_text(f"{value}\n")
        (vm / "pages_4k").write_text("8\n")
        os.chmod(vm / "pages_4k", 0o444)
        (vm / "mmu_rmaps_stat").write_text("rmap_count 0 1 2\n")
        (vm / "halt_poll_fail_hist").write_text("0\n")
        (vm / "future_text").write_text("not a number\n")
        p = proc / str(pid)
        p.mkdir(parents=True)
        (p / "stat").write_text(f"{pid} (qemu-system-x86) S " + " ".join(["1"] * 18) + f" {pid * 10} 0 0\n")
        (p / "cmdline").write_bytes(b"\0".join([b"qemu-system-x86_64", b"-name", f"guest={name}".encode()]) + b"\0")
        (p / "comm").write_text("qemu-system-x86\n")
    (kvm / "exits").write_text("999\n")  # top-level sum: never used while per-VM dirs exist
    return kvm, proc


def test_reads_per_vm_dirs_and_skips_what_is_not_a_counter(tree, caplog):
    kvm, proc = tree
    source = DebugfsSource(str(kvm), str(proc))
    readings = sorted(source.read(), key=lambda r: r.identity.key.pid)
    assert [r.identity.name for r in readings] == ["web", "db"]
    assert readings[0].vm_stats == {"exits": 101, "halt_exits": 102, "halt_wait_ns": 5, "pages_4k": 8}
    assert readings[0].vm_stats_include_vcpus and readings[0].identity.key.vm_fd == 11
    assert readings[0].identity.key.start_time == 1000
    descs = readings[0].descs
    assert descs["pages_4k"].type is StatType.INSTANT and descs["exits"].type is StatType.CUMULATIVE
    assert descs["halt_wait_ns"].unit is StatUnit.SECONDS and descs["halt_wait_ns"].exponent == -9
    assert source.usability().usable
    assert sum("future_text is not a number" in m for m in caplog.messages) == 1
    source.read()
    assert sum("future_text is not a number" in m for m in caplog.messages) == 1  # said once


def test_vanished_vm_dir_and_vanished_process(tree):
    kvm, proc = tree
    source = DebugfsSource(str(kvm), str(proc))
    for f in (kvm / "100-11").iterdir():
        if f.is_file():
            f.unlink()
    (kvm / "100-11" / "vcpu0" / "tsc-offset").unlink()
    (kvm / "100-11" / "vcpu0").rmdir()
    (kvm / "100-11").rmdir()
    (proc / "200" / "stat").unlink()  # process gone, directory lingering
    assert source.read() == []
    assert source.usability().usable


def test_lockdown_eperm_makes_source_unusable_but_listing_still_names_vms(tree, monkeypatch, caplog):
    kvm, proc = tree
    real_open = os.open

    def locked_open(path, flags, *args):
        if str(path).startswith(str(kvm)):
            raise PermissionError(errno.EPERM, "Operation not permitted", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", locked_open)
    source = DebugfsSource(str(kvm), str(proc), say=SayOnce())
    assert source.read() == []
    state = source.usability()
    assert not state.usable and "lockdown" in state.reason
    assert sorted(source.listed_vms()) == [(100, 11), (200, 12)]
    source.read()
    assert sum("debugfs source unusable" in m for m in caplog.messages) == 1


def test_missing_debugfs(tmp_path):
    source = DebugfsSource(str(tmp_path / "nope"), str(tmp_path))
    assert source.read() == []
    assert "not mounted" in source.usability().reason


def in_pid_namespace(proc, nspid="1", ns_link="pid:[4026532180]"):
    """Make the fake /proc say this process runs in a PID namespace of its own, with its own /proc mounted."""
    (proc / "self" / "ns").mkdir(parents=True)
    (proc / "self" / "status").write_text(f"Name:\tkvmfleet\nNSpid:\t{nspid}\nSeccomp:\t0\n")
    os.symlink(ns_link, proc / "self" / "ns" / "pid")


@pytest.mark.parametrize("lockdown", ["none", "integrity", "unknown"])
def test_own_pid_namespace_reads_lists_and_names_nothing(tree, monkeypatch, lockdown):
    """The debugfs pids are the host's; here pid 100 and 200 are other processes: none of them is named."""
    kvm, proc = tree
    in_pid_namespace(proc)
    monkeypatch.setattr("kvmfleet.sources.debugfs.lockdown_mode", lambda: lockdown)
    source = DebugfsSource(str(kvm), str(proc), say=SayOnce())
    assert source.read() == [] and source.listed_vms() == [] and source.identity(100, 11) is None
    also = "; kernel lockdown (integrity) also denies reading " + str(kvm) if lockdown == "integrity" else ""
    assert source.usability() == Usability(False, "this process runs in a PID namespace of its own (NSpid 1 in "
                                  "/proc/self/status, /proc/self/ns/pid is pid:[4026532180], the host's is "
                                  "pid:[4026531836]): debugfs names VMs by the host's pids, which match no process "
                                  "here, or the wrong one (run the collector in the host's PID namespace, e.g. "
                                  "podman --pid=host; statsfd reads the VMMs of this namespace)" + also)


def test_host_pid_namespace_reads_as_before(tree):
    kvm, proc = tree
    in_pid_namespace(proc, nspid="4242", ns_link="pid:[4026531836]")
    source = DebugfsSource(str(kvm), str(proc))
    assert sorted(r.identity.name for r in source.read()) == ["db", "web"]
    assert source.usability().usable


def test_nested_namespace_seen_through_the_hosts_proc_by_nspid_alone(tree):
    """No /proc/self/ns (old kernels): NSpid with two entries still says nested."""
    kvm, proc = tree
    (proc / "self").mkdir()
    (proc / "self" / "status").write_text("NSpid:\t31227\t1\n")
    source = DebugfsSource(str(kvm), str(proc))
    assert source.read() == [] and source.listed_vms() == []
    assert "(NSpid 31227 1 in /proc/self/status)" in source.usability().reason


# -- vCPUs: debugfs reads none one by one, but names each in a vcpuN directory --------------------------------------
def vcpu_tree(kvm, proc, vcpus_of):
    """Two VMs with vCPU directories (3 and 1 in the tests); a vcpuN file or vcpuN-ish directory is no vCPU."""
    for (pid, fd), count in vcpus_of.items():
        vm = kvm / f"{pid}-{fd}"
        for i in range(count):
            (vm / f"vcpu{i}").mkdir(parents=True)
            (vm / f"vcpu{i}" / "tsc-offset").write_text("1\n")
        (vm / "exits").write_text(f"{pid}\n")
        (vm / "vcpus_total").mkdir()  # not vcpu<N>
        p = proc / str(pid)
        p.mkdir(parents=True)
        (p / "stat").write_text(f"{pid} (qemu-system-x86) S " + " ".join(["1"] * 18) + f" {pid * 10} 0 0\n")
        (p / "cmdline").write_bytes(b"\0".join([b"qemu-system-x86_64", b"-name", f"guest=vm{pid}".encode()]) + b"\0")
        (p / "comm").write_text("qemu-system-x86\n")


def kvm_host_vcpus(source):
    sample = Collector(source).sample()
    line = PointBuilder(AgentConfig(), "h").facts_line(sample)
    return sample, dict(f.split("=", 1) for f in line.split(" ")[1].split(","))["vcpus"]


def test_debugfs_vms_count_their_vcpu_directories(tmp_path):
    kvm, proc = tmp_path / "kvm", tmp_path / "proc"
    vcpu_tree(kvm, proc, {(100, 11): 3, (200, 12): 1})
    sample, vcpus = kvm_host_vcpus(DebugfsSource(str(kvm), str(proc)))
    assert vcpus == "4i" and sample.vcpu_count == 4
    assert sorted((vm.identity.key.pid, vm.vcpu_count, vm.vcpus) for vm in sample.vms) == [(100, 3, {}), (200, 1, {})]
    assert {vm.identity.key.pid: dict(vm.stats) for vm in sample.vms} == {100: {"exits": 100}, 200: {"exits": 200}}


def test_vcpus_counted_from_the_listing_under_lockdown(tmp_path, monkeypatch):
    """Lockdown denies debugfs's files but not its listing: a VM no source reads, or read without its vCPUs, still
    has them counted; one whose vCPUs a source read counts those."""
    kvm, proc = tmp_path / "kvm", tmp_path / "proc"
    vcpu_tree(kvm, proc, {(100, 11): 3, (200, 12): 1, (300, 13): 2})
    real_open = os.open

    def locked_open(path, flags, *args):
        if str(path).startswith(str(kvm)):
            raise PermissionError(errno.EPERM, "Operation not permitted", path)
        return real_open(path, flags, *args)

    class Fixed(Source):
        def __init__(self, name, readings):
            self.name, self.readings = name, readings

        def read(self):
            return self.readings

        def usability(self):
            return Usability(True, "fixed")

        def read_groups(self, vcpus_for=None):
            return []

        def hint(self, pids):
            pass

        def vmm_pids(self):
            return {100, 300}

    statsfd = Fixed("statsfd", [VMReading(VMIdentity(VMKey(100, 1000, -1), "qemu", "vm100"), "statsfd",
                                          {"exits": 5}),  # a VM stats fd, no vCPU ones; its VM fd closed
                                VMReading(VMIdentity(VMKey(300, 3000, 13), "qemu", "vm300"), "statsfd",
                                          {}, {0: {"exits": 1}, 1: {"exits": 2}})])
    monkeypatch.setattr(os, "open", locked_open)
    auto = AutoSource(DebugfsSource(str(kvm), str(proc)), statsfd, libvirt=Fixed("libvirt", []))
    sample, vcpus = kvm_host_vcpus(auto)
    assert sorted((vm.identity.key.pid, vm.source, vm.vcpu_count) for vm in sample.vms) == [
        (100, "statsfd", 3), (200, "none", 1), (300, "statsfd", 2)]
    assert vcpus == "6i"
    assert DebugfsSource(str(kvm), str(proc)).vcpus_listed(999, 1) is None  # no such VM directory
