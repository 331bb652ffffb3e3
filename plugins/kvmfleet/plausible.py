"""Values no VMM could have produced, refused before they reach a sample (docs/statistics.md, "Hostile VMMs").

Host totals never go backwards, so one forged counter would stay in them for good; and InfluxDB integers are
signed 64-bit. At every sample, whatever the source (libvirt's values come from QEMU's replies):

* every value (counters, instant and peak values, histogram buckets) must fit a signed 64-bit integer;
* a cumulative counter or histogram bucket may grow at most ``rate_per_second(desc) * (seconds + SLACK_S)``
  since its VM's last accepted reading; a VM's first reading, from zero over the age of its VMM process
  (its counters started at 0 when the VM was made, after the process started). Counters that go down (a
  debugfs file cleared) are left to the host totals, which hold each VM's contribution monotonic.

A reading that fails is refused whole (:meth:`PlausibilityGate.check`) and said once per VM and counter.

Per-sample cost: a stat block whose bytes did not change is one comparison; one that changed is checked at
once as one big integer of 64-bit lanes (int64: top bits; growth: a lane-wise subtraction); only a block
that fails that, a first reading, or a source without blocks is looked at value by value, to name the counter.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Container, Mapping
from typing import Callable, NamedTuple

from . import procfs
from .logsay import SayOnce
from .model import StatDesc, Stats, StatUnit, VMIdentity, VMKey, VMReading
from .statblock import Shape, StatBlock
from .textsafe import terminal_safe

INT64_MAX = (1 << 63) - 1
KVM_MAX_VCPUS = 4096  # x86's KVM_MAX_VCPUS: a VM-wide counter may add up this many vCPUs
# What one vCPU could do in a second, far above what any does: more than one event per nanosecond (a
# VM exit, an emulated instruction, a halt take far longer), a whole second, an 8.6 GHz clock, 128 GiB.
PER_VCPU_SECOND = {StatUnit.NONE: 1 << 30, StatUnit.BOOLEAN: 1 << 30, StatUnit.CYCLES: 1 << 33,
                   StatUnit.BYTES: 1 << 37}
SLACK_S = 1.0  # added to every interval: reads of one sample are not all at the same instant
_LITTLE = sys.byteorder == "little"


def rate_per_second(desc: StatDesc) -> int:
    """The most a cumulative stat of this kind could grow per second of wall time, in its raw unit."""
    if desc.unit is StatUnit.SECONDS:
        per_vcpu = max(1, math.ceil(float(desc.base) ** -desc.exponent))  # one second per second
    else:
        per_vcpu = PER_VCPU_SECOND.get(desc.unit, 1 << 30)
    return KVM_MAX_VCPUS * per_vcpu


class _Lanes:
    """A shape's data block as one integer (``int.from_bytes``, native order): word i is a 64-bit lane."""

    def __init__(self, shape: Shape) -> None:
        def top(words: list[int]) -> int:
            return sum(1 << (self._shift(i) + 63) for i in words)

        self.nwords, self.nbytes = shape.nwords, shape.nwords * 8
        cumulative = [(word, desc) for word, desc in zip(shape.scalar_words, map(shape.descs.get, shape.scalar_names))
                      if desc is not None and desc.type.is_cumulative]
        for name, (start, size) in shape.hists.items():
            cumulative += [(word, shape.descs[name]) for word in range(start, start + size)]
        read = [*shape.scalar_words, *(w for start, size in shape.hists.values() for w in range(start, start + size))]
        self.read_top, self.all_top = top(read), top(list(range(self.nwords)))
        self.cum_top = top([word for word, _ in cumulative])
        self.low_bits = (1 << self.nbytes * 8) - 1 - self.all_top  # a lane's 63 low bits
        rates = [(word, rate_per_second(desc)) for word, desc in cumulative]
        self.rates = sum(rate << self._shift(word) for word, rate in rates)
        self.ones = sum(1 << self._shift(word) for word, _ in rates)
        self.max_seconds = INT64_MAX // max((rate for _, rate in rates), default=1)
        self.limits: dict[int, int] = {}  # whole seconds -> rates * seconds + 1 in each cumulative lane

    def _shift(self, word: int) -> int:
        return 64 * (word if _LITTLE else self.nwords - 1 - word)

    def value(self, data: bytes) -> int:
        return int.from_bytes(data[: self.nbytes], sys.byteorder)

    def within(self, value: int, before: int, seconds: float) -> bool:
        """True if no read lane is past int64 and no cumulative lane grew past its rate over ``seconds``;
        False means: look value by value (a counter that went down fails here too, and passes there)."""
        whole = math.ceil(seconds + SLACK_S)
        if value & self.read_top or whole > self.max_seconds:
            return False
        growth = (value | self.all_top) - before  # before's top bits are clear: no lane borrows from another
        if growth & self.cum_top != self.cum_top:
            return False
        limit = self.limits.get(whole)
        if limit is None:
            if len(self.limits) > 64:
                self.limits.clear()
            limit = self.limits[whole] = self.rates * whole + self.ones  # growth > rate * seconds fails
        return not (growth - limit) & self.cum_top


class _Seen(NamedTuple):
    """One part of a VM (VM stats or a vCPU) as last accepted."""

    stats: Stats
    value: int  # a block's lanes with their top bits cleared, -1 for other mappings
    at: float


def refusal(stats: Stats, before: Stats | None, descs: Mapping[str, StatDesc], seconds: float | None) -> str:
    """Why ``stats`` cannot be, value by value ("" if they can); ``seconds`` None: no bound on growth."""
    for name, value in stats.items():
        values = value if isinstance(value, tuple) else (value,)
        if not all(isinstance(v, int) for v in values):
            return f"{name} is not an integer"
        if values and not 0 <= min(values) <= max(values) <= INT64_MAX:
            return f"{name} = {max(values) if max(values) > INT64_MAX else min(values)} is not a signed 64-bit count"
        desc = descs.get(name)
        if seconds is None or desc is None or not desc.type.is_cumulative:
            continue
        old = before.get(name) if before is not None else None
        olds = (old,) if isinstance(old, int) else old
        if not isinstance(olds, tuple) or len(olds) != len(values):
            olds = (0,) * len(values)  # new, or a histogram that changed shape: from zero
        growth = max((v - o for v, o in zip(values, olds)), default=0)
        limit = rate_per_second(desc) * (seconds + SLACK_S)
        if growth > limit:
            return f"{name} grew by {growth} in {seconds:.1f} s, more than the {limit:.3g} any VM could"
    return ""


class PlausibilityGate:
    """Checks each VM's reading against what it last accepted of that VM, and remembers what it accepts."""

    def __init__(self, say: SayOnce | None = None, uptime_ticks: Callable[[], int] = procfs.uptime_ticks) -> None:
        self.say = say or SayOnce()
        self.refused = 0  # readings refused since the start
        self._uptime_ticks = uptime_ticks
        self._seen: dict[VMKey, dict[int, _Seen]] = {}  # by VM, by part: -1 VM stats, else the vCPU id
        self._lanes: dict[Shape, _Lanes] = {}
        self._said: dict[VMKey, set[str]] = {}

    def check(self, reading: VMReading, now: float) -> bool:
        """True if every value of ``reading`` is plausible at monotonic time ``now``; False: refused, said once."""
        key = reading.identity.key
        seen = self._seen.get(key, {})
        accepted: dict[int, _Seen] = {}
        parts = [(-1, reading.vm_stats)] if reading.vm_stats else []
        for part, stats in [*parts, *reading.vcpus.items()]:
            before = seen.get(part)
            why, value = self._check_part(stats, before, reading.descs, now, key)
            if why:
                self._refuse(reading.identity, "its VM stats" if part < 0 else f"vCPU {part}", why)
                return False
            accepted[part] = _Seen(stats, value, now)
        self._seen[key] = accepted
        return True

    def _check_part(self, stats: Stats, before: _Seen | None, descs: Mapping[str, StatDesc], now: float,
                    key: VMKey) -> tuple[str, int]:
        """(why not, "" if plausible; the lanes to remember). Hot: once per stats fd per sample."""
        data = stats.data if isinstance(stats, StatBlock) else None
        if data is None or not isinstance(stats, StatBlock):
            return refusal(stats, before.stats if before else None, descs, self._seconds(before, now, key)), -1
        lanes = self._lanes.get(stats.shape) or self._lanes.setdefault(stats.shape, _Lanes(stats.shape))
        if len(data) < lanes.nbytes:
            return f"data truncated: {len(data)} of {lanes.nbytes} bytes", -1
        stats.scalars  # noqa: B018  (unpacked now, within this VM's error handling, not later in the host totals)
        old = before.stats if before is not None else None
        if before is not None and isinstance(old, StatBlock) and old.shape is stats.shape and before.value >= 0:
            if data == old.data:
                return "", before.value
            value = lanes.value(data)
            if lanes.within(value, before.value, now - before.at):
                return "", value & lanes.low_bits
        else:
            value = lanes.value(data)
        return refusal(stats, old, descs, self._seconds(before, now, key)), value & lanes.low_bits

    def _seconds(self, before: _Seen | None, now: float, key: VMKey) -> float | None:
        """Since the last accepted reading; for a first one, the age of the VMM process (None if unknown)."""
        if before is not None:
            return now - before.at
        age = (self._uptime_ticks() - key.start_time) / procfs.CLK_TCK
        return age if key.start_time > 0 and age >= 0 else None

    def unreadable(self, identity: VMIdentity, err: Exception) -> None:
        """A reading that could not even be looked at (an error in its values): refused too."""
        self._refuse(identity, "its stats", f"unreadable ({type(err).__name__}: {err})")

    def _refuse(self, identity: VMIdentity, what: str, why: str) -> None:
        self.refused += 1
        key = identity.key
        said = f"refused:{key.pid}:{key.start_time}:{key.vm_fd}:{what}:{why.split(' ', 1)[0]}"
        self._said.setdefault(key, set()).add(said)
        self.say.first(said, f"kvmfleet: VM {terminal_safe(identity.name, 80)} (pid {key.pid}) refused, {what}: "
                             f"{why}; left out of the samples while this lasts, the host totals keep its last "
                             "accepted values")

    def forget_except(self, live: Container[VMKey]) -> None:
        """Drop what is remembered of VMs that are gone."""
        for key in [key for key in self._seen if key not in live]:
            del self._seen[key]
        for key in [key for key in self._said if key not in live]:
            for said in self._said.pop(key):
                self.say.forget(said)
