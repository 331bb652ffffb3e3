"""Host facts that decide which KVM statistics can be read here and what they mean.

:func:`gather` reads ``/proc`` and ``/sys`` (through a ``root`` prefix, so tests can point it at a fake
tree) and returns a :class:`HostFacts`: CPU vendor and virtualization flags, the loaded KVM backend and
its parameters, ``/dev/kvm``, kernel lockdown, debugfs, privileges, what the host has for capacity (CPUs online,
memory, KVM's halt-polling and ``nx_huge_pages`` parameters), whether exits can be counted by reason
(:func:`kvmfleet.exitreasons.facts_group`), and the TDP verdict of :mod:`kvmfleet.tdp`:
do the VMs on this host run with two-dimensional paging (Intel EPT / AMD NPT) or on shadow paging? The verdict
matters when reading counters: ``mmu_pte_write``, ``mmu_flooded``, ``mmu_unsync`` and ``invlpg`` only move under
shadow paging (or for nested L2 guests), see ``docs/queries.md`` (the shadow-paging rule).

Nothing here raises on missing, unreadable or garbled files: a fact that cannot be read is recorded as
``"unknown"`` (strings) or ``None`` (booleans and numbers; ``null`` in JSON), and ``why_unknown`` maps the
fact's key to the reason.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import textwrap
from dataclasses import dataclass, field
from typing import Any

from . import borrowrights, cpulist, procfs, words
from .tdp import TDP_UNKNOWN, TdpVerdict, tdp_verdict

UNKNOWN = "unknown"

# KVM backends ("vendor modules") this module knows, in the order we prefer when several are loaded and
# the CPU flags do not settle it. kvm_pvm is the PVM backend (pure software, shadow paging only).
KNOWN_BACKENDS = ("kvm_intel", "kvm_amd", "kvm_pvm")

# Anything bigger than this is not a /proc or /sys file we want; read no further.
_MAX_READ = 16 * 1024 * 1024

LOCKDOWN_FILE = "sys/kernel/security/lockdown"
CPUS_ONLINE_FILE = "sys/devices/system/cpu/online"
MEMINFO_FILE = "proc/meminfo"
# kvm's halt-polling parameters (virt/kvm/kvm_main.c, all ``uint``), in the order they are shown.
HALT_POLL_PARAMS = ("halt_poll_ns", "halt_poll_ns_grow", "halt_poll_ns_grow_start", "halt_poll_ns_shrink")
_UINT_LIMIT = 2**32  # module parameters of type uint
_INT64_LIMIT = 2**63  # InfluxDB integers are int64: a bigger value would get the whole kvm_host line refused
# No kernel has this many CPUs (NR_CPUS is at most 8192 on x86): a bigger cpulist is garbage.


@dataclass
class HostFacts:
    """Everything :func:`gather` found. ``to_dict()`` gives a JSON-ready dict with the same keys."""

    root: str = "/"
    # CPU (first processor block of /proc/cpuinfo).
    cpu_vendor: str = UNKNOWN  # GenuineIntel, AuthenticAMD, HygonGenuine, ...
    cpu_model: str = UNKNOWN
    cpu_vmx: bool | None = None
    cpu_svm: bool | None = None
    cpu_hypervisor: bool | None = None  # this host is itself a guest
    cpu_ept: bool | None = None  # ``ept`` in flags or in the ``vmx flags`` line
    cpu_npt: bool | None = None  # ``npt`` in flags
    cpu_vmx_flags: list[str] = field(default_factory=list)  # the ``vmx flags`` line (newer kernels)
    # KVM modules.
    kvm_loaded: bool | None = None  # /sys/module/kvm
    kvm_modules: list[str] = field(default_factory=list)  # loaded kvm_* backends, excluding kvm itself
    kvm_backend: str | None = None  # the one in use
    module_params: dict[str, str] = field(default_factory=dict)  # raw: "kvm_intel.ept" -> "Y"
    ept_param: bool | None = None  # kvm_intel.ept
    npt_param: bool | None = None  # kvm_amd.npt
    tdp_mmu: bool | None = None  # kvm.tdp_mmu
    nested: bool | None = None  # <backend>.nested
    # Capacity: what the host has to give its VMs, and how KVM lets halted vCPUs poll. The kvm.* parameters are
    # writable at run time: they are as fresh as the last gather().
    cpus_online: int | None = None  # CPUs in sys/devices/system/cpu/online
    mem_total_bytes: int | None = None  # MemTotal of proc/meminfo
    halt_poll_ns: int | None = None
    halt_poll_ns_grow: int | None = None
    halt_poll_ns_grow_start: int | None = None
    halt_poll_ns_shrink: int | None = None
    nx_huge_pages: bool | None = None
    # Device, kernel, security.
    dev_kvm_present: bool = False
    dev_kvm_accessible: bool | None = None  # read+write for the effective user
    kernel_release: str = UNKNOWN
    lockdown: str = UNKNOWN  # none / integrity / confidentiality / unknown
    securityfs_mounted: bool | None = None
    debugfs_mounted: bool | None = None  # at /sys/kernel/debug
    is_root: bool | None = None  # effective uid 0
    yama_present: bool | None = None
    yama_ptrace_scope: int | None = None  # None when Yama is absent or unreadable
    cap_eff: str | None = None  # CapEff from /proc/self/status, hex as the kernel prints it
    cap_sys_ptrace: bool | None = None
    seccomp: str = UNKNOWN  # disabled / strict / filter: Seccomp in /proc/self/status
    seccomp_filters: int | None = None  # Seccomp_filters (Linux 5.9)
    pidfd_getfd_allowed: bool | None = None  # borrowing our own fd works (no filter refuses it); live host only
    pidfd_getfd_reason: str = ""  # why not
    nspid: list[int] = field(default_factory=list)  # NSpid: this process's pid in each PID namespace /proc shows
    pid_ns_host: bool | None = None  # in the host's (initial) PID namespace, whose pids debugfs uses
    # Verdict.
    tdp: TdpVerdict = field(
        default_factory=lambda: TdpVerdict(
            state=TDP_UNKNOWN, reason="not evaluated", backend=None, tdp_mmu=None, nested=None, is_guest=False
        )
    )
    # Which stats sources can work here and why not: filled in by the CLI (another module).
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    # libvirt: uri, library/daemon/hypervisor versions, vm_stats_group, usable, reason (filled in by the CLI).
    # Exit reasons (kvmfleet.exitreasons.facts_group): usable, reason, mechanism it would use, tracepoints found.
    exit_reasons: dict[str, Any] = field(default_factory=dict)
    libvirt: dict[str, Any] = field(default_factory=dict)
    # fact key -> why it is unknown.
    why_unknown: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Reading helpers: never raise, return (text, None) or (None, why).


def _path(root: str, rel: str) -> str:
    return os.path.join(root, rel.lstrip("/"))


def _read(root: str, rel: str) -> tuple[str | None, str | None]:
    """Read a small text file below ``root``. Binary junk is decoded with replacement characters."""
    path = _path(root, rel)
    try:
        # O_NONBLOCK so that a FIFO planted where a file should be cannot hang us.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        return None, f"{rel} does not exist"
    except IsADirectoryError:
        return None, f"{rel} is a directory, not a file"
    except PermissionError:
        return None, f"{rel}: permission denied"
    except OSError as exc:
        return None, f"{rel}: {exc.strerror or exc}"
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            return None, f"{rel} is a directory, not a file"
        if not stat.S_ISREG(st.st_mode):
            return None, f"{rel} is not a regular file"
        chunks: list[bytes] = []
        total = 0
        while total < _MAX_READ:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        return None, f"{rel}: {exc.strerror or exc}"
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", errors="replace").replace("\x00", ""), None


def parse_bool(text: str | None) -> bool | None:
    """Module parameter booleans: Y/N (bool params), 1/0 (int params, older kvm_amd), yes/no, true/false.

    Any other integer counts as true if non-zero; anything else is None.
    """
    value = words.parse_bool(text)
    if value is not None or text is None:
        return value
    try:
        return int(text.strip(), 0) != 0
    except ValueError:
        return None


def parse_lockdown(text: str) -> str | None:
    """The current mode of a ``sys/kernel/security/lockdown`` text (``none [integrity] confidentiality``: the
    bracketed word), or None when the text holds no bracketed mode."""
    m = re.search(r"\[([A-Za-z_-]+)\]", text)
    return m.group(1) if m else None


def lockdown_mode(root: str = "/") -> str:
    """This host's lockdown mode, or ``unknown`` when it cannot be read."""
    text, _ = _read(root, LOCKDOWN_FILE)
    return (parse_lockdown(text) if text is not None else None) or UNKNOWN


def _is_dir(root: str, rel: str) -> bool:
    try:
        return os.path.isdir(_path(root, rel))
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------
# Individual facts.


def parse_cpuinfo(text: str) -> dict[str, str]:
    """The ``key: value`` pairs of the first processor block that has a ``flags`` line.

    Falls back to the first block if none has flags. Lines without a colon are ignored.
    """
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key and key not in current:
            current[key] = value.strip()
    if current:
        blocks.append(current)
    for block in blocks:
        if "flags" in block:
            return block
    return blocks[0] if blocks else {}


def _gather_cpu(facts: HostFacts, root: str) -> None:
    text, why = _read(root, "proc/cpuinfo")
    if text is None:
        for key in ("cpu_vendor", "cpu_model", "cpu_flags"):
            facts.why_unknown[key] = why or "unreadable"
        return
    info = parse_cpuinfo(text)
    vendor = info.get("vendor_id", "")
    if vendor:
        facts.cpu_vendor = vendor
    else:
        facts.why_unknown["cpu_vendor"] = "no vendor_id line in proc/cpuinfo"
    model = info.get("model name", "")
    if model:
        facts.cpu_model = model
    else:
        facts.why_unknown["cpu_model"] = "no 'model name' line in proc/cpuinfo"
    if "flags" not in info:
        facts.why_unknown["cpu_flags"] = "no flags line in proc/cpuinfo"
        return
    flags = set(info["flags"].split())
    # "vmx flags" (since 5.9) lists VMX features such as ept, ept_ad, ept_x_only, ept_1gb, ept_5level,
    # vpid, unrestricted_guest; the plain flags line may drop "ept" on these kernels.
    vmx_flags = info.get("vmx flags", "").split()
    facts.cpu_vmx_flags = vmx_flags
    facts.cpu_vmx = "vmx" in flags
    facts.cpu_svm = "svm" in flags
    facts.cpu_hypervisor = "hypervisor" in flags
    facts.cpu_ept = "ept" in flags or "ept" in vmx_flags
    facts.cpu_npt = "npt" in flags


def _module_live(root: str, name: str) -> bool:
    """A /sys/module/<name> directory that is live (built-in modules have no initstate file)."""
    if not _is_dir(root, f"sys/module/{name}"):
        return False
    state, _ = _read(root, f"sys/module/{name}/initstate")
    return state is None or state.strip() in ("live", "")


def _raw_param(facts: HostFacts, root: str, module: str, param: str) -> str | None:
    """The text of /sys/module/<module>/parameters/<param>, recorded in ``module_params``; None and why if unread."""
    key = f"{module}.{param}"
    text, why = _read(root, f"sys/module/{module}/parameters/{param}")
    if text is None:
        facts.why_unknown[key] = why or "unreadable"
        return None
    raw = text.strip()
    facts.module_params[key] = raw
    return raw


def _param(facts: HostFacts, root: str, module: str, param: str) -> bool | None:
    """Read /sys/module/<module>/parameters/<param> as a boolean; record raw value or why not."""
    raw = _raw_param(facts, root, module, param)
    if raw is None:
        return None
    value = parse_bool(raw)
    if value is None:
        facts.why_unknown[f"{module}.{param}"] = f"cannot parse {raw[:40]!r} as a boolean"
    return value


def _gather_kvm(facts: HostFacts, root: str) -> None:
    if _is_dir(root, "sys/module"):
        facts.kvm_loaded = _module_live(root, "kvm")
        try:
            names = sorted(os.listdir(_path(root, "sys/module")))
        except OSError as exc:
            names = []
            facts.why_unknown["kvm_modules"] = f"sys/module: {exc.strerror or exc}"
        facts.kvm_modules = [n for n in names if n.startswith("kvm_") and _module_live(root, n)]
    else:
        facts.why_unknown["kvm_modules"] = "sys/module is missing (sysfs not mounted?)"

    mods = facts.kvm_modules
    backend: str | None = None
    if len(mods) == 1:
        backend = mods[0]
    elif mods:
        # Upstream x86 KVM takes one vendor module at a time, but be ready for several: prefer the one
        # the CPU flags fit, then PVM (which needs neither vmx nor svm), then known ones, then any.
        if facts.cpu_vmx and "kvm_intel" in mods:
            backend = "kvm_intel"
        elif facts.cpu_svm and "kvm_amd" in mods:
            backend = "kvm_amd"
        elif "kvm_pvm" in mods:
            backend = "kvm_pvm"
        else:
            backend = next((m for m in KNOWN_BACKENDS if m in mods), mods[0])
    facts.kvm_backend = backend

    if facts.kvm_loaded:
        facts.tdp_mmu = _param(facts, root, "kvm", "tdp_mmu")
    if "kvm_intel" in mods:
        facts.ept_param = _param(facts, root, "kvm_intel", "ept")
    if "kvm_amd" in mods:
        facts.npt_param = _param(facts, root, "kvm_amd", "npt")
    if backend is not None:
        if os.path.exists(_path(root, f"sys/module/{backend}/parameters/nested")):
            facts.nested = _param(facts, root, backend, "nested")
        else:
            facts.why_unknown["nested"] = f"{backend} has no 'nested' parameter"


def parse_cpulist(text: str) -> int | None:
    """How many CPUs a cpulist names (``0-3,8-11``: 8), as the kernel prints one (``%*pbl``: ascending,
    disjoint ranges); None for an empty list or anything else."""
    cpus = cpulist.parse(text)
    return None if cpus is None else len(cpus)


def parse_meminfo_total(text: str) -> int | None:
    """``MemTotal`` of a /proc/meminfo text in bytes (the kernel prints kB), or None when there is none."""
    m = re.search(r"^MemTotal:[ \t]*([0-9]+) kB$", text, re.M)
    if not m:
        return None
    total = int(m.group(1)) * 1024
    return total if total < _INT64_LIMIT else None


def parse_uint_param(text: str) -> int | None:
    """A ``uint`` module parameter (``%u``), or None for anything else."""
    word = text.strip()
    if not re.fullmatch(r"[0-9]+", word):
        return None
    value = int(word)
    return value if value < _UINT_LIMIT else None


# kvm.nx_huge_pages reads Y or N, or "never" once the mitigation is hard-disabled (nx_huge_pages=never at boot).
# "force", "off" and "auto" are what one writes to it; the kernel prints Y/N back (it resolves auto against
# X86_BUG_ITLB_MULTIHIT), so auto, were a kernel to print it, tells nothing: unknown.
_NX_HUGE_PAGES_WORDS = {"never": False, "force": True}


def parse_nx_huge_pages(text: str) -> bool | None:
    word = text.strip().lower()
    if word in _NX_HUGE_PAGES_WORDS:
        return _NX_HUGE_PAGES_WORDS[word]
    return words.parse_bool(word)  # Y/N, and off


def _gather_capacity(facts: HostFacts, root: str) -> None:
    text, why = _read(root, CPUS_ONLINE_FILE)
    if text is None:
        facts.why_unknown["cpus_online"] = why or "unreadable"
    else:
        facts.cpus_online = parse_cpulist(text)
        if facts.cpus_online is None:
            facts.why_unknown["cpus_online"] = f"cannot parse {text.strip()[:40]!r} in {CPUS_ONLINE_FILE}"
    text, why = _read(root, MEMINFO_FILE)
    facts.mem_total_bytes = parse_meminfo_total(text) if text is not None else None
    if facts.mem_total_bytes is None:
        facts.why_unknown["mem_total_bytes"] = why or f"no MemTotal line in kB in {MEMINFO_FILE}"
    if not facts.kvm_loaded:
        return  # like kvm.tdp_mmu: no parameters to read (kvm_modules says why)
    for param in HALT_POLL_PARAMS:
        raw = _raw_param(facts, root, "kvm", param)
        value = parse_uint_param(raw) if raw is not None else None
        if raw is not None and value is None:
            facts.why_unknown[f"kvm.{param}"] = f"cannot parse {raw[:40]!r} as an unsigned 32-bit integer"
        setattr(facts, param, value)
    raw = _raw_param(facts, root, "kvm", "nx_huge_pages")
    if raw is not None:
        facts.nx_huge_pages = parse_nx_huge_pages(raw)
        if facts.nx_huge_pages is None:
            facts.why_unknown["kvm.nx_huge_pages"] = (
                "'auto': the kernel decides at load time and prints Y or N once it has" if raw.lower() == "auto"
                else f"cannot parse {raw[:40]!r} (Y, N or never)")


def _gather_dev_kvm(facts: HostFacts, root: str) -> None:
    path = _path(root, "dev/kvm")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        facts.dev_kvm_present = False
        facts.dev_kvm_accessible = False
        return
    except OSError as exc:
        facts.why_unknown["dev_kvm"] = f"dev/kvm: {exc.strerror or exc}"
        return
    facts.dev_kvm_present = True
    if root in ("/", "") and not stat.S_ISCHR(st.st_mode):
        facts.why_unknown["dev_kvm_accessible"] = "dev/kvm is not a character device"
        facts.dev_kvm_accessible = False
        return
    mode = os.R_OK | os.W_OK
    try:
        if os.access in os.supports_effective_ids:
            facts.dev_kvm_accessible = os.access(path, mode, effective_ids=True)
        else:
            facts.dev_kvm_accessible = os.access(path, mode)
    except OSError as exc:
        facts.why_unknown["dev_kvm_accessible"] = f"dev/kvm: {exc.strerror or exc}"


def _unescape_mount(field_: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def _gather_mounts(facts: HostFacts, root: str) -> None:
    text, why = _read(root, "proc/mounts")
    if text is None:
        facts.why_unknown["debugfs_mounted"] = why or "unreadable"
        facts.why_unknown["securityfs_mounted"] = why or "unreadable"
        return
    mounts: set[tuple[str, str]] = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            mounts.add((_unescape_mount(parts[1]), parts[2]))
    facts.debugfs_mounted = ("/sys/kernel/debug", "debugfs") in mounts
    facts.securityfs_mounted = ("/sys/kernel/security", "securityfs") in mounts


def _gather_lockdown(facts: HostFacts, root: str) -> None:
    text, why = _read(root, LOCKDOWN_FILE)
    if text is not None:
        mode = parse_lockdown(text)
        if mode:
            facts.lockdown = mode
        else:
            facts.why_unknown["lockdown"] = (
                f"no bracketed mode in sys/kernel/security/lockdown: {text.strip()[:60]!r}"
            )
        return
    securityfs = facts.securityfs_mounted
    if securityfs is None:
        # /proc/mounts unreadable: guess from the directory (an unmounted securityfs leaves it empty).
        try:
            securityfs = bool(os.listdir(_path(root, "sys/kernel/security")))
        except OSError:
            securityfs = False
    if not securityfs:
        facts.why_unknown["lockdown"] = (
            "securityfs is not mounted at /sys/kernel/security "
            "(mount -t securityfs none /sys/kernel/security), so the lockdown mode cannot be read"
        )
    elif why and "does not exist" in why:
        facts.why_unknown["lockdown"] = (
            "securityfs is mounted but has no lockdown file: the lockdown LSM is not built in or not "
            "enabled (probably no lockdown)"
        )
    else:
        facts.why_unknown["lockdown"] = why or "unreadable"


def _gather_kernel(facts: HostFacts, root: str) -> None:
    text, why = _read(root, "proc/sys/kernel/osrelease")
    release = text.strip() if text is not None else ""
    if release and release.isprintable():
        facts.kernel_release = release
    else:
        facts.why_unknown["kernel_release"] = why or f"garbled proc/sys/kernel/osrelease: {release[:40]!r}"


def _gather_yama(facts: HostFacts, root: str) -> None:
    text, why = _read(root, "proc/sys/kernel/yama/ptrace_scope")
    if text is None:
        if why and "does not exist" in why and _is_dir(root, "proc/sys/kernel"):
            facts.yama_present = False  # no Yama LSM: classic ptrace rules apply
        else:
            facts.why_unknown["yama_ptrace_scope"] = why or "unreadable"
        return
    facts.yama_present = True
    try:
        facts.yama_ptrace_scope = int(text.strip())
    except ValueError:
        facts.why_unknown["yama_ptrace_scope"] = f"cannot parse {text.strip()[:40]!r}"


def _gather_status(facts: HostFacts, root: str) -> None:
    text, why = _read(root, "proc/self/status")
    fields = procfs.status_fields(text) if text is not None else {}
    _gather_confinement(facts, root, fields, why)
    # Uid: real effective saved fs.
    uids = fields.get("Uid", "").split()
    if len(uids) >= 2 and uids[1].isdigit():
        facts.is_root = int(uids[1]) == 0
    elif root in ("/", "") and hasattr(os, "geteuid"):
        facts.is_root = os.geteuid() == 0
    else:
        facts.why_unknown["is_root"] = why or "no Uid line in proc/self/status"
    cap = fields.get("CapEff", "")
    has_cap = borrowrights.has_cap_sys_ptrace(cap)
    if has_cap is None:
        facts.why_unknown["cap_sys_ptrace"] = why or f"cannot parse CapEff {cap[:40]!r} in proc/self/status"
        return
    facts.cap_eff = cap
    facts.cap_sys_ptrace = has_cap


def _gather_confinement(facts: HostFacts, root: str, fields: dict[str, str], why: str | None) -> None:
    """Seccomp mode, whether pidfd_getfd is allowed (probed on the live host only), and the PID namespace."""
    mode, facts.seccomp_filters = procfs.parse_seccomp(fields)
    if mode is None:
        facts.why_unknown["seccomp"] = why or "no Seccomp line in proc/self/status"
    else:
        facts.seccomp = borrowrights.SECCOMP_MODES.get(mode, f"mode {mode}")
    if root in ("/", ""):
        probe = borrowrights.probe_self()
        facts.pidfd_getfd_allowed, facts.pidfd_getfd_reason = probe.allowed, probe.reason
    else:
        facts.why_unknown["pidfd_getfd_allowed"] = "probed on the live host only"
    namespace = procfs.PidNamespace(procfs.parse_nspid(fields.get("NSpid", "")),
                                    procfs.pid_ns_inode(_path(root, "proc")))
    facts.nspid = list(namespace.nspid)
    facts.pid_ns_host = namespace.host
    if facts.pid_ns_host is None:
        facts.why_unknown["pid_ns_host"] = "no NSpid line in proc/self/status and no proc/self/ns/pid"


def _gather_exit_reasons(facts: HostFacts, root: str) -> None:
    """Whether exits by reason can be counted here (perf and tracefs are tried on the live host only)."""
    from .exitreasons import facts_group  # opens perf events: only when facts are gathered

    facts.exit_reasons = facts_group(root or "/")


# --------------------------------------------------------------------------------------------------
# Public entry points.


def gather(root: str = "/") -> HostFacts:
    """Read the host facts below ``root`` (default "/"). Never raises on bad or missing files."""
    facts = HostFacts(root=root)
    steps = (
        ("cpu", _gather_cpu),
        ("kvm_modules", _gather_kvm),
        ("capacity", _gather_capacity),  # after kvm_modules: reads kvm's parameters only when it is loaded
        ("dev_kvm", _gather_dev_kvm),
        ("kernel_release", _gather_kernel),
        ("mounts", _gather_mounts),
        ("lockdown", _gather_lockdown),
        ("yama_ptrace_scope", _gather_yama),
        ("status", _gather_status),
        ("exit_reasons", _gather_exit_reasons),
    )
    for name, step in steps:
        try:
            step(facts, root)
        except Exception as exc:  # a bug or a very odd tree must not cost the other facts
            facts.why_unknown.setdefault(name, f"internal error: {type(exc).__name__}: {exc}")
    try:
        facts.tdp = tdp_verdict(facts)
    except Exception as exc:
        facts.tdp["reason"] = f"internal error: {type(exc).__name__}: {exc}"
        facts.tdp["is_guest"] = bool(facts.cpu_hypervisor)
    return facts


def _show(value: object) -> str:
    if value is None:
        return UNKNOWN
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value) if value else "-"
    return str(value)


def _confinement_rows(facts: HostFacts) -> list[tuple[str, str]]:
    filters = facts.seccomp_filters
    return [
        ("seccomp", facts.seccomp + ("" if filters is None else f" ({filters} filter{'' if filters == 1 else 's'})")),
        ("pidfd_getfd allowed", _show(facts.pidfd_getfd_allowed)
         + (f": {facts.pidfd_getfd_reason}" if facts.pidfd_getfd_reason else "")),
        ("host PID namespace", _show(facts.pid_ns_host) + f" (NSpid {_show(facts.nspid)})"),
    ]


def _capacity_rows(facts: HostFacts) -> list[tuple[str, str]]:
    mem = facts.mem_total_bytes
    return [
        ("cpus online", _show(facts.cpus_online)),
        ("memory total", UNKNOWN if mem is None else f"{mem} bytes ({mem / 2**30:.1f} GiB)"),
        *((f"kvm.{param}", _show(getattr(facts, param))) for param in HALT_POLL_PARAMS),
        ("kvm.nx_huge_pages", _show(facts.nx_huge_pages)),
    ]


def format_text(facts: HostFacts) -> str:
    """Aligned ``key: value`` lines for humans, TDP verdict first."""
    tdp = facts.tdp
    rows: list[tuple[str, str]] = [
        ("TDP (EPT/NPT)", tdp["state"].upper()),
        ("TDP reason", tdp["reason"]),
        ("kvm backend", _show(facts.kvm_backend) if facts.kvm_backend else "none"),
        ("kvm modules", _show(facts.kvm_modules)),
        ("kvm.tdp_mmu", _show(facts.tdp_mmu)),
        ("kvm_intel.ept", _show(facts.ept_param)),
        ("kvm_amd.npt", _show(facts.npt_param)),
        ("nested", _show(facts.nested)),
        ("is guest", _show(tdp["is_guest"])),
        ("", ""),
        *_capacity_rows(facts),
        ("", ""),
        ("cpu vendor", facts.cpu_vendor),
        ("cpu model", facts.cpu_model),
        ("cpu vmx/svm", f"vmx={_show(facts.cpu_vmx)} svm={_show(facts.cpu_svm)}"),
        ("cpu ept/npt", f"ept={_show(facts.cpu_ept)} npt={_show(facts.cpu_npt)}"),
        ("cpu hypervisor", _show(facts.cpu_hypervisor)),
        ("vmx flags", _show(facts.cpu_vmx_flags)),
        ("/dev/kvm", f"present={_show(facts.dev_kvm_present)} accessible={_show(facts.dev_kvm_accessible)}"),
        ("kernel", facts.kernel_release),
        ("lockdown", facts.lockdown),
        ("securityfs mounted", _show(facts.securityfs_mounted)),
        ("debugfs mounted", _show(facts.debugfs_mounted)),
        ("root", _show(facts.is_root)),
        ("CAP_SYS_PTRACE", _show(facts.cap_sys_ptrace)),
        *_confinement_rows(facts),
        (
            "yama ptrace_scope",
            "no Yama" if facts.yama_present is False else _show(facts.yama_ptrace_scope),
        ),
    ]
    if facts.libvirt:
        lv = facts.libvirt
        rows += [
            ("libvirt", f"uri={lv.get('uri')} library={_show(lv.get('library_version'))} "
                        f"daemon={_show(lv.get('daemon_version'))} qemu={_show(lv.get('hypervisor_version'))}"),
            ("libvirt VM stats group", _show(lv.get("vm_stats_group"))),
            ("libvirt usable", f"{_show(lv.get('usable'))}: {lv.get('reason') or '-'}"),
        ]
    if facts.exit_reasons:
        reasons = facts.exit_reasons
        rows.append(("exit reasons", f"usable={_show(reasons.get('usable'))} "
                                     f"mechanism={reasons.get('mechanism') or '-'} "
                                     f"tracepoints={_show(reasons.get('tracepoints'))}"
                     + (f": {reasons['reason']}" if reasons.get("reason") else "")))
    for name, info in sorted(facts.sources.items()):
        rows.append((f"source {name}", ", ".join(f"{k}={_show(v)}" for k, v in info.items()) or "-"))
    for key, why in sorted(facts.why_unknown.items()):
        rows.append((f"unknown {key}", why))

    width = max(len(k) for k, _ in rows) + 2
    lines: list[str] = []
    for key, value in rows:
        if not key:
            lines.append("")
            continue
        head = f"{key + ':':<{width}}"
        wrapped = textwrap.wrap(value, width=max(40, 100 - width)) or [""]
        lines.append(head + wrapped[0])
        lines.extend(" " * width + more for more in wrapped[1:])
    return "\n".join(lines) + "\n"
