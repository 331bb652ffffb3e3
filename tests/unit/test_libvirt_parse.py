"""The libvirt source's key parsing and auto's merging, on made-up stats records (no libvirtd)."""

from __future__ import annotations

import logging

from kvmfleet.logsay import SayOnce
from kvmfleet.model import StatType, StatUnit, Usability, VMIdentity, VMKey, VMReading
from kvmfleet.sources.auto import AutoSource
from kvmfleet.sources.base import Source
from kvmfleet.sources.libvirt import LibvirtSource, parse_key, parse_stats

RECORD = {
    "vcpu.current": 2, "vcpu.maximum": 2,
    "vcpu.0.state": 1, "vcpu.0.time": 5000, "vcpu.0.wait": 0, "vcpu.0.delay": 7, "vcpu.0.halted": True,
    "vcpu.0.exits.sum": 10, "vcpu.0.guest_mode.cur": True, "vcpu.0.blocking.cur": False,
    "vcpu.1.exits.sum": 5, "vcpu.1.guest_mode.cur": False,
    "vm.mmu_pte_write.sum": 42, "vm.pages_4k.cur": 7, "vm.max_mmu_rmap_size.max": 3,
    "vm.odd.sum": 1.5, "vm.text.cur": "x", "vm.hist.bucket": 1, "vcpu.0.a.b.sum": 1, "block.count": 1,
}


def test_parse_keys_types_booleans_and_skips(caplog) -> None:
    keys: dict = {}
    say = SayOnce()
    with caplog.at_level(logging.WARNING, "kvmfleet"):
        vm, vcpus, descs = parse_stats(RECORD, keys, say)
        parse_stats(RECORD, keys, say)  # the second sample says nothing new
    assert vm == {"mmu_pte_write": 42, "pages_4k": 7, "max_mmu_rmap_size": 3}
    assert vcpus == {0: {"exits": 10, "guest_mode": 1, "blocking": 0}, 1: {"exits": 5, "guest_mode": 0}}
    assert all(type(v) is int for s in (vm, *vcpus.values()) for v in s.values())  # bools as ints
    assert descs["mmu_pte_write"].type is StatType.CUMULATIVE
    assert descs["pages_4k"].type is StatType.INSTANT
    assert descs["max_mmu_rmap_size"].type is StatType.PEAK
    assert (descs["guest_mode"].type, descs["guest_mode"].unit) == (StatType.INSTANT, StatUnit.BOOLEAN)
    assert descs["exits"].unit is StatUnit.NONE and descs["exits"].exponent == 0  # libvirt gives no units
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 4, said  # odd (float), text (str), hist.bucket, a.b, each once; block.* is not ours
    assert sum("vm.odd.sum is a float" in m for m in said) == 1
    assert sum("'vm.hist.bucket'" in m for m in said) == 1


def test_parse_key_leaves_libvirt_own_fields_out_silently() -> None:
    for key in ("vcpu.current", "vcpu.maximum", "vcpu.3.state", "vcpu.3.time", "vcpu.3.wait", "vcpu.3.delay",
                "vcpu.3.halted", "balloon.current", "net.count"):
        assert parse_key(key) is None, key
    assert isinstance(parse_key("vcpu.3.exits.total"), str)
    assert parse_key("vcpu.12.halt_exits.sum").vcpu == 12  # type: ignore[union-attr]


class Fixed(Source):
    def __init__(self, name: str, readings: list[VMReading], usable: bool = True) -> None:
        self.name, self.readings, self.usable = name, readings, usable

    def read(self) -> list[VMReading]:
        return self.readings

    def usability(self) -> Usability:
        return Usability(self.usable, "fixed")


class LockedDebugfs(Fixed):
    def listed_vms(self) -> list[tuple[int, int]]:
        return [(100, 9), (200, 9)]

    def identity(self, pid: int, vm_fd: int) -> VMIdentity:
        return VMIdentity(VMKey(pid, 1, vm_fd), "qemu", f"vm{pid}")

    def vcpus_listed(self, pid: int, vm_fd: int) -> int | None:
        return {100: 4, 200: 2}.get(pid)  # its vcpuN directories, listed under lockdown too


class Statsfd(Fixed):
    def hint(self, pids: set[int]) -> None:
        pass

    def vmm_pids(self) -> set[int]:
        return set()


class FakeLibvirt(LibvirtSource):
    def __init__(self, readings: list[VMReading]) -> None:
        super().__init__(optional=True)
        self.readings = readings
        self.asked: list[tuple[int, bool]] = []

    def read_groups(self, vcpus_for=None) -> list[VMReading]:  # type: ignore[no-untyped-def]
        self.asked = [(r.identity.key.pid, vcpus_for(r.identity.key.pid)) for r in self.readings]
        out = []
        for r in self.readings:
            want = vcpus_for(r.identity.key.pid)
            out.append(VMReading(r.identity, "libvirt", dict(r.vm_stats), dict(r.vcpus) if want else {}, dict(r.descs)))
        return out


def test_auto_takes_vm_stats_from_libvirt_and_vcpus_from_held_fds_one_vm_each() -> None:
    a = VMIdentity(VMKey(100, 1, 9), "qemu", "dom-a", "uuid-a")
    b = VMIdentity(VMKey(200, 1, 9), "qemu", "dom-b", "uuid-b")
    libvirt = FakeLibvirt([VMReading(a, "libvirt", {"mmu_pte_write": 4}, {0: {"exits": 1}}),
                           VMReading(b, "libvirt", {"mmu_pte_write": 8}, {0: {"exits": 2}})])
    # QEMU >= 8.1 of dom-a holds vCPU stats fds (no VM-level one); dom-b's QEMU holds none
    statsfd = Statsfd("statsfd", [VMReading(VMIdentity(VMKey(100, 1, 9), "qemu", "dom-a", "uuid-a"), "statsfd",
                                            {}, {0: {"exits": 11}, 1: {"exits": 12}})])
    auto = AutoSource(debugfs=LockedDebugfs("debugfs", [], usable=False), statsfd=statsfd, libvirt=libvirt)  # type: ignore[arg-type]
    got = {r.identity.name: r for r in auto.read()}
    assert set(got) == {"dom-a", "dom-b"}  # each VM once; debugfs's listing adds no "none" twin
    assert got["dom-a"].source == "libvirt+statsfd"
    assert dict(got["dom-a"].vm_stats) == {"mmu_pte_write": 4}
    assert got["dom-a"].vcpus == {0: {"exits": 11}, 1: {"exits": 12}}
    assert got["dom-b"].source == "libvirt" and got["dom-b"].vcpus == {0: {"exits": 2}}
    assert sorted(libvirt.asked) == [(100, False), (200, True)]  # libvirt not asked for dom-a's vCPUs


def test_auto_does_not_ask_libvirt_while_debugfs_reads() -> None:
    ident = VMIdentity(VMKey(100, 1, 9), "qemu", "vm100")
    libvirt = FakeLibvirt([VMReading(ident, "libvirt", {"mmu_pte_write": 4})])
    debugfs = LockedDebugfs("debugfs", [VMReading(ident, "debugfs", {"mmu_pte_write": 4}, vm_stats_include_vcpus=True)])
    auto = AutoSource(debugfs=debugfs, statsfd=Statsfd("statsfd", []), libvirt=libvirt)  # type: ignore[arg-type]
    read = auto.read()
    assert [r.source for r in read] == ["debugfs", "none"]  # vm200 is listed but unreadable
    assert read[1].vcpus_listed == 2  # its vCPUs are counted all the same
    assert libvirt.asked == []


def test_what_qemu_names_reaches_the_log_escaped(caplog) -> None:
    """Keys and values come from QEMU's replies: a hostile VMM chooses them (docs/statistics.md, "Hostile VMMs")."""
    with caplog.at_level(logging.WARNING, "kvmfleet"):
        parse_stats({"vm.evil\x1b[2J.sum": "\x1b]0;x\x07"}, {}, SayOnce())
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "\x1b" not in said[0] and "vm.evil\\x1b[2J.sum is a str" in said[0], said
