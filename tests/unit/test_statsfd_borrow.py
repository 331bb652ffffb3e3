"""A VMM that lists a stats fd and hands over something else (docs/statistics.md, "Hostile VMMs").

The VMM is a child process holding crafted files at the fd numbers a fake /proc lists as KVM stats fds, as
if it swapped them between the collector's readlink and its pidfd_getfd: the fd borrowed is what is checked.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest
from tests.unit.statsbytes import stats_file
from tests.unit.test_procfs import fake_proc

from kvmfleet import procfs
from kvmfleet.binstats import StatsFormatError
from kvmfleet.logsay import SayOnce
from kvmfleet.sources import StatsfdSource, borrowcheck
from kvmfleet.sources.borrowcheck import BorrowRejected, verify_stats_fd

CUMUL = 0
FORGED = 987654321987
need_root = pytest.mark.skipif(os.geteuid() != 0, reason="borrowing another process's fds needs root")


def crafted(tmp_path, name: str, raw: bytes) -> int:
    path = tmp_path / name
    path.write_bytes(raw)
    return os.open(path, os.O_RDONLY)


def open_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def swapping_vmm(tmp_path):
    """A child holding, where its (fake) fd table says kvm-vm-stats and kvm-vcpu-stats:0, a well-formed stats
    file with forged values and a FIFO."""
    forged = crafted(tmp_path, "forged", stats_file([("halt_exits", CUMUL, 0, 1, 0)], [FORGED]))
    os.mkfifo(tmp_path / "fifo")
    fifo = os.open(tmp_path / "fifo", os.O_RDWR | os.O_NONBLOCK)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=(forged, fifo))
    proc = fake_proc(tmp_path / "proc", child.pid, {
        100: "anon_inode:kvm-vm", forged: "anon_inode:kvm-vm-stats", fifo: "anon_inode:kvm-vcpu-stats:0"})
    os.close(forged)
    os.close(fifo)
    try:
        yield child.pid, proc, forged, fifo
    finally:
        child.kill()
        child.wait()


@need_root
def test_borrowed_fd_that_is_not_a_stats_fd_is_rejected_closed_and_said_once(swapping_vmm, caplog):
    pid, proc, forged, fifo = swapping_vmm
    before = open_count()
    source = StatsfdSource(proc=proc, only_pids={pid}, rescan_s=0.0, say=SayOnce())
    with caplog.at_level(logging.WARNING, logger="kvmfleet"):
        for _ in range(3):
            assert source.read() == []  # nothing forged is read
    assert source.rejected_fds == 6
    assert open_count() == before + 1  # the VMM's pidfd; every borrowed fd was closed at once
    said = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(said) == 2, said  # once per fd and reason, not once per sample
    assert f"fd {forged} of pid {pid} rejected and closed: it is /" in said[0] + said[1]
    assert any(f"fd {fifo} of pid {pid}" in line and "fifo, not anon_inode:kvm-vcpu-stats:0" in line for line in said)
    source.close()
    assert open_count() == before


def test_verify_checks_the_link_of_the_fd_it_holds(tmp_path):
    fd = crafted(tmp_path, "stats", stats_file([("exits", CUMUL, 0, 1, 0)], [1]))
    try:
        with pytest.raises(BorrowRejected, match="stats, not anon_inode:kvm-vm-stats") as err:
            verify_stats_fd(fd, procfs.KvmFd(fd, "vm-stats"))
        assert err.value.kind == "link"
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind,index,raw,why", [
    ("vm-stats", -1, stats_file([("a", CUMUL, 0, 1, 0), ("b", CUMUL, 0, 1, 0)], [1, 2], offsets=[0, 0]),
     "layout: .*overlap"),
    ("vm-stats", -1, stats_file([("a", CUMUL, 0, 1, 0)], [1], num_desc=5000), "layout: .*num_desc"),
    ("vm-stats", -1, stats_file([("a", CUMUL, 0, 1, 0)], [], data_offset=200), "layout: .*data truncated"),
    ("vm-stats", -1, stats_file([("a", CUMUL, 0, 1, 0)], [1], stat_id="kvm-7/vcpu-0"), "id: .*kvm-7/vcpu-0"),
    ("vcpu-stats", 1, stats_file([("a", CUMUL, 0, 1, 0)], [1], stat_id="kvm-7/vcpu-0"), "id: "),
    ("vcpu-stats", 0, stats_file([("a", CUMUL, 0, 1, 0)], [1], stat_id="\x1b[2Jx"), r"id: .*\\x1b\[2Jx"),
])
def test_a_stats_fd_whose_header_or_id_is_not_the_kernels_is_rejected(tmp_path, monkeypatch, kind, index, raw, why):
    """As if the kernel had named the file (only it can): the layout and the id are checked next."""
    kfd = procfs.KvmFd(9, kind, index)
    monkeypatch.setattr(borrowcheck.os, "readlink", lambda path: borrowcheck.expected_link(kfd))
    fd = crafted(tmp_path, "stats", raw)
    try:
        with pytest.raises(BorrowRejected) as err:
            verify_stats_fd(fd, kfd)
        assert re.match(why, f"{err.value.kind}: {err.value}"), str(err.value)
    finally:
        os.close(fd)


def test_verify_passes_the_kernels_layout(tmp_path, monkeypatch):
    kfd = procfs.KvmFd(9, "vcpu-stats", 3)
    monkeypatch.setattr(borrowcheck.os, "readlink", lambda path: "anon_inode:kvm-vcpu-stats:3")
    fd = crafted(tmp_path, "stats", stats_file([("exits", CUMUL, 0, 1, 0)], [5], stat_id="kvm-42/vcpu-3"))
    try:
        layout = verify_stats_fd(fd, kfd)
        assert layout.id == "kvm-42/vcpu-3" and layout.read(fd) == {"exits": 5}
    finally:
        os.close(fd)
    assert not issubclass(StatsFormatError, BorrowRejected)


@need_root
def test_a_process_looked_at_but_neither_a_vmm_nor_noted_is_looked_at_again_next_sample(swapping_vmm):
    """Discovery compares /proc's listing with the last one; a pid whose scan found nothing to note (it was exiting,
    or its pid reused, while scanned) stays due at the next sample, not after ``rescan_s``."""
    pid, proc, _, _ = swapping_vmm
    stat = os.path.join(proc, str(pid), "stat")
    with open(stat) as handle:
        saved = handle.read()
    os.remove(stat)  # as if it exited while it was scanned
    source = StatsfdSource(proc=proc, only_pids={pid}, rescan_s=3600.0, young_s=0.0, say=SayOnce())
    assert source.read() == [] and source.rejected_fds == 0
    with open(stat, "w") as handle:
        handle.write(saved)
    assert source.read() == [] and source.rejected_fds == 2  # scanned again: both of its fds borrowed and checked
    assert source.read() == [] and source.rejected_fds == 2  # now noted: not again until rescan_s
    source.close()
