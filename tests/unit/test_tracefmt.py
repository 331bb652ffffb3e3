"""Tests for kvmfleet.exitreasons.tracefmt on this kernel's real format files (tests/data/tracefmt/README)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvmfleet.exitreasons.tracefmt import FormatError, find_tracing_root, parse_format, read_format

DATA = Path(__file__).resolve().parent.parent / "data" / "tracefmt"
EXIT_TEXT = (DATA / "kvm_exit.format").read_text()
USER_TEXT = (DATA / "kvm_userspace_exit.format").read_text()


def test_kvm_exit_fields_and_id() -> None:
    fmt = parse_format(EXIT_TEXT, "kvm_exit")
    assert fmt.name == "kvm_exit" and fmt.event_id == 103
    assert (fmt.fields["exit_reason"].offset, fmt.fields["exit_reason"].size) == (8, 4)
    assert not fmt.fields["exit_reason"].signed and fmt.fields["common_pid"].signed
    assert (fmt.fields["isa"].offset, fmt.fields["guest_rip"].size) == (24, 8)
    spec = fmt.spec("exit_reason")
    assert (spec.name, spec.event_id, spec.reason_field, spec.reason_offset, spec.reason_size,
            spec.isa_offset, spec.isa_size) == ("kvm_exit", 103, "exit_reason", 8, 4, 24, 4)


def test_kvm_exit_vmx_table_is_the_isa_1_branch() -> None:
    fmt = parse_format(EXIT_TEXT, "kvm_exit")
    assert set(fmt.tables) == {1, 2}
    vmx = fmt.tables[1]
    assert len(vmx) == 65
    assert (vmx[0], vmx[12], vmx[30], vmx[48], vmx[85]) == (
        "EXCEPTION_NMI", "HLT", "IO_INSTRUCTION", "EPT_VIOLATION", "MSR_WRITE_IMM")
    assert 5 not in vmx  # no VMX reason 5 in this kernel
    assert fmt.value_masks == {1: 0xFFFF, 2: None}  # "REC->exit_reason & 0xffff" for VMX only


def test_kvm_exit_svm_table() -> None:
    svm = parse_format(EXIT_TEXT, "kvm_exit").tables[2]
    assert len(svm) == 110
    assert svm[0x400] == "npf"
    assert svm[0x40 + 14] == "PF excp"  # "0x040 + 14", a name with a space
    assert svm[0x78] == "hlt" and svm[0x7B] == "io" and svm[0x0A6] == "idle-halt"
    assert svm[0xFFFFFFFF] == "invalid_guest_state"  # "-1" of the u32 field
    assert svm[0x8000FFFD] == "vmgexit_hypervisor_feature"


def test_kvm_userspace_exit_concatenated_names() -> None:
    fmt = parse_format(USER_TEXT, "kvm_userspace_exit")
    assert fmt.event_id == 42 and set(fmt.tables) == {None}  # "errno < 0 ?" is no isa condition
    table = fmt.tables[None]
    assert len(table) == 31
    assert (table[2], table[5], table[6], table[10], table[30]) == (
        "KVM_EXIT_IO", "KVM_EXIT_HLT", "KVM_EXIT_MMIO", "KVM_EXIT_INTR", "KVM_EXIT_X86_WRMSR")
    spec = fmt.spec("reason")
    assert (spec.reason_offset, spec.reason_size, spec.isa_offset) == (8, 4, None)


def test_condition_is_read_not_assumed_from_positions() -> None:
    swapped = EXIT_TEXT.replace("(REC->isa == 1) ? __print_symbolic(REC->exit_reason & 0xffff,",
                                "(REC->isa != 1) ? __print_symbolic(REC->exit_reason & 0xffff,")
    fmt = parse_format(swapped, "kvm_exit")
    assert fmt.tables[2][12] == "HLT" and fmt.tables[1][0x400] == "npf"


def test_spec_of_a_missing_field() -> None:
    with pytest.raises(FormatError, match="no field 'nope'"):
        parse_format(USER_TEXT, "kvm_userspace_exit").spec("nope")


@pytest.mark.parametrize("text, why", [
    ("", "no ID"),
    ("garbage\x00\xff\nmore garbage\n", "no ID"),
    ("name: kvm_exit\nID: 103\nformat:\n", "no field"),
    (EXIT_TEXT.split("print fmt:")[0], "no 'print fmt:'"),
    (EXIT_TEXT[: EXIT_TEXT.index('{ 0x400, "npf" }') + 5], "unterminated string|unbalanced"),
    (EXIT_TEXT[: EXIT_TEXT.index("{ 0x400,")], "unbalanced"),
    (USER_TEXT.replace('{ 5, "KVM_EXIT_" "HLT" }', '{ five, "KVM_EXIT_" "HLT" }'), "'five' is not an integer"),
    (USER_TEXT.replace("__print_symbolic(REC->reason,", "__print_symbolic(REC->nope,"), "not of a field"),
])
def test_garbage_and_truncated_formats_say_why(text: str, why: str) -> None:
    with pytest.raises(FormatError, match=why):
        parse_format(text, "kvm_exit")


def test_read_format_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match=f"{tmp_path}/events/kvm/kvm_exit/format"):
        read_format("kvm/kvm_exit", str(tmp_path))
    bad = tmp_path / "events" / "kvm" / "kvm_exit"
    bad.mkdir(parents=True)
    (bad / "format").write_text("name: kvm_exit\nID: 1\n")
    with pytest.raises(FormatError, match=f"{bad}/format: .*no field"):
        read_format("kvm/kvm_exit", str(tmp_path))
    (bad / "format").write_text(EXIT_TEXT)
    assert read_format("kvm/kvm_exit", str(tmp_path)).tables[1][48] == "EPT_VIOLATION"


@pytest.mark.skipif(find_tracing_root() is None or not os.path.exists(
    os.path.join(find_tracing_root() or "/", "events", "kvm", "kvm_exit", "format")),
    reason="no readable tracefs with kvm tracepoints on this host")
def test_live_format_files_parse() -> None:
    exit_fmt = read_format("kvm/kvm_exit")
    assert set(exit_fmt.tables) == {1, 2} and exit_fmt.tables[1][12] == "HLT" and exit_fmt.tables[2][0x400] == "npf"
    user_fmt = read_format("kvm/kvm_userspace_exit")
    assert user_fmt.tables[None][5] == "KVM_EXIT_HLT"
