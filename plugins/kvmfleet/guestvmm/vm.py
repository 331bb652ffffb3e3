"""One KVM virtual machine with M vCPUs running a workload from :mod:`.guests`, one thread per vCPU.

Lifecycle: :meth:`GuestVM.setup` (every ioctl up to the first KVM_RUN; raises :class:`KvmError` naming
the failing step), :meth:`GuestVM.start` (one thread per vCPU), then the caller waits for its ``notify``
callback and looks at :attr:`GuestVM.all_done` / :attr:`GuestVM.all_started` / :attr:`GuestVM.error`;
:meth:`GuestVM.stop` kicks vCPUs out of KVM_RUN (``immediate_exit`` + a signal to the thread) and joins
them; :meth:`GuestVM.close` releases every fd and mapping.

A vCPU thread enters KVM_RUN only until its guest has written the done port; after that the vCPU sits
idle, so its stats no longer change. The VM keeps its stats fds (``stats_fds``: ``all`` = VM + every
vCPU, ``vcpu`` = every vCPU like QEMU 8.1+, ``none`` like QEMU 7.2) for as long as it is open.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import signal
import threading
import time
from collections.abc import Callable

from . import guests
from .kvmapi import (
    EXIT_REASON_NAMES,
    KVM_API_VERSION,
    KVM_CAP_BINARY_STATS_FD,
    KVM_CAP_IMMEDIATE_EXIT,
    KVM_CAP_MAX_VCPUS,
    KVM_CAP_NR_VCPUS,
    KVM_CHECK_EXTENSION,
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_EXIT_HLT,
    KVM_EXIT_INTR,
    KVM_EXIT_IO,
    KVM_EXIT_IO_OUT,
    KVM_EXIT_MMIO,
    KVM_GET_API_VERSION,
    KVM_GET_SREGS,
    KVM_GET_STATS_FD,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_RUN,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    KVM_SET_TSS_ADDR,
    KVM_SET_USER_MEMORY_REGION,
    KvmError,
    KvmRegs,
    KvmRun,
    KvmSegment,
    KvmSregs,
    KvmUserspaceMemoryRegion,
    ioctl,
    mmap_shared,
    munmap,
)

STATS_FDS_CHOICES = ("all", "vcpu", "none")

# Signal sent to a vCPU thread to kick it out of KVM_RUN. The process must have a handler installed
# for it (see install_kick_handler), otherwise the default action would kill the process.
KICK_SIGNAL = signal.SIGUSR1

# Signals a vCPU thread blocks: all but the kick and the synchronous faults.
_VCPU_BLOCKED_SIGNALS = set(signal.valid_signals()) - {
    KICK_SIGNAL,
    signal.SIGSEGV,
    signal.SIGBUS,
    signal.SIGFPE,
    signal.SIGILL,
    signal.SIGABRT,
}

_CR0_PE = 1 << 0
_CR0_ET = 1 << 4
_CR0_PG = 1 << 31
_CR4_PAE = 1 << 5
_EFER_LME = 1 << 8
_EFER_LMA = 1 << 10
_RFLAGS_RESERVED = 1 << 1


def install_kick_handler() -> None:
    """Install a no-op handler for :data:`KICK_SIGNAL` (call from the main thread before stop())."""
    signal.signal(KICK_SIGNAL, _ignore_signal)


def _ignore_signal(signum: int, frame: object) -> None:
    """The kick signal only has to interrupt KVM_RUN; nothing to do when it is handled."""


class VcpuRunner:
    """One vCPU: its fd, its mmap'ed kvm_run page, its optional stats fd and its thread."""

    def __init__(self, vm: GuestVM, index: int, fd: int, run_addr: int, run_size: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = fd
        self.run_addr = run_addr
        self.run_size = run_size
        self.run = KvmRun.from_address(run_addr)
        self.stats_fd: int | None = None
        self.thread: threading.Thread | None = None
        self.started = False
        self.done = False
        self._counts: dict[int, int] = {}  # KVM_RUN returns by exit reason

    def loop(self) -> None:
        """Thread body: KVM_RUN until the guest writes the done port, or until stopped."""
        vm = self.vm
        try:
            # Like QEMU's vCPU threads, take no process-directed signal (SIGTERM & co. go to the main
            # thread); only the kick. A stray signal would make KVM_RUN return early and re-enter,
            # which adds to exits and fpu_reload.
            signal.pthread_sigmask(signal.SIG_SETMASK, _VCPU_BLOCKED_SIGNALS)
            self._loop()
        except KvmError as exc:
            vm.fail(str(exc))
        except Exception as exc:  # a bug here must not leave the VMM hanging with a dead vCPU
            vm.fail(f"vcpu {self.index}: {type(exc).__name__}: {exc}")

    def _loop(self) -> None:
        # The hot path: one iteration per exit to userspace. Locals only, fcntl.ioctl directly.
        vm = self.vm
        run = self.run
        fd = self.fd
        counts = self._counts
        expected = vm.expected_exit
        run_ioctl = fcntl.ioctl
        step = f"KVM_RUN vcpu {self.index}"
        self.started = True
        vm.vcpu_started()
        while not vm.stopping:
            try:
                run_ioctl(fd, KVM_RUN, 0)
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN):
                    continue  # kicked (stop) or a stray signal: re-check and re-enter
                raise KvmError.from_errno(step, exc.errno or 0) from None
            reason = run.exit_reason
            counts[reason] = counts.get(reason, 0) + 1
            if reason == KVM_EXIT_IO:
                io = run.exit.io
                if io.direction == KVM_EXIT_IO_OUT and io.port == guests.DONE_PORT:
                    self.done = True
                    vm.vcpu_done()
                    return
                if reason == expected and io.direction == KVM_EXIT_IO_OUT and io.port == guests.WORK_PORT:
                    continue
                direction = "out" if io.direction == KVM_EXIT_IO_OUT else "in"
                raise KvmError(step, f"unexpected port I/O: {direction} port {io.port:#x} size {io.size}")
            if reason == expected:
                if reason == KVM_EXIT_MMIO:
                    mmio = run.exit.mmio
                    if mmio.phys_addr != guests.MMIO_ADDR or not mmio.is_write:
                        kind = "write" if mmio.is_write else "read"
                        raise KvmError(step, f"unexpected MMIO {kind} at {mmio.phys_addr:#x}")
                continue
            if reason == KVM_EXIT_INTR:
                continue
            raise KvmError(step, f"unexpected exit {EXIT_REASON_NAMES.get(reason, '?')} ({reason})")

    @property
    def exit_counts(self) -> dict[str, int]:
        """Returns from KVM_RUN seen by userspace, by exit reason name (a cross-check of the stats)."""
        return {EXIT_REASON_NAMES.get(reason, str(reason)): n for reason, n in self._counts.items()}

    def kick(self) -> None:
        """Make the thread leave KVM_RUN soon: immediate_exit for the next entry, a signal for now."""
        self.run.immediate_exit = 1
        thread = self.thread
        if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
            return  # no handler: the signal would kill the process; immediate_exit must do
        if thread is not None and thread.is_alive() and thread.ident is not None:
            try:
                signal.pthread_kill(thread.ident, KICK_SIGNAL)
            except ProcessLookupError:  # the thread ended meanwhile
                pass

    def close(self) -> None:
        if self.stats_fd is not None:
            os.close(self.stats_fd)
            self.stats_fd = None
        del self.run
        munmap(self.run_addr, self.run_size)
        os.close(self.fd)


class GuestVM:
    """A VM running ``workload`` ``loops`` times on each of ``vcpus`` vCPUs (``loops`` 0: forever)."""

    def __init__(
        self,
        *,
        vcpus: int,
        workload: str,
        loops: int,
        stats_fds: str = "all",
        notify: Callable[[], None] | None = None,
        kvm_path: str = "/dev/kvm",
    ) -> None:
        if workload not in guests.WORKLOADS:
            raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(guests.WORKLOADS)}")
        if stats_fds not in STATS_FDS_CHOICES:
            raise ValueError(f"stats_fds must be one of {', '.join(STATS_FDS_CHOICES)}, not {stats_fds!r}")
        if vcpus < 1:
            raise ValueError("a VM needs at least one vCPU")
        if loops < 0:
            raise ValueError("loops must be >= 0")
        if workload == "paging" and vcpus > guests.PAGING_MAX_VCPUS:
            raise ValueError(f"the paging workload supports at most {guests.PAGING_MAX_VCPUS} vCPUs")
        self.vcpus = vcpus
        self.workload = workload
        self.loops = loops
        self.stats_fds_mode = stats_fds
        self.kvm_path = kvm_path
        self.expected_exit = {"halt": KVM_EXIT_HLT, "mmio": KVM_EXIT_MMIO, "pio": KVM_EXIT_IO}.get(workload, -1)
        self._notify = notify
        self._lock = threading.Lock()
        self._started = 0
        self._done = 0
        self.error: str | None = None
        self.stopping = False
        self.kvm_fd: int | None = None
        self.vm_fd: int | None = None
        self.vm_stats_fd: int | None = None
        self._mem: mmap.mmap | None = None
        self._mem_anchor: ctypes.Array[ctypes.c_char] | None = None
        self.vcpu_runners: list[VcpuRunner] = []

    # --- setup -----------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Open /dev/kvm, create the VM, its memory and vCPUs, load the guest. Raises KvmError."""
        try:
            self.kvm_fd = os.open(self.kvm_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmError.from_errno(f"open {self.kvm_path}", exc.errno or 0) from None
        kvm = self.kvm_fd
        version = ioctl(kvm, KVM_GET_API_VERSION, 0, step="KVM_GET_API_VERSION")
        if version != KVM_API_VERSION:
            raise KvmError("KVM_GET_API_VERSION", f"API version {version}, need {KVM_API_VERSION}")
        if self.stats_fds_mode != "none" and not ioctl(
            kvm, KVM_CHECK_EXTENSION, KVM_CAP_BINARY_STATS_FD, step="KVM_CHECK_EXTENSION"
        ):
            raise KvmError("KVM_CHECK_EXTENSION", "KVM_CAP_BINARY_STATS_FD missing (kernel < 5.14)")
        max_vcpus = ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_MAX_VCPUS, step="KVM_CHECK_EXTENSION") or ioctl(
            kvm, KVM_CHECK_EXTENSION, KVM_CAP_NR_VCPUS, step="KVM_CHECK_EXTENSION"
        )
        if max_vcpus and self.vcpus > max_vcpus:
            raise KvmError("KVM_CHECK_EXTENSION", f"{self.vcpus} vCPUs requested, KVM allows {max_vcpus}")
        if not ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_IMMEDIATE_EXIT, step="KVM_CHECK_EXTENSION"):
            raise KvmError("KVM_CHECK_EXTENSION", "KVM_CAP_IMMEDIATE_EXIT missing")
        mmap_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0, step="KVM_GET_VCPU_MMAP_SIZE")

        self.vm_fd = ioctl(kvm, KVM_CREATE_VM, 0, step="KVM_CREATE_VM")
        vm = self.vm_fd
        ioctl(vm, KVM_SET_TSS_ADDR, guests.TSS_ADDR, step="KVM_SET_TSS_ADDR")
        self._setup_memory()
        if self.stats_fds_mode == "all":
            self.vm_stats_fd = ioctl(vm, KVM_GET_STATS_FD, 0, step="KVM_GET_STATS_FD (VM)")

        for index in range(self.vcpus):
            step = f"KVM_CREATE_VCPU {index}"
            fd = ioctl(vm, KVM_CREATE_VCPU, index, step=step)
            try:
                run_addr = mmap_shared(fd, mmap_size, step=f"mmap kvm_run of vcpu {index}")
            except KvmError:
                os.close(fd)
                raise
            runner = VcpuRunner(self, index, fd, run_addr, mmap_size)
            self.vcpu_runners.append(runner)
            if self.stats_fds_mode in ("all", "vcpu"):
                runner.stats_fd = ioctl(fd, KVM_GET_STATS_FD, 0, step=f"KVM_GET_STATS_FD (vcpu {index})")
            if self.workload != "idle":
                self._setup_vcpu_state(runner)

    def _setup_memory(self) -> None:
        assert self.vm_fd is not None
        size = guests.LONG_MODE_MEM_SIZE if self.workload == "paging" else guests.REAL_MODE_MEM_SIZE
        mem = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, mmap.PROT_READ | mmap.PROT_WRITE)
        self._mem = mem
        code = guests.guest_code(self.workload)
        mem[guests.CODE_ADDR : guests.CODE_ADDR + len(code)] = code
        if self.workload == "paging":
            for addr, data in guests.paging_tables(self.vcpus):
                mem[addr : addr + len(data)] = data
        self._mem_anchor = (ctypes.c_char * size).from_buffer(mem)
        region = KvmUserspaceMemoryRegion(
            slot=0,
            flags=0,
            guest_phys_addr=0,
            memory_size=size,
            userspace_addr=ctypes.addressof(self._mem_anchor),
        )
        ioctl(self.vm_fd, KVM_SET_USER_MEMORY_REGION, region, step="KVM_SET_USER_MEMORY_REGION")

    def _setup_vcpu_state(self, runner: VcpuRunner) -> None:
        index, fd = runner.index, runner.fd
        sregs = KvmSregs()
        ioctl(fd, KVM_GET_SREGS, sregs, step=f"KVM_GET_SREGS vcpu {index}")
        regs = KvmRegs()
        regs.rflags = _RFLAGS_RESERVED
        regs.rip = guests.CODE_ADDR
        # The counted loop: rcx = loops, rbx != 0 runs forever (see guests._counted_loop).
        regs.rcx = self.loops
        regs.rbx = 1 if self.loops == 0 else 0
        if self.workload == "paging":
            self._long_mode_sregs(sregs)
            regs.rdi = guests.paging_pte_addr(index)
            regs.rsi = guests.paging_virt_addr(index)
            regs.rdx, regs.r8 = guests.paging_pte_values(index)
        else:
            # Real mode from the reset state, but CS:IP = 0000:CODE_ADDR.
            sregs.cs.base = 0
            sregs.cs.selector = 0
            if self.workload == "mmio":
                sregs.ds.base = guests.MMIO_ADDR
                sregs.ds.selector = guests.MMIO_ADDR >> 4
        ioctl(fd, KVM_SET_SREGS, sregs, step=f"KVM_SET_SREGS vcpu {index}")
        ioctl(fd, KVM_SET_REGS, regs, step=f"KVM_SET_REGS vcpu {index}")

    @staticmethod
    def _long_mode_sregs(sregs: KvmSregs) -> None:
        code = KvmSegment(base=0, limit=0xFFFFFFFF, selector=0x8, type=0xB, present=1, dpl=0, db=0, s=1, l=1, g=1)
        data = KvmSegment(base=0, limit=0xFFFFFFFF, selector=0x10, type=0x3, present=1, dpl=0, db=1, s=1, l=0, g=1)
        sregs.cs = code
        sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
        sregs.cr3 = guests.PML4_ADDR
        sregs.cr4 = _CR4_PAE
        sregs.cr0 = _CR0_PE | _CR0_ET | _CR0_PG
        sregs.efer = _EFER_LME | _EFER_LMA

    # --- running ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start one thread per vCPU (none for ``idle``).

        Called from the main thread, it installs the kick handler (:func:`install_kick_handler`) if
        :data:`KICK_SIGNAL` has none, so that :meth:`stop` can interrupt a vCPU inside KVM_RUN.
        """
        if self.workload == "idle":
            return
        if threading.current_thread() is threading.main_thread() and signal.getsignal(KICK_SIGNAL) in (
            signal.SIG_DFL,
            None,
        ):
            install_kick_handler()
        for runner in self.vcpu_runners:
            runner.thread = threading.Thread(target=runner.loop, name=f"vcpu{runner.index}", daemon=True)
            runner.thread.start()

    def vcpu_started(self) -> None:
        with self._lock:
            self._started += 1
        self._wake()

    def vcpu_done(self) -> None:
        with self._lock:
            self._done += 1
        self._wake()

    def fail(self, message: str) -> None:
        with self._lock:
            if self.error is None:
                self.error = message
        self._wake()

    def _wake(self) -> None:
        if self._notify is not None:
            self._notify()

    @property
    def all_started(self) -> bool:
        return self._started == len(self.vcpu_runners)

    @property
    def all_done(self) -> bool:
        return self._done == len(self.vcpu_runners)

    def stop(self, timeout: float = 0.5) -> bool:
        """Kick every vCPU out of KVM_RUN and join the threads; True if all ended within ``timeout``."""
        self.stopping = True
        for runner in self.vcpu_runners:
            runner.kick()
        deadline = time.monotonic() + timeout
        ok = True
        for runner in self.vcpu_runners:
            if runner.thread is not None:
                runner.thread.join(max(0.0, deadline - time.monotonic()))
                if runner.thread.is_alive():
                    ok = False
        return ok

    def stats_fds(self) -> dict[str, int]:
        """The stats fds this VM holds: ``{"vm": fd, "vcpu0": fd, ...}`` (what --stats-fds opened)."""
        fds: dict[str, int] = {}
        if self.vm_stats_fd is not None:
            fds["vm"] = self.vm_stats_fd
        for runner in self.vcpu_runners:
            if runner.stats_fd is not None:
                fds[f"vcpu{runner.index}"] = runner.stats_fd
        return fds

    def close(self) -> None:
        """Release every vCPU, the memory, the stats fds and the VM. Threads must have ended."""
        for runner in self.vcpu_runners:
            runner.close()
        self.vcpu_runners = []
        if self.vm_stats_fd is not None:
            os.close(self.vm_stats_fd)
            self.vm_stats_fd = None
        if self.vm_fd is not None:
            os.close(self.vm_fd)
            self.vm_fd = None
        self._mem_anchor = None
        if self._mem is not None:
            self._mem.close()
            self._mem = None
        if self.kvm_fd is not None:
            os.close(self.kvm_fd)
            self.kvm_fd = None
