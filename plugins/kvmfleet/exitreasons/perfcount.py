"""Count tracepoint hits by reason the way ``kvm_stat -t`` does: one filtered counting perf event per reason.

Host-wide: one event per (tracepoint, reason code, online CPU), ``pid=-1``, with the tracepoint filter
``"<reason field> == <code>"`` (kvm_exit: ``&& isa == <isa>`` when both isa tables are counted). Per process: one
event per (tracepoint, reason code, thread of ``/proc/<pid>/task``) with ``inherit`` set, so that threads the
process starts later (a VMM's vCPU threads) are counted from their birth by the copies the kernel gives them,
without new fds; a thread that exits keeps its fd (its count stays readable; the copies' counts fold into their
parent's) until its process is no longer asked about. The cost is fds: (reasons x CPUs) host-wide plus
(reasons x threads at first ask) per process, bounded by ``max_fds``. Counts are 8-byte reads of each fd.

What it cannot count: a thread created while the events of its process are being opened (at the first ask
only: about a millisecond) by a thread whose events are not open yet is missed; CPUs brought online later.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import struct
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from .. import cpulist, procfs
from ..logsay import SayOnce
from . import perfevent
from .counter import Counts, ExitCounter, ReasonKey, TracepointSpec

FD_MARGIN = 64  # fds kept free for everything else the process opens (sockets, /proc files)


class PerfCountError(OSError):
    """The host-wide events cannot all be opened: the counter is unusable; ``str()`` says why."""


@dataclass(frozen=True)
class CountedReason:
    """One reason to count: its key, the tracepoint it comes from, and the filter that selects it."""

    key: ReasonKey
    spec: TracepointSpec
    filter: str


def reasons_to_count(spec: TracepointSpec, codes: Iterable[tuple[int, int]], filter_isa: bool) -> list[CountedReason]:
    """The reasons of ``spec`` for ``codes`` ((isa, code) pairs; isa 0 for tracepoints without one): the filter
    names the isa too when ``filter_isa`` (both kvm_exit tables counted: code 0 is a VMX and an SVM reason)."""
    reasons = []
    for isa, code in codes:
        text = f"{spec.reason_field} == {code}"
        if filter_isa and spec.isa_offset is not None:
            text += f" && isa == {isa}"
        reasons.append(CountedReason((spec.name, isa, code), spec, text))
    return reasons


def open_filtered(reason: CountedReason, pid: int, cpu: int, inherit: bool = False) -> int:
    """An enabled counting event for ``reason``; nothing left open on failure."""
    fd = perfevent.tracepoint_event(reason.spec.event_id, pid, cpu, inherit=inherit, name=reason.spec.name)
    try:
        fcntl.ioctl(fd, perfevent.PERF_EVENT_IOC_SET_FILTER, reason.filter.encode() + b"\0")
        fcntl.ioctl(fd, perfevent.PERF_EVENT_IOC_ENABLE, 0)
    except OSError as err:
        os.close(fd)
        raise OSError(err.errno, f"filter {reason.filter!r} of {reason.spec.name}: {err.strerror}") from err
    return fd


def read_count(fd: int) -> int:
    return int(struct.unpack("=Q", os.read(fd, 8))[0])


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def make_room(needed: int) -> bool:
    """Raise the soft RLIMIT_NOFILE (up to the hard one, as kvm_stat does) so that ``needed`` more fds fit."""
    want = open_fd_count() + needed + FD_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or want <= soft:
        return True
    if hard != resource.RLIM_INFINITY and want > hard:
        return False
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return True


@dataclass
class _Process:
    """The events of one process: (key, fd) of each of its threads at first ask, and its start time."""

    start_time: int | None
    fds: list[tuple[ReasonKey, int]]


class PerfCountCounter(ExitCounter):
    """kvm_stat's mechanism (module docstring). Raises :class:`PerfCountError` when the host-wide events do not
    all open (or do not fit ``max_fds`` / RLIMIT_NOFILE): never silently partial."""

    name = "perf-count"

    def __init__(self, reasons: Sequence[CountedReason], *, per_process: bool = False, max_fds: int = 4096,
                 say: SayOnce | None = None, cpus: Sequence[int] | None = None) -> None:
        self.reasons = list(reasons)
        self.per_process = per_process
        self.max_fds = max_fds
        self._say = say or SayOnce()
        self._host: list[tuple[ReasonKey, int]] = []
        self._procs: dict[int, _Process] = {}
        self._refused: set[int] = set()  # pids left uncounted (budget, rights): not retried while asked about
        try:
            cpu_list = list(cpus) if cpus is not None else cpulist.read()
        except (OSError, ValueError) as err:
            raise PerfCountError(f"cannot tell the online CPUs ({err})") from None
        needed = len(self.reasons) * len(cpu_list)
        if needed > max_fds:
            raise PerfCountError(f"counting {len(self.reasons)} reasons on {len(cpu_list)} CPUs needs {needed} perf "
                                 f"fds, more than the budget of {max_fds} (max_fds)")
        if not make_room(needed):
            raise PerfCountError(f"counting {len(self.reasons)} reasons on {len(cpu_list)} CPUs needs {needed} perf "
                                 f"fds, more than RLIMIT_NOFILE's hard limit allows ({open_fd_count()} open)")
        try:
            for reason in self.reasons:
                for cpu in cpu_list:
                    self._host.append((reason.key, open_filtered(reason, -1, cpu)))
        except OSError as err:
            self.close()
            raise PerfCountError(err.errno, f"{err.strerror} (CPU-wide event on {reason.spec.name}, CPU {cpu})"
                                 ) from None

    def fds(self) -> int:
        return len(self._host) + sum(len(proc.fds) for proc in self._procs.values())

    def read(self, pids: Collection[int] = ()) -> tuple[Counts, dict[int, Counts]]:
        host = _sum_counts(self._host)
        asked = set(pids) if self.per_process else set()
        for pid in set(self._procs) - asked:
            self._forget(pid)
        self._refused &= asked
        per_pid: dict[int, Counts] = {}
        for pid in sorted(asked):
            proc = self._procs.get(pid)
            if proc is not None and procfs.start_time(pid) not in (None, proc.start_time):
                self._forget(pid)  # the pid now names another process (gone: its counts stay readable)
                proc = None
            if proc is None and pid not in self._refused:
                proc = self._open_process(pid)
            if proc is not None:
                per_pid[pid] = _sum_counts(proc.fds)
        return host, per_pid

    def _open_process(self, pid: int) -> _Process | None:
        try:
            start = procfs.start_time(pid)
            tids = sorted(int(name) for name in os.listdir(f"/proc/{pid}/task"))
        except OSError:
            return None  # gone: nothing to count
        if start is None:
            return None
        needed = len(tids) * len(self.reasons)
        if self.fds() + needed > self.max_fds or not make_room(needed):
            self._refused.add(pid)
            self._say.first("perfcount-budget", f"exit reasons: per-process counting is off for pid {pid} (and any "
                            f"other process beyond the budget): its {len(tids)} threads need {needed} perf fds, "
                            f"{self.fds()} of max_fds {self.max_fds} are in use")
            return None
        proc = _Process(start, [])
        self._procs[pid] = proc
        for tid in tids:
            for reason in self.reasons:
                try:
                    proc.fds.append((reason.key, open_filtered(reason, tid, -1, inherit=True)))
                except OSError as err:
                    if err.errno == errno.ESRCH:
                        break  # the thread exited: its hits are in no count we could still open
                    self._forget(pid)
                    self._refused.add(pid)
                    self._say(f"perfcount-pid-{pid}", f"exit reasons: cannot count pid {pid} ({err})")
                    return None
        return proc

    def _forget(self, pid: int) -> None:
        proc = self._procs.pop(pid, None)
        if proc is not None:
            _close_all(proc.fds)

    def close(self) -> None:
        for pid in list(self._procs):
            self._forget(pid)
        _close_all(self._host)
        self._host = []


def _sum_counts(fds: Iterable[tuple[ReasonKey, int]]) -> Counts:
    counts: Counts = {}
    for key, fd in fds:
        value = read_count(fd)
        if value:
            counts[key] = counts.get(key, 0) + value
    return counts


def _close_all(fds: list[tuple[ReasonKey, int]]) -> None:
    for _, fd in fds:
        os.close(fd)
    fds.clear()
