"""kvmfleet.agent without collectd: option validation, point building, dispatch plans, the sampler."""

from __future__ import annotations

import logging
import os
import re
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from influxdb_client import Point  # type: ignore[attr-defined]

from kvmfleet import agent as ag
from kvmfleet.agent import Agent, AgentConfig, ConfigEntry, ConfigError, PointBuilder, parse_config
from kvmfleet.collector import Collector, vm_sample
from kvmfleet.facts import HostFacts
from kvmfleet.model import StatDesc, StatType, Usability, VMIdentity, VMKey, VMReading
from kvmfleet.ship.writers import Writer
from kvmfleet.sources.base import Source
from kvmfleet.statblock import Shape, StatBlock

SECRET = "Tok3n-s3cr3t-value-42"

# -- stat blocks shaped like a kernel's vCPU and VM stats fds ---------------------------------------------------
VCPU_DESCS = [StatDesc("exits"), StatDesc("halt_exits"), StatDesc("guest_mode", StatType.INSTANT),
              StatDesc("halt_wait_hist", StatType.LOG_HIST, size=4), StatDesc("mmio_exits")]
VM_DESCS = [StatDesc("pages_4k", StatType.INSTANT), StatDesc("max_mmu_rmap_size", StatType.PEAK),
            StatDesc("mmu_pte_write")]


def _shape(descs: list[StatDesc]) -> Shape:
    placed, at = [], 0
    for d in descs:
        placed.append((d, at))
        at += d.size
    return Shape.of(placed)


VCPU_SHAPE = _shape(VCPU_DESCS)
VM_SHAPE = _shape(VM_DESCS)
ALL_DESCS = {d.name: d for d in VCPU_DESCS + VM_DESCS}


def vcpu_block(exits: int, halts: int, hist: tuple[int, int, int, int] = (0, 0, 0, 0), mmio: int = 0) -> StatBlock:
    words = [exits, halts, 0, *hist, mmio]
    return StatBlock.from_data(VCPU_SHAPE, struct.pack(f"={len(words)}Q", *words))


def vm_block(pages: int, peak: int, ptes: int) -> StatBlock:
    return StatBlock.from_data(VM_SHAPE, struct.pack("=3Q", pages, peak, ptes))


def reading(pid: int, name: str, uuid: str | None = "u-1", vcpus: int = 2, halts: int = 10,
            hist: tuple[int, int, int, int] = (0, 3, 0, 1), start: int = 100, vmm: str = "qemu") -> VMReading:
    ident = VMIdentity(VMKey(pid, start, 12), vmm, name, uuid)
    return VMReading(ident, "statsfd", vm_block(100 + pid, 7, 2 * pid),
                     {i: vcpu_block(halts + 5 + i, halts, hist) for i in range(vcpus)}, dict(ALL_DESCS))


def dict_reading(pid: int, name: str) -> VMReading:
    """The same VM as a debugfs-style dict (no stat blocks)."""
    r = reading(pid, name)
    stats: dict[str, Any] = dict(r.vm_stats)
    for block in r.vcpus.values():
        for k, v in block.items():
            stats[k] = tuple(a + b for a, b in zip(stats[k], v)) if isinstance(v, tuple) and k in stats \
                else (stats.get(k, 0) + v if isinstance(v, int) else v)
    return VMReading(r.identity, "debugfs", stats, {}, dict(ALL_DESCS), vm_stats_include_vcpus=True)


class ListSource(Source):
    name = "list"

    def __init__(self, readings: list[VMReading]) -> None:
        self.readings = readings
        self.closed = False

    def read(self) -> list[VMReading]:
        return list(self.readings)

    def usability(self) -> Usability:
        return Usability(True)

    def close(self) -> None:
        self.closed = True


def sample_of(*readings: VMReading, ts: int = 1_700_000_000_123_456_789) -> Any:
    return Collector(ListSource(list(readings)), wall_clock=lambda: ts).sample()


def entries(*lines: tuple[Any, ...]) -> list[ConfigEntry]:
    return [ConfigEntry(key, tuple(values)) for key, *values in lines]


def problems(*lines: tuple[Any, ...]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(entries(*lines))
    return info.value.problems


def secret(tmp_path: Path, name: str = "token", text: str = SECRET, mode: int = 0o600) -> str:
    path = tmp_path / name
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return str(path)


def parse_line(text: str) -> tuple[str, dict[str, str], dict[str, str], int]:
    """Split one line of our own output (no escaped spaces or commas in fields) into its parts."""
    head, fields, ts = re.split(r"(?<!\\) ", text)
    parts = re.split(r"(?<!\\),", head)
    tags = dict(p.split("=", 1) for p in parts[1:])
    return parts[0], tags, dict(f.split("=", 1) for f in fields.split(",")), int(ts)


# -- options ------------------------------------------------------------------------------------------------------
def test_defaults_and_no_shipping_without_url() -> None:
    cfg = parse_config([])
    assert (cfg.source, cfg.per_vm, cfg.per_vcpu, cfg.dispatch, cfg.histograms) == ("auto", True, False, True, True)
    assert cfg.facts_interval == 300 and cfg.interval is None and cfg.ship is None and cfg.tags == {}


def test_every_option_has_a_kind_and_defaults_match_the_dataclass() -> None:
    cfg = AgentConfig()
    assert {o.name for o in ag.OPTIONS} >= {"Source", "PerVM", "PerVCPU", "Include", "Exclude", "Tag", "Dispatch",
                                            "Histograms", "FactsInterval", "InfluxURL", "InfluxAPI", "Database",
                                            "RetentionPolicy", "Username", "PasswordFile", "Org", "Bucket",
                                            "TokenFile", "VerifyTLS", "CAFile", "Timeout", "BufferLines",
                                            "SpoolPath", "BatchLines"}
    assert (cfg.source, cfg.per_vm, cfg.per_vcpu) == tuple(ag.OPTION_BY_KEY[k].default
                                                           for k in ("source", "pervm", "pervcpu"))


def test_keys_are_case_insensitive_and_values_lenient(tmp_path: Path) -> None:
    cfg = parse_config(entries(("source", "STATSFD"), ("PERVCPU", "yes"), ("pervm", False), ("histograms", "off"),
                               ("FactsInterval", "60"), ("interval", 5.0), ("Include", "^halt", "exits$"),
                               ("exclude", "poll"), ("tag", "rack", "r 1"), ("TAG", "dc", 7.0),
                               ("influxurl", "https://db.example:8086/"), ("database", "kvm"),
                               ("BufferLines", 2000.0), ("spoolpath", str(tmp_path / "sp" / "ship.spool")),
                               ("RetryMax", 5.0)))
    assert cfg.source == "statsfd" and cfg.per_vcpu and not cfg.per_vm and not cfg.histograms
    assert cfg.facts_interval == 60 and cfg.interval == 5
    assert [p.pattern for p in cfg.include] == ["^halt", "exits$"] and [p.pattern for p in cfg.exclude] == ["poll"]
    assert cfg.tags == {"rack": "r 1", "dc": "7"}
    assert cfg.ship is not None and cfg.ship.buffer_lines == 2000 and cfg.ship.retry_max == 5
    assert cfg.ship.api == "v1" and cfg.ship.database == "kvm"
    assert cfg.keeps("halt_exits") and cfg.keeps("exits") and not cfg.keeps("halt_poll_exits")
    assert not cfg.keeps("mmio_exits_x")


@pytest.mark.parametrize(("line", "needles"), [
    (("Foo", "bar"), ['unknown option Foo "bar"', "expected one of Source, PerVM"]),
    (("PerVM", 5.0), ["option PerVM 5", "expected a boolean"]),
    (("PerVM",), ["option PerVM (no value)", "exactly one value"]),
    (("Dispatch", "maybe"), ['option Dispatch "maybe"', "true or false"]),
    (("Source", "proc"), ['option Source "proc"', '"auto", "statsfd", "debugfs"']),
    (("FactsInterval", "ten"), ['option FactsInterval "ten"', "a number of seconds > 0"]),
    (("FactsInterval", -1.0), ["option FactsInterval -1", "a number of seconds > 0"]),
    (("Include", "(unclosed"), ['option Include "(unclosed"', "valid regular expression", "missing )"]),
    (("Exclude", 3.0), ["option Exclude 3", "quoted regular expressions"]),
    (("Tag", "rack"), ['option Tag "rack"', 'two quoted strings: Tag "KEY" "VALUE"']),
    (("Tag", "host", "x"), ['option Tag "host" "x"', "a tag key other than host, vm, vm_uuid, vmm, vcpu"]),
    (("Tag", "a", ""), ['option Tag "a" ""', "neither empty"]),
    (("Interval", 0.0), ["option Interval 0", "> 0"]),
])
def test_each_mistake_names_option_value_and_expectation(line: tuple[Any, ...], needles: list[str]) -> None:
    found = problems(line)
    assert len(found) == 1, found
    for needle in needles:
        assert needle in found[0], (needle, found[0])


@pytest.mark.parametrize(("lines", "needles"), [
    ([("InfluxURL", "http://x:8086")], ["option Database is missing", 'InfluxAPI "v1"']),
    ([("InfluxURL", "http://x:8086"), ("InfluxAPI", "v2")],
     ["option Bucket is missing", "option Org is missing", "option TokenFile is missing"]),
    ([("InfluxURL", "http://x:8086"), ("InfluxAPI", "v3")], ['option InfluxAPI "v3"', '"v1", "v2"']),
    ([("InfluxURL", "ftp://x"), ("Database", "kvm")], ['option InfluxURL "ftp://x"', "an http(s) URL"]),
    ([("InfluxURL", "http://x:8086"), ("Database", "kvm"), ("PasswordFile", "/etc/p")],
     ['option PasswordFile "/etc/p"', "Username as well"]),
    ([("InfluxURL", "http://x:8086"), ("Database", "kvm"), ("Username", "u")],
     ['option Username "u"', "PasswordFile as well"]),
    ([("InfluxURL", "http://x:8086"), ("Database", "kvm"), ("Bucket", "b")],
     ['option Bucket "b"', 'no Bucket with InfluxAPI "v1"']),
    ([("InfluxURL", "http://x:8086"), ("Database", "kvm"), ("BufferLines", 1.5)],
     ["option BufferLines 1.5", "a whole number >= 1"]),
    ([("InfluxURL", "http://x:8086"), ("Database", "kvm"), ("BatchLines", 0.0)],
     ["option BatchLines 0", "a whole number >= 1"]),
    ([("InfluxURL", "http://x:8086"), ("Database", "kvm"), ("RetryMin", 9.0), ("RetryMax", 2.0)],
     ["option RetryMin 9", "at most RetryMax (2)"]),
    ([("InfluxURL", "http://x:8086"), ("Database", "kvm"), ("CAFile", "/nonexistent/ca.pem")],
     ['option CAFile "/nonexistent/ca.pem"', "a readable PEM file"]),
    ([("InfluxURL", "http://x:8086"), ("Database", "kvm"), ("SpoolPath", "relative/ship.spool")],
     ['option SpoolPath "relative/ship.spool"', "an absolute file path"]),
    ([("InfluxURL", "http://x:8086"), ("Database", "kvm"), ("SpoolPath", "/etc/passwd/x/ship.spool")],
     ["option SpoolPath", "/etc/passwd is not a writable directory"]),
    ([("Dispatch", False)], ["option Dispatch false", "expected InfluxURL too"]),
    ([("PerVM", True), ("PerVM", False)], ["option PerVM false", "the option once (it is already set to true)"]),
])
def test_cross_option_mistakes(lines: list[tuple[Any, ...]], needles: list[str]) -> None:
    text = "\n".join(problems(*lines))
    for needle in needles:
        assert needle in text, (needle, text)


def test_secret_files_are_checked_and_never_read_out(tmp_path: Path) -> None:
    base = [("InfluxURL", "http://x:8086"), ("InfluxAPI", "v2"), ("Org", "o"), ("Bucket", "b")]
    missing = problems(*base, ("TokenFile", str(tmp_path / "nope")))
    assert len(missing) == 1 and f'option TokenFile "{tmp_path / "nope"}"' in missing[0]
    assert "No such file or directory" in missing[0] and "holding the token alone" in missing[0]
    a_dir = problems(*base, ("TokenFile", str(tmp_path)))
    assert "Is a directory" in a_dir[0]
    empty = secret(tmp_path, "empty", "")
    assert "is empty" in problems(*base, ("TokenFile", empty))[0]
    two = secret(tmp_path, "two", SECRET + "\nsecond line")
    text = problems(*base, ("TokenFile", two))[0]
    assert "alone on one line" in text and SECRET not in text
    relative = problems(*base, ("TokenFile", "token.txt"))[0]
    assert "an absolute path" in relative
    cfg = parse_config(entries(*base, ("TokenFile", secret(tmp_path))))
    assert cfg.ship is not None and cfg.ship.token_file and SECRET not in repr(cfg) and SECRET not in cfg.summary()


def test_inline_secrets_and_url_credentials_are_never_echoed() -> None:
    found = problems(("Password", SECRET), ("Token", SECRET), ("InfluxURL", f"http://user:{SECRET}@db:8086"),
                     ("Database", "kvm"))
    text = "\n".join(found)
    assert len(found) == 3 and SECRET not in text
    assert 'unknown option Password "***"' in text and 'option InfluxURL "http://***@db:8086"' in text


def test_all_mistakes_are_reported_together() -> None:
    found = problems(("PerVM", 5.0), ("Foo", 1.0), ("Tag", "x"), ("Source", "nope"))
    assert len(found) == 4


def test_shipping_options_without_url_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kvmfleet"):
        cfg = parse_config(entries(("Database", "kvm"), ("BufferLines", 10.0)))
    assert cfg.ship is None
    assert "Database, BufferLines have no effect without InfluxURL" in caplog.text


def test_v2_config_and_writer(tmp_path: Path) -> None:
    cfg = parse_config(entries(("InfluxURL", "http://127.0.0.1:9"), ("InfluxAPI", "V2"), ("Org", "o"),
                               ("Bucket", "b"), ("TokenFile", secret(tmp_path)), ("SpoolPath", "")))
    assert cfg.ship is not None and (cfg.ship.api, cfg.ship.bucket, cfg.ship.org) == ("v2", "b", "o")
    assert cfg.ship.spool_path is None
    writer = ag.build_writer(cfg)
    assert writer is not None and "bucket=b" in writer.name
    writer.close()
    assert ag.build_writer(parse_config([])) is None


def test_check_files_false_skips_file_checks() -> None:
    cfg = parse_config(entries(("InfluxURL", "http://x:1"), ("Database", "kvm"), ("Username", "u"),
                               ("PasswordFile", "/nonexistent/pass"), ("CAFile", "/nonexistent/ca")),
                       check_files=False)
    assert cfg.ship is not None and cfg.ship.password_file == "/nonexistent/pass"


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
    vm = s.vms[0]

    def point(measurement: str, tags: dict[str, str], stats: Any) -> str:
        p = Point(measurement)
        for k, v in tags.items():
            p.tag(k, v)
        for k, v in stats.items():
            if isinstance(v, tuple):
                for i, c in enumerate(v):
                    if c:
                        p.field(f"{k}_bucket_{i}", c)
            else:
                p.field(k, v)
        return str(p.time(s.time_ns).to_line_protocol())

    base = {"host": "hv 1", "rack": "r=9"}
    want = [point("kvm", base, s.host),
            point("kvm_vm", {**base, "vm": 'we b"x', "vm_uuid": "u-11", "vmm": "qemu"}, vm.stats)]
    want += [point("kvm_vcpu", {**base, "vm": 'we b"x', "vm_uuid": "u-11", "vmm": "qemu", "vcpu": str(i)},
                   vm.vcpus[i]) for i in (0, 1)]

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
    assert ag.plugin_instance("a/b\nc") == "a_b_c"
    long = ag.plugin_instance("é" * 200)
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


# -- the sampler --------------------------------------------------------------------------------------------------
class ListWriter:
    name = "list-writer"

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, body_lines: list[str]) -> None:
        self.lines.extend(body_lines)

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_agent_reads_ships_dispatches_and_stops(tmp_path: Path) -> None:
    cfg = parse_config(entries(("InfluxURL", "http://127.0.0.1:9"), ("Database", "kvm"),
                               ("SpoolPath", str(tmp_path / "ship.spool")), ("RetryMin", 0.05), ("RetryMax", 0.1)))
    writer = ListWriter()
    dispatched: list[tuple[str, str]] = []

    def sink(plugin: str, pi: str, t: float, types: Any, names: Any, values: Any) -> int:
        dispatched.extend((plugin, n) for n in names)
        return len(names)

    source = ListSource([reading(11, "a"), reading(12, "b")])
    w: Writer = writer
    agent = Agent(cfg, w)
    agent.start("hv1", sink=sink, source=source)
    for _ in range(3):
        st = agent.read()
        time.sleep(0.002)
    assert st.reads == 3 and st.failures == 0 and st.vms == 2 and st.points == 5
    assert agent.shipper is not None and agent.shipper.wait_idle(5)
    measurements = [parse_line(t)[0] for t in writer.lines]
    assert measurements.count("kvm") == 3 and measurements.count("kvm_vm") == 6
    assert measurements.count("kvm_host") == 3 and measurements.count("kvmfleet_agent") == 3
    last_agent = [parse_line(t) for t in writer.lines if t.startswith("kvmfleet_agent")][-1][2]
    assert {"sent", "buffered", "dropped", "dropped_rejected", "retries", "last_error", "sample_duration_s",
            "points", "read_duration_s", "read_cpu_s", "dispatched"} <= set(last_agent)
    assert last_agent["points"] == "5i" and last_agent["last_error"] == '""'
    assert ("kvmfleet", "sent") in dispatched and ("kvm", "halt_exits") in dispatched
    final = agent.stop()
    assert final is not None and final["sent"] == 15 and source.closed


def test_agent_without_shipping_only_dispatches() -> None:
    agent = Agent(parse_config([]))
    n: list[int] = []
    agent.start("h", sink=lambda *a: n.append(len(a[4])) or len(a[4]), source=ListSource([reading(1, "a")]))
    st = agent.read()
    assert agent.shipper is None and st.points == 0 and st.dispatched == sum(n[:-1])
    assert agent.stop() is None


def test_agent_read_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(ListSource):
        def read(self) -> list[VMReading]:
            raise OSError("boom")

    agent = Agent(parse_config([]))
    agent.start("h", sink=None, source=Broken([]))
    with caplog.at_level(logging.ERROR, logger="kvmfleet"):
        agent.read()
        agent.read()
    assert agent.stats.failures == 2
    assert caplog.text.count("reading the KVM statistics failed: OSError: boom") == 1


def test_facts_are_reread_every_facts_interval() -> None:
    now = [0.0]
    agent = Agent(AgentConfig(facts_interval=300), clock=lambda: now[0])
    calls: list[int] = []

    def fake_gather() -> HostFacts:
        calls.append(1)
        return HostFacts()

    agent._gather = fake_gather
    agent.start("h", source=ListSource([]))
    agent.read()
    now[0] = 299.0
    agent.read()
    now[0] = 300.5
    agent.read()
    assert len(calls) == 2


def test_vm_sample_of_helper_is_consistent() -> None:
    vm = vm_sample(reading(3, "x"))
    assert vm.stats["halt_exits"] == 20 and len(vm.parts) == 2
