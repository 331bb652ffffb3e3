import errno
import os

import pytest

from kvmfleet.logsay import SayOnce
from kvmfleet.model import StatType, StatUnit
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
