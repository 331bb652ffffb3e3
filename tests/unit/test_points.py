"""kvmfleet.points: samples to line protocol (byte-equal to influxdb-client) and to dispatched values."""

from __future__ import annotations

import re
from typing import Any

from tests.support.refpoints import client_lines
from tests.unit.agentdata import (
    ListSource,
    dict_reading,
    entries,
    parse_line,
    reading,
    sample_of,
)

from kvmfleet import points as pt
from kvmfleet.collector import Collector
from kvmfleet.facts import HostFacts
from kvmfleet.model import ExitReasonReading
from kvmfleet.options import AgentConfig, parse_config
from kvmfleet.points import PointBuilder


# -- points -------------------------------------------------------------------------------------------------------
def builder(**kw: Any) -> PointBuilder:
    cfg = AgentConfig(**kw)
    return PointBuilder(cfg, "hv 1")


def test_lines_per_measurement_with_tags_fields_and_timestamp() -> None:
    s = sample_of(reading(11, "web,1", uuid="u-11"), reading(12, "db", uuid=None, vmm="firecracker"))
    b = builder(per_vcpu=True, tags={"rack": "r 9", "dc": "eu"})
    lines = b.build(s).lines
    parsed = [parse_line(t) for t in lines]
    assert [p[0] for p in parsed] == ["kvm", "kvm_vm", "kvm_vcpu", "kvm_vcpu", "kvm_vm", "kvm_vcpu", "kvm_vcpu"]
    assert all(p[3] == s.time_ns for p in parsed)
    host, vm11, vc0 = parsed[0], parsed[1], parsed[2]
    assert host[1] == {"host": r"hv\ 1", "rack": r"r\ 9", "dc": "eu"}
    assert vm11[1] == {"host": r"hv\ 1", "rack": r"r\ 9", "dc": "eu", "vm": r"web\,1", "vm_uuid": "u-11",
                       "vmm": "qemu"}
    assert parsed[4][1]["vmm"] == "firecracker" and "vm_uuid" not in parsed[4][1]
    assert vc0[1]["vcpu"] == "0" and vc0[1]["vm"] == r"web\,1"
    # fields: the kernel's names, integers; VM-level stats plus the vCPUs' sums
    assert vm11[2]["halt_exits"] == "20i" and vm11[2]["exits"] == str(15 + 16) + "i"
    assert vm11[2]["pages_4k"] == "111i" and vm11[2]["mmu_pte_write"] == "22i"
    assert host[2]["halt_exits"] == "40i" and host[2]["pages_4k"] == str(111 + 112) + "i"
    assert host[2]["max_mmu_rmap_size"] == "7i"
    assert vc0[2]["halt_exits"] == "10i" and "pages_4k" not in vc0[2]
    # histograms: non-zero buckets only, numbered from 0
    assert {k: v for k, v in vm11[2].items() if "_bucket_" in k} == {"halt_wait_hist_bucket_1": "6i",
                                                                      "halt_wait_hist_bucket_3": "2i"}
    assert {k: v for k, v in host[2].items() if "_bucket_" in k} == {"halt_wait_hist_bucket_1": "12i",
                                                                     "halt_wait_hist_bucket_3": "4i"}
    assert {k: v for k, v in vc0[2].items() if "_bucket_" in k} == {"halt_wait_hist_bucket_1": "3i",
                                                                    "halt_wait_hist_bucket_3": "1i"}


def test_lines_equal_influxdb_client_points() -> None:
    s = sample_of(reading(11, 'we b"x', uuid="u-11"))
    b = builder(per_vcpu=True, tags={"rack": "r=9"})
    ours = b.build(s).lines
    want = client_lines(s, "hv 1", {"rack": "r=9"})

    def canon(text: str) -> tuple[str, frozenset[str], int]:
        head, fields, ts = re.split(r"(?<!\\) ", text)
        return head, frozenset(re.split(r"(?<!\\),", fields)), int(ts)

    assert [canon(t) for t in ours] == [canon(t) for t in want]


def test_dict_stats_give_the_same_fields_as_stat_blocks() -> None:
    blocks = builder().build(sample_of(reading(11, "a"))).lines
    dicts = builder().build(sample_of(dict_reading(11, "a"))).lines
    assert parse_line(blocks[1])[2] == parse_line(dicts[1])[2]


def test_include_exclude_and_histograms_off() -> None:
    s = sample_of(reading(11, "a"))
    cfg = parse_config(entries(("Include", "exits$", "hist"), ("Exclude", "^mmio")))
    lines = PointBuilder(cfg, "h").build(s).lines
    assert set(parse_line(lines[1])[2]) == {"exits", "halt_exits", "halt_wait_hist_bucket_1",
                                            "halt_wait_hist_bucket_3"}
    assert set(parse_line(lines[0])[2]) == set(parse_line(lines[1])[2])
    no_hist = builder(histograms=False).build(s).lines
    assert not any("_bucket_" in t for t in no_hist)


def test_all_counters_filtered_out_gives_no_line() -> None:
    cfg = parse_config(entries(("Include", "^nothing-matches$")))
    assert PointBuilder(cfg, "h").build(sample_of(reading(11, "a"))).lines == []


def test_per_vm_off() -> None:
    s = sample_of(reading(11, "a"), reading(12, "b"))
    assert [parse_line(t)[0] for t in builder(per_vm=False).build(s).lines] == ["kvm"]
    assert [parse_line(t)[0] for t in builder(per_vm=False, per_vcpu=True).build(s).lines] == [
        "kvm", "kvm_vcpu", "kvm_vcpu", "kvm_vcpu", "kvm_vcpu"]


def test_duplicate_vm_names_the_oldest_keeps_the_name() -> None:
    s = sample_of(reading(20, "dup", start=500), reading(21, "dup", start=100), reading(22, "solo"))
    names = [parse_line(t)[1]["vm"] for t in builder().build(s).lines[1:]]
    assert names == ["dup-pid20", "dup", "solo"]


def test_dispatch_groups_types_and_instances() -> None:
    got: list[tuple[Any, ...]] = []

    def sink(plugin: str, pi: str, t: float, types: Any, names: Any, values: Any) -> int:
        got.append((plugin, pi, t, dict(zip(names, zip(types, values)))))
        return len(names)

    s = sample_of(reading(11, "web/1"))
    result = builder(per_vcpu=True).build(s, lines=False, sink=sink)
    assert result.lines == [] and result.dispatched == sum(len(g[3]) for g in got)
    assert [(g[0], g[1]) for g in got] == [("kvm", ""), ("kvm", "web_1")]  # per-vCPU values are not dispatched
    assert all(g[2] == s.time_ns / 1e9 for g in got)
    host, vm = got[0][3], got[1][3]
    assert host["halt_exits"] == ("derive", 20) and host["pages_4k"] == ("gauge", 111)
    assert host["max_mmu_rmap_size"] == ("gauge", 7) and vm["guest_mode"] == ("gauge", 0)
    assert not any("hist" in name for g in got for name in g[3])  # histograms are not dispatched


def test_plugin_instance_sanitized_and_bounded() -> None:
    assert pt.plugin_instance("a/b\nc") == "a_b_c"
    long = pt.plugin_instance("é" * 200)
    assert len(long.encode()) <= 110 and long == "é" * 55


def test_facts_line() -> None:
    facts = HostFacts(cpu_ept=True, cpu_npt=None, ept_param=False, tdp_mmu=True, lockdown="integrity",
                      kvm_backend="kvm_intel")
    facts.tdp = {"state": "disabled", "reason": "ept=N", "backend": "kvm_intel", "tdp_mmu": True, "nested": None,
                 "is_guest": False}
    b = builder()
    b.set_facts(facts)
    s = sample_of(reading(11, "a", vcpus=3), reading(12, "b", vcpus=1))
    m, tags, fields, ts = parse_line(b.facts_line(s))
    assert (m, tags, ts) == ("kvm_host", {"host": r"hv\ 1"}, s.time_ns)
    assert fields == {"tdp_state": '"disabled"', "tdp_enabled": "false", "cpu_ept": "true", "ept_param": "false",
                      "tdp_mmu": "true", "is_guest": "false", "lockdown": '"integrity"',
                      "kvm_module": '"kvm_intel"', "vms": "2i", "vcpus": "4i"}


def test_facts_line_carries_the_capacity_facts() -> None:
    facts = HostFacts(cpus_online=8, mem_total_bytes=16 * 2**30, halt_poll_ns=200000, halt_poll_ns_grow=2,
                      halt_poll_ns_grow_start=10000, halt_poll_ns_shrink=0, nx_huge_pages=False,
                      kernel_release="6.12.0-1-amd64")
    b = builder()
    b.set_facts(facts)
    fields = parse_line(b.facts_line(sample_of(reading(11, "a", vcpus=3))))[2]
    assert {k: fields[k] for k in ("cpus_online", "mem_total_bytes", "halt_poll_ns", "halt_poll_ns_grow",
                                   "halt_poll_ns_grow_start", "halt_poll_ns_shrink", "nx_huge_pages",
                                   "kernel_release", "vcpus")} == {
        "cpus_online": "8i", "mem_total_bytes": "17179869184i", "halt_poll_ns": "200000i", "halt_poll_ns_grow": "2i",
        "halt_poll_ns_grow_start": "10000i", "halt_poll_ns_shrink": "0i", "nx_huge_pages": "false",
        "kernel_release": '"6.12.0-1-amd64"', "vcpus": "3i"}


def test_unknown_capacity_facts_are_left_out() -> None:
    """None (and the kernel release "unknown") is no value: left out rather than written as 0 or a word."""
    fields = pt.facts_fields(HostFacts(halt_poll_ns=0))
    assert fields["halt_poll_ns"] == 0 and fields["kernel_release"] is None
    b = builder()
    b.set_facts(HostFacts(halt_poll_ns=0))
    written = parse_line(b.facts_line(sample_of(reading(11, "a"))))[2]
    assert written["halt_poll_ns"] == "0i"
    assert not {"cpus_online", "mem_total_bytes", "halt_poll_ns_grow", "nx_huge_pages", "kernel_release"} & set(
        written)


# -- exits by reason ------------------------------------------------------------------------------------------------
class FakeReasons:
    """A reasons source with fixed counts: host-wide, and per VM for the VMs keyed by pid in ``per_pid``."""

    def __init__(self, host: Any, per_pid: Any) -> None:
        self.host, self.per_pid, self.asked, self.closed = host, per_pid, [], False

    def read(self, vms: Any) -> Any:
        self.asked.append(list(vms))
        isa = {"HLT": "vmx", "npf": "svm", "PF excp": "svm", "KVM_EXIT_HLT": "userspace", "KVM_EXIT_IO": "userspace"}
        return ExitReasonReading(self.host, {key: self.per_pid[key.pid] for key in vms if key.pid in self.per_pid},
                                 isa)

    def close(self) -> None:
        self.closed = True


def reasons_sample(**kw: Any) -> Any:
    host = {"kvm_exit": {"HLT": 7, "PF excp": 2}, "kvm_userspace_exit": {"KVM_EXIT_HLT": 1000, "KVM_EXIT_IO": 2}}
    fake = FakeReasons(host, {11: {"kvm_userspace_exit": {"KVM_EXIT_HLT": 600}}})
    collector = Collector(ListSource([reading(11, "web"), reading(12, "db")]), wall_clock=lambda: 5, reasons=fake)
    sample = collector.sample()
    collector.close()
    assert fake.closed and [k.pid for k in fake.asked[0]] == [11, 12]
    return sample


def test_reason_lines_host_wide_and_per_vm_only_for_reasons_seen() -> None:
    s = reasons_sample()
    assert s.exit_reasons["kvm_userspace_exit"]["KVM_EXIT_HLT"] == 1000
    assert s.vms[0].exit_reasons == {"kvm_userspace_exit": {"KVM_EXIT_HLT": 600}} and s.vms[1].exit_reasons is None
    lines = [parse_line(t) for t in builder(tags={"dc": "eu"}).build(s).lines]
    reasons = [(p[1], p[2]) for p in lines if p[0] == "kvm_exit_reason"]
    assert reasons == [
        ({"host": r"hv\ 1", "dc": "eu", "isa": "vmx", "reason": "HLT"}, {"count": "7i"}),
        ({"host": r"hv\ 1", "dc": "eu", "isa": "svm", "reason": r"PF\ excp"}, {"count": "2i"}),
        ({"host": r"hv\ 1", "dc": "eu", "isa": "userspace", "reason": "KVM_EXIT_HLT"}, {"count": "1000i"}),
        ({"host": r"hv\ 1", "dc": "eu", "isa": "userspace", "reason": "KVM_EXIT_IO"}, {"count": "2i"}),
        ({"host": r"hv\ 1", "dc": "eu", "isa": "userspace", "reason": "KVM_EXIT_HLT", "vm": "web"},
         {"count": "600i"}),
    ]
    assert all(p[3] == 5 for p in lines)


def test_reason_lines_equal_influxdb_client_points() -> None:
    from influxdb_client import Point

    s = reasons_sample()
    ours = [t for t in builder().build(s).lines if t.startswith("kvm_exit_reason")]
    point = Point("kvm_exit_reason").tag("host", "hv 1").tag("isa", "svm").tag("reason", "PF excp")
    assert ours[1] == point.field("count", 2).time(5).to_line_protocol()


def test_reasons_dispatched_as_derives_of_their_own_plugin() -> None:
    calls: list[tuple[Any, ...]] = []

    def sink(plugin: str, pi: str, t: float, types: Any, names: Any, values: Any) -> int:
        if plugin == pt.REASON_PLUGIN_NAME:
            calls.append((pi, tuple(types), tuple(names), tuple(values)))
        return len(values)

    builder().build(reasons_sample(), lines=False, sink=sink)
    assert calls == [
        ("", ("derive", "derive"), ("HLT", "PF excp"), (7, 2)),
        ("", ("derive", "derive"), ("KVM_EXIT_HLT", "KVM_EXIT_IO"), (1000, 2)),
        ("web", ("derive",), ("KVM_EXIT_HLT",), (600,)),
    ]
    calls.clear()
    builder(per_vm=False).build(reasons_sample(), lines=False, sink=sink)
    assert [c[0] for c in calls] == ["", ""]  # per-VM reasons still shipped, but not dispatched without PerVM
