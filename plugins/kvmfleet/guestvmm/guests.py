"""Guest programs of the guest VMM, hand-assembled, and the exact counts each one moves.

Every workload is a counted loop: the VMM puts the loop count in ``(e|r)cx`` and a "forever" flag in
``(e|r)bx`` (``--loops 0``), the guest runs the workload body that many times and then signals
completion with ``out 0xf4, al`` (the *done port*, like QEMU's isa-debug-exit). The VMM stops entering
KVM_RUN for a vCPU once it has seen its done ``out``.

Memory map (guest-physical; one memslot at 0):

* real-mode workloads (halt, mmio, pio, idle): 64 KiB of RAM, code at 0x1000, ``CS:IP = 0000:1000``;
  the mmio workload stores to ``MMIO_ADDR`` (0xd0000, outside the memslot, through ``DS`` base).
* paging: 4 MiB of RAM, 64-bit long mode, identity-mapped with 4 KiB pages over the first 2 MiB
  (PML4 0x2000 -> PDPT 0x4000 -> PD 0x5000 -> PT 0x3000), code at 0x1000. vCPU *i* owns the virtual
  page ``0x100000 + i*0x1000`` (PTE at ``0x3000 + 8*(256+i)``) and flips it between the physical pages
  ``0x200000 + i*0x2000`` and ``+0x1000``, so at most 256 vCPUs.

Exact counts after ``--loops N`` (N >= 1), per vCPU unless marked (VM), for an undisturbed run,
read from the VMM's own KVM_GET_STATS_FD fds after its ready line. Measured on Linux 6.18 with the PVM
backend (``kvm_pvm``: shadow paging, every real-mode instruction and every long-mode memory access of
these guests goes through KVM's instruction emulator), N in {1, 2, 1000, 20000, 100000}, 1-4 vCPUs,
with and without competing CPU load:

========  ==========  ==========  ========  ==============  ==========  ===========  ===================
workload  halt_exits  mmio_exits  io_exits  insn_emulation  fpu_reload  invlpg       mmu_pte_write (VM)
========  ==========  ==========  ========  ==============  ==========  ===========  ===================
halt      N           0           0         5N + 1          N + 1       0            0
mmio      0           N           0         5N + 1          N + 1       0            0
pio       0           0           **0**     5N + 1          N + 1       0            0
paging    0           0           0         8N + 1          1           N            **2N per vCPU**
idle      0           0           0         0               0           0            0
========  ==========  ==========  ========  ==============  ==========  ===========  ===================

* ``exits`` is **not** exact: host interrupts and preemption add exits (``preemption_other`` moves with
  them). It is at least N + 1 for halt/mmio/pio (N workload exits + the done ``out``) and at least 1 for
  paging (the done ``out``); :func:`minimum_counts` gives these floors.
* The first KVM_RUN adds nothing. The done ``out`` adds 1 to ``exits`` and to ``insn_emulation`` (the
  ``+ 1``) but nothing to ``io_exits``.
* ``io_exits`` stays 0: ports written by emulated instructions are not counted there (``vmx.c``'s
  ``handle_io`` counts only intercepted IN/OUT), though each ``out`` does return KVM_EXIT_IO to the VMM.
* ``insn_emulation`` counts every guest instruction here: 5 per loop (body, ``test``, ``jnz``, ``dec``,
  ``jnz``) for the real-mode loops, 8 for paging, + 1 for the done ``out``.
* ``fpu_reload`` counts KVM_RUN entries on PVM: one per exit to userspace, + 1.
* ``mmu_pte_write`` grows by 2 for each PTE rewrite (one guest ``mov``), not 1.
* Other counters that move but are not exact: ``req_event``, ``preemption_other``, ``tlb_flush`` (1),
  ``mmu_cache_miss`` (VM; 4 for real mode, 1 for paging).

Returns from KVM_RUN to the VMM (the ``kvm:kvm_userspace_exit`` tracepoint, by ``reason``), exact on any backend
since the VMM makes them: each workload exit (``hlt`` -> KVM_EXIT_HLT with no in-kernel irqchip, the MMIO store ->
KVM_EXIT_MMIO, ``out 0x80`` -> KVM_EXIT_IO) returns once, and the done ``out`` once more as KVM_EXIT_IO; after it
the vCPU thread enters KVM_RUN no more, so stopping the VM kicks no vCPU out of KVM_RUN (no KVM_EXIT_INTR) for a
bounded run. Measured on Linux 6.18 PVM (tests/kvm/test_exit_reasons.py and by hand: halt, mmio, pio and paging,
N in {1, 300, 1000}, 1-3 vCPUs); :func:`expected_userspace_exits` gives them per VM:

========  ===================================
workload  KVM_RUN returns per vCPU, by reason
========  ===================================
halt      KVM_EXIT_HLT N, KVM_EXIT_IO 1
mmio      KVM_EXIT_MMIO N, KVM_EXIT_IO 1
pio       KVM_EXIT_IO N + 1
paging    KVM_EXIT_IO 1
idle      none (no vCPU runs)
========  ===================================

On other backends (``kvm_intel``/``kvm_amd``, not measured here) only ``halt_exits`` and ``mmio_exits``
follow from the kernel source (``__kvm_emulate_halt`` and ``x86_emulate_instruction`` count each exit
to userspace once); real mode runs natively there, so :func:`expected_counts` returns only those two.
"""

from __future__ import annotations

import os
import struct

# Guest-physical layout.
CODE_ADDR = 0x1000
REAL_MODE_MEM_SIZE = 0x10000
LONG_MODE_MEM_SIZE = 0x400000
MMIO_ADDR = 0xD0000
PML4_ADDR = 0x2000
PT_ADDR = 0x3000
PDPT_ADDR = 0x4000
PD_ADDR = 0x5000
PAGING_VIRT_BASE = 0x100000
PAGING_PHYS_BASE = 0x200000
PAGING_MAX_VCPUS = 256
TSS_ADDR = 0x7FFBD000  # must fit a signed int through fcntl.ioctl

# Ports.
WORK_PORT = 0x80  # the pio workload writes here
DONE_PORT = 0xF4  # every workload writes here once, after its last loop

PTE_P_RW = 0x3  # present | writable

WORKLOADS = ("halt", "mmio", "pio", "paging", "idle")
# Workloads whose vCPUs run a real-mode counted loop.
REAL_MODE_WORKLOADS = ("halt", "mmio", "pio")


def _rel8(source_end: int, target: int) -> bytes:
    """The rel8 displacement of a short jump ending at ``source_end`` to ``target``."""
    disp = target - source_end
    if not -128 <= disp <= 127:
        raise ValueError(f"short jump out of range: {disp}")
    return struct.pack("<b", disp)


def _counted_loop(body: bytes, *, rex_w: bytes) -> bytes:
    """Wrap ``body`` in the counted loop shared by all workloads.

    ``rex_w`` is the operand-size prefix that widens ``bx``/``cx`` to 32 bits in real mode (``66``) or
    the REX.W prefix that makes them 64-bit in long mode (``48``). With ``dec`` written as ``ff /1``
    (not the one-byte ``49`` that is a REX prefix in long mode) the same bytes work in both modes::

        loop:   <body>
                test ebx, ebx     ; 66|48 85 db   (ebx != 0: --loops 0, run forever)
                jnz  loop         ; 75 rel8
                dec  ecx          ; 66|48 ff c9
                jnz  loop         ; 75 rel8
        done:   out  0xf4, al     ; e6 f4         (the done signal: KVM_EXIT_IO on DONE_PORT)
                jmp  done         ; eb fc         (never re-entered; exits again if it were)
    """
    code = bytearray(body)
    code += rex_w + b"\x85\xdb"  # test ebx, ebx
    code += b"\x75" + _rel8(len(code) + 2, 0)  # jnz loop
    code += rex_w + b"\xff\xc9"  # dec ecx
    code += b"\x75" + _rel8(len(code) + 2, 0)  # jnz loop
    code += b"\xe6" + bytes([DONE_PORT])  # done: out DONE_PORT, al
    code += b"\xeb\xfc"  # jmp done
    return bytes(code)


# Real-mode (16-bit) bodies. CS base 0, IP CODE_ADDR; DS base MMIO_ADDR for mmio.
HALT_BODY = b"\xf4"  # hlt                      -> KVM_EXIT_HLT (no in-kernel irqchip)
MMIO_BODY = b"\xa2\x00\x00"  # mov [0x0000], al  -> KVM_EXIT_MMIO, 1-byte write to MMIO_ADDR
PIO_BODY = b"\xe6" + bytes([WORK_PORT])  # out 0x80, al -> KVM_EXIT_IO, 1-byte out

# Long-mode (64-bit) body. rdi = address of this vCPU's PTE, rsi = its virtual page,
# rdx / r8 = the two PTE values it alternates between.
PAGING_BODY = (
    b"\x48\x89\x17"  # mov  [rdi], rdx   ; rewrite the PTE (shadowed page table: mmu_pte_write)
    b"\x0f\x01\x3e"  # invlpg [rsi]      ; drop the stale translation (vCPU stat invlpg)
    b"\x89\x06"  # mov  [rsi], eax       ; touch the page through the new mapping
    b"\x4c\x87\xc2"  # xchg rdx, r8      ; next time, the other physical page
)


def guest_code(workload: str) -> bytes:
    """The machine code loaded at CODE_ADDR for ``workload`` (``idle`` runs none; returns b"")."""
    if workload == "halt":
        return _counted_loop(HALT_BODY, rex_w=b"\x66")
    if workload == "mmio":
        return _counted_loop(MMIO_BODY, rex_w=b"\x66")
    if workload == "pio":
        return _counted_loop(PIO_BODY, rex_w=b"\x66")
    if workload == "paging":
        return _counted_loop(PAGING_BODY, rex_w=b"\x48")
    if workload == "idle":
        return b""
    raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")


def paging_tables(vcpus: int) -> list[tuple[int, bytes]]:
    """(guest-physical address, bytes) to write for the paging workload's page tables."""
    if not 1 <= vcpus <= PAGING_MAX_VCPUS:
        raise ValueError(f"the paging workload supports 1..{PAGING_MAX_VCPUS} vCPUs, not {vcpus}")
    pt = bytearray(struct.pack("<512Q", *((i << 12) | PTE_P_RW for i in range(512))))
    for i in range(vcpus):
        struct.pack_into("<Q", pt, 8 * (256 + i), paging_pte_values(i)[0])
    return [
        (PML4_ADDR, struct.pack("<Q", PDPT_ADDR | PTE_P_RW)),
        (PDPT_ADDR, struct.pack("<Q", PD_ADDR | PTE_P_RW)),
        (PD_ADDR, struct.pack("<Q", PT_ADDR | PTE_P_RW)),
        (PT_ADDR, bytes(pt)),
    ]


def paging_pte_values(vcpu: int) -> tuple[int, int]:
    """The two PTE values vCPU ``vcpu`` alternates between."""
    phys = PAGING_PHYS_BASE + vcpu * 0x2000
    return phys | PTE_P_RW, (phys + 0x1000) | PTE_P_RW


def paging_pte_addr(vcpu: int) -> int:
    return PT_ADDR + 8 * (256 + vcpu)


def paging_virt_addr(vcpu: int) -> int:
    return PAGING_VIRT_BASE + vcpu * 0x1000


def detect_backend(sys_module: str = "/sys/module") -> str:
    """The KVM backend of this host: ``pvm``, ``vmx``, ``svm`` or ``unknown`` (from loaded modules)."""
    for module, backend in (("kvm_pvm", "pvm"), ("kvm_intel", "vmx"), ("kvm_amd", "svm")):
        if os.path.isdir(os.path.join(sys_module, module)):
            return backend
    return "unknown"


def _check(workload: str, loops: int) -> None:
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    if loops < 1 and workload != "idle":
        raise ValueError("expected counts exist only for a bounded run (loops >= 1)")


def expected_counts(workload: str, loops: int, backend: str | None = None) -> dict[str, int]:
    """Exact per-vCPU stat values after ``loops`` loops of ``workload`` (see the module table).

    Only counters that are exact on ``backend`` (default: :func:`detect_backend`) are returned: the full
    measured row on ``pvm``, just ``halt_exits`` and ``mmio_exits`` elsewhere. ``loops`` must be >= 1
    (``--loops 0`` runs forever) except for ``idle``, which never runs its vCPUs.
    """
    _check(workload, loops)
    if backend is None:
        backend = detect_backend()
    n = loops
    if workload == "idle":
        counts = {"halt_exits": 0, "mmio_exits": 0, "io_exits": 0, "exits": 0}
        if backend == "pvm":
            counts.update(insn_emulation=0, fpu_reload=0, invlpg=0)
        return counts
    if workload == "paging":
        if backend != "pvm":
            return {}
        return {"halt_exits": 0, "mmio_exits": 0, "io_exits": 0, "insn_emulation": 8 * n + 1, "fpu_reload": 1,
                "invlpg": n}  # fmt: skip
    counts = {"halt_exits": n if workload == "halt" else 0, "mmio_exits": n if workload == "mmio" else 0}
    if backend == "pvm":
        counts.update(io_exits=0, insn_emulation=5 * n + 1, fpu_reload=n + 1, invlpg=0)
    return counts


def expected_vm_counts(workload: str, loops: int, vcpus: int, backend: str | None = None) -> dict[str, int]:
    """Exact VM-level stat values after every one of ``vcpus`` vCPUs ran ``loops`` loops (PVM only)."""
    _check(workload, loops)
    if (backend or detect_backend()) != "pvm":
        return {}
    if workload == "paging":
        return {"mmu_pte_write": 2 * loops * vcpus}
    return {"mmu_pte_write": 0}


def expected_userspace_exits(workload: str, loops: int, vcpus: int) -> dict[str, int]:
    """Exact ``kvm:kvm_userspace_exit`` counts by reason name for a VM of ``vcpus`` vCPUs that ran ``loops``
    loops of ``workload`` (module docstring), reasons with a count of 0 left out."""
    _check(workload, loops)
    if workload == "idle":
        return {}
    per_vcpu = {"halt": {"KVM_EXIT_HLT": loops, "KVM_EXIT_IO": 1}, "mmio": {"KVM_EXIT_MMIO": loops, "KVM_EXIT_IO": 1},
                "pio": {"KVM_EXIT_IO": loops + 1}, "paging": {"KVM_EXIT_IO": 1}}[workload]
    return {reason: count * vcpus for reason, count in per_vcpu.items()}


def minimum_counts(workload: str, loops: int) -> dict[str, int]:
    """Per-vCPU floors for counters that only grow past their exact value (``exits``), any backend."""
    _check(workload, loops)
    if workload == "idle":
        return {"exits": 0}
    if workload == "paging":
        return {"exits": 1}
    return {"exits": loops + 1}
