"""The exit reasons source: counts of ``kvm:kvm_exit`` and ``kvm:kvm_userspace_exit`` by reason name.

It reads both tracepoints' format files (:mod:`.tracefmt`), opens a mechanism (:mod:`.bpf` when it loads,
else :mod:`.perfcount`), and turns the mechanism's counts by code into counts by the names the format files
give. Per VM, a VM is its VMM process: its pid must still be the process of the VMKey (start time), and a
process holding several VMs cannot be split between them (their VMs get no per-VM counts).

:func:`probe` says whether the source can work on this host and, if not, why, in operator words.
"""

from __future__ import annotations

import errno
import importlib
import inspect
import logging
import os
import re
import struct
from collections.abc import Sequence
from typing import Any

from .. import procfs
from ..logsay import SayOnce
from ..model import ExitReasonReading, ReasonCounts, Usability, VMKey
from .counter import Counts, ExitCounter, ReasonKey, TracepointSpec
from .perfcount import CountedReason, PerfCountCounter, reasons_to_count
from .perfevent import tracepoint_event
from .tracefmt import FormatError, TracepointFormat, find_tracing_root, read_format

# (tracepoint as tracefs names it, the field holding the reason)
TRACEPOINTS = (("kvm/kvm_exit", "exit_reason"), ("kvm/kvm_userspace_exit", "reason"))
ISA_NAMES = {1: "vmx", 2: "svm"}
USERSPACE_ISA = "userspace"
MECHANISMS = ("auto", "bpf", "perf-count")
CAP_SYS_ADMIN, CAP_PERFMON = 21, 38  # bits of CapEff (include/uapi/linux/capability.h)
PARANOID_FILE = "proc/sys/kernel/perf_event_paranoid"
LOCKDOWN_FILE = "sys/kernel/security/lockdown"


def host_isa(cpuinfo: str = "/proc/cpuinfo") -> int | None:
    """1 (VMX) or 2 (SVM) from the CPU flags; None when neither is there (a PVM host, or unreadable)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as file:
            for line in file:
                if line.startswith("flags"):
                    flags = set(line.partition(":")[2].split())
                    return 1 if "vmx" in flags else 2 if "svm" in flags else None
    except OSError:
        return None
    return None


class ReasonNames:
    """Names the counts' codes from the format files; ``unknown_<code>`` for a code no table names."""

    def __init__(self, formats: dict[str, TracepointFormat], say: SayOnce) -> None:
        self.formats = formats
        self._say = say

    def name(self, key: ReasonKey) -> tuple[str, str]:
        """(reason name, isa tag) of ``key``."""
        tracepoint, isa, code = key
        fmt = self.formats[tracepoint]
        table_key = isa if isa in fmt.tables else None
        table = fmt.tables.get(table_key, {})
        mask = fmt.value_masks.get(table_key)
        name = table.get(code & mask if mask is not None else code)  # VMX: the high bits are flags
        tag = ISA_NAMES.get(isa, f"isa{isa}") if tracepoint == "kvm_exit" else USERSPACE_ISA
        if name is None:
            name = f"unknown_{code}"
            self._say.first(f"exitreasons-unknown-{tracepoint}-{isa}-{code}",
                            f"exit reasons: {tracepoint} code {code} (isa {isa}) has no name in its format file: "
                            f"counted as {name}")
        return name, tag

    def counts(self, counts: Counts, isa_tags: dict[str, str]) -> ReasonCounts:
        named: ReasonCounts = {}
        for key, value in counts.items():
            name, tag = self.name(key)
            by_name = named.setdefault(key[0], {})
            by_name[name] = by_name.get(name, 0) + value
            isa_tags[name] = tag
        return named


def read_formats(root: str | None = None) -> dict[str, TracepointFormat]:
    """Both tracepoints' formats by tracepoint name; :class:`FormatError` naming the one that fails."""
    return {path.rsplit("/", 1)[1]: read_format(path, root) for path, _ in TRACEPOINTS}


def counted_reasons(formats: dict[str, TracepointFormat], isa: int | None) -> list[CountedReason]:
    """What perf-count opens: every named code of kvm_userspace_exit; kvm_exit's codes of the host's isa, or of
    both isas filtered by isa when the CPU flags name neither (a PVM host: kvm_exit does not fire there)."""
    reasons: list[CountedReason] = []
    for path, field_name in TRACEPOINTS:
        fmt = formats[path.rsplit("/", 1)[1]]
        spec = fmt.spec(field_name)
        if spec.isa_offset is None or set(fmt.tables) == {None}:
            reasons += reasons_to_count(spec, [(0, code) for code in fmt.tables.get(None, {})], False)
            continue
        isas: list[int] = ([isa] if isa is not None and isa in fmt.tables
                           else sorted(k for k in fmt.tables if k is not None))
        codes = [(table_isa, code) for table_isa in isas for code in fmt.tables[table_isa]]
        reasons += reasons_to_count(spec, codes, len(isas) > 1)
    return reasons


class ExitReasonSource:
    """Exits by reason, host-wide and (``per_vm``) per VM; see the module docstring. Construction raises only
    on an unknown ``mechanism`` (ValueError, a config error); otherwise :meth:`usability` says whether it counts."""

    def __init__(self, *, per_vm: bool = False, mechanism: str = "auto", max_fds: int = 4096,
                 say: SayOnce | None = None, root: str | None = None) -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(f"exit reasons mechanism {mechanism!r}: expected one of {', '.join(MECHANISMS)}")
        self.per_vm = per_vm
        self._say = say or SayOnce()
        self._counter: ExitCounter | None = None
        self._names: ReasonNames | None = None
        self._usability = Usability(True)
        try:
            formats = read_formats(root)
            self._names = ReasonNames(formats, self._say)
            self._counter = self._open(mechanism, formats, max_fds)
        except OSError as err:
            self._fail(f"exit reasons cannot be counted: {err}")

    @property
    def mechanism_name(self) -> str:
        return self._counter.name if self._counter is not None else "none"

    def _open(self, mechanism: str, formats: dict[str, TracepointFormat], max_fds: int) -> ExitCounter:
        if mechanism in ("auto", "bpf"):
            specs: list[TracepointSpec] = [formats[path.rsplit("/", 1)[1]].spec(field_name)
                                           for path, field_name in TRACEPOINTS]
            try:
                bpf: Any = importlib.import_module(".bpf", __package__)
                takes_say = "say" in inspect.signature(bpf.BpfExitCounter).parameters  # lost hits said once
                counter: ExitCounter = bpf.BpfExitCounter(specs, per_process=self.per_vm,
                                                          **({"say": self._say} if takes_say else {}))
                return counter
            except (ImportError, OSError) as err:
                if mechanism == "bpf":
                    raise OSError(getattr(err, "errno", None) or errno.ENOSYS, f"bpf mechanism: {err}") from err
                self._say("exitreasons-bpf", f"exit reasons: the bpf mechanism is not usable ({err}); "
                          "counting with perf-count (one perf event per reason and CPU)", logging.INFO)
        return PerfCountCounter(counted_reasons(formats, host_isa()), per_process=self.per_vm, max_fds=max_fds,
                                say=self._say)

    def _fail(self, reason: str) -> None:
        self._usability = Usability(False, reason)
        self._say("exitreasons-unusable", reason)
        self.close()

    def usability(self) -> Usability:
        return self._usability

    def fds(self) -> int:
        return self._counter.fds() if self._counter is not None else 0

    def read(self, vms: Sequence[VMKey]) -> ExitReasonReading:
        """Counts since the source opened (host-wide) and since each VM was first asked about (per VM)."""
        if self._counter is None or self._names is None:
            return ExitReasonReading()
        by_pid = self._attributable(vms) if self.per_vm else {}
        try:
            host, per_pid = self._counter.read(list(by_pid))
        except (OSError, ValueError, struct.error) as err:  # struct.error: a short read of a count
            self._fail(f"exit reasons stopped: {self.mechanism_name} failed ({err})")
            return ExitReasonReading()
        reading = ExitReasonReading()
        reading.host = self._names.counts(host, reading.isa)
        for pid, key in by_pid.items():
            if pid in per_pid:
                reading.vms[key] = self._names.counts(per_pid[pid], reading.isa)
        return reading

    def _attributable(self, vms: Sequence[VMKey]) -> dict[int, VMKey]:
        """The pid of each VM that per-VM counts can be given to: its VMKey still names the process of that pid
        (or the process is gone: the counts of a VMM that exited stay readable while it is asked about), and that
        process holds no other VM of ``vms``."""
        keys_by_pid: dict[int, set[VMKey]] = {}
        for key in vms:
            keys_by_pid.setdefault(key.pid, set()).add(key)
        by_pid: dict[int, VMKey] = {}
        for pid, keys in keys_by_pid.items():
            if len(keys) > 1:
                self._say.first(f"exitreasons-shared-{pid}", f"exit reasons: pid {pid} runs {len(keys)} VMs, "
                                "whose exits cannot be told apart: none of them gets per-VM counts", logging.INFO)
                continue
            key = next(iter(keys))
            try:
                started = procfs.start_time(pid)
            except OSError:
                started = None
            if started in (None, key.start_time):  # gone: the counts its events kept, if any
                by_pid[pid] = key
        return by_pid

    def close(self) -> None:
        if self._counter is not None:
            try:
                self._counter.close()
            finally:
                self._counter = None

    def __enter__(self) -> ExitReasonSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# Whether the source can work here.


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return file.read()
    except OSError:
        return None


def probe(root: str | None = None, *, fs_root: str = "/") -> Usability:
    """Whether the exit reasons source can count here (host-wide), and if not, why. ``root``: the tracing root
    (default: found); ``fs_root``: where /proc and /sys are (a fake tree in tests: nothing is opened there)."""
    def path(rel: str) -> str:
        return os.path.join(fs_root, rel)

    live = os.path.abspath(fs_root) == "/"
    lockdown = re.search(r"\[(\w+)\]", _read_text(path(LOCKDOWN_FILE)) or "")
    if lockdown and lockdown.group(1) == "confidentiality":
        return Usability(False, "kernel lockdown is 'confidentiality': it locks tracefs, where the tracepoints' "
                                "ids and reason names are read (boot with lockdown=integrity or none to count exit "
                                "reasons)")
    if root is None:
        candidates = [path("sys/kernel/tracing"), path("sys/kernel/debug/tracing")]
        root = next((c for c in candidates if os.path.isdir(os.path.join(c, "events"))), None)
        if root is None:
            return Usability(False, "no tracefs: mount it (mount -t tracefs nodev /sys/kernel/tracing) or debugfs "
                                    "(mount -t debugfs none /sys/kernel/debug)")
    try:
        formats = read_formats(root)
    except FormatError as err:
        if err.errno == errno.ENOENT:
            return Usability(False, f"the kvm tracepoints are missing ({err}): is the kvm module loaded?")
        if err.errno in (errno.EACCES, errno.EPERM):
            return Usability(False, f"tracefs is not readable for this user ({err}): run as root")
        return Usability(False, str(err))
    paranoid_text = (_read_text(path(PARANOID_FILE)) or "").strip()
    paranoid = int(paranoid_text) if re.fullmatch(r"-?\d+", paranoid_text) else None
    status = procfs.status_fields(_read_text(path("proc/self/status")) or "")
    perfmon = bool(procfs.has_any_cap(status.get("CapEff"), CAP_PERFMON, CAP_SYS_ADMIN))
    if paranoid is not None and paranoid > 0 and not perfmon:
        return Usability(False, f"perf_event_paranoid is {paranoid} (> 0: CPU-wide perf events need CAP_PERFMON "
                                "or CAP_SYS_ADMIN) and this process has neither (CapEff "
                                f"{status.get('CapEff', 'unreadable')}): run as root, grant CAP_PERFMON, or set "
                                "kernel.perf_event_paranoid=0")
    if live:
        event_id = formats["kvm_userspace_exit"].event_id
        try:
            os.close(tracepoint_event(event_id, -1, 0, name="kvm_userspace_exit"))
        except OSError as err:
            name = errno.errorcode.get(err.errno or 0, str(err.errno))
            return Usability(False, f"perf_event_open on kvm:kvm_userspace_exit fails ({name}: {err.strerror})")
    return Usability(True)


def facts_group(fs_root: str = "/") -> dict[str, Any]:
    """The ``exit_reasons`` group of ``kvmfleet facts``: usable, reason, the mechanism the source would use,
    the tracepoints found. The mechanism is tried only on the live host."""
    tracing = find_tracing_root() if os.path.abspath(fs_root) == "/" else None
    if tracing is None and os.path.abspath(fs_root) != "/":
        tracing = next((c for c in (os.path.join(fs_root, "sys/kernel/tracing"),
                                    os.path.join(fs_root, "sys/kernel/debug/tracing"))
                        if os.path.isdir(os.path.join(c, "events"))), None)
    found = [f"kvm:{path.rsplit('/', 1)[1]}" for path, _ in TRACEPOINTS
             if tracing is not None and os.path.exists(os.path.join(tracing, "events", path, "format"))]
    state = probe(tracing, fs_root=fs_root)
    mechanism = None
    if state.usable and os.path.abspath(fs_root) == "/":
        source = ExitReasonSource(say=SayOnce(quiet=True), root=tracing)
        try:
            mechanism = source.mechanism_name if source.usability() else None
            if not source.usability():
                state = source.usability()
        finally:
            source.close()
    return {"usable": state.usable, "reason": state.reason, "mechanism": mechanism, "tracepoints": found}
