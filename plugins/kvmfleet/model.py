"""The data model shared by every source, the collector and the sinks.

A *source* reads the VMs it can see and returns one :class:`VMReading` per VM. The collector merges
readings, keeps host totals that never go backwards, and derives rates. Values are the kernel's raw
integers (``value = raw * base ** exponent`` in the unit of the descriptor); histograms are tuples of
bucket counts.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Union

# One scalar counter or a histogram (bucket counts, lowest bucket first).
Value = Union[int, tuple[int, ...]]
Stats = Mapping[str, Value]  # a dict, or a StatBlock read from a stats fd


class StatType(enum.IntEnum):
    """KVM_STATS_TYPE_* (include/uapi/linux/kvm.h), bits 0-3 of the descriptor flags."""

    CUMULATIVE = 0
    INSTANT = 1
    PEAK = 2
    LINEAR_HIST = 3
    LOG_HIST = 4

    @property
    def is_histogram(self) -> bool:
        return self in (StatType.LINEAR_HIST, StatType.LOG_HIST)

    @property
    def is_cumulative(self) -> bool:
        """Counters that only grow while the VM lives (histogram buckets do too)."""
        return self in (StatType.CUMULATIVE, StatType.LINEAR_HIST, StatType.LOG_HIST)


class StatUnit(enum.IntEnum):
    """KVM_STATS_UNIT_* >> 4, bits 4-7 of the descriptor flags."""

    NONE = 0
    BYTES = 1
    SECONDS = 2
    CYCLES = 3
    BOOLEAN = 4


@dataclass(frozen=True)
class StatDesc:
    """What one statistic is: the binary stats descriptor minus its offset.

    Sources that do not know types (debugfs) fill in what the kernel's naming and file modes tell
    (see :func:`kvmfleet.sources.debugfs.guess_desc`).
    """

    name: str
    type: StatType = StatType.CUMULATIVE
    unit: StatUnit = StatUnit.NONE
    base: int = 10  # 10 or 2
    exponent: int = 0
    size: int = 1  # number of u64 values: 1 for scalars, buckets for histograms
    bucket_size: int = 0  # linear histograms only

    @property
    def scale(self) -> float:
        """Multiply a raw value by this to get the value in ``unit`` (e.g. ns -> s is 1e-9)."""
        return float(self.base) ** self.exponent

    @property
    def unit_name(self) -> str:
        if self.unit is StatUnit.NONE:
            return ""
        prefix = {(10, -9): "n", (10, -6): "u", (10, -3): "m", (10, 0): "", (2, 10): "Ki", (2, 20): "Mi"}
        return prefix.get((self.base, self.exponent), f"{self.base}^{self.exponent} ") + {
            StatUnit.BYTES: "B",
            StatUnit.SECONDS: "s",
            StatUnit.CYCLES: "cycles",
            StatUnit.BOOLEAN: "bool",
        }[self.unit]


class VMKey(NamedTuple):
    """What makes a VM one series: the VMM process (pid + start time) and the VM fd in it.

    A VM restarted by its manager gets a new pid or start time and so a new key. ``vm_fd`` is the
    number of the ``anon_inode:kvm-vm`` fd in the VMM (the ``<fd>`` of debugfs's ``<pid>-<fd>``), or
    -1 where a source cannot tell (a VMM that closed its VM fd but keeps stats fds).

    A named tuple: keys are hashed thousands of times a sample (per VM and vCPU, in every dict of the
    collector, the gate and the point builder), and a tuple's hash is C, a frozen dataclass's Python.
    """

    pid: int
    start_time: int  # /proc/<pid>/stat field 22, clock ticks since boot
    vm_fd: int = -1


@dataclass(frozen=True)
class VMIdentity:
    key: VMKey
    vmm: str  # "qemu", "firecracker", "cloud-hypervisor", "kvmfleet-guestvmm", or the process comm
    name: str  # from the VMM command line, else "<comm>-<pid>"
    uuid: str | None = None


@dataclass
class VMReading:
    """What one source read of one VM in one sample.

    ``vm_stats`` are the VM-level stats (VM stats fd, or a debugfs ``<pid>-<fd>/`` directory, which
    already holds the vCPU stats summed: then ``vm_stats_include_vcpus`` is true). ``vcpus`` maps a
    vCPU id to its own stats where the source sees vCPUs one by one; ``vcpus_listed`` is how many vCPUs a
    source that does not read them one by one saw (debugfs: the ``vcpuN`` directories), None if it cannot tell.
    """

    identity: VMIdentity
    source: str
    vm_stats: Stats = field(default_factory=dict)
    vcpus: dict[int, Stats] = field(default_factory=dict)
    descs: dict[str, StatDesc] = field(default_factory=dict)
    vm_stats_include_vcpus: bool = False
    vcpus_listed: int | None = None


@dataclass(frozen=True)
class Usability:
    """Whether a source can read on this host, and if not, why, in words an operator can act on."""

    usable: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.usable



# Exit counts by tracepoint, then reason name, each cumulative since the source started counting it:
# {"kvm_userspace_exit": {"KVM_EXIT_HLT": 1000, "KVM_EXIT_IO": 1}, "kvm_exit": {"HLT": 12}}.
# Only reasons seen (count > 0) appear. Reason names come from the tracepoint's own format file.
ReasonCounts = dict[str, dict[str, int]]


@dataclass
class ExitReasonReading:
    """What the exit reasons source read in one sample (:mod:`kvmfleet.exitreasons`).

    ``host``: host-wide counts. ``vms``: per VM, for the VMs the source was asked about and could attribute
    (empty unless per VM is on). ``isa``: the ``isa`` tag of each reason name, ``"vmx"`` or ``"svm"`` for
    ``kvm_exit`` reasons, ``"userspace"`` for ``kvm_userspace_exit`` reasons.
    """

    host: ReasonCounts = field(default_factory=dict)
    vms: dict[VMKey, ReasonCounts] = field(default_factory=dict)
    isa: dict[str, str] = field(default_factory=dict)
