"""Counting exit reasons in the kernel: one hand-assembled BPF program per tracepoint, one per-CPU hash map.

Each hit of a counted tracepoint runs a ~30-instruction program that adds 1 to the slot of the key
``{tgid, isa, reason, tracepoint index}`` (tgid 0 when counting host-wide only) in a
``BPF_MAP_TYPE_PERCPU_HASH``: no lock and no cache line shared between CPUs, no record copied to user
space. :meth:`BpfExitCounter.read` walks the map and sums the per-CPU slots. The number of fds is
fixed (2 maps, and one program and one perf event per tracepoint) whatever the number of reasons, CPUs
or VMs; the map's size bounds the number of (VM, reason) pairs (:attr:`BpfExitCounter.max_entries`);
hits that find it full are counted in a second per-CPU array (:meth:`BpfExitCounter.lost`).

Only ctypes and the bpf(2) / perf_event_open(2) syscalls: no bcc, no clang, no libbpf.

* **Attach**: a BPF program attached to a tracepoint perf event goes into the *tracepoint's* program
  array, which runs on every CPU; the kernel refuses the same program twice in it (EEXIST), so one perf
  event (on one online CPU, ``pid=-1``) per tracepoint serves every CPU (bcc does the same). The event is
  left disabled and the program returns 1, so other perf users of the tracepoint (``kvm_stat``, ``perf``,
  the perf-count mechanism) keep seeing every hit (a program returning 0 hides the hit from them all).
* **Misses**: the kernel does not nest BPF tracing programs on a CPU: a hit while another one (any tool's
  kprobe or tracepoint program) runs on that CPU is skipped and counted by the kernel (:meth:`missed`).
* **License**: the helpers used (map lookup/update, ``get_current_pid_tgid``) are not GPL-only and the
  tracepoint attach does not check the license, so the program is declared under the project's own
  license (Apache-2.0).
* **Arches**: x86_64 and aarch64 (little-endian; the syscall numbers are the only per-arch part; the
  instruction encoding packs registers for little-endian). Elsewhere the constructor raises OSError(ENOSYS),
  so a caller falls back to another mechanism.
* **Pid namespaces**: ``bpf_get_current_pid_tgid`` gives pids of the initial pid namespace. A collector in
  another one (a container) numbers processes with ``bpf_get_ns_current_pid_tgid`` (Linux 5.7) in its own
  namespace instead: VMMs in that very namespace get per-process counts under the pids its ``/proc`` shows;
  hits of processes in any other namespace are counted host-wide only (tgid 0), never under a pid that would
  name another process here.
* **Dead VMMs**: keys of a tgid that no longer exists are folded into a retired sum (host-wide counts
  stay complete) and deleted, so the map does not fill with processes long gone. A pid reused by a new
  VMM before the next read would inherit the old one's counts (same key): pids are reused only after
  the whole pid space turned over, so rare between two reads.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import struct
import sys
from collections.abc import Collection, Sequence

from .. import cpulist
from ..logsay import SayOnce
from . import perfevent
from .counter import Counts, ExitCounter, ReasonKey, TracepointSpec

# Syscall numbers by machine (uname -m).
_SYSCALLS = {"x86_64": {"bpf": 321}, "aarch64": {"bpf": 280}}

# bpf(2) commands.
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH = 24
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0

BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_PROG_TYPE_TRACEPOINT = 5

# Helper function ids (include/uapi/linux/bpf.h, __BPF_FUNC_MAPPER order).
BPF_FUNC_map_lookup_elem = 1
BPF_FUNC_map_update_elem = 2
BPF_FUNC_get_current_pid_tgid = 14
BPF_FUNC_get_ns_current_pid_tgid = 120  # Linux 5.7
PROC_PID_INIT_INO = 0xEFFFFFFC  # the initial pid namespace's inode (include/linux/proc_ns.h)
BPF_NOEXIST = 1
BPF_F_NO_PREALLOC = 1
BPF_PSEUDO_MAP_FD = 1

LICENSE = b"Apache-2.0\0"
KEY = struct.Struct("<IIII")  # tgid, isa, reason, tracepoint index
VALUE_SIZE = 8  # u64 per CPU
VERIFIER_LOG_SIZE = 1 << 16
PROG_RETURN = 1  # non-zero: the tracepoint's other perf events still get the hit (see program())
PROG_NAME = b"kvmfleet_reason"  # 15 chars + NUL fits BPF_OBJ_NAME_LEN


# ---------------------------------------------------------------- instruction encoding

# Instruction classes, sizes, modes, operations (include/uapi/linux/bpf_common.h, bpf.h).
BPF_LD, BPF_LDX, BPF_ST, BPF_STX, BPF_ALU64, BPF_JMP = 0x00, 0x01, 0x02, 0x03, 0x07, 0x05
BPF_W, BPF_H, BPF_B, BPF_DW = 0x00, 0x08, 0x10, 0x18
BPF_IMM, BPF_MEM, BPF_ATOMIC = 0x00, 0x60, 0xC0
BPF_K, BPF_X = 0x00, 0x08
BPF_ADD, BPF_RSH, BPF_MOV = 0x00, 0x70, 0xB0
BPF_JA, BPF_JEQ, BPF_JNE, BPF_CALL, BPF_EXIT = 0x00, 0x10, 0x50, 0x80, 0x90
R0, R1, R2, R3, R4, R6, R10 = 0, 1, 2, 3, 4, 6, 10
_SIZES = {1: BPF_B, 2: BPF_H, 4: BPF_W, 8: BPF_DW}
_INSN = struct.Struct("<BBhi")


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One 8-byte ``struct bpf_insn`` (little-endian: dst_reg in the low nibble)."""
    return _INSN.pack(code, (src << 4) | dst, off, imm)


def mov64_reg(dst: int, src: int) -> bytes:
    return insn(BPF_ALU64 | BPF_MOV | BPF_X, dst, src)


def mov64_imm(dst: int, imm: int) -> bytes:
    return insn(BPF_ALU64 | BPF_MOV | BPF_K, dst, imm=imm)


def add64_imm(dst: int, imm: int) -> bytes:
    return insn(BPF_ALU64 | BPF_ADD | BPF_K, dst, imm=imm)


def rsh64_imm(dst: int, imm: int) -> bytes:
    return insn(BPF_ALU64 | BPF_RSH | BPF_K, dst, imm=imm)


def ldx_mem(size: int, dst: int, src: int, off: int) -> bytes:
    return insn(BPF_LDX | BPF_MEM | _SIZES[size], dst, src, off)


def stx_mem(size: int, dst: int, src: int, off: int) -> bytes:
    return insn(BPF_STX | BPF_MEM | _SIZES[size], dst, src, off)


def st_mem(size: int, dst: int, off: int, imm: int) -> bytes:
    return insn(BPF_ST | BPF_MEM | _SIZES[size], dst, off=off, imm=imm)


def atomic_add64(dst: int, src: int, off: int = 0) -> bytes:
    """``lock *(u64 *)(dst + off) += src`` (the classic XADD encoding)."""
    return insn(BPF_STX | BPF_ATOMIC | BPF_DW, dst, src, off, BPF_ADD)


def ld_imm64(dst: int, value: int) -> bytes:
    """``dst = value`` for a 64-bit constant (two slots)."""
    return insn(BPF_LD | BPF_DW | BPF_IMM, dst, imm=_s32(value & 0xFFFFFFFF)) + insn(0, imm=_s32(value >> 32))


def _s32(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


def ld_map_fd(dst: int, map_fd: int) -> bytes:
    """``dst = map`` (a 16-byte ld_imm64 the verifier turns into the map's address)."""
    return insn(BPF_LD | BPF_DW | BPF_IMM, dst, BPF_PSEUDO_MAP_FD, imm=map_fd) + insn(0)


def call(helper: int) -> bytes:
    return insn(BPF_JMP | BPF_CALL, imm=helper)


def jeq_imm(dst: int, imm: int, off: int) -> bytes:
    return insn(BPF_JMP | BPF_JEQ | BPF_K, dst, off=off, imm=imm)


def jne_imm(dst: int, imm: int, off: int) -> bytes:
    return insn(BPF_JMP | BPF_JNE | BPF_K, dst, off=off, imm=imm)


def exit_insn() -> bytes:
    return insn(BPF_JMP | BPF_EXIT)


# Stack layout of the program (r10 = frame pointer, stack grows down).
_KEY_OFF = -16  # struct key, 16 bytes
_ONE_OFF = -24  # u64 1, the initial value of a new key
_LOST_KEY_OFF = -28  # u32 index into the lost array
_PIDNS_INFO_OFF = -40  # struct bpf_pidns_info {u32 pid; u32 tgid;}


def program(spec: TracepointSpec, index: int, counts_fd: int, lost_fd: int, per_process: bool,
            pid_ns: tuple[int, int] | None = None) -> bytes:
    """The program for tracepoint number ``index``: count one hit of ``spec`` under its key.

    It returns 1: the kernel hands a hit to the tracepoint's perf events (``perf_tp_event``) only when the
    programs attached to it return non-zero, so returning 0 would blind every other perf user of the
    tracepoint on the host (kvm_stat, perf stat, the perf-count mechanism) for as long as this program is
    attached. Our own perf event is never enabled, so the hit costs it nothing."""
    for what, size in (("reason", spec.reason_size), ("isa", spec.isa_size)):
        if size not in (1, 2, 4):
            raise ValueError(f"{spec.name}: {what} field of {size} bytes; only 1, 2 or 4 bytes are counted")
    code = [mov64_reg(R6, R1)]  # r6 = ctx (the raw record: common fields, then the tracepoint's fields)
    if per_process and pid_ns is not None:
        # The tgid as the pid namespace (dev, ino) numbers it, when the hitting process lives in that very
        # namespace; 0 (host-wide only) for any other process: its pid means nothing to our /proc.
        # The helper zeroes bpf_pidns_info when the process is in another namespace: tgid 0 then.
        dev, ino = pid_ns
        code += [ld_imm64(R1, dev), ld_imm64(R2, ino), mov64_reg(R3, R10), add64_imm(R3, _PIDNS_INFO_OFF),
                 mov64_imm(R4, 8), call(BPF_FUNC_get_ns_current_pid_tgid), ldx_mem(4, R0, R10, _PIDNS_INFO_OFF + 4),
                 stx_mem(4, R10, R0, _KEY_OFF)]  # fmt: skip
    elif per_process:
        code += [call(BPF_FUNC_get_current_pid_tgid), rsh64_imm(R0, 32), stx_mem(4, R10, R0, _KEY_OFF)]
    else:
        code += [st_mem(4, R10, _KEY_OFF, 0)]
    if spec.isa_offset is not None:
        code += [ldx_mem(spec.isa_size, R1, R6, spec.isa_offset), stx_mem(4, R10, R1, _KEY_OFF + 4)]
    else:
        code += [st_mem(4, R10, _KEY_OFF + 4, 0)]
    code += [
        ldx_mem(spec.reason_size, R1, R6, spec.reason_offset),
        stx_mem(4, R10, R1, _KEY_OFF + 8),
        st_mem(4, R10, _KEY_OFF + 12, index),
        st_mem(8, R10, _ONE_OFF, 1),
    ]
    lookup = [ld_map_fd(R1, counts_fd), mov64_reg(R2, R10), add64_imm(R2, _KEY_OFF), call(BPF_FUNC_map_lookup_elem)]
    add_one_and_exit = [mov64_imm(R1, 1), atomic_add64(R0, R1), mov64_imm(R0, PROG_RETURN), exit_insn()]
    ret0 = [mov64_imm(R0, PROG_RETURN), exit_insn()]
    # 1. the key exists (the common case): add 1 in place.
    code += [*lookup, jeq_imm(R0, 0, _len(add_one_and_exit)), *add_one_and_exit]
    # 2. new key: insert it with 1 (BPF_NOEXIST: another CPU may insert it first).
    insert = [ld_map_fd(R1, counts_fd), mov64_reg(R2, R10), add64_imm(R2, _KEY_OFF), mov64_reg(R3, R10),
              add64_imm(R3, _ONE_OFF), mov64_imm(R4, BPF_NOEXIST), call(BPF_FUNC_map_update_elem)]  # fmt: skip
    code += [*insert, jne_imm(R0, 0, _len(ret0)), *ret0]
    # 3. the insert failed: another CPU inserted the key (EEXIST) -> add to it; or the map is full -> lost.
    code += [*lookup, jeq_imm(R0, 0, _len(add_one_and_exit)), *add_one_and_exit]
    code += [
        st_mem(4, R10, _LOST_KEY_OFF, index),
        ld_map_fd(R1, lost_fd),
        mov64_reg(R2, R10),
        add64_imm(R2, _LOST_KEY_OFF),
        call(BPF_FUNC_map_lookup_elem),
        jeq_imm(R0, 0, _len(add_one_and_exit)),
    ]
    code += add_one_and_exit + ret0
    return b"".join(code)


def _len(instructions: Sequence[bytes]) -> int:
    """The length of ``instructions`` in 8-byte slots (a jump offset)."""
    return sum(len(i) for i in instructions) // 8


# ---------------------------------------------------------------- syscalls

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# What an errno means for each syscall, to put in the OSError.
_BPF_HINTS = {
    errno.EPERM: "needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN); kernel lockdown or a too small "
    "RLIMIT_MEMLOCK (kernels before 5.11) also refuse it",
    errno.EACCES: "the verifier refused the program",
    errno.EINVAL: "the kernel does not support this command or map/program type",
    errno.E2BIG: "too big for this kernel",
    errno.ENOMEM: "out of memory (or RLIMIT_MEMLOCK on kernels before 5.11)",
    errno.ENOSYS: "no bpf() in this kernel (CONFIG_BPF_SYSCALL off)",
}


_IOCTL_HINTS = {
    errno.EACCES: "the program reads past the tracepoint's record (wrong field offset?)",
    errno.EEXIST: "the program is attached to this tracepoint already",
    errno.EINVAL: "not a tracepoint program, or the kernel cannot attach BPF to this event",
}


def _os_error(what: str, err: int, hints: dict[int, str], detail: str = "") -> OSError:
    hint = hints.get(err)
    message = f"{what}: {os.strerror(err)}" + (f" ({hint})" if hint else "") + (f"\n{detail}" if detail else "")
    return OSError(err, message)


def _syscall_numbers() -> dict[str, int]:
    machine = platform.machine()
    numbers = _SYSCALLS.get(machine)
    if numbers is None or sys.byteorder != "little":
        raise OSError(errno.ENOSYS, f"BPF exit counting supports x86_64 and aarch64, not {machine}")
    return numbers


def bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    """bpf(cmd, attr); OSError naming ``what`` on failure."""
    ret = _libc.syscall(
        ctypes.c_long(_syscall_numbers()["bpf"]), ctypes.c_long(cmd), attr, ctypes.c_long(len(attr))
    )
    if ret < 0:
        raise _os_error(what, ctypes.get_errno(), _BPF_HINTS)
    return int(ret)


def _attr(size: int, *fields: tuple[int, str, int | bytes]) -> ctypes.Array[ctypes.c_char]:
    """A zeroed ``union bpf_attr`` buffer of ``size`` bytes with (offset, struct format, value) fields set."""
    buf = ctypes.create_string_buffer(size)
    for offset, fmt, value in fields:
        struct.pack_into("<" + fmt, buf, offset, value)
    return buf


def _addr(buf: ctypes.Array[ctypes.c_char] | ctypes.Array[ctypes.c_ubyte]) -> int:
    return ctypes.addressof(buf)


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, name: bytes, flags: int = 0) -> int:
    attr = _attr(64, (0, "I", map_type), (4, "I", key_size), (8, "I", value_size), (12, "I", max_entries),
                 (16, "I", flags), (28, "16s", name[:15]))  # fmt: skip
    return bpf(BPF_MAP_CREATE, attr, f"bpf(BPF_MAP_CREATE, type {map_type}, {max_entries} entries)")


def prog_load(code: bytes, name: str) -> int:
    """Load a tracepoint program; on failure the OSError carries the verifier's log."""
    insns = ctypes.create_string_buffer(code, len(code))
    license_buf = ctypes.create_string_buffer(LICENSE, len(LICENSE))
    log = ctypes.create_string_buffer(VERIFIER_LOG_SIZE)

    def load(log_level: int) -> int:
        attr = _attr(128, (0, "I", BPF_PROG_TYPE_TRACEPOINT), (4, "I", len(code) // 8), (8, "Q", _addr(insns)),
                     (16, "Q", _addr(license_buf)), (24, "I", log_level),
                     (28, "I", VERIFIER_LOG_SIZE if log_level else 0), (32, "Q", _addr(log) if log_level else 0),
                     (48, "16s", PROG_NAME))  # fmt: skip
        return int(_libc.syscall(ctypes.c_long(_syscall_numbers()["bpf"]), ctypes.c_long(BPF_PROG_LOAD), attr,
                                 ctypes.c_long(len(attr))))  # fmt: skip

    fd = load(0)  # no log when it loads: the verifier runs faster
    if fd >= 0:
        return fd
    err = ctypes.get_errno()
    if err in (errno.EACCES, errno.EINVAL):  # the verifier said no: load again to get its reasons
        fd = load(1)
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
    text = log.value.decode(errors="replace").strip()
    raise _os_error(f"bpf(BPF_PROG_LOAD) of the {name} counting program", err, _BPF_HINTS,
                    f"verifier log:\n{text}" if text else "")  # fmt: skip


# struct bpf_prog_info: where the run statistics sit (include/uapi/linux/bpf.h, stable since 5.1/5.12).
_PROG_INFO_SIZE = 224
_PROG_INFO_RUN_TIME_NS = 192
_PROG_INFO_RUN_CNT = 200
_PROG_INFO_RECURSION_MISSES = 208


def enable_run_stats() -> int:
    """BPF_ENABLE_STATS: the kernel times every BPF program run while the returned fd is open (close it)."""
    return bpf(BPF_ENABLE_STATS, _attr(8, (0, "I", BPF_STATS_RUN_TIME)), "bpf(BPF_ENABLE_STATS)")


def prog_run_stats(prog_fd: int) -> tuple[int, int, int]:
    """(runs, ns spent running, runs skipped because another BPF program was running on that CPU) of a program;
    runs and ns move only while :func:`enable_run_stats` holds its fd, the skipped runs always."""
    info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    attr = _attr(16, (0, "I", prog_fd), (4, "I", _PROG_INFO_SIZE), (8, "Q", _addr(info)))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "bpf(BPF_OBJ_GET_INFO_BY_FD)")
    return tuple(struct.unpack_from("<Q", info, offset)[0]
                 for offset in (_PROG_INFO_RUN_CNT, _PROG_INFO_RUN_TIME_NS, _PROG_INFO_RECURSION_MISSES))


def possible_cpus(path: str = cpulist.POSSIBLE) -> int:
    """How many CPUs per-CPU map values hold slots for: the highest possible CPU + 1."""
    return max(cpulist.read(path)) + 1


def first_online_cpu(path: str = cpulist.ONLINE) -> int:
    return min(cpulist.read(path))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- the counter


class BpfExitCounter(ExitCounter):
    """Counts hits of ``specs`` by reason in a per-CPU BPF hash map; per process when ``per_process``.

    Counting starts in the constructor; :meth:`close` (or a ``with`` block) detaches and frees it all.
    """

    name = "bpf"

    def __init__(self, specs: Sequence[TracepointSpec], per_process: bool, max_entries: int = 16384,
                 say: SayOnce | None = None, ns_helper: bool | None = None) -> None:
        """``max_entries``: the (process, reason) pairs the map holds (host-wide: reasons only); ``say``: where
        hits lost to a full map or missed by nesting are said (once per cause) when :meth:`read` sees them;
        ``ns_helper``: number processes with ``bpf_get_ns_current_pid_tgid`` in this process's pid namespace
        (None: only when that is not the initial one; tests force it)."""
        if not specs:
            raise ValueError("no tracepoint to count")
        if len({spec.name for spec in specs}) != len(specs):  # two programs on one tracepoint: each hit twice
            raise ValueError(f"a tracepoint given twice: {', '.join(spec.name for spec in specs)}")
        _syscall_numbers()  # fail early on an unsupported arch
        self.specs = list(specs)
        self.per_process = per_process
        self.max_entries = max_entries
        self._say = say or SayOnce()
        self.ncpus = possible_cpus()
        self.pid_ns = self._pid_namespace(ns_helper) if per_process else None
        self._value_size = VALUE_SIZE * self.ncpus
        self._slots = struct.Struct(f"<{self.ncpus}Q")  # one u64 per possible CPU
        self._retired: Counts = {}  # counts of processes that exited and whose keys were deleted
        self._batch: bool | None = None  # whether BPF_MAP_LOOKUP_BATCH works here (None: not tried yet)
        self.counts_fd = -1
        self.lost_fd = -1
        self.prog_fds: list[int] = []
        self.perf_fds: list[int] = []
        try:
            # Not preallocated: memory for the keys in use only (preallocated, 16384 keys cost 8 bytes x 16384 x
            # every possible CPU: 33 MiB on 256 CPUs); a new key allocates once, in the kernel's BPF allocator.
            self.counts_fd = map_create(BPF_MAP_TYPE_PERCPU_HASH, KEY.size, VALUE_SIZE, max_entries, b"kvmfleet_rsn",
                                        BPF_F_NO_PREALLOC)  # fmt: skip
            self.lost_fd = map_create(BPF_MAP_TYPE_PERCPU_ARRAY, 4, VALUE_SIZE, len(self.specs), b"kvmfleet_lost")
            cpu = first_online_cpu()
            for index, spec in enumerate(self.specs):
                code = program(spec, index, self.counts_fd, self.lost_fd, per_process, self.pid_ns)
                self.prog_fds.append(prog_load(code, spec.name))
                # The event only carries the program: the kernel registers the tracepoint's perf probe when the event
                # is created and runs the attached programs on every hit whether the event is enabled or not; left
                # disabled, the event stays off the CPU's list of events the hit is then handed to.
                fd = perfevent.tracepoint_event(spec.event_id, -1, cpu, name=spec.name)
                self.perf_fds.append(fd)
                self._ioctl(fd, perfevent.PERF_EVENT_IOC_SET_BPF, self.prog_fds[-1],
                            f"PERF_EVENT_IOC_SET_BPF ({spec.name})")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _pid_namespace(ns_helper: bool | None) -> tuple[int, int] | None:
        """(dev, ino) of this process's pid namespace when processes must be numbered in it, else None."""
        st = os.stat("/proc/self/ns/pid")
        if ns_helper is None:
            ns_helper = st.st_ino != PROC_PID_INIT_INO
        return (st.st_dev, st.st_ino) if ns_helper else None

    @staticmethod
    def _ioctl(fd: int, request: int, arg: int, what: str) -> None:
        try:
            fcntl.ioctl(fd, request, arg)
        except OSError as exc:
            raise _os_error(what, exc.errno or 0, _IOCTL_HINTS) from None

    # ---- reading

    def _entries(self) -> list[tuple[bytes, int]]:
        """Every (key, count summed over CPUs) of the counts map."""
        if self._batch is not False:
            try:
                entries = self._entries_batch()
                self._batch = True
                return entries
            except OSError as exc:
                if self._batch or exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.ENOTTY, 524):  # 524 ENOTSUPP
                    raise
                self._batch = False
        return self._entries_one_by_one()

    def _sum(self, values: ctypes.Array[ctypes.c_char], offset: int) -> int:
        return sum(self._slots.unpack_from(values, offset))

    def _entries_one_by_one(self) -> list[tuple[bytes, int]]:
        key = ctypes.create_string_buffer(KEY.size)
        next_key = ctypes.create_string_buffer(KEY.size)
        values = ctypes.create_string_buffer(self._value_size)
        entries: list[tuple[bytes, int]] = []
        # A NULL key starts the walk; a key deleted meanwhile restarts it from the first key (kernel
        # behaviour), so only this process deletes and it does not delete while walking.
        current = 0
        while True:
            attr = _attr(32, (0, "I", self.counts_fd), (8, "Q", current), (16, "Q", _addr(next_key)))
            try:
                bpf(BPF_MAP_GET_NEXT_KEY, attr, "bpf(BPF_MAP_GET_NEXT_KEY)")
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return entries
                raise
            ctypes.memmove(key, next_key, KEY.size)
            current = _addr(key)
            attr = _attr(32, (0, "I", self.counts_fd), (8, "Q", _addr(key)), (16, "Q", _addr(values)))
            try:
                bpf(BPF_MAP_LOOKUP_ELEM, attr, "bpf(BPF_MAP_LOOKUP_ELEM)")
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    continue
                raise
            entries.append((key.raw, self._sum(values, 0)))

    def _entries_batch(self) -> list[tuple[bytes, int]]:
        chunk = 256
        keys = ctypes.create_string_buffer(KEY.size * chunk)
        values = ctypes.create_string_buffer(self._value_size * chunk)
        in_batch = ctypes.create_string_buffer(8)
        out_batch = ctypes.create_string_buffer(8)
        entries: list[tuple[bytes, int]] = []
        first = True
        while True:
            attr = _attr(56, (0, "Q", 0 if first else _addr(in_batch)), (8, "Q", _addr(out_batch)),
                         (16, "Q", _addr(keys)), (24, "Q", _addr(values)), (32, "I", chunk),
                         (36, "I", self.counts_fd))  # fmt: skip
            done = False
            try:
                bpf(BPF_MAP_LOOKUP_BATCH, attr, "bpf(BPF_MAP_LOOKUP_BATCH)")
            except OSError as exc:
                if exc.errno != errno.ENOENT:  # ENOENT: the last batch (possibly with entries)
                    raise
                done = True
            count = struct.unpack_from("<I", attr, 32)[0]
            raw_keys = keys.raw  # one copy per batch (.raw copies the whole buffer each time)
            for i in range(count):
                entries.append((raw_keys[i * KEY.size : (i + 1) * KEY.size], self._sum(values, i * self._value_size)))
            if done:
                return entries
            ctypes.memmove(in_batch, out_batch, 8)
            first = False

    def _delete(self, key: bytes) -> None:
        key_buf = ctypes.create_string_buffer(key, KEY.size)
        attr = _attr(32, (0, "I", self.counts_fd), (8, "Q", _addr(key_buf)))
        try:
            bpf(BPF_MAP_DELETE_ELEM, attr, "bpf(BPF_MAP_DELETE_ELEM)")
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise

    def _lookup(self, key: bytes) -> int:
        key_buf = ctypes.create_string_buffer(key, KEY.size)
        values = ctypes.create_string_buffer(self._value_size)
        attr = _attr(32, (0, "I", self.counts_fd), (8, "Q", _addr(key_buf)), (16, "Q", _addr(values)))
        try:
            bpf(BPF_MAP_LOOKUP_ELEM, attr, "bpf(BPF_MAP_LOOKUP_ELEM)")
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return 0
            raise
        return self._sum(values, 0)

    def _reason_key(self, isa: int, reason: int, index: int) -> ReasonKey | None:
        if not 0 <= index < len(self.specs):
            return None  # not ours (cannot happen: the map is private to this counter)
        return (self.specs[index].name, isa, reason)

    def read(self, pids: Collection[int] = ()) -> tuple[Counts, dict[int, Counts]]:
        if pids and not self.per_process:
            raise ValueError("per-process counts need a counter opened with per_process=True")
        self._check_open()
        host: Counts = dict(self._retired)
        wanted = set(pids)
        per_pid: dict[int, Counts] = {pid: {} for pid in wanted}
        alive: dict[int, bool] = {}
        dead_keys: list[tuple[bytes, ReasonKey]] = []
        for raw_key, count in self._entries():
            tgid, isa, reason, index = KEY.unpack(raw_key)
            reason_key = self._reason_key(isa, reason, index)
            if reason_key is None:
                continue
            if tgid and tgid not in wanted:
                if tgid not in alive:
                    alive[tgid] = _pid_alive(tgid)
                if not alive[tgid]:
                    dead_keys.append((raw_key, reason_key))
                    continue
            if count:
                host[reason_key] = host.get(reason_key, 0) + count
                if tgid in per_pid:
                    per_pid[tgid][reason_key] = per_pid[tgid].get(reason_key, 0) + count
        # The process is gone, so its keys no longer move: read them again after the death check (hits
        # between the walk and the check are not lost), keep the sum, then delete them.
        for raw_key, reason_key in dead_keys:
            count = self._lookup(raw_key)
            self._delete(raw_key)
            if count:
                self._retired[reason_key] = self._retired.get(reason_key, 0) + count
                host[reason_key] = host.get(reason_key, 0) + count
        self._say_losses()
        return {k: v for k, v in host.items() if v}, per_pid

    def _say_losses(self) -> None:
        lost = self.lost()
        if lost:
            self._say.first("exitreasons-bpf-lost", f"exit reasons: the BPF map is full ({self.max_entries} "
                            f"(process, reason) keys): hits of new keys are not counted (so far: {lost})")
        missed = self.missed()
        if missed:
            self._say.first("exitreasons-bpf-missed", "exit reasons: hits not counted because another BPF "
                            f"tracing program was running on the CPU at the time (so far: {missed})")

    def lost(self) -> dict[str, int]:
        """Hits not counted because the map was full, by tracepoint name (only those with losses)."""
        self._check_open()
        lost: dict[str, int] = {}
        key = ctypes.create_string_buffer(4)
        values = ctypes.create_string_buffer(self._value_size)
        for index, spec in enumerate(self.specs):
            struct.pack_into("<I", key, 0, index)
            attr = _attr(32, (0, "I", self.lost_fd), (8, "Q", _addr(key)), (16, "Q", _addr(values)))
            bpf(BPF_MAP_LOOKUP_ELEM, attr, "bpf(BPF_MAP_LOOKUP_ELEM) of the lost-hits array")
            count = self._sum(values, 0)
            if count:
                lost[spec.name] = lost.get(spec.name, 0) + count
        return lost

    def missed(self) -> dict[str, int]:
        """Hits not counted because another BPF program (kprobe, tracepoint: any tool's) was running on that CPU
        when the tracepoint fired (the kernel does not nest them), by tracepoint name (only those with misses)."""
        self._check_open()
        missed: dict[str, int] = {}
        for spec, prog_fd in zip(self.specs, self.prog_fds):
            count = prog_run_stats(prog_fd)[2]
            if count:
                missed[spec.name] = missed.get(spec.name, 0) + count
        return missed

    def _check_open(self) -> None:
        if self.counts_fd < 0:
            raise ValueError("the counter is closed")

    def fds(self) -> int:
        return len(self.perf_fds) + len(self.prog_fds) + (self.counts_fd >= 0) + (self.lost_fd >= 0)

    def close(self) -> None:
        # Perf events first: closing them detaches the programs; then programs, then maps.
        for fd in self.perf_fds + self.prog_fds:
            os.close(fd)
        self.perf_fds = []
        self.prog_fds = []
        for attr in ("counts_fd", "lost_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)

    def __enter__(self) -> BpfExitCounter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
