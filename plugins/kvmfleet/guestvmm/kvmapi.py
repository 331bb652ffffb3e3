"""The slice of the KVM userspace API (include/uapi/linux/kvm.h) that the guest VMM needs.

ioctl numbers, ctypes mirrors of the x86 register structures, and the layout of the shared
``struct kvm_run`` page that each vCPU fd maps. Only the stdlib is used (``fcntl.ioctl``, ``ctypes``).
All structures are native-endian and laid out as the kernel lays them out on x86-64; their sizes are
checked at import time.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

# --- ioctl number encoding (include/uapi/asm-generic/ioctl.h) --------------------------------------------

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (type_ << 8) | nr


def _io(type_: int, nr: int) -> int:
    return _ioc(_IOC_NONE, type_, nr, 0)


def _iow(type_: int, nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, type_, nr, size)


def _ior(type_: int, nr: int, size: int) -> int:
    return _ioc(_IOC_READ, type_, nr, size)


KVMIO = 0xAE
KVM_API_VERSION = 12

# --- structures ------------------------------------------------------------------------------------------


class KvmRegs(ctypes.Structure):
    """struct kvm_regs (x86)."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]  # fmt: skip


class KvmSegment(ctypes.Structure):
    """struct kvm_segment: a segment register with its hidden (cached descriptor) part."""

    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    ]


class KvmDtable(ctypes.Structure):
    """struct kvm_dtable: GDTR / IDTR."""

    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint16),
        ("padding", ctypes.c_uint16 * 3),
    ]


class KvmSregs(ctypes.Structure):
    """struct kvm_sregs (x86)."""

    _fields_ = [
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", ctypes.c_uint64),
        ("cr2", ctypes.c_uint64),
        ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64),
        ("cr8", ctypes.c_uint64),
        ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * 4),
    ]


class KvmUserspaceMemoryRegion(ctypes.Structure):
    """struct kvm_userspace_memory_region."""

    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    ]


class KvmRunIo(ctypes.Structure):
    """kvm_run.io (KVM_EXIT_IO); the data lives in the kvm_run page at ``data_offset``."""

    _fields_ = [
        ("direction", ctypes.c_uint8),
        ("size", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("count", ctypes.c_uint32),
        ("data_offset", ctypes.c_uint64),
    ]


class KvmRunMmio(ctypes.Structure):
    """kvm_run.mmio (KVM_EXIT_MMIO)."""

    _fields_ = [
        ("phys_addr", ctypes.c_uint64),
        ("data", ctypes.c_uint8 * 8),
        ("len", ctypes.c_uint32),
        ("is_write", ctypes.c_uint8),
    ]


class KvmRunFailEntry(ctypes.Structure):
    """kvm_run.fail_entry (KVM_EXIT_FAIL_ENTRY)."""

    _fields_ = [
        ("hardware_entry_failure_reason", ctypes.c_uint64),
        ("cpu", ctypes.c_uint32),
    ]


class KvmRunInternal(ctypes.Structure):
    """kvm_run.internal (KVM_EXIT_INTERNAL_ERROR)."""

    _fields_ = [
        ("suberror", ctypes.c_uint32),
        ("ndata", ctypes.c_uint32),
        ("data", ctypes.c_uint64 * 16),
    ]


class KvmRunExit(ctypes.Union):
    """The exit-reason union of struct kvm_run (256 bytes of padding in the kernel header)."""

    _fields_ = [
        ("io", KvmRunIo),
        ("mmio", KvmRunMmio),
        ("fail_entry", KvmRunFailEntry),
        ("internal", KvmRunInternal),
        ("padding", ctypes.c_char * 256),
    ]


class KvmRun(ctypes.Structure):
    """The head of struct kvm_run, the page shared with the kernel through mmap of the vCPU fd."""

    _fields_ = [
        ("request_interrupt_window", ctypes.c_uint8),
        ("immediate_exit", ctypes.c_uint8),
        ("padding1", ctypes.c_uint8 * 6),
        ("exit_reason", ctypes.c_uint32),
        ("ready_for_interrupt_injection", ctypes.c_uint8),
        ("if_flag", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("cr8", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("exit", KvmRunExit),
    ]


assert ctypes.sizeof(KvmRegs) == 144
assert ctypes.sizeof(KvmSegment) == 24
assert ctypes.sizeof(KvmDtable) == 16
assert ctypes.sizeof(KvmSregs) == 312
assert ctypes.sizeof(KvmUserspaceMemoryRegion) == 32
assert KvmRun.exit.offset == 32

# --- ioctls ----------------------------------------------------------------------------------------------

# on /dev/kvm
KVM_GET_API_VERSION = _io(KVMIO, 0x00)
KVM_CREATE_VM = _io(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _io(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(KVMIO, 0x04)
# on a VM fd
KVM_CREATE_VCPU = _io(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _iow(KVMIO, 0x46, ctypes.sizeof(KvmUserspaceMemoryRegion))
KVM_SET_TSS_ADDR = _io(KVMIO, 0x47)
KVM_GET_STATS_FD = _io(KVMIO, 0xCE)  # also on a vCPU fd
# on a vCPU fd
KVM_RUN = _io(KVMIO, 0x80)
KVM_GET_REGS = _ior(KVMIO, 0x81, ctypes.sizeof(KvmRegs))
KVM_SET_REGS = _iow(KVMIO, 0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS = _ior(KVMIO, 0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS = _iow(KVMIO, 0x84, ctypes.sizeof(KvmSregs))

# KVM_CHECK_EXTENSION arguments
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_BINARY_STATS_FD = 203

# kvm_run.exit_reason
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17

EXIT_REASON_NAMES = {
    KVM_EXIT_UNKNOWN: "UNKNOWN",
    KVM_EXIT_EXCEPTION: "EXCEPTION",
    KVM_EXIT_IO: "IO",
    KVM_EXIT_HYPERCALL: "HYPERCALL",
    KVM_EXIT_DEBUG: "DEBUG",
    KVM_EXIT_HLT: "HLT",
    KVM_EXIT_MMIO: "MMIO",
    KVM_EXIT_IRQ_WINDOW_OPEN: "IRQ_WINDOW_OPEN",
    KVM_EXIT_SHUTDOWN: "SHUTDOWN",
    KVM_EXIT_FAIL_ENTRY: "FAIL_ENTRY",
    KVM_EXIT_INTR: "INTR",
    KVM_EXIT_INTERNAL_ERROR: "INTERNAL_ERROR",
}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1


class KvmError(Exception):
    """A KVM step failed. ``step`` names it (e.g. ``"KVM_CREATE_VM"``); str() is one line."""

    def __init__(self, step: str, detail: str, errno_: int | None = None) -> None:
        super().__init__(f"{step}: {detail}")
        self.step = step
        self.errno = errno_

    @classmethod
    def from_errno(cls, step: str, code: int) -> KvmError:
        """``step: <strerror> (<ENAME>)``."""
        return cls(step, f"{os.strerror(code)} ({errno.errorcode.get(code, code)})", code)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_PROT_READ_WRITE = 0x3
_MAP_SHARED = 0x01


def mmap_shared(fd: int, size: int, *, step: str) -> int:
    """mmap(2) ``size`` bytes of ``fd`` read/write, shared; returns the address.

    Used for the kvm_run page of a vCPU fd instead of :class:`mmap.mmap`, which keeps a dup() of the fd
    open: a VMM must show exactly one ``anon_inode:kvm-vcpu:N`` link per vCPU in ``/proc/<pid>/fd``.
    """
    addr = _libc.mmap(None, size, _PROT_READ_WRITE, _MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        raise KvmError.from_errno(step, ctypes.get_errno())
    return int(addr)


def munmap(addr: int, size: int) -> None:
    _libc.munmap(addr, size)


def ioctl(fd: int, request: int, arg: int | ctypes.Structure = 0, *, step: str) -> int:
    """``ioctl(2)`` that raises :class:`KvmError` naming ``step`` on failure.

    ``arg`` is an int (passed by value) or a ctypes structure (passed by address, read and written
    in place by the kernel).
    """
    try:
        if isinstance(arg, ctypes.Structure):
            buf = (ctypes.c_char * ctypes.sizeof(arg)).from_buffer(arg)
            return int(fcntl.ioctl(fd, request, buf, True))
        return int(fcntl.ioctl(fd, request, arg))
    except OSError as exc:
        raise KvmError.from_errno(step, exc.errno or 0) from None
