"""Issue 12's "Hostile VMM" acceptance, on real KVM (docs/statistics.md, "Hostile VMMs").

A VMM flips its fd N between a real stats fd and, in turn, a file with overlapping descriptors, one with
u64-max values, a FIFO and a regular file, thousands of times a second for a minute, under a name holding
escape sequences, backslashes, a line-protocol injection and 64 KiB; three honest guests run beside it.
Sampled every 0.2 s: every count of every VM (the hostile one's real guest too) and the host totals stay
exact, no sample fails or takes longer than the interval, no forged or out-of-range value reaches the line
protocol, and borrowed fds and memory stay bounded.
"""

from __future__ import annotations

import logging
import os
import re
import time

from tests.support.hostilevmm import FORGED, U64_MAX, start_hostile

from kvmfleet import procfs
from kvmfleet.collector import Collector, Sample, VMSample
from kvmfleet.guestvmm import expected_counts, expected_vm_counts, launch
from kvmfleet.logsay import SayOnce
from kvmfleet.model import Usability
from kvmfleet.options import AgentConfig
from kvmfleet.plausible import INT64_MAX
from kvmfleet.points import PointBuilder
from kvmfleet.sources import StatsfdSource
from kvmfleet.statview import sample_text

HONEST = {"t-honest-halt": (2, "halt", 1500), "t-honest-mmio": (2, "mmio", 700), "t-honest-wide": (4, "halt", 300)}
HOSTILE = (2, "halt", 400)
EVIL_NAME = ("evil\x1b[2J\x1b[H\x1b]0;owned\x07 \\x1b\\\\ \u202e\r\nkvm halt_exits=424242i 1\n" + "A" * 65536)
FLIP_S = 60.0
INTERVAL_S = 0.2
FORGED_TEXT = (str(FORGED), str(U64_MAX), str(INT64_MAX), "424242i")


def expected(vcpus: int, workload: str, loops: int) -> tuple[dict[str, int], dict[str, int]]:
    """(per-vCPU counts, VM counts) of a guest that ran its loops."""
    per_vcpu = expected_counts(workload, loops)
    return per_vcpu, {**{k: v * vcpus for k, v in per_vcpu.items()}, **expected_vm_counts(workload, loops, vcpus)}


def check_vm(vm: VMSample, vcpus: int, workload: str, loops: int) -> None:
    per_vcpu, whole = expected(vcpus, workload, loops)
    assert sorted(vm.vcpus) == list(range(vcpus))
    for stats in vm.vcpus.values():
        assert {k: stats[k] for k in per_vcpu} == per_vcpu
    assert {k: vm.stats[k] for k in whole} == whole


def check_values_fit(sample: Sample) -> None:
    parts = [sample.host] + [vm.stats for vm in sample.vms] + [s for vm in sample.vms for s in vm.vcpus.values()]
    for stats in parts:
        for value in stats.values():
            assert max(value if isinstance(value, tuple) else (value,), default=0) <= INT64_MAX


def check_lines(lines: list[str], vcpus: int) -> None:
    """What would be shipped: one line per measurement and series, no forged number, every integer an int64."""
    assert len(lines) == 1 + 4 + vcpus
    for line in lines:
        series, fields, _ts = line.rsplit(" ", 2)
        assert re.match(r"kvm(_vm|_vcpu)?(,|$)", series)
        for text in FORGED_TEXT:
            assert text not in fields
        assert all(int(value) <= INT64_MAX for value in re.findall(r"=(\d+)i", fields))


def rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGESIZE") // 1024


def test_a_vmm_flipping_its_stats_fd_for_a_minute_blinds_nothing(caplog):
    guests = {name: launch(name, vcpus, workload, loops) for name, (vcpus, workload, loops) in HONEST.items()}
    hostile = None
    try:
        for guest in guests.values():
            guest.wait_ready(30)
        hostile, info = start_hostile(EVIL_NAME, vcpus=HOSTILE[0], loops=HOSTILE[2], seconds=FLIP_S)
        with caplog.at_level(logging.WARNING, logger="kvmfleet"):
            samples, source = sample_while_flipping(guests, hostile.pid, info["flip_fd"])
        assert hostile.wait(10) == 0
        flips = int(re.search(rb"(\d+) flips", hostile.stderr.read()).group(1))  # type: ignore[union-attr]
        assert flips > 50 * FLIP_S  # many times a second
    finally:
        for guest in guests.values():
            guest.stop()
        if hostile is not None and hostile.poll() is None:
            hostile.kill()
            hostile.wait()
    assert samples >= 0.8 * FLIP_S / INTERVAL_S
    # the swap between the collector's look at fd N and its pidfd_getfd did happen, and was caught each time
    rejected = [r.getMessage() for r in caplog.records if "rejected and closed" in r.getMessage()]
    assert source.rejected_fds >= 3, "the race was never hit: the test proved nothing"
    assert 1 <= len(rejected) <= 3 and all(f"fd {info['flip_fd']} of pid {info['pid']}" in m for m in rejected)
    assert not [r for r in caplog.records if "refused" in r.getMessage() or "failed" in r.getMessage()]


def sample_while_flipping(guests: dict[str, object], hostile_pid: int, flip_fd: int) -> tuple[int, StatsfdSource]:
    """Sample every INTERVAL_S until the hostile VMM is done flipping (closes ``flip_fd``); every check on every
    sample."""
    pids = {guest.pid: name for name, guest in guests.items()}  # type: ignore[attr-defined]
    pids[hostile_pid] = EVIL_NAME
    shapes = {**HONEST, EVIL_NAME: HOSTILE}
    host_want: dict[str, int] = {}
    for vcpus, workload, loops in shapes.values():
        for key, value in expected(vcpus, workload, loops)[1].items():
            host_want[key] = host_want.get(key, 0) + value
    vcpu_total = sum(vcpus for vcpus, _, _ in shapes.values())
    held_most = sum(vcpus + 2 for vcpus, _, _ in shapes.values()) + 1  # stats fds + pidfd each; fd N once more
    source = StatsfdSource(only_pids=set(pids), rescan_s=0.0, say=SayOnce())
    collector = Collector(source, say=source.say)
    builder = PointBuilder(AgentConfig(per_vm=True, per_vcpu=True), "hv-hostile")
    kvm_fds_before, fds_before = procfs.borrowed_fd_count(), len(os.listdir("/proc/self/fd"))
    count, rss_warm, started = 0, 0, time.monotonic()
    while os.path.exists(f"/proc/{hostile_pid}/fd/{flip_fd}") and time.monotonic() - started < FLIP_S + 20:
        sample = collector.sample()
        count += 1
        assert sample.duration_s < INTERVAL_S and sample.refused == []
        assert {vm.identity.name for vm in sample.vms} == set(shapes)
        for vm in sample.vms:
            check_vm(vm, *shapes[vm.identity.name])
        assert {key: sample.host[key] for key in host_want} == host_want
        check_values_fit(sample)
        check_lines(builder.build(sample).lines, vcpu_total)
        assert procfs.borrowed_fd_count() - kvm_fds_before <= held_most
        assert len(os.listdir("/proc/self/fd")) - fds_before <= held_most
        if count == 50:
            rss_warm = rss_kib()
            assert "\x1b" not in sample_text(sample, None, {"statsfd": Usability(True)}, per_vm=True, vcpus=True,
                                             pattern=None)
        time.sleep(max(0.0, INTERVAL_S - sample.duration_s))
    assert rss_kib() - rss_warm < 4096
    collector.close()
    assert procfs.borrowed_fd_count() == kvm_fds_before
    return count, source


def test_an_error_with_one_vmm_leaves_the_others_read_and_closes_its_fds(monkeypatch, caplog):
    with launch("t-iso-a", 2, "halt", 100) as a, launch("t-iso-b", 1, "mmio", 50) as b:
        a.wait_ready(30)
        b.wait_ready(30)
        kvm_fds_before = procfs.borrowed_fd_count()
        source = StatsfdSource(only_pids={a.pid, b.pid}, say=SayOnce(), rescan_s=0.0)
        collector = Collector(source)
        assert collector.sample().host["halt_exits"] == 200
        read_vmm = source._read_vmm_checked

        def failing(vmm):  # a bug that one VMM's fds trigger: in the read of every fd at once, then in its own
            if vmm.pid == a.pid:
                raise IndexError("tuple index out of range")
            return read_vmm(vmm)

        def failing_planned(plan):
            raise IndexError("tuple index out of range")

        monkeypatch.setattr(source, "_read_planned", failing_planned)
        monkeypatch.setattr(source, "_read_vmm_checked", failing)
        with caplog.at_level(logging.WARNING, logger="kvmfleet"):
            sample = collector.sample()
        assert [vm.identity.name for vm in sample.vms] == ["t-iso-b"] and sample.vms[0].stats["mmio_exits"] == 50
        assert sample.host["halt_exits"] == 200 and sample.host["mmio_exits"] == 50  # a retired, not lost
        assert procfs.borrowed_fd_count() - kvm_fds_before == 2 + 1  # b's stats fds and pidfd; a's closed
        assert [f"reading pid {a.pid} failed, its fds closed: IndexError" in r.getMessage() for r in caplog.records] \
            == [True]
        monkeypatch.undo()  # the trouble is over: a is scanned and read again
        again = collector.sample()
        assert sorted(vm.identity.name for vm in again.vms) == ["t-iso-a", "t-iso-b"]
        assert again.host["halt_exits"] == 200  # back under its key: taken out of the retired sums, not counted twice
        collector.close()
