"""The collectd glue (kvmfleet.collectd_plugin) against the collectd stub: callbacks, logging, dispatch."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.support import collectd_stub
from tests.support.collectd_stub import StubCollectd, module_block
from tests.unit.agentdata import SECRET, ListSource, reading, secret

from kvmfleet import agent as ag


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[StubCollectd, Any]]:
    source = ListSource([reading(11, "web-1"), reading(12, "db-1")])
    monkeypatch.setattr(ag, "make_source", lambda name, say=None, libvirt_uri=None: source)
    s, plugin = collectd_stub.install(hostname="hv-stub")
    try:
        yield s, plugin
    finally:
        collectd_stub.uninstall()


def test_import_registers_config_init_shutdown_only(stub: tuple[StubCollectd, Any]) -> None:
    s, _ = stub
    assert len(s.configs) == 1 and len(s.inits) == 1 and len(s.shutdowns) == 1 and not s.reads
    assert s.configs[0].__module__ == "kvmfleet.collectd_plugin"  # collectd matches the <Module> block by it


def test_valid_config_reads_and_dispatches(stub: tuple[StubCollectd, Any]) -> None:
    s, _ = stub
    s.run_config(module_block(("PerVCPU", True), ("Tag", "rack", "r1"), ("Interval", 5)))
    assert any("PerVCPU true has no effect without InfluxURL" in m for m in s.messages("warning"))
    s.run_init()
    assert list(s.reads) == ["python.kvmfleet"] and s.reads["python.kvmfleet"][1]["interval"] == 5
    assert not s.writes  # the hostname probe is gone
    active = [m for m in s.messages("info") if "active" in m]
    assert active and "kvmfleet: active on host hv-stub: source auto, per-VM on, per-vCPU on" in active[0]
    s.run_reads(2)
    kvm = [d for d in s.dispatched if d["plugin"] == "kvm"]
    instances = {d["plugin_instance"] for d in kvm}
    assert instances == {"", "web-1", "db-1"}  # per-vCPU values are shipped only
    halts = [d for d in kvm if d["plugin_instance"] == "web-1" and d["type_instance"] == "halt_exits"]
    assert [(d["type"], d["values"], d["host"]) for d in halts] == [("derive", [20], "hv-stub")] * 2
    pages = [d for d in kvm if d["plugin_instance"] == "" and d["type_instance"] == "pages_4k"]
    assert pages[0]["type"] == "gauge" and pages[0]["values"] == [111 + 112]
    own = {d["type_instance"] for d in s.dispatched if d["plugin"] == "kvmfleet"}
    assert own == {"sample_duration_s", "read_cpu_s"}  # no shipping: no shipping counters
    s.run_shutdown()
    assert "kvmfleet: stopped" in s.messages("info")


def test_no_module_block_runs_with_defaults(stub: tuple[StubCollectd, Any]) -> None:
    s, _ = stub
    s.run_init()
    assert "python.kvmfleet" in s.reads
    assert any("no <Module" in m for m in s.messages("info"))
    s.run_reads()
    assert {d["plugin_instance"] for d in s.dispatched if d["plugin"] == "kvm"} == {"", "web-1", "db-1"}
    s.run_shutdown()


def test_bad_config_logs_one_line_per_mistake_and_stays_inactive(stub: tuple[StubCollectd, Any]) -> None:
    s, _ = stub
    s.run_config(module_block(("PerVM", 5), ("Bogus", "x"), ("InfluxURL", "http://127.0.0.1:9"),
                              ("InfluxAPI", "v2"), ("Bucket", "b")))
    errors = s.messages("error")
    assert errors[0] == "kvmfleet: config: option PerVM 5: expected a boolean: true or false"
    assert any(e.startswith('kvmfleet: config: unknown option Bogus "x"') for e in errors)
    assert any("option Org is missing" in e for e in errors) and any("option TokenFile is missing" in e
                                                                      for e in errors)
    assert errors[-1].startswith("kvmfleet: plugin inactive: 4 configuration error(s)")
    s.run_init()
    s.run_reads()
    s.run_shutdown()
    assert not s.reads and not s.dispatched and not s.messages("info")


def test_configured_twice_is_an_error(stub: tuple[StubCollectd, Any]) -> None:
    s, _ = stub
    s.run_config(module_block())
    s.run_config(module_block())
    s.run_init()
    assert not s.reads and any("appears more than once" in m for m in s.messages("error"))


def test_secret_never_logged_or_dispatched(stub: tuple[StubCollectd, Any], tmp_path: Path) -> None:
    s, _ = stub
    token = secret(tmp_path, mode=0o644)
    s.run_config(module_block(("InfluxURL", "http://127.0.0.1:9"), ("InfluxAPI", "v2"), ("Org", "o"),
                              ("Bucket", "b"), ("TokenFile", token), ("SpoolPath", str(tmp_path / "spool")),
                              ("RetryMin", 0.05), ("RetryMax", 0.1), ("Timeout", 1), ("Password", SECRET)))
    assert any("unknown option Password" in m for m in s.messages("error"))
    s2, _ = collectd_stub.install()
    s2.run_config(module_block(("InfluxURL", "http://127.0.0.1:9"), ("InfluxAPI", "v2"), ("Org", "o"),
                               ("Bucket", "b"), ("TokenFile", token), ("SpoolPath", str(tmp_path / "spool")),
                               ("RetryMin", 0.05), ("RetryMax", 0.1), ("Timeout", 1)))
    s2.run_init()
    s2.run_reads(2)
    s2.run_shutdown()
    everything = repr(s.logs) + repr(s2.logs) + repr(s.dispatched) + repr(s2.dispatched)
    assert SECRET not in everything
    assert any("readable by group or others" in m for m in s2.messages("warning"))
    assert (tmp_path / "spool").exists() and SECRET not in (tmp_path / "spool").read_text()


def test_dispatch_errors_are_counted_not_raised(stub: tuple[StubCollectd, Any]) -> None:
    s, plugin = stub
    s.run_config(module_block())
    s.run_init()
    s.fail_dispatch = True
    s.run_reads()
    assert plugin.STATE.dispatch_errors > 0 and not s.messages("error")
    s.run_shutdown()


def test_library_log_lines_reach_collectd_prefixed(stub: tuple[StubCollectd, Any]) -> None:
    s, _ = stub
    logging.getLogger("kvmfleet.ship").warning("spool: %s", "something")
    logging.getLogger("kvmfleet").error("kvmfleet-ship: already prefixed")
    assert s.logs[-2:] == [("warning", "kvmfleet: spool: something"), ("error", "kvmfleet-ship: already prefixed")]


def test_hostname_falls_back_when_probe_fails(stub: tuple[StubCollectd, Any], monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    s, plugin = stub

    def broken(*a: Any, **kw: Any) -> str:
        raise RuntimeError("no write callbacks here")

    monkeypatch.setattr(s, "register_write", broken)
    monkeypatch.setattr(plugin.socket, "gethostname", lambda: "fallback-host")
    assert plugin.collectd_hostname() == "fallback-host"
    assert any("cannot learn collectd's Hostname" in m for m in s.messages("warning"))
