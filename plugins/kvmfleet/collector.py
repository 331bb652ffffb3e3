"""Samples: a source's readings turned into per-VM totals, host totals and rates.

Host totals are what kvm_stat shows (the sum over VMs), with two differences that make them
usable as counters in a time series database:

* they start from the current totals of the VMs alive when the collector starts, not from zero;
* they never go backwards when a VM exits: a VM that disappears leaves its last cumulative values
  in a *retired* sum. (kvm_stat's and debugfs's top-level totals drop by a VM's whole history when it
  exits, which a derivative shows as a huge negative rate.)

Per counter type: cumulative counters and histogram buckets are ``retired + sum over live VMs``,
each live VM's contribution held monotonic (a counter read lower than before, e.g. because a vCPU
fd was dropped, counts as its previous value); instant values (``pages_4k``, ``guest_mode``) are
the sum over live VMs; peak values the maximum ever seen.

A VM is one series per :class:`VMKey` (pid, process start time, VM fd): a restarted VM is new. A VM
(or vCPU) that comes back under the same key after it was retired (its fds were dropped for a while, or
its VMM closed and reopened them) is taken back out of the retired sums: it is never counted twice.

A VM's reading with values no VMM could produce (:mod:`kvmfleet.plausible`), or that cannot be read at
all, is refused: the VM is left out of that sample (``Sample.refused`` names it) and the host totals
keep its last accepted values, neither growing nor dropping; the other VMs are counted as usual.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Callable, Protocol, TypeVar

from .logsay import SayOnce
from .model import ExitReasonReading, ReasonCounts, StatDesc, Stats, StatType, Value, VMIdentity, VMKey, VMReading
from .plausible import PlausibilityGate
from .sources.base import Source
from .statblock import MergedStats, StatBlock, add_values, combine, scalar_items, sub_values, sum_blocks

GONE_SAMPLES = 1000  # a VM or vCPU retired this many samples ago is not expected back under its key


@dataclass
class VMSample:
    identity: VMIdentity
    source: str
    stats: Stats  # VM-level stats plus its vCPUs' summed, like a debugfs <pid>-<fd>/ directory
    vcpus: dict[int, Stats]
    descs: Mapping[str, StatDesc]
    parts: tuple[Stats, ...] = ()  # what ``stats`` is made of: VM-level stats, the vCPUs' sum
    vcpus_listed: int | None = None  # vCPUs the source counted without reading them (VMReading.vcpus_listed)
    exit_reasons: ReasonCounts | None = None  # this VM's exits by reason, when the reasons source counts per VM

    @property
    def vcpu_count(self) -> int:
        """The VM's vCPUs: those read one by one, or those listed where there are more (debugfs reads none)."""
        return max(len(self.vcpus), self.vcpus_listed or 0)


@dataclass
class Sample:
    time_ns: int  # wall clock when the read started: the timestamp of every point of this sample
    monotonic: float
    source: str
    host: Stats
    host_descs: dict[str, StatDesc]
    vms: list[VMSample]
    duration_s: float = 0.0
    retired_vms: int = 0  # VMs that vanished since the previous sample
    refused: list[VMIdentity] = field(default_factory=list)  # VMs read but left out: implausible or unreadable
    exit_reasons: ReasonCounts | None = None  # host-wide exits by reason, when a reasons source is on
    reason_isa: dict[str, str] = field(default_factory=dict)  # the isa tag of each reason (ExitReasonReading.isa)

    @property
    def vcpu_count(self) -> int:
        return sum(vm.vcpu_count for vm in self.vms)


@dataclass
class Rates:
    """Per-second rates of cumulative scalar counters between two samples."""

    interval_s: float
    host: dict[str, float] = field(default_factory=dict)
    vms: dict[VMKey, dict[str, float]] = field(default_factory=dict)
    vcpus: dict[tuple[VMKey, int], dict[str, float]] = field(default_factory=dict)


def vm_sample(reading: VMReading) -> VMSample:
    if reading.vm_stats_include_vcpus or not reading.vcpus:
        parts: tuple[Stats, ...] = (reading.vm_stats,)
    else:
        vcpu_sum = combine(list(reading.vcpus.values()), reading.descs)
        # a VM-level stat wins over a same-named vCPU sum
        parts = (reading.vm_stats, vcpu_sum) if reading.vm_stats else (vcpu_sum,)
    stats = parts[0] if len(parts) == 1 else MergedStats(*parts)
    return VMSample(reading.identity, reading.source, stats, reading.vcpus, reading.descs, parts, reading.vcpus_listed)


class HostStats(Mapping[str, Value]):
    """Host totals: scalars computed with the sample, histograms added up on first access."""

    __slots__ = ("_hist", "_hist_names", "scalars")

    def __init__(self, scalars: dict[str, int], hist_names: list[str],
                 hist: Callable[[str], tuple[int, ...]]) -> None:
        self.scalars = scalars
        self._hist_names = [name for name in hist_names if name not in scalars]
        self._hist = hist

    def __getitem__(self, name: str) -> Value:
        if name in self.scalars:
            return self.scalars[name]
        if name in self._hist_names:
            return self._hist(name)
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        yield from self.scalars
        yield from self._hist_names

    def __len__(self) -> int:
        return len(self.scalars) + len(self._hist_names)


K = TypeVar("K")
V = TypeVar("V")


def _drop_older(gone: dict[K, tuple[int, V]], oldest: int) -> None:
    """Drop the entries numbered ``oldest`` or less from the front of ``gone`` (kept in number order)."""
    while gone:
        first = next(iter(gone))
        if gone[first][0] > oldest:
            return
        del gone[first]


class HostTotals:
    """Monotonic host totals over VMs that come and go (see the module docstring)."""

    def __init__(self) -> None:
        self._last: dict[VMKey, VMSample] = {}  # each live VM's latest sample, retired when it goes
        self._retired: dict[str, Value] = {}
        self._peaks: dict[str, int] = {}
        self._floor: dict[str, int] = {}  # cumulative totals never go below what was reported
        self.descs: dict[str, StatDesc] = {}
        self._samples = 0
        self._gone_vms: dict[VMKey, tuple[int, VMSample]] = {}  # retired, by sample number, oldest first
        self._gone_vcpus: dict[tuple[VMKey, int], tuple[int, Stats]] = {}

    def _fold(self, parts: Iterable[Stats], subtract: bool = False) -> None:
        """Add the cumulative values of ``parts`` to the retired sums (or take them back out)."""
        for part in parts:
            for name, value in part.items():
                desc = self.descs.get(name)
                if desc is None or desc.type.is_cumulative:
                    old = self._retired.get(name)
                    self._retired[name] = sub_values(old, value) if subtract and old is not None \
                        else add_values(old, value)

    def update(self, vms: list[VMSample], held: Iterable[VMKey] = ()) -> tuple[Stats, int]:
        """(host totals, number of VMs retired by this update). ``held``: VMs alive but refused this time,
        counted with their last accepted sample (a VM refused before it was ever accepted counts nothing)."""
        vms = vms + [self._last[key] for key in held if key in self._last]
        gone = self._track(vms)
        groups = self._groups(vms)
        scalars = self._scalars(groups)
        hist_names = [name for name, desc in self.descs.items() if desc.type.is_histogram]
        retired_hists = {name: self._retired.get(name) for name in hist_names}

        def hist(name: str) -> tuple[int, ...]:
            total = retired_hists.get(name)
            for group in groups:
                if name in group:
                    total = add_values(total, group[name])
            return total if isinstance(total, tuple) else ()

        return HostStats(scalars, hist_names, hist), gone

    def _track(self, vms: list[VMSample]) -> int:
        """Learn new descriptors, retire the VMs (and vCPUs) that are gone; how many VMs went."""
        for vm in vms:
            if vm.descs is not self._last.get(vm.identity.key, vm).descs or not self.descs:
                for name, vm_desc in vm.descs.items():
                    self.descs.setdefault(name, vm_desc)
        self._samples += 1
        live = {vm.identity.key: vm for vm in vms}
        gone = [key for key in self._last if key not in live]
        for key in gone:
            self._fold(self._last[key].parts)
            self._gone_vms[key] = (self._samples, self._last.pop(key))
        for key, vm in live.items():
            last = self._last.get(key) or self._back(key)
            if vm.source.startswith("debugfs"):
                continue  # its VM stats hold its vCPUs' already: they are detail, never retired alone
            before = last.vcpus if last is not None else {}
            for vcpu in before.keys() - vm.vcpus.keys():  # gone from a live VM (unplugged, fds dropped): keep counts
                self._fold([before[vcpu]])
                self._gone_vcpus[(key, vcpu)] = (self._samples, before[vcpu])
            for vcpu in vm.vcpus.keys() - before.keys():
                gone_vcpu = self._gone_vcpus.pop((key, vcpu), None)
                if gone_vcpu is not None:  # back: its counts are live again, not retired
                    self._fold([gone_vcpu[1]], subtract=True)
        self._last = live
        self._forget_long_gone()
        return len(gone)

    def _back(self, key: VMKey) -> VMSample | None:
        """A VM seen again after it was retired: its last sample, taken back out of the retired sums."""
        gone = self._gone_vms.pop(key, None)
        if gone is None:
            return None
        self._fold(gone[1].parts, subtract=True)
        return gone[1]

    def _forget_long_gone(self) -> None:
        _drop_older(self._gone_vms, self._samples - GONE_SAMPLES)
        _drop_older(self._gone_vcpus, self._samples - GONE_SAMPLES)

    def _groups(self, vms: list[VMSample]) -> list[Stats]:
        """The live VMs' stats summed like with like: parts of one shape column-wise, the rest (debugfs dicts)
        name by name."""
        by_shape: dict[int, list[StatBlock]] = {}
        loose: list[Stats] = []
        for vm in vms:
            for part in vm.parts:
                if isinstance(part, StatBlock):
                    by_shape.setdefault(id(part.shape), []).append(part)
                else:
                    loose.append(part)
        groups: list[Stats] = [sum_blocks(blocks) for blocks in by_shape.values()]
        if loose:
            groups.append(combine(loose, self.descs))
        return groups

    def _scalars(self, groups: list[Stats]) -> dict[str, int]:
        """Host scalar totals: sums (cumulative ones with the retired VMs', never below what was reported), the
        peaks' maximum ever seen."""
        scalars: dict[str, int] = {}
        peaks_now: dict[str, int] = {}
        for group in groups:
            for name, value in scalar_items(group):
                kind = self.descs.get(name)
                if kind is not None and kind.type is StatType.PEAK:
                    peaks_now[name] = max(peaks_now.get(name, value), value)
                else:
                    scalars[name] = scalars.get(name, 0) + value
        for name, value in scalars.items():
            kind = self.descs.get(name)
            if kind is None or kind.type is StatType.CUMULATIVE:
                retired = self._retired.get(name, 0)
                total = value + (retired if isinstance(retired, int) else 0)
                scalars[name] = self._floor[name] = max(total, self._floor.get(name, 0))
        for name, retired in self._retired.items():
            if isinstance(retired, int) and name not in scalars:
                scalars[name] = max(retired, self._floor.get(name, 0))
        for name, value in peaks_now.items():
            self._peaks[name] = max(self._peaks.get(name, value), value)
        scalars.update(self._peaks)
        return scalars


class ReasonSource(Protocol):
    """What the collector needs of an exit reasons source (:class:`kvmfleet.exitreasons.ExitReasonSource`)."""

    def read(self, vms: Sequence[VMKey]) -> ExitReasonReading:
        """Host-wide counts, and per VM for ``vms`` (the VMs of this sample) when counting per VM."""

    def close(self) -> None:
        """Close every perf fd."""


class Collector:
    """Reads a source and produces :class:`Sample` objects; one per call of :meth:`sample`. With ``reasons``,
    each sample also carries the exits by reason (host-wide, and per VM when that source counts per VM)."""

    def __init__(self, source: Source, wall_clock: Callable[[], int] = time.time_ns,
                 mono_clock: Callable[[], float] = time.monotonic, say: SayOnce | None = None,
                 reasons: ReasonSource | None = None) -> None:
        self.source = source
        self.reasons = reasons
        self._totals = HostTotals()
        self.gate = PlausibilityGate(say)
        self._wall = wall_clock
        self._mono = mono_clock

    def sample(self) -> Sample:
        time_ns, start = self._wall(), self._mono()
        vms, refused = self._admit(self.source.read(), start)
        host, retired = self._totals.update(vms, [ident.key for ident in refused])
        sample = Sample(time_ns, start, self.source.name, host, dict(self._totals.descs), vms,
                        self._mono() - start, retired, refused)
        if self.reasons is not None:
            self._add_reasons(sample)
            sample.duration_s = self._mono() - start
        return sample

    def _add_reasons(self, sample: Sample) -> None:
        assert self.reasons is not None
        reading = self.reasons.read([vm.identity.key for vm in sample.vms])
        sample.exit_reasons, sample.reason_isa = reading.host, reading.isa
        for vm in sample.vms:
            vm.exit_reasons = reading.vms.get(vm.identity.key)

    def _admit(self, readings: list[VMReading], now: float) -> tuple[list[VMSample], list[VMIdentity]]:
        """(the readings that pass the plausibility gate, as VM samples; the VMs refused). An error with one VM's
        values is that VM's alone: it is refused, the others are counted."""
        vms, refused = [], []
        for reading in readings:
            try:
                if self.gate.check(reading, now):  # first: stat blocks that did not change are not unpacked again
                    vms.append(vm_sample(reading))
                    continue
            except Exception as err:
                self.gate.unreadable(reading.identity, err)
            refused.append(reading.identity)
        self.gate.forget_except({reading.identity.key for reading in readings})
        return vms, refused

    def close(self) -> None:
        try:
            self.source.close()
        finally:
            if self.reasons is not None:
                self.reasons.close()

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _scalar_rates(prev: Stats, cur: Stats, descs: Mapping[str, StatDesc], dt: float) -> dict[str, float]:
    rates = {}
    for name, value in scalar_items(cur):
        before = prev.get(name)
        desc = descs.get(name)
        if not isinstance(before, int) or (desc is not None and desc.type is not StatType.CUMULATIVE):
            continue
        if value >= before:  # a counter that went down was reset: no rate rather than a wrong one
            rates[name] = (value - before) / dt
    return rates


def rates(prev: Sample, cur: Sample) -> Rates:
    dt = cur.monotonic - prev.monotonic
    if dt <= 0:
        return Rates(0.0)
    out = Rates(dt, _scalar_rates(prev.host, cur.host, cur.host_descs, dt))
    before = {vm.identity.key: vm for vm in prev.vms}
    for vm in cur.vms:
        old = before.get(vm.identity.key)
        if old is None:
            continue  # a new VM (or a restarted one: new key) has no rate yet
        out.vms[vm.identity.key] = _scalar_rates(old.stats, vm.stats, vm.descs, dt)
        for vcpu, stats in vm.vcpus.items():
            if vcpu in old.vcpus:
                out.vcpus[(vm.identity.key, vcpu)] = _scalar_rates(old.vcpus[vcpu], stats, vm.descs, dt)
    return out
