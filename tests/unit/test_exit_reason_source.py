"""Tests for kvmfleet.exitreasons.source's naming and bookkeeping, on this kernel's format files with a fake
mechanism (the real mechanisms are tested against real guests in tests/kvm/test_exit_reasons.py)."""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from pathlib import Path

import pytest

from kvmfleet import procfs
from kvmfleet.exitreasons import source as S
from kvmfleet.exitreasons.counter import Counts, ExitCounter
from kvmfleet.exitreasons.tracefmt import parse_format
from kvmfleet.logsay import SayOnce
from kvmfleet.model import VMKey

DATA = Path(__file__).resolve().parent.parent / "data" / "tracefmt"
FORMATS = {name: parse_format((DATA / f"{name}.format").read_text(), name)
           for name in ("kvm_exit", "kvm_userspace_exit")}


class FakeCounter(ExitCounter):
    name = "fake"

    def __init__(self, host: Counts, per_pid: dict[int, Counts] | None = None, fail: OSError | None = None) -> None:
        self.host, self.per_pid, self.fail = host, per_pid or {}, fail
        self.asked: list[list[int]] = []
        self.closed = False

    def read(self, pids: Collection[int] = ()) -> tuple[Counts, dict[int, Counts]]:
        self.asked.append(sorted(pids))
        if self.fail is not None:
            raise self.fail
        return self.host, {pid: counts for pid, counts in self.per_pid.items() if pid in pids}

    def fds(self) -> int:
        return 0 if self.closed else 7

    def close(self) -> None:
        self.closed = True


def source_with(counter: FakeCounter, monkeypatch: pytest.MonkeyPatch, per_vm: bool = False,
                say: SayOnce | None = None) -> S.ExitReasonSource:
    monkeypatch.setattr(S, "read_formats", lambda root=None: FORMATS)
    monkeypatch.setattr(S.ExitReasonSource, "_open", lambda self, mechanism, formats, max_fds: counter)
    return S.ExitReasonSource(per_vm=per_vm, say=say)


def test_codes_are_named_from_the_format_files(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = FakeCounter({("kvm_exit", 1, 12): 3, ("kvm_exit", 1, 0x80000000 | 33): 1, ("kvm_exit", 1, 33): 2,
                           ("kvm_exit", 2, 0x400): 5, ("kvm_exit", 2, 0x4E): 6, ("kvm_exit", 2, 0xFFFFFFFF): 1,
                           ("kvm_userspace_exit", 0, 5): 10, ("kvm_userspace_exit", 0, 2): 1})
    reading = source_with(counter, monkeypatch).read([])
    assert reading.host == {
        "kvm_exit": {"HLT": 3, "INVALID_STATE": 3, "npf": 5, "PF excp": 6, "invalid_guest_state": 1},
        "kvm_userspace_exit": {"KVM_EXIT_HLT": 10, "KVM_EXIT_IO": 1},
    }  # VMX 0x80000021 (FAILED_VMENTRY | 33) is named by its low 16 bits, as the print format does
    assert reading.isa == {"HLT": "vmx", "INVALID_STATE": "vmx", "npf": "svm", "PF excp": "svm",
                           "invalid_guest_state": "svm", "KVM_EXIT_HLT": "userspace", "KVM_EXIT_IO": "userspace"}
    assert reading.vms == {}


def test_unknown_codes_are_counted_and_said_once(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    counter = FakeCounter({("kvm_exit", 1, 5): 2, ("kvm_userspace_exit", 0, 99): 4})
    source = source_with(counter, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="kvmfleet"):
        reading = source.read([])
        source.read([])
    assert reading.host == {"kvm_exit": {"unknown_5": 2}, "kvm_userspace_exit": {"unknown_99": 4}}
    assert reading.isa == {"unknown_5": "vmx", "unknown_99": "userspace"}
    said = [r.getMessage() for r in caplog.records]
    assert said == ["exit reasons: kvm_exit code 5 (isa 1) has no name in its format file: counted as unknown_5",
                    "exit reasons: kvm_userspace_exit code 99 (isa 0) has no name in its format file: counted as "
                    "unknown_99"]


def test_per_vm_by_pid_with_start_time_and_shared_pids(monkeypatch: pytest.MonkeyPatch) -> None:
    me = os.getpid()
    started = procfs.start_time(me)
    assert started is not None
    counts = {("kvm_userspace_exit", 0, 6): 8}
    counter = FakeCounter(counts, {me: counts, 1: counts})
    source = source_with(counter, monkeypatch, per_vm=True)
    mine = VMKey(me, started, 3)
    reused = VMKey(1, started + 12345)  # pid 1 runs, but not the process this key names
    gone = VMKey(2**22 + 7, 1)  # above pid_max: no such process (its counts, if the mechanism kept any, are read)
    reading = source.read([mine, reused, gone])
    assert counter.asked[-1] == [me, 2**22 + 7]
    assert reading.vms == {mine: {"kvm_userspace_exit": {"KVM_EXIT_MMIO": 8}}}
    # Two VMs in one process cannot be told apart: neither gets per-VM counts.
    reading = source.read([mine, VMKey(me, started, 4)])
    assert counter.asked[-1] == [] and reading.vms == {}
    assert reading.host == {"kvm_userspace_exit": {"KVM_EXIT_MMIO": 8}}


def test_not_per_vm_asks_about_no_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = FakeCounter({})
    reading = source_with(counter, monkeypatch).read([VMKey(os.getpid(), 1)])
    assert counter.asked == [[]] and reading.vms == {} and reading.host == {}


def test_a_mechanism_failure_empties_and_says_once(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    counter = FakeCounter({}, fail=OSError(5, "Input/output error"))
    source = source_with(counter, monkeypatch)
    assert source.usability().usable and source.mechanism_name == "fake" and source.fds() == 7
    with caplog.at_level(logging.WARNING, logger="kvmfleet"):
        first, second = source.read([]), source.read([])
    assert first.host == {} and second.host == {} and counter.closed and len(counter.asked) == 1
    state = source.usability()
    assert not state.usable and state.reason == ("exit reasons stopped: fake failed ([Errno 5] Input/output error)")
    assert [r.getMessage() for r in caplog.records] == [state.reason]
    assert source.mechanism_name == "none" and source.fds() == 0


def test_unusable_without_tracefs_does_not_raise(tmp_path: Path) -> None:
    source = S.ExitReasonSource(root=str(tmp_path), say=SayOnce(quiet=True))
    state = source.usability()
    assert not state.usable
    assert state.reason == (f"exit reasons cannot be counted: [Errno 2] cannot read "
                            f"{tmp_path}/events/kvm/kvm_exit/format: No such file or directory")
    assert source.read([VMKey(1, 1)]).host == {} and source.fds() == 0
    source.close()


def test_unknown_mechanism_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="exit reasons mechanism 'ebpf': expected one of auto, bpf, perf-count"):
        S.ExitReasonSource(mechanism="ebpf")


def test_counted_reasons_by_host_isa() -> None:
    both = S.counted_reasons(FORMATS, None)  # PVM: neither vmx nor svm, both tables filtered by isa
    exits = [r for r in both if r.key[0] == "kvm_exit"]
    assert len(exits) == 65 + 110 and len(both) == 65 + 110 + 31
    by_key = {r.key: r.filter for r in both}
    assert by_key[("kvm_exit", 1, 12)] == "exit_reason == 12 && isa == 1"
    assert by_key[("kvm_exit", 2, 0xFFFFFFFF)] == "exit_reason == 4294967295 && isa == 2"
    assert by_key[("kvm_userspace_exit", 0, 5)] == "reason == 5"
    vmx = S.counted_reasons(FORMATS, 1)
    assert len(vmx) == 65 + 31 and {r.key[1] for r in vmx if r.key[0] == "kvm_exit"} == {1}
    assert {r.filter for r in vmx if r.key == ("kvm_exit", 1, 48)} == {"exit_reason == 48"}
    assert len(S.counted_reasons(FORMATS, 2)) == 110 + 31


@pytest.mark.parametrize("flags, isa", [("fpu vmx ept", 1), ("fpu svm npt", 2), ("fpu hypervisor", None)])
def test_host_isa(tmp_path: Path, flags: str, isa: int | None) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\n")
    assert S.host_isa(str(cpuinfo)) == isa
    assert S.host_isa(str(tmp_path / "missing")) is None
