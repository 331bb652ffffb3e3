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

A VM is one series per :class:`VMKey` (pid, process start time, VM fd): a restarted VM is new.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from .model import StatDesc, Stats, StatType, Value, VMIdentity, VMKey, VMReading, combine_stats
from .sources.base import Source


@dataclass
class VMSample:
    identity: VMIdentity
    source: str
    stats: Stats  # VM-level stats plus its vCPUs' summed, like a debugfs <pid>-<fd>/ directory
    vcpus: dict[int, Stats]
    descs: dict[str, StatDesc]


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

    @property
    def vcpu_count(self) -> int:
        return sum(len(vm.vcpus) for vm in self.vms)


@dataclass
class Rates:
    """Per-second rates of cumulative scalar counters between two samples."""

    interval_s: float
    host: dict[str, float] = field(default_factory=dict)
    vms: dict[VMKey, dict[str, float]] = field(default_factory=dict)
    vcpus: dict[tuple[VMKey, int], dict[str, float]] = field(default_factory=dict)


def vm_sample(reading: VMReading) -> VMSample:
    if reading.vm_stats_include_vcpus or not reading.vcpus:
        stats = dict(reading.vm_stats)
    else:
        stats = combine_stats(list(reading.vcpus.values()), reading.descs)
        stats.update(reading.vm_stats)  # a VM-level stat wins over a same-named vCPU sum
    return VMSample(reading.identity, reading.source, stats, reading.vcpus, reading.descs)


def _grow(prev: Value | None, cur: Value) -> Value:
    """The larger of a previous and a current cumulative value (element-wise for histograms)."""
    if prev is None:
        return cur
    if isinstance(cur, int) and isinstance(prev, int):
        return cur if cur >= prev else prev
    if isinstance(cur, tuple) and isinstance(prev, tuple) and len(cur) == len(prev):
        return tuple(c if c >= p else p for c, p in zip(cur, prev))
    return cur


def _add(a: Value | None, b: Value) -> Value:
    if a is None:
        return b
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        return tuple(x + y for x, y in zip(a, b))
    return b  # a histogram that changed shape (new kernel): take the newer one


class HostTotals:
    """Monotonic host totals over VMs that come and go (see the module docstring)."""

    def __init__(self) -> None:
        self._live: dict[VMKey, Stats] = {}  # each live VM's monotonic cumulative contribution
        self._retired: Stats = {}
        self._peaks: dict[str, int] = {}
        self.descs: dict[str, StatDesc] = {}

    def update(self, vms: list[VMSample]) -> tuple[Stats, int]:
        """(host totals, number of VMs retired by this update)."""
        seen = set()
        instant: Stats = {}
        for vm in vms:
            key = vm.identity.key
            seen.add(key)
            contrib = self._live.setdefault(key, {})
            for name, value in vm.stats.items():
                desc = vm.descs.get(name) or self.descs.get(name) or StatDesc(name)
                self.descs.setdefault(name, desc)
                if desc.type is StatType.INSTANT:
                    instant[name] = _add(instant.get(name), value)
                elif desc.type is StatType.PEAK and isinstance(value, int):
                    self._peaks[name] = max(self._peaks.get(name, value), value)
                else:
                    contrib[name] = _grow(contrib.get(name), value)
        gone = [key for key in self._live if key not in seen]
        for key in gone:
            for name, value in self._live.pop(key).items():
                self._retired[name] = _add(self._retired.get(name), value)
        totals: Stats = dict(self._retired)
        for contrib in self._live.values():
            for name, value in contrib.items():
                totals[name] = _add(totals.get(name), value)
        totals.update(instant)
        totals.update(self._peaks)
        return totals, len(gone)


class Collector:
    """Reads a source and produces :class:`Sample` objects; one per call of :meth:`sample`."""

    def __init__(self, source: Source, wall_clock: Callable[[], int] = time.time_ns,
                 mono_clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self._totals = HostTotals()
        self._wall = wall_clock
        self._mono = mono_clock

    def sample(self) -> Sample:
        time_ns, start = self._wall(), self._mono()
        vms = [vm_sample(reading) for reading in self.source.read()]
        host, retired = self._totals.update(vms)
        return Sample(time_ns, start, self.source.name, host, dict(self._totals.descs), vms,
                      self._mono() - start, retired)

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _scalar_rates(prev: Stats, cur: Stats, descs: dict[str, StatDesc], dt: float) -> dict[str, float]:
    rates = {}
    for name, value in cur.items():
        before = prev.get(name)
        desc = descs.get(name)
        if not isinstance(value, int) or not isinstance(before, int):
            continue
        if desc is not None and desc.type is not StatType.CUMULATIVE:
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
