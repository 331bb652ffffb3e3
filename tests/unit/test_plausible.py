"""Implausible values are refused, never folded into the host totals (kvmfleet.plausible, docs/statistics.md)."""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator, Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.unit.agentdata import ALL_DESCS, VCPU_SHAPE, ListSource, vcpu_block, vm_block

from kvmfleet import procfs
from kvmfleet.collector import Collector
from kvmfleet.logsay import SayOnce
from kvmfleet.model import StatDesc, StatType, StatUnit, VMIdentity, VMKey, VMReading
from kvmfleet.plausible import INT64_MAX, SLACK_S, _Lanes, rate_per_second, refusal
from kvmfleet.statblock import Shape, StatBlock

U64_MAX = (1 << 64) - 1
NOW_TICKS = 1_000_000 * procfs.CLK_TCK  # "uptime" of the tests' gate: VMs started at tick 100 are old


def block_reading(pid: int, exits: int, halts: int = 10, pages: int = 5, start: int = 100,
                  hist: tuple[int, int, int, int] = (0, 3, 0, 1)) -> VMReading:
    """A VM as a stats fd source reads it: stat blocks (the fast path)."""
    ident = VMIdentity(VMKey(pid, start, 12), "qemu", f"vm{pid}")
    return VMReading(ident, "statsfd", vm_block(pages, 7, 2), {0: vcpu_block(exits, halts, hist)}, dict(ALL_DESCS))


def dict_reading(pid: int, exits: int, halts: int = 10, pages: int = 5, start: int = 100,
                 hist: tuple[int, int, int, int] = (0, 3, 0, 1)) -> VMReading:
    """The same VM as a source without stat blocks reads it (debugfs, libvirt): value by value."""
    ident = VMIdentity(VMKey(pid, start, 12), "qemu", f"vm{pid}")
    stats = {"exits": exits, "halt_exits": halts, "pages_4k": pages, "halt_wait_hist": hist}
    return VMReading(ident, "debugfs", stats, {}, dict(ALL_DESCS), vm_stats_include_vcpus=True)


class ScriptSource(ListSource):
    """One list of readings per sample."""

    def __init__(self, script: list[list[VMReading]]) -> None:
        super().__init__([])
        self.script = list(script)

    def read(self) -> list[VMReading]:
        return self.script.pop(0)


def collector(script: list[list[VMReading]], seconds: float = 1.0) -> Collector:
    """Samples ``seconds`` apart; the VMs' processes started long ago unless a reading says otherwise."""
    calls = iter(range(10_000))  # a sample reads the monotonic clock twice: at its start and at its end
    col = Collector(ScriptSource(script), wall_clock=lambda: 1, mono_clock=lambda: next(calls) // 2 * seconds,
                    say=SayOnce())
    col.gate._uptime_ticks = lambda: NOW_TICKS
    return col


@pytest.mark.parametrize("make", [block_reading, dict_reading])
@pytest.mark.parametrize("forged", [U64_MAX, 1 << 63, INT64_MAX + 12345])
def test_a_value_past_int64_is_refused_and_moves_no_total(make, forged):
    col = collector([[make(1, 100), make(2, 50)], [make(1, forged), make(2, 60)], [make(1, 130), make(2, 70)]])
    first, second, third = col.sample(), col.sample(), col.sample()
    assert first.host["exits"] == 150
    assert [vm.identity.key.pid for vm in second.vms] == [2] and [i.key.pid for i in second.refused] == [1]
    assert second.host["exits"] == 100 + 60 and second.host["pages_4k"] == first.host["pages_4k"]
    assert second.host["halt_wait_hist"] == first.host["halt_wait_hist"]
    assert third.host["exits"] == 130 + 70 and third.refused == [] and col.gate.refused == 1


@pytest.mark.parametrize("make", [block_reading, dict_reading])
def test_a_forged_instant_value_or_histogram_bucket_is_refused_too(make):
    col = collector([[make(1, 100)], [make(1, 101, pages=U64_MAX)], [make(1, 102, hist=(0, 3, U64_MAX, 1))]])
    first, second, third = col.sample(), col.sample(), col.sample()
    assert second.vms == [] and third.vms == [] and len(third.refused) == 1
    assert third.host == first.host  # held: neither up nor down


@pytest.mark.parametrize("make", [block_reading, dict_reading])
def test_a_counter_jumping_past_what_hardware_could_do_is_refused(make):
    bound = rate_per_second(ALL_DESCS["exits"]) * (2.0 + SLACK_S)
    col = collector([[make(1, 1000)], [make(1, 1000 + int(bound) + 1)], [make(1, 1000 + int(bound) - 1)]],
                    seconds=2.0)
    first, second, third = col.sample(), col.sample(), col.sample()
    assert first.host["exits"] == 1000 and second.vms == [] and second.host["exits"] == 1000
    # the bound grows with the time since the last accepted reading: 4 s later the same value is plausible
    assert [vm.stats["exits"] for vm in third.vms] == [1000 + int(bound) - 1]


@pytest.mark.parametrize("make", [block_reading, dict_reading])
def test_a_histogram_bucket_jump_is_refused(make):
    col = collector([[make(1, 10)], [make(1, 11, hist=(0, 3, 1 << 62, 1))]])
    col.sample()
    assert col.sample().vms == []


@pytest.mark.parametrize("make", [block_reading, dict_reading])
def test_a_first_reading_is_bounded_by_the_age_of_its_vmm(make):
    young = NOW_TICKS - 10 * procfs.CLK_TCK  # a process that started 10 s ago
    plausible = rate_per_second(ALL_DESCS["exits"]) * 10
    col = collector([[make(1, 1 << 62, start=young), make(2, plausible, start=young),
                      make(3, 1 << 62, start=0)]])  # start time unknown: bounded by int64 only
    sample = col.sample()
    assert sorted(vm.identity.key.pid for vm in sample.vms) == [2, 3] and sample.refused[0].key.pid == 1


@pytest.mark.parametrize("make", [block_reading, dict_reading])
def test_a_vm_older_than_any_bound_is_bounded_by_int64_only(make):
    col = collector([[make(1, INT64_MAX - 5), make(2, INT64_MAX + 1)]])
    col.gate._uptime_ticks = lambda: 200 * 86400 * procfs.CLK_TCK  # up 200 days: 2^42 a second reaches int64
    sample = col.sample()
    assert [vm.identity.key.pid for vm in sample.vms] == [1] and sample.refused[0].key.pid == 2


@pytest.mark.parametrize("make", [block_reading, dict_reading])
def test_counters_that_go_down_are_left_to_the_host_totals(make):
    col = collector([[make(1, 100)], [make(1, 40)], [make(1, 110)]])
    assert [col.sample().host["exits"] for _ in range(3)] == [100, 100, 110]


def test_a_refusal_is_said_once_per_vm_and_counter(caplog):
    script = [[block_reading(1, 100)]] + [[block_reading(1, U64_MAX - i)] for i in range(5)] + [[]]
    script += [[block_reading(1, 5, start=999)], [block_reading(1, U64_MAX, start=999)]]
    col = collector(script)
    with caplog.at_level(logging.WARNING, logger="kvmfleet"):
        for _ in script:
            col.sample()
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and all("VM vm1 (pid 1) refused, vCPU 0: exits = " in line for line in said)
    assert "left out of the samples while this lasts" in said[0]


class Broken(Mapping[str, int]):
    def __getitem__(self, name: str) -> int:
        raise struct.error("unpack requires a buffer of 48 bytes")

    def __iter__(self) -> Iterator[str]:
        return iter(["exits"])

    def __len__(self) -> int:
        return 1


def test_a_vm_whose_stats_cannot_be_read_is_left_out_and_the_others_counted_exactly():
    broken = block_reading(1, 100)
    broken.vcpus[1] = Broken()
    col = collector([[block_reading(2, 50), broken, block_reading(3, 7)]])
    sample = col.sample()
    assert [vm.identity.key.pid for vm in sample.vms] == [2, 3] and sample.host["exits"] == 57
    assert [ident.key.pid for ident in sample.refused] == [1]


def test_a_block_shorter_than_its_shape_is_refused():
    short = block_reading(1, 100)
    short.vcpus[0] = StatBlock.from_data(VCPU_SHAPE, vcpu_block(1, 2).data[:-8])  # type: ignore[index]
    assert collector([[short]]).sample().vms == []


# -- the fast path (lanes of one big integer) decides as the value-by-value check does ----------------------------
PADDED = Shape.of([(StatDesc("exits"), 0), (StatDesc("pages_4k", StatType.INSTANT), 1),
                   (StatDesc("halt_wait_ns", unit=StatUnit.SECONDS, exponent=-9), 3),  # word 2: a skipped stat
                   (StatDesc("hist", StatType.LOG_HIST, size=3), 4), (StatDesc("max_x", StatType.PEAK), 7)])
word = st.one_of(st.integers(0, 1 << 20), st.integers(0, U64_MAX), st.sampled_from([INT64_MAX, 1 << 63, U64_MAX]))


@given(st.lists(word, min_size=8, max_size=8), st.lists(word, min_size=8, max_size=8), st.integers(0, 100))
def test_lanes_decide_like_the_value_by_value_check(before, after, whole_seconds):
    lanes = _Lanes(PADDED)
    old, new = (StatBlock.from_data(PADDED, struct.pack("=8Q", *words)) for words in (before, after))
    if refusal(old, None, old.shape.descs, None):
        return  # the fast path only ever compares with an accepted reading
    seconds = whole_seconds + 1 - SLACK_S  # a whole number of seconds with the slack: both use the same bound
    exact = refusal(new, old, new.shape.descs, seconds)
    went_down = any(new[n] < old[n] if isinstance(new[n], int) else any(map(int.__lt__, new[n], old[n]))
                    for n in ("exits", "halt_wait_ns", "hist"))
    fast = lanes.within(lanes.value(new.data or b""), lanes.value(old.data or b"") & lanes.low_bits, seconds)
    if fast:
        assert exact == ""
    else:
        assert exact or went_down
    assert bool(lanes.refusal(new.data or b"", old.data, seconds)) == bool(exact)  # both name the same trouble
    first = refusal(new, None, new.shape.descs, seconds)
    assert lanes.within(lanes.value(new.data or b""), 0, seconds) == (first == "")  # a first reading
    assert bool(lanes.refusal(new.data or b"", None, seconds)) == bool(first)
    assert lanes.within(lanes.value(new.data or b""), 0, None) == (refusal(new, None, new.shape.descs, None) == "")


def test_honest_readings_are_checked_without_looking_value_by_value(monkeypatch):
    import kvmfleet.plausible as plausible

    looked = []
    monkeypatch.setattr(plausible, "refusal", lambda *args: looked.append(args) or "refused")
    monkeypatch.setattr(plausible._Lanes, "refusal", lambda *args: looked.append(args) or "refused")
    script = [[block_reading(1, 100 + 10**9 * i, halts=i, hist=(i, 2 * i, 0, 1))] for i in range(6)]
    col = collector([*script, [block_reading(1, 100 + 10**9 * 5, halts=5, hist=(5, 10, 0, 1))]])
    assert all(len(col.sample().vms) == 1 for _ in range(7))
    assert looked == []  # the first reading too: its lanes against the VMM's age
    col = collector([[block_reading(2, U64_MAX)]])
    assert col.sample().vms == [] and len(looked) == 1  # only to name what is refused
