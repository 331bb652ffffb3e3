"""KVM statistics through libvirt: ``virConnectGetAllDomainStats`` with the VM and vCPU stats groups.

libvirt >= 8.9 with QEMU >= 7.1 passes QEMU's ``query-stats`` through: ``vm.<name>.sum|cur|max`` for the VM
stats, ``vcpu.<n>.<name>.sum|cur|max`` for each vCPU's. This reaches the VM-level counters (``mmu_pte_write``,
``pages_4k``, ...) on hosts where kernel lockdown closes debugfs and the VMM keeps no VM stats fd (every QEMU).

What libvirt does not pass on: units, base and exponent (every value is a bare integer, so descriptors keep
``StatUnit.NONE``, except booleans, which libvirt sends as booleans), and histograms (libvirt 9.0 drops QEMU's
``*_hist`` stats). Its own vCPU fields (``vcpu.<n>.state|time|wait|delay|halted``, ``vcpu.current``,
``vcpu.maximum``) are not KVM statistics and are left out.

The connection is opened once and kept. Every libvirt call runs in a short-lived daemon thread that the sample
waits for at most ``timeout_s``: the client has no call timeout of its own, and a libvirtd that is stopped
(SIGSTOP) or wedged would otherwise hang collectd's read thread for good. A failed or timed-out call drops the
connection; reconnects are tried with a backoff from ``retry_min_s`` to ``retry_max_s``. A close callback would
need a running libvirt event loop, so failures are noticed by the call that fails instead. Connecting runs in the
background too: the first connect is waited for (``timeout_s`` at most), a reconnect for ``RECONNECT_WAIT_S`` only,
and the samples meanwhile go on without libvirt. A socket-activated libvirtd that restarts accepts the connection at
once but answers only once it is up, seconds later: the other sources' samples must not wait for it.

Each domain's identity is its libvirt name and UUID; its :class:`VMKey` is the QEMU process (pid from
``/run/libvirt/qemu/<name>.pid``, else the QEMU whose ``-uuid`` matches), its start time and its
``anon_inode:kvm-vm`` fd, so the key equals the one statsfd and debugfs give the same VM. A domain whose QEMU
cannot be found here (a remote URI) gets pid -1, start time = libvirt's domain id.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Container, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, TypeVar

from .. import procfs
from ..logsay import SayOnce
from ..model import StatDesc, Stats, StatType, StatUnit, Usability, Value, VMIdentity, VMKey, VMReading
from ..textsafe import for_terminal, one_line, shortened
from .base import Source

DEFAULT_URI = "qemu:///system"
NOT_INSTALLED = ("python3-libvirt not installed (a venv sees it only when made with --system-site-packages; "
                 "or pip install libvirt-python where libvirt-dev and a compiler exist)")
# libvirt's VM stats group (and the KVM stats in its vCPU group): libvirt 8.9.0, QEMU 7.1.0
MIN_LIBVIRT = 8_009_000
MIN_QEMU = 7_001_000

SUFFIX_TYPES = {"sum": StatType.CUMULATIVE, "cur": StatType.INSTANT, "max": StatType.PEAK}
# libvirt's own per-vCPU fields in the vCPU group: not KVM statistics
LIBVIRT_VCPU_FIELDS = frozenset({"state", "time", "wait", "delay", "halted"})

T = TypeVar("T")
# what a call run in a thread gave: [(True, result)] or [(False, error)], empty while it runs
_Box = list[tuple[bool, Any]]


def import_libvirt() -> ModuleType | None:
    """The ``libvirt`` binding, or None when it is not installed (or blocked, as tests do)."""
    try:
        import libvirt
    except ImportError:
        return None
    if not hasattr(libvirt, "virConnect"):  # something else named libvirt (a directory on sys.path)
        return None
    # libvirt's default error handler prints every failed call to stderr; errors are reported through
    # the exceptions (and said once) instead
    libvirt.registerErrorHandler(_quiet, None)
    module: ModuleType = libvirt
    return module


def _quiet(_ctx: object, _err: object) -> None:
    """An error handler that prints nothing."""


def version_text(number: int) -> str:
    """libvirt's ``major * 1000000 + minor * 1000 + release`` as ``major.minor.release``."""
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


# -- parsing ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Key:
    """What one typed-parameter key of the stats record means: the VM's stat (vcpu -1) or a vCPU's."""

    vcpu: int
    name: str
    desc: StatDesc


def parse_key(key: str) -> _Key | str | None:
    """A KVM stat key, or None for libvirt's own fields (silently left out), or a string saying why an
    unknown key is skipped."""
    parts = key.split(".")
    scope = parts[0]
    if scope not in ("vm", "vcpu") or key in ("vcpu.current", "vcpu.maximum"):
        return None  # other groups' keys, should a caller ask for them
    if len(parts) < 3:
        return f"unknown key {key!r}"
    if scope == "vm" and len(parts) == 3:
        vcpu, name, suffix = -1, parts[1], parts[2]
    elif scope == "vcpu" and parts[1].isdigit():
        if len(parts) == 3 and parts[2] in LIBVIRT_VCPU_FIELDS:
            return None
        if len(parts) != 4:
            return f"unknown vCPU key {key!r}"
        vcpu, name, suffix = int(parts[1]), parts[2], parts[3]
    else:
        return f"unknown key {key!r}"
    kind = SUFFIX_TYPES.get(suffix)
    if kind is None or not name:
        return f"unknown statistic type {suffix!r} in {key!r}"
    return _Key(vcpu, name, StatDesc(name, kind))


def parse_stats(record: Mapping[str, Any], keys: dict[str, _Key | str | None],
                say: SayOnce) -> tuple[dict[str, Value], dict[int, Stats], dict[str, StatDesc]]:
    """(VM stats, per-vCPU stats, descriptors) from one domain's stats record. ``keys`` caches what each key
    means (the same keys come every sample); odd keys and values are skipped and said once."""
    vm: dict[str, Value] = {}
    vcpus: dict[int, dict[str, Value]] = {}
    descs: dict[str, StatDesc] = {}
    for key, value in record.items():
        meaning = keys.get(key, "")
        if meaning == "":
            meaning = keys[key] = parse_key(key)
        if meaning is None:
            continue
        if isinstance(meaning, str):
            say(f"libvirt-key:{key}", f"kvmfleet: libvirt: {meaning}, skipped")
            continue
        desc = meaning.desc
        if isinstance(value, bool):  # bool first: it is an int too
            if desc.unit is not StatUnit.BOOLEAN:
                desc = StatDesc(desc.name, desc.type, StatUnit.BOOLEAN)
                keys[key] = _Key(meaning.vcpu, meaning.name, desc)
            value = int(value)
        elif not isinstance(value, int):
            say(f"libvirt-value:{meaning.name}",
                f"kvmfleet: libvirt: {for_terminal(shortened(key, 120))} is a {type(value).__name__} "
                f"({one_line(shortened(repr(value), 80))}), not a counter: skipped")
            continue
        if meaning.vcpu < 0:
            vm[meaning.name] = value
        else:
            vcpus.setdefault(meaning.vcpu, {})[meaning.name] = value
        descs[meaning.name] = desc
    return vm, dict(vcpus), descs


# -- the source ---------------------------------------------------------------------------------
class _Timeout(Exception):
    pass


@dataclass
class _Domain:
    """Where a domain runs on this host (cached per UUID and libvirt domain id: a restart changes the id)."""

    dom_id: int
    identity: VMIdentity


# How long a sample waits for a reconnect (the first connect waits up to timeout_s): a sample that waits for a
# restarting libvirtd costs every other source's counters that interval.
RECONNECT_WAIT_S = 0.25


class LibvirtSource(Source):
    name = "libvirt"

    def __init__(self, uri: str = DEFAULT_URI, say: SayOnce | None = None, proc: str = "/proc",
                 only_pids: Container[int] | None = None, timeout_s: float = 5.0, retry_min_s: float = 1.0,
                 retry_max_s: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 run_dir: str = "/run/libvirt/qemu", optional: bool = False) -> None:
        """``only_pids`` restricts the domains read to those QEMU processes (tests, selftest). ``optional``: a
        part of ``auto``, where a host without libvirtd is normal: why it is unusable is logged at INFO."""
        self.uri = uri
        self.say = say or SayOnce()
        self.proc = proc
        self.only_pids = only_pids
        self.timeout_s = timeout_s
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.run_dir = run_dir
        self._clock = clock
        self._level = logging.INFO if optional else logging.WARNING
        self._lv = import_libvirt()
        self._conn: Any = None
        self._busy: threading.Thread | None = None  # a call that has not come back (libvirtd hung)
        self._connecting: threading.Thread | None = None  # a connect in the background, and when it began
        self._connect_began = 0.0
        self._opened: _Box = []  # what the background connect gave: (ok, (conn, versions) or error)
        self._connected_once = False
        self._next_try = 0.0
        self._delay = retry_min_s
        self._keys: dict[str, _Key | str | None] = {}
        self._domains: dict[str, _Domain] = {}  # by UUID
        self.versions: dict[str, int] = {}  # library, daemon, hypervisor (after a connect)
        self.saw_vm_group = False  # some domain answered with vm.* keys
        if self._lv is None:
            self._usability = Usability(False, NOT_INSTALLED)
        elif not hasattr(self._lv, "VIR_DOMAIN_STATS_VM"):
            self._usability = Usability(False, f"python3-libvirt {version_text(self._lv.getVersion())} has no VM "
                                               f"stats group (needs libvirt >= {version_text(MIN_LIBVIRT)})")
            self._lv = None
        else:
            self._usability = Usability(True, "not read yet")

    def usability(self) -> Usability:
        return self._usability

    # -- calls that cannot hang the caller ---------------------------------------------------------
    @staticmethod
    def _spawn(fn: Callable[..., Any], *args: Any, name: str = "kvmfleet-libvirt") -> tuple[threading.Thread, _Box]:
        """``fn(*args)`` started in a daemon thread; the box gets ``(True, result)`` or ``(False, error)``."""
        box: _Box = []

        def run() -> None:
            try:
                box.append((True, fn(*args)))
            except BaseException as err:  # handed to whoever waits for it
                box.append((False, err))

        worker = threading.Thread(target=run, name=name, daemon=True)
        worker.start()
        return worker, box

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a daemon thread, waited for ``timeout_s`` at most (raises :class:`_Timeout`)."""
        worker, box = self._spawn(fn, *args)
        # a sample costs libvirtd a QMP round trip per domain (about 30 ms each for 50 SeaBIOS domains on a
        # 2-core host): the wait grows with the domains last seen
        timeout = max(self.timeout_s, 0.1 * len(self._domains))
        worker.join(timeout)
        if worker.is_alive():
            self._busy = worker
            raise _Timeout(f"libvirtd did not answer within {timeout:g} s")
        ok, result = box[0]
        if not ok:
            raise result
        return result  # type: ignore[no-any-return]

    def _fail(self, reason: str) -> list[VMReading]:
        """Drop the connection, back off, say why once; the sample goes on without libvirt."""
        conn, self._conn = self._conn, None
        if conn is not None and self._busy is None:
            try:
                conn.close()
            except Exception:  # already broken: nothing to release that close() would
                pass
        self._next_try = self._clock() + self._delay
        self._delay = min(self._delay * 2, self.retry_max_s)
        self._usability = Usability(False, reason)
        self.say("libvirt", f"kvmfleet: libvirt source unusable: {reason}", self._level)
        return []

    def _open(self) -> tuple[Any, dict[str, int]]:
        """In the connect thread: the connection and the versions (a half-open connection is closed on error)."""
        assert self._lv is not None
        conn = self._lv.open(self.uri)
        try:
            return conn, {"library": int(self._lv.getVersion()), "daemon": int(conn.getLibVersion()),
                          "hypervisor": int(conn.getVersion())}
        except BaseException:
            try:
                conn.close()
            except Exception:  # a half-open connection: nothing more to release
                pass
            raise

    def _close_late(self) -> None:
        """Close what a connect given up on (timed out) opened after all, and forget it."""
        for ok, result in self._opened:
            if ok:
                try:
                    result[0].close()
                except Exception:  # nothing more to release
                    pass
        self._opened = []

    def _connect(self) -> bool:
        """Start a connect in the background if none runs, wait for it a little (the first one up to ``timeout_s``),
        and take its result when it is there."""
        if self._connecting is None:
            self._close_late()
            self._connect_began = time.monotonic()
            self._connecting, self._opened = self._spawn(self._open, name="kvmfleet-libvirt-connect")
        elapsed = time.monotonic() - self._connect_began
        wait = self.timeout_s if not self._connected_once else min(RECONNECT_WAIT_S, self.timeout_s)
        self._connecting.join(max(0.0, min(wait, self.timeout_s - elapsed)))
        if self._connecting.is_alive():
            if time.monotonic() - self._connect_began < self.timeout_s:
                self._usability = Usability(False, f"connecting to {self.uri} (libvirtd starting?)")
                return False
            self._busy, self._connecting = self._connecting, None
            self._fail(f"cannot connect to {self.uri}: libvirtd did not answer within {self.timeout_s:g} s")
            return False
        self._connecting = None
        ok, result = self._opened[0]
        if not ok:
            detail = _message(result)
            if self._lv is not None and isinstance(result, self._lv.libvirtError):
                detail += " (is libvirtd running?)"
            self._fail(f"cannot connect to {self.uri}: {detail}")
            return False
        self._conn, self.versions = result
        self._connected_once = True
        daemon, qemu = self.versions["daemon"], self.versions["hypervisor"]
        if daemon < MIN_LIBVIRT or (qemu and qemu < MIN_QEMU):
            self._fail(f"libvirtd {version_text(daemon)} with QEMU {version_text(qemu)} has no VM stats group "
                       f"(needs libvirt >= {version_text(MIN_LIBVIRT)} and QEMU >= {version_text(MIN_QEMU)})")
            return False
        return True

    def _ready(self) -> bool:
        """A live connection, or False with the reason in :meth:`usability` (no waiting: backoff)."""
        if self._lv is None:
            return False
        if self._busy is not None:
            if self._busy.is_alive():
                self._usability = Usability(False, f"a libvirt call has not come back after {self.timeout_s:g} s "
                                                   f"(libvirtd hung?); not calling again until it does")
                return False
            self._busy = None
        if self._conn is None:
            if self._connecting is None and self._clock() < self._next_try:
                return False
            if not self._connect():
                return False
        return True

    # -- reading ---------------------------------------------------------------------------------
    def read(self) -> list[VMReading]:
        return self.read_groups()

    def read_groups(self, vcpus_for: Callable[[int], bool] | None = None) -> list[VMReading]:
        """One reading per running domain with KVM stats. ``vcpus_for(pid)`` false: that domain's vCPU stats are
        not asked (the caller reads them cheaper elsewhere); then the VM group comes in one call and the vCPU
        group for the others in a second. Never raises."""
        if not self._ready():
            return []
        lv = self._lv
        assert lv is not None
        vm_group, vcpu_group = lv.VIR_DOMAIN_STATS_VM, lv.VIR_DOMAIN_STATS_VCPU
        active = lv.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
        conn = self._conn
        try:
            if self.only_pids is None and vcpus_for is None:
                records = self._call(conn.getAllDomainStats, vm_group | vcpu_group, active)
            else:
                records = self._read_split(vcpus_for)
        except _Timeout as err:
            return self._fail(str(err))
        except lv.libvirtError as err:
            return self._fail(f"reading {self.uri} failed: {_message(err)}")
        self._delay = self.retry_min_s
        self.say.forget("libvirt")
        readings = self._readings(records)
        self._usability = Usability(True, f"{len(readings)} domains with KVM stats" if readings
                                    else "no running domains with KVM stats")
        return readings

    def _read_split(self, vcpus_for: Callable[[int], bool] | None) -> list[tuple[Any, dict[str, Any]]]:
        lv = self._lv
        assert lv is not None
        conn = self._conn
        domains = self._call(conn.listAllDomains, lv.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        if self.only_pids is not None:
            domains = [dom for dom in domains if self._domain(dom).identity.key.pid in self.only_pids]
        if not domains:
            return []
        want_vcpus = [dom for dom in domains if vcpus_for is None or vcpus_for(self._domain(dom).identity.key.pid)]
        if len(want_vcpus) == len(domains):
            return list(self._call(conn.domainListGetStats, domains, lv.VIR_DOMAIN_STATS_VM | lv.VIR_DOMAIN_STATS_VCPU))
        records = {dom.UUIDString(): (dom, stats)
                   for dom, stats in self._call(conn.domainListGetStats, domains, lv.VIR_DOMAIN_STATS_VM)}
        if want_vcpus:
            for dom, stats in self._call(conn.domainListGetStats, want_vcpus, lv.VIR_DOMAIN_STATS_VCPU):
                uuid = dom.UUIDString()
                if uuid in records:
                    records[uuid][1].update(stats)
        return list(records.values())

    def _readings(self, records: list[tuple[Any, dict[str, Any]]]) -> list[VMReading]:
        readings = []
        seen: set[str] = set()
        for dom, record in records:
            try:
                found = self._domain(dom)
            except Exception as err:  # a domain that went away between the call and here
                self.say(f"libvirt-domain:{err}", f"kvmfleet: libvirt: a domain could not be placed, skipped: {err}")
                continue
            key = found.identity.key
            if self.only_pids is not None and key.pid not in self.only_pids:
                continue
            seen.add(found.identity.uuid or "")
            vm, vcpus, descs = parse_stats(record, self._keys, self.say)
            if not vm and not vcpus:
                self.say(f"libvirt-empty:{found.identity.name}",
                         f"kvmfleet: libvirt domain {for_terminal(shortened(found.identity.name, 80))} gives no KVM "
                         "stats (QEMU < 7.1, or not a KVM domain)")
                continue
            self.saw_vm_group = self.saw_vm_group or bool(vm)
            readings.append(VMReading(found.identity, self.name, vm, vcpus, descs))
        for uuid in [uuid for uuid in self._domains if uuid not in seen]:
            del self._domains[uuid]
        return readings

    # -- where a domain runs ---------------------------------------------------------------------
    def _domain(self, dom: Any) -> _Domain:
        uuid, dom_id = dom.UUIDString(), dom.ID()  # both local to the binding: no libvirtd round trip
        cached = self._domains.get(uuid)
        if cached is not None and cached.dom_id == dom_id:
            return cached
        name = dom.name()
        pid = self._qemu_pid(name, uuid)
        started = procfs.start_time(pid, self.proc) if pid > 0 else None
        key = VMKey(-1, dom_id, -1) if pid <= 0 or started is None else VMKey(pid, started, self._vm_fd(pid))
        found = self._domains[uuid] = _Domain(dom_id, VMIdentity(key, "qemu", name, uuid))
        return found

    def _qemu_pid(self, name: str, uuid: str) -> int:
        try:
            with open(os.path.join(self.run_dir, f"{name}.pid")) as handle:
                pid = int(handle.read().strip())
            if f"-uuid\0{uuid}\0" in "\0".join(procfs.cmdline(pid, self.proc)) + "\0":
                return pid
        except (OSError, ValueError):
            pass
        for pid in procfs.pids(self.proc):  # a session URI, another run dir: find QEMU by its -uuid
            try:
                argv = procfs.cmdline(pid, self.proc)
            except OSError:
                continue
            if "-uuid" in argv and uuid in argv and "qemu" in os.path.basename(argv[0] if argv else ""):
                return pid
        return -1

    def _vm_fd(self, pid: int) -> int:
        try:
            return next((kfd.fd for kfd in procfs.kvm_fds(pid, self.proc) if kfd.kind == "vm"), -1)
        except OSError:
            return -1

    def facts(self) -> dict[str, Any]:
        """Versions, URI, whether the VM stats group is supported, usability: for ``kvmfleet facts``."""
        versions = {name: version_text(number) if number else None for name, number in self.versions.items()}
        if self._lv is not None and "library" not in versions:
            versions["library"] = version_text(self._lv.getVersion())
        if self.saw_vm_group:
            vm_group: str = "yes (a running domain answered with vm.* stats)"
        elif self.versions.get("daemon"):
            ok = self.versions["daemon"] >= MIN_LIBVIRT and self.versions.get("hypervisor", 0) >= MIN_QEMU
            vm_group = (f"{'yes' if ok else 'no'} by version (libvirt >= {version_text(MIN_LIBVIRT)} and QEMU >= "
                        f"{version_text(MIN_QEMU)}; no running domain answered)")
        else:
            vm_group = "unknown (not connected)"
        state = self.usability()
        return {"uri": self.uri, "library_version": versions.get("library"),
                "daemon_version": versions.get("daemon"), "hypervisor_version": versions.get("hypervisor"),
                "vm_stats_group": vm_group, "usable": state.usable, "reason": state.reason}

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._busy is None:
            try:
                self._call(conn.close)
            except Exception as err:  # closing a dead connection: nothing more to do
                self.say("libvirt-close", f"kvmfleet: closing the libvirt connection: {err}")


def _message(err: Exception) -> str:
    get = getattr(err, "get_error_message", None)
    text = get() if callable(get) else None
    return str(text or err)
