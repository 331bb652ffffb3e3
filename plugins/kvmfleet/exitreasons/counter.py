"""The one interface of the mechanisms that count tracepoint hits by reason (kvm_stat style: small providers).

A mechanism counts hits of a few tracepoints (``kvm:kvm_exit``, ``kvm:kvm_userspace_exit``) by reason code,
host-wide and, when asked, per process (a VMM). It knows nothing of reason names: :mod:`.tracefmt` reads them
from the tracepoints' ``format`` files and :class:`kvmfleet.exitreasons.ExitReasonSource` names the codes.

Two mechanisms implement it, chosen by measurement (docs/exit-reasons.md): :mod:`.bpf` (one tiny BPF program
per tracepoint adds each hit to a per-CPU hash map in the kernel: a few perf fds per CPU whatever the number
of reasons or VMs) and :mod:`.perfcount` (kvm_stat's way: one filtered counting perf event per reason and CPU,
and per reason and thread for a process).
"""

from __future__ import annotations

import abc
from collections.abc import Collection
from dataclasses import dataclass

# (tracepoint name, isa value of the hit (0 for tracepoints without an isa field), reason code as the u32 field
# holds it): e.g. ("kvm_userspace_exit", 0, 5) for KVM_EXIT_HLT, ("kvm_exit", 1, 12) for VMX HLT.
ReasonKey = tuple[str, int, int]
Counts = dict[ReasonKey, int]


@dataclass(frozen=True)
class TracepointSpec:
    """Where a tracepoint's record holds what a mechanism needs (from its ``format`` file)."""

    name: str  # "kvm_exit"
    event_id: int  # the ID: line, perf_event_attr.config for PERF_TYPE_TRACEPOINT
    reason_field: str  # "exit_reason" or "reason"
    reason_offset: int
    reason_size: int  # 4
    isa_offset: int | None = None  # kvm_exit's "isa" field (1 VMX, 2 SVM); None: no isa field
    isa_size: int = 4


class ExitCounter(abc.ABC):
    """Counts hits by :data:`ReasonKey`, host-wide and per process. Counts start at 0 when counting starts."""

    name: str = "?"

    @abc.abstractmethod
    def read(self, pids: Collection[int] = ()) -> tuple[Counts, dict[int, Counts]]:
        """(host-wide counts since the counter opened; per pid of ``pids``, that process's counts since it was
        first asked about, or since the counter opened, by mechanism; only keys with a count > 0). A pid no
        longer asked about is forgotten (its fds, if any, closed; its counts stay in the host-wide ones)."""

    @abc.abstractmethod
    def fds(self) -> int:
        """How many fds the mechanism holds now (perf events, BPF maps and programs)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close every fd."""
