"""The BPF instruction encoding of exitreasons.bpf against the bytes clang/llvm-objdump give (little-endian)."""

from __future__ import annotations

import pytest

from kvmfleet import cpulist
from kvmfleet.exitreasons import bpf
from kvmfleet.exitreasons.counter import TracepointSpec


def test_single_instructions():
    assert bpf.mov64_reg(bpf.R6, bpf.R1).hex() == "bf16000000000000"  # r6 = r1
    assert bpf.rsh64_imm(bpf.R0, 32).hex() == "7700000020000000"  # r0 >>= 32
    assert bpf.add64_imm(bpf.R2, -16).hex() == "07020000f0ffffff"  # r2 += -16
    assert bpf.ldx_mem(4, bpf.R1, bpf.R6, 8).hex() == "6161080000000000"  # r1 = *(u32 *)(r6 + 8)
    assert bpf.stx_mem(4, bpf.R10, bpf.R0, -16).hex() == "630af0ff00000000"  # *(u32 *)(r10 - 16) = r0
    assert bpf.st_mem(8, bpf.R10, -24, 1).hex() == "7a0ae8ff01000000"  # *(u64 *)(r10 - 24) = 1
    assert bpf.atomic_add64(bpf.R0, bpf.R1).hex() == "db10000000000000"  # lock *(u64 *)(r0 + 0) += r1
    assert bpf.ld_map_fd(bpf.R1, 5).hex() == "1811000005000000" + "00" * 8  # r1 = map_fd(5) ll
    assert bpf.call(bpf.BPF_FUNC_map_lookup_elem).hex() == "8500000001000000"
    assert bpf.jeq_imm(bpf.R0, 0, 4).hex() == "1500040000000000"  # if r0 == 0 goto +4
    assert bpf.exit_insn().hex() == "9500000000000000"


def test_program_reads_the_spec_offsets_and_sizes():
    spec = TracepointSpec("kvm_exit", 103, "exit_reason", 8, 4, isa_offset=24)
    code = bpf.program(spec, 3, counts_fd=7, lost_fd=8, per_process=True)
    insns = [code[i : i + 8] for i in range(0, len(code), 8)]
    assert bpf.ldx_mem(4, bpf.R1, bpf.R6, 24) in insns  # isa
    assert bpf.ldx_mem(4, bpf.R1, bpf.R6, 8) in insns  # reason
    assert bpf.st_mem(4, bpf.R10, -4, 3) in insns  # the tracepoint index in the key
    assert bpf.call(bpf.BPF_FUNC_get_current_pid_tgid) in insns
    host_wide = bpf.program(spec, 3, counts_fd=7, lost_fd=8, per_process=False)
    assert bpf.call(bpf.BPF_FUNC_get_current_pid_tgid).hex() not in host_wide.hex()
    # every jump lands inside the program
    for i, ins in enumerate(insns):
        if ins[0] & 0x07 == bpf.BPF_JMP and ins[0] & 0xF0 not in (bpf.BPF_CALL, bpf.BPF_EXIT):
            target = i + 1 + int.from_bytes(ins[2:4], "little", signed=True)
            assert 0 <= target < len(insns)


def test_odd_field_sizes_are_refused():
    with pytest.raises(ValueError, match="reason field of 8 bytes"):
        bpf.program(TracepointSpec("t", 1, "r", 8, 8), 0, 3, 4, per_process=False)


def test_ld_imm64_splits_a_64_bit_constant():
    # r1 = 0x1_effffffc ll: low half in the first slot's imm, high half in the second's
    assert bpf.ld_imm64(bpf.R1, 0x1EFFFFFFC).hex() == "18010000fcffffef" + "0000000001000000"


def test_a_namespaced_program_asks_the_ns_helper_with_dev_and_ino():
    spec = TracepointSpec("kvm_userspace_exit", 42, "reason", 8, 4)
    code = bpf.program(spec, 0, 3, 4, per_process=True, pid_ns=(4, 0xEFFFFFFB))
    assert bpf.ld_imm64(bpf.R1, 4) + bpf.ld_imm64(bpf.R2, 0xEFFFFFFB) in code
    assert bpf.call(bpf.BPF_FUNC_get_ns_current_pid_tgid) in code
    assert bpf.call(bpf.BPF_FUNC_get_current_pid_tgid) not in code


def test_a_tracepoint_given_twice_is_refused_before_any_fd_is_opened():
    spec = TracepointSpec("kvm_userspace_exit", 42, "reason", 8, 4)
    with pytest.raises(ValueError, match="given twice"):
        bpf.BpfExitCounter([spec, spec], per_process=False)


def test_cpu_lists(tmp_path):
    path = tmp_path / "possible"
    path.write_text("0-3,8,10-11\n")
    assert cpulist.read(str(path)) == [0, 1, 2, 3, 8, 10, 11]
    assert bpf.possible_cpus(str(path)) == 12 and bpf.first_online_cpu(str(path)) == 0
    path.write_text("garbage\n")
    with pytest.raises(OSError, match="not a CPU list"):
        bpf.possible_cpus(str(path))
    for garbage in ("", "3-1", "1,1", "0-3,2", "x", "0-70000"):
        path.write_text(garbage)
        with pytest.raises(OSError, match="not a CPU list"):
            cpulist.read(str(path))
