"""kvmfleet.agent without collectd: the sampler reads, ships, dispatches, refreshes facts, stops."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
from tests.unit.agentdata import (
    ListSource,
    entries,
    parse_line,
    reading,
)

from kvmfleet.agent import Agent
from kvmfleet.collector import vm_sample
from kvmfleet.facts import HALT_POLL_PARAMS, HostFacts, gather
from kvmfleet.model import VMReading
from kvmfleet.options import AgentConfig, parse_config
from kvmfleet.ship.writers import Writer


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


@pytest.mark.parametrize("per_vm_option", [None, True, False])
def test_with_influxdb_per_vm_values_go_into_collectd_only_with_dispatch_per_vm(tmp_path: Path,
                                                                                per_vm_option: bool | None) -> None:
    """Default with InfluxURL: host totals (and the agent's own values) into collectd, per-VM points to InfluxDB."""
    extra = [] if per_vm_option is None else [("DispatchPerVM", per_vm_option)]
    cfg = parse_config(entries(("InfluxURL", "http://127.0.0.1:9"), ("Database", "kvm"), ("SpoolPath", ""),
                               *extra))
    writer = ListWriter()
    instances: set[tuple[str, str]] = set()

    def sink(plugin: str, pi: str, t: float, types: Any, names: Any, values: Any) -> int:
        instances.add((plugin, pi))
        return len(names)

    agent = Agent(cfg, writer)
    agent.start("hv1", sink=sink, source=ListSource([reading(11, "a"), reading(12, "b")]))
    st = agent.read()
    assert agent.shipper is not None and agent.shipper.wait_idle(5)
    vm_points = {parse_line(t)[1]["vm"] for t in writer.lines if t.startswith("kvm_vm,")}
    assert vm_points == {"a", "b"}
    per_vm = {("kvm", "a"), ("kvm", "b")}
    assert instances == {("kvm", ""), ("kvmfleet", "")} | (per_vm if per_vm_option else set())
    assert st.dispatched > 0
    agent.stop(timeout=0.1)


def test_agent_without_shipping_only_dispatches() -> None:
    agent = Agent(parse_config([]))
    n: list[int] = []
    agent.start("h", sink=lambda *a: n.append(len(a[4])) or len(a[4]), source=ListSource([reading(1, "a")]))
    st = agent.read()
    assert agent.shipper is None and st.points == 0 and st.dispatched == sum(n[:-1])
    assert agent.stop() is None


def test_agent_counts_the_vms_a_sample_refused() -> None:
    forged = reading(2, "forged")
    forged.vm_stats = {"mmu_pte_write": 2**64 - 1}  # past int64: no VMM counts that far
    agent = Agent(parse_config([]))
    agent.start("h", source=ListSource([reading(1, "honest"), forged]))
    st = agent.read()
    assert (st.vms, st.vms_refused, agent.agent_fields(None)["vms_refused"]) == (1, 1, 1)
    agent.stop()


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


def test_agent_ships_this_hosts_capacity_facts_in_kvm_host(tmp_path: Path) -> None:
    """The kvm_host line the agent ships carries the capacity facts of this machine, as gather() reads them."""
    cfg = parse_config(entries(("InfluxURL", "http://127.0.0.1:9"), ("Database", "kvm"),
                               ("SpoolPath", str(tmp_path / "ship.spool"))))
    writer = ListWriter()
    agent = Agent(cfg, writer)
    agent.start("hv1", source=ListSource([reading(11, "a", vcpus=3)]))
    agent.read()
    assert agent.shipper is not None and agent.shipper.wait_idle(5)
    agent.stop()
    shipped = [parse_line(t)[2] for t in writer.lines if t.startswith("kvm_host,")]
    here = gather()
    expected = {"cpus_online": f"{here.cpus_online}i", "mem_total_bytes": f"{here.mem_total_bytes}i",
                "kernel_release": f'"{os.uname().release}"', "vcpus": "3i", "vms": "1i"}
    for name in (*HALT_POLL_PARAMS, "nx_huge_pages"):  # None where KVM is not loaded: left out of the line
        value = getattr(here, name)
        expected[name] = None if value is None else str(value).lower() if isinstance(value, bool) else f"{value}i"
    assert len(shipped) == 1 and {k: shipped[0].get(k) for k in expected} == expected


def test_vm_sample_of_helper_is_consistent() -> None:
    vm = vm_sample(reading(3, "x"))
    assert vm.stats["halt_exits"] == 20 and len(vm.parts) == 2


# -- exits by reason ----------------------------------------------------------------------------------------------
class FakeReasonSource:
    """Stands in for ExitReasonSource: fixed host-wide counts, usable or not."""

    made: list[FakeReasonSource] = []

    def __init__(self, *, per_vm: bool, mechanism: str, max_fds: int, say: Any, usable: bool = True) -> None:
        from kvmfleet.model import Usability

        self.per_vm, self.mechanism, self.max_fds, self.closed = per_vm, mechanism, max_fds, False
        self.state = Usability(True) if usable else Usability(False, "lockdown confidentiality: tracefs is locked")
        if not usable:  # as ExitReasonSource does: said once through the caller's SayOnce
            say("exitreasons-unusable", f"exit reasons cannot be counted: {self.state.reason}")
        self.mechanism_name = "fake"
        FakeReasonSource.made.append(self)

    def usability(self) -> Any:
        return self.state

    def fds(self) -> int:
        return 3

    def read(self, vms: Any) -> Any:
        from kvmfleet.model import ExitReasonReading

        if not self.state:
            return ExitReasonReading()
        return ExitReasonReading({"kvm_userspace_exit": {"KVM_EXIT_HLT": 42}}, {}, {"KVM_EXIT_HLT": "userspace"})

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("usable", [True, False])
def test_exit_reasons_option_opens_the_source_ships_its_counts_and_closes_it(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, usable: bool) -> None:
    import kvmfleet.agent as agent_module

    FakeReasonSource.made.clear()
    monkeypatch.setattr(agent_module, "ExitReasonSource",
                        lambda **kw: FakeReasonSource(**kw, usable=usable))
    cfg = parse_config(entries(("ExitReasons", "vm"), ("ExitReasonsMaxFds", 512),
                               ("ExitReasonsMechanism", "perf-count"), ("InfluxURL", "http://127.0.0.1:9"),
                               ("Database", "kvm"), ("SpoolPath", "")))
    writer = ListWriter()
    agent = Agent(cfg, writer)
    caplog.set_level(logging.INFO, logger="kvmfleet")
    agent.start("hv1", source=ListSource([reading(11, "a")]))
    agent.read()
    agent.stop(timeout=0.5)
    (made,) = FakeReasonSource.made
    assert (made.per_vm, made.mechanism, made.max_fds, made.closed) == (True, "perf-count", 512, True)
    reason_lines = [parse_line(t) for t in writer.lines if t.startswith("kvm_exit_reason")]
    if usable:
        assert [(p[1]["reason"], p[2]["count"]) for p in reason_lines] == [("KVM_EXIT_HLT", "42i")]
        assert "exit reasons: counting host-wide and per VM with fake (3 fds)" in caplog.text
    else:
        assert reason_lines == []
        assert caplog.text.count("exit reasons cannot be counted: lockdown confidentiality: tracefs is locked") == 1


def test_exit_reasons_off_opens_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvmfleet.agent as agent_module

    monkeypatch.setattr(agent_module, "ExitReasonSource", lambda **kw: pytest.fail("opened with ExitReasons off"))
    agent = Agent(AgentConfig(exit_reasons="off"))
    agent.start("hv1", source=ListSource([reading(11, "a")]))
    assert agent.collector is not None and agent.collector.reasons is None
    agent.stop()
