"""Values no VMM could have produced, refused before they reach a sample (docs/statistics.md, "Hostile VMMs").

Host totals never go backwards, so one forged counter would stay in them for good; and InfluxDB integers are
signed 64-bit. At every sample, whatever the source (libvirt's values come from QEMU's replies):

* every value (counters, instant and peak values, histogram buckets) must fit a signed 64-bit integer;
* a cumulative counter or histogram bucket may grow at most ``rate_per_second(desc) * (seconds + SLACK_S)``
  since its VM's last accepted reading; a VM's first reading, from zero over the age of its VMM process
  (its counters started at 0 when the VM was made, after the process started). Counters that go down (a
  debugfs file cleared) are left to the host totals, which hold each VM's contribution monotonic.

A reading that fails is refused whole (:meth:`PlausibilityGate.check`) and said once per VM and counter.

Per-sample cost: a stat block whose bytes did not change is one comparison (and is not unpacked again); one
that changed, or a first reading, is checked at once as one big integer of 64-bit lanes (int64: top bits;
growth: a lane-wise subtraction); a block is looked at word by word only to name what it refused, and value
by value only for sources without blocks (debugfs, libvirt) or a block whose layout changed.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Container, Iterable, Mapping
from typing import Callable

from . import procfs
from .logsay import SayOnce
from .model import StatDesc, Stats, StatUnit, VMIdentity, VMKey, VMReading
from .statblock import Shape, StatBlock
from .textsafe import for_terminal, shortened

INT64_MAX = (1 << 63) - 1
KVM_MAX_VCPUS = 4096  # x86's KVM_MAX_VCPUS: a VM-wide counter may add up this many vCPUs
# What one vCPU could do in a second, far above what any does: more than one event per nanosecond (a
# VM exit, an emulated instruction or a halt each take far longer), a whole second, an 8.6 GHz clock, 128 GiB.
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


def _past_int64(name: str, value: int) -> str:
    return f"{name} = {value} is not a signed 64-bit count"


def _too_fast(name: str, growth: int, seconds: float, limit: float) -> str:
    return f"{name} grew by {growth} in {seconds:.1f} s, more than the {limit:.3g} any VM could"


class _Lanes:
    """A shape's data block as one integer (``int.from_bytes``, native order): word i is a 64-bit lane."""

    def __init__(self, shape: Shape) -> None:
        self.nwords, self.nbytes = shape.nwords, shape.nwords * 8
        self.unpack = struct.Struct(f"={self.nwords}Q").unpack_from
        named = [(word, name) for word, name in zip(shape.scalar_words, shape.scalar_names)]
        named += [(start + i, f"{name}[{i}]") for name, (start, size) in shape.hists.items() for i in range(size)]
        self.read = [(word, name) for word, name in named]  # every word a stat is read from, and its name
        self.cumulative = [(word, name, rate_per_second(desc)) for word, name in named
                           for desc in [shape.descs[name.split("[", 1)[0]]] if desc.type.is_cumulative]
        self.read_top = self._lanes((word, 1 << 63) for word, _ in self.read)
        self.all_top = self._lanes((word, 1 << 63) for word in range(self.nwords))
        self.cum_top = self._lanes((word, 1 << 63) for word, _, _ in self.cumulative)
        self.low_bits = (1 << self.nbytes * 8) - 1 - self.all_top  # a lane's 63 low bits
        self.padded = self.read_top != self.all_top  # words no stat is read from (a newer kernel's, skipped)
        self.rates = self._lanes((word, rate) for word, _, rate in self.cumulative)
        self.ones = self._lanes((word, 1) for word, _, _ in self.cumulative)
        rates = [rate for _, _, rate in self.cumulative] or [1]
        self.max_seconds = INT64_MAX // max(rates)  # up to here, rate * seconds fits every lane
        self.vacuous_seconds = INT64_MAX // min(rates) + 1  # from here, no growth bound is below int64
        self.limits: dict[int, int] = {}  # whole seconds -> rates * seconds + 1 in each cumulative lane

    def _lanes(self, values: Iterable[tuple[int, int]]) -> int:
        return sum(value << 64 * (word if _LITTLE else self.nwords - 1 - word) for word, value in values)

    def value(self, data: bytes) -> int:
        return int.from_bytes(data if len(data) == self.nbytes else data[: self.nbytes], sys.byteorder)

    def kept(self, value: int) -> int:
        """What to compare the next reading with: ``value`` with every lane's top bit clear (only words no stat
        is read from can have it set, once ``value`` passed :meth:`within`)."""
        return value & self.low_bits if self.padded else value

    def within(self, value: int, before: int, seconds: float | None) -> bool:
        """True if no read lane is past int64 and no cumulative lane grew past its rate over ``seconds`` (None: no
        bound); False means: look value by value (a counter that went down may fail here, and passes there).

        Lane by lane, ``value | top - before - limit`` with a lane's top bit as the guard: it stays set where a
        counter grew by more than its limit. A lane that went down far enough to borrow from the next sets its
        own top bit, so a borrow never hides a jump: the whole block then goes to :meth:`refusal`."""
        whole = math.inf if seconds is None else math.ceil(seconds + SLACK_S)
        if value & self.read_top:
            return False
        if whole > self.max_seconds:
            return whole >= self.vacuous_seconds
        limit = self.limits.get(int(whole))
        if limit is None:
            if len(self.limits) > 64:
                self.limits.clear()
            limit = self.limits[int(whole)] = self.rates * int(whole) + self.ones  # growth > rate * seconds fails
        return not ((value | self.all_top) - before - limit) & self.cum_top

    def refusal(self, data: bytes, before: bytes | None, seconds: float | None) -> str:
        """Why this block cannot be, word by word ("" if it can): names the stat :meth:`within` refused."""
        words = self.unpack(data)
        for word, name in self.read:
            if words[word] > INT64_MAX:
                return _past_int64(name, words[word])
        if seconds is None:
            return ""
        olds = self.unpack(before) if before is not None else (0,) * self.nwords
        for word, name, rate in self.cumulative:
            growth, limit = words[word] - olds[word], rate * (seconds + SLACK_S)
            if growth > limit:
                return _too_fast(name, growth, seconds, limit)
        return ""


# One part of a VM (its VM stats or a vCPU) as last accepted: (stats, a block's lanes with their top bits
# cleared, or -1 for other mappings). A plain tuple: one is made per stats fd per sample.
_Seen = tuple[Stats, int]


def refusal(stats: Stats, before: Stats | None, descs: Mapping[str, StatDesc], seconds: float | None) -> str:
    """Why ``stats`` cannot be, value by value ("" if they can); ``seconds`` None: no bound on growth."""
    for name, value in stats.items():
        values = value if isinstance(value, tuple) else (value,)
        if not all(isinstance(v, int) for v in values):
            return f"{name} is not an integer"
        if values and not 0 <= min(values) <= max(values) <= INT64_MAX:
            return _past_int64(name, max(values) if max(values) > INT64_MAX else min(values))
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
            return _too_fast(name, growth, seconds, limit)
    return ""


class _VMSeen:
    """What was last accepted of one VM, and when (monotonic seconds)."""

    __slots__ = ("at", "parts")

    def __init__(self, at: float) -> None:
        self.at = at
        self.parts: dict[int, _Seen] = {}  # -1: its VM stats; n: vCPU n


class PlausibilityGate:
    """Checks each VM's reading against what it last accepted of that VM, and remembers what it accepts."""

    def __init__(self, say: SayOnce | None = None, uptime_ticks: Callable[[], int] = procfs.uptime_ticks) -> None:
        self.say = say or SayOnce()
        self.refused = 0  # readings refused since the start
        self._uptime_ticks = uptime_ticks
        self._seen: dict[VMKey, _VMSeen] = {}
        self._lanes: dict[Shape, _Lanes] = {}
        self._said: dict[VMKey, set[str]] = {}

    def check(self, reading: VMReading, now: float) -> bool:
        """True if every value of ``reading`` is plausible at monotonic time ``now``; False: refused, said once.
        Hot: a block whose bytes did not change costs one comparison (and is not unpacked again)."""
        key = reading.identity.key
        vm = self._seen.get(key) or self._seen.setdefault(key, _VMSeen(now))
        seen = vm.parts
        accepted: dict[int, _Seen] = {}
        vcpus = reading.vcpus.items()
        for part, stats in [(-1, reading.vm_stats), *vcpus] if reading.vm_stats else vcpus:
            before = seen.get(part)
            if before is not None and isinstance(stats, StatBlock) and stats.same_data_as(before[0]):
                accepted[part] = (stats, before[1])  # the new block: the old one can go
                continue
            seconds = now - vm.at if before is not None else self._age(key)
            why, value = self._check_part(stats, before, reading.descs, seconds)
            if why:
                self._refuse(reading.identity, "its VM stats" if part < 0 else f"vCPU {part}", why)
                return False
            accepted[part] = (stats, value)
        vm.at, vm.parts = now, accepted
        return True

    def _check_part(self, stats: Stats, before: _Seen | None, descs: Mapping[str, StatDesc],
                    seconds: float | None) -> tuple[str, int]:
        """(why not, "" if plausible; the lanes to remember) of stats that changed since ``seconds`` ago."""
        old = before[0] if before is not None else None
        data = stats.data if isinstance(stats, StatBlock) else None
        if data is None or not isinstance(stats, StatBlock):
            return refusal(stats, old, descs, seconds), -1
        lanes = self._lanes.get(stats.shape) or self._lanes.setdefault(stats.shape, _Lanes(stats.shape))
        if len(data) < lanes.nbytes:
            return f"data truncated: {len(data)} of {lanes.nbytes} bytes", -1
        stats.scalars  # noqa: B018  (unpacked now, within this VM's error handling, not later in the host totals)
        value = lanes.value(data)
        kept = lanes.kept(value)
        if before is not None and not (isinstance(old, StatBlock) and old.shape is stats.shape and before[1] >= 0):
            return refusal(stats, old, descs, seconds), kept  # a new layout: name by name
        if lanes.within(value, before[1] if before is not None else 0, seconds):
            return "", kept
        return lanes.refusal(data, old.data if isinstance(old, StatBlock) else None, seconds), kept

    def _age(self, key: VMKey) -> float | None:
        """Seconds since the VMM process started: what a first reading is bounded by (None if unknown)."""
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
        name = for_terminal(shortened(identity.name, 80))
        self.say.first(said, f"kvmfleet: VM {name} (pid {key.pid}) refused, {what}: {why}; left out of the samples "
                             "while this lasts, the host totals keep its last accepted values")

    def forget_except(self, live: Container[VMKey]) -> None:
        """Drop what is remembered of VMs that are gone."""
        for key in [key for key in self._seen if key not in live]:
            del self._seen[key]
        for key in [key for key in self._said if key not in live]:
            for said in self._said.pop(key):
                self.say.forget(said)
