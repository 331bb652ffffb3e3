"""A real QEMU 10 (Debian 13) read through the statsfd source: per-vCPU stats, name and UUID."""

from __future__ import annotations

import os
import time
import uuid as uuidlib

import pytest
from tests.support.qemu import ensure_trixie_qemu_tree, start_qemu
from tests.support.waiting import wait_for

from kvmfleet.collector import Collector
from kvmfleet.procfs import borrowed_fd_count
from kvmfleet.sources import AutoSource, StatsfdSource

pytestmark = [pytest.mark.qemu, pytest.mark.kvm]


def test_statsfd_reads_qemu_vcpu_stats_with_identity_from_its_command_line() -> None:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm is absent")
    tree = ensure_trixie_qemu_tree()
    name, uuid = "web,01", str(uuidlib.uuid4())  # the comma travels as ",," on QEMU's command line
    before = borrowed_fd_count()
    with start_qemu(tree, name, uuid, vcpus=2) as qemu:
        source = StatsfdSource(only_pids={qemu.pid})
        collector = Collector(source)
        first = collector.sample()
        assert [vm.identity.name for vm in first.vms] == [name]
        vm = first.vms[0]
        assert (vm.identity.vmm, vm.identity.uuid, vm.identity.key.pid) == ("qemu", uuid, qemu.pid)
        assert vm.source == "statsfd"
        assert sorted(vm.vcpus) == [0, 1]  # QEMU >= 8.1 holds one stats fd per vCPU, none for the VM
        assert source.held_fds() == 2 + 1  # two vCPU stats fds and the pidfd
        # SeaBIOS starts on vCPU 0: wait until it exited and had instructions emulated
        vm = wait_for("SeaBIOS's exits and emulated instructions on vCPU 0", lambda: collector.sample().vms[0], 10,
                      every=0.1, until=lambda vm: vm.vcpus[0]["exits"] > 0 and vm.vcpus[0]["insn_emulation"] > 0)
        assert vm.vcpus[0]["exits"] > 0 and vm.vcpus[0]["insn_emulation"] > 0
        assert vm.stats["exits"] == vm.vcpus[0]["exits"] + vm.vcpus[1]["exits"]
        time.sleep(0.3)
        second = collector.sample()
        assert second.vms[0].vcpus[0]["insn_emulation"] >= vm.vcpus[0]["insn_emulation"]
        assert second.host["exits"] >= first.host["exits"]
        with AutoSource(statsfd=StatsfdSource(only_pids={qemu.pid})) as auto:
            seen = [r for r in auto.read() if r.identity.key.pid == qemu.pid]
        assert [r.identity.name for r in seen] == [name] and sorted(seen[0].vcpus) == [0, 1]
    collector.sample()  # QEMU is gone: its borrowed fds close in this sample
    assert source.held_fds() == 0 and borrowed_fd_count() == before
