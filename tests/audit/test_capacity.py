"""``kvmfleet capacity`` against a real InfluxDB 1.6 holding synthetic hosts whose answers are known exactly:
overcommitted, idle, growing, polling-heavy, without pages counters, on shadow paging, with gaps and a restart.

Jitter is 0, so every rate is exact; the data ends on a boundary of the time buckets (6 h window: 360 s), so
that each bucket holds one state of a growing host and its trend is exactly linear."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from tests.support import synthetic as sy
from tests.support.servers import InfluxDB1

from kvmfleet.audit.capacity import CapacityOptions, CapacityResult, parse_limits, run_capacity
from kvmfleet.audit.capacity_report import render
from kvmfleet.audit.client import Connection, InfluxQLClient
from kvmfleet.cli import main

WINDOW, DURATION, STEP, BUCKET = "6h", 6 * 3600, 10, 360
R = sy.PROFILES["ept"]["exits"]  # exits per vCPU-second of the "ept" profile
IDLE = sy.PROFILES["ept-idle"]["exits"]
POLL = sy.PROFILES["halt-poll-waste"]
GROW_VMS = DURATION // BUCKET + 1  # one 1-vCPU VM more at the start of every bucket, the last one at the end


def _hosts() -> list[sy.HostSpec]:
    def host(name: str, profile: str, n_vms: int, vcpus: int, **kw: Any) -> sy.HostSpec:
        return sy.make_host(name, profile, n_vms=n_vms, vcpus=vcpus, jitter=0.0, **kw)

    grow = sy.HostSpec("cap-grow", [sy.VMSpec(f"g{i}", "ept", 1, start_s=i * BUCKET) for i in range(GROW_VMS)],
                       jitter=0.0, per_vm=False)
    return [
        host("cap-over", "ept-idle", 4, 40),
        host("cap-idle", "ept-idle", 1, 2),
        grow,
        host("cap-poll", "halt-poll-waste", 4, 4),
        host("cap-nopages", "ept", 2, 2, fields=("exits", "halt_poll_success_ns", "halt_poll_fail_ns")),
        host("cap-shadow", "shadow", 2, 2),
        host("cap-gaps", "ept", 2, 2, gaps=[(3600, 7200)], resets=[10800]),
    ]


@pytest.fixture(scope="module")
def fleet(audit_influx: InfluxDB1) -> str:
    db = "capacity1"
    audit_influx.create_database(db)
    end = int(time.time()) // BUCKET * BUCKET
    sy.post_lines(audit_influx.url, db, sy.fleet_lines(_hosts(), end, DURATION, STEP))
    return db


def capacity(server: InfluxDB1, db: str, **kw: Any) -> CapacityResult:
    client = InfluxQLClient(Connection(url=server.url, database=db))
    try:
        return run_capacity(client, CapacityOptions(window=WINDOW, stale_after="15m", **kw), source=server.url)
    finally:
        client.close()


@pytest.fixture(scope="module")
def result(audit_influx: InfluxDB1, fleet: str) -> CapacityResult:
    return capacity(audit_influx, fleet, limits=parse_limits(["halt_poll_share=0.2"]), place=200)


def by_host(result: CapacityResult) -> dict[str, Any]:
    return {h.host: h for h in result.hosts}


def test_overcommitted_host_crosses_its_limit(result: CapacityResult) -> None:
    h = by_host(result)["cap-over"]
    assert (h.vms, h.vcpus, h.cpus) == (4, 160, 32)
    assert (h.vms_mean, h.vms_peak, h.vcpus_mean, h.vcpus_peak) == (4, 4, 160, 160)
    assert h.vcpus_per_cpu == h.vcpus_per_cpu_mean == h.vcpus_per_cpu_peak == 5.0
    assert h.exits_per_s == pytest.approx(IDLE * 160, rel=1e-12)
    assert h.exits_per_s_per_cpu == pytest.approx(IDLE * 160 / 32, rel=1e-12)
    assert h.vcpus_per_day == 0.0 and h.days_to_limit == 0.0 and h.headroom_vcpus == 0
    assert h.limits["vcpus_per_cpu"] == {"limit": 4.0, "value": 5.0, "crossed": True, "days_to_limit": 0.0}
    [f] = [f for f in result.findings if f.host == "cap-over"]
    assert (f.rule, f.severity) == ("capacity-limit", "critical")
    assert f.summary == "vcpus_per_cpu 5 is at or above the limit 4 (160 vCPUs on 32 CPUs)"


def test_idle_host_has_room_and_no_trend_to_fear(result: CapacityResult) -> None:
    h = by_host(result)["cap-idle"]
    assert (h.vms, h.vcpus, h.cpus, h.vcpus_per_cpu) == (1, 2, 32, 2 / 32)
    assert h.headroom_vcpus == 4 * 32 - 2
    assert h.days_to_limit is None and h.vcpus_per_day == 0.0
    assert h.exits_per_s == pytest.approx(IDLE * 2, rel=1e-12)
    pages = sy.PROFILES["ept-idle"]
    mapped = 2 * (pages["pages_4k"] * 4096 + pages["pages_2m"] * (2 << 20))
    assert h.mem_mapped_bytes == mapped and h.mem_mapped_share == mapped / (256 << 30)
    assert not [f for f in result.findings if f.host == "cap-idle"]


def test_growing_host_trend_and_days_to_limit_are_exact(result: CapacityResult) -> None:
    h = by_host(result)["cap-grow"]
    per_day = 86400 / BUCKET  # one vCPU more per bucket
    assert (h.vms, h.vcpus, h.vcpus_peak) == (GROW_VMS, GROW_VMS, GROW_VMS)
    assert h.vcpus_per_day == pytest.approx(per_day, rel=1e-9)
    assert h.days_to_limit == pytest.approx((4 * 32 - GROW_VMS) / per_day, rel=1e-9)
    # between the last samples of two buckets, VM j is born (0) and j + 1 VMs count for 35 of 36 samples: the
    # rate is R * (j + 35/36), so it grows by R per bucket
    assert h.exits_per_s_per_day == pytest.approx(R * per_day, rel=1e-9)
    assert h.headroom_vcpus == 4 * 32 - GROW_VMS
    [f] = [f for f in result.findings if f.host == "cap-grow"]
    assert f.severity == "warning" and f.evidence["days_to_limit"] == h.days_to_limit
    assert f.summary.startswith(f"vcpus_per_cpu {GROW_VMS / 32:.3g} reaches the limit 4 in "
                                f"{h.days_to_limit:.1f} days at +{per_day / 32:.3g} a day")


def test_polling_heavy_host_burns_cpus_on_failed_polls(result: CapacityResult) -> None:
    h = by_host(result)["cap-poll"]
    ok, fail = POLL["halt_poll_success_ns"] * 16, POLL["halt_poll_fail_ns"] * 16
    assert h.halt_poll_cpus == pytest.approx((ok + fail) / 1e9, rel=1e-12)
    assert h.halt_poll_fail_cpus == pytest.approx(fail / 1e9, rel=1e-12)
    assert h.halt_poll_share == pytest.approx((ok + fail) / 1e9 / 32, rel=1e-12)
    assert h.limits["halt_poll_share"]["crossed"] is True
    assert {f.summary.split()[0] for f in result.findings if f.host == "cap-poll"} == {"halt_poll_share"}
    assert h.settings["halt_poll_ns"] == 200000


def test_hosts_without_pages_counters_or_on_shadow_paging_say_so(result: CapacityResult) -> None:
    nopages, shadow = by_host(result)["cap-nopages"], by_host(result)["cap-shadow"]
    assert nopages.mem_mapped_bytes is None and shadow.mem_mapped_bytes is None
    assert any("no pages_4k/pages_2m/pages_1g counters" in n for n in nopages.notes)
    assert any("stay 0 under shadow paging (tdp_state unsupported)" in n for n in shadow.notes)
    assert nopages.exits_per_s == pytest.approx(R * 4, rel=1e-12)


def test_gaps_and_a_restart_keep_the_rates_exact(result: CapacityResult) -> None:
    h = by_host(result)["cap-gaps"]
    base = sy.PROFILES["ept"]
    assert h.exits_per_s == pytest.approx(R * 4, rel=1e-12)
    assert h.halt_poll_cpus == pytest.approx((base["halt_poll_success_ns"] + base["halt_poll_fail_ns"]) * 4 / 1e9,
                                             rel=1e-12)
    assert any("counters went down in the window" in n for n in h.notes)
    assert "capacity_polling" in [q["query"] for q in result.queries]


def test_fleet_totals_imbalance_and_placement(result: CapacityResult) -> None:
    hosts = by_host(result)
    f = result.fleet
    assert f["hosts"] == 7 and f["cpus"] == 7 * 32
    assert f["vcpus"] == sum(h.vcpus for h in hosts.values()) == 160 + 2 + GROW_VMS + 16 + 4 + 4 + 4
    assert f["vcpus_per_cpu"] == f["vcpus"] / f["cpus"]
    per_cpu = sorted(h.vcpus_per_cpu for h in hosts.values())
    assert f["imbalance"]["vcpus_per_cpu"]["max"] == 5.0 and f["imbalance"]["vcpus_per_cpu"]["min"] == per_cpu[0]
    assert f["most_headroom"][0] == {"host": "cap-idle", "headroom_vcpus": 126, "vcpus_per_cpu": 2 / 32}
    placed = {p["host"]: p["vcpus"] for p in f["place"]["placed"]}
    assert sum(placed.values()) == 200 and f["place"]["unplaced"] == 0
    assert all(placed[n] <= hosts[n].headroom_vcpus for n in placed)
    # water-filling: every host given some ends with no more room left than any host given none
    left = {n: hosts[n].headroom_vcpus - placed.get(n, 0) for n in hosts}
    assert max(left.values()) - min(left[n] for n in placed) <= 1
    assert "cap-over" not in placed


def test_every_format_carries_the_same_figures(result: CapacityResult) -> None:
    doc = json.loads(render(result, "json"))
    hosts = {h["host"]: h for h in doc["hosts"]}
    for key in ("host", "vms", "vcpus", "cpus", "vcpus_per_cpu", "halt_poll_cpus", "exits_per_s", "vcpus_per_day",
                "days_to_limit"):
        assert key in hosts["cap-grow"]
    assert hosts["cap-over"]["vcpus_per_cpu"] == 5.0 and hosts["cap-idle"]["days_to_limit"] is None
    assert doc["fleet"]["vcpus"] == result.fleet["vcpus"]
    table = render(result, "table")
    assert "cap-over" in table and "5.00" in table and "vcpus_per_cpu 5 is at or above the limit 4" in table
    md = render(result, "markdown")
    assert "| cap-grow |" in md and "## Limits" in md


def test_html_draws_the_load_of_the_hosts_that_matter(audit_influx: InfluxDB1, fleet: str) -> None:
    result = capacity(audit_influx, fleet, charts=True)
    assert set(result.charts) >= {"cap-over", "cap-grow"}  # crossed, forecast
    peaks = [v for _, v in result.charts["cap-grow"]["vcpus"]]
    # one bucket per state of the growing host; the first bucket is out of the window once "now - 6h" has passed
    # its last sample (the report runs up to a bucket after the data ends)
    first = GROW_VMS + 1 - len(peaks)
    assert first in (1, 2) and peaks == list(range(first, GROW_VMS + 1))
    page = render(result, "html")
    assert page.count("<svg") == 2 * len(result.charts)
    assert 'id="host-cap-grow"' in page and f"mean {sum(peaks) / len(peaks):.3g}</text>" in page


def test_cli_exit_status_and_fail_on(audit_influx: InfluxDB1, fleet: str, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    base = ["capacity", "--url", audit_influx.url, "--database", fleet, "--window", WINDOW, "--stale-after", "15m",
            "--format", "json"]
    assert main(base) == 0
    assert main([*base, "--fail-on", "crossed"]) == 1
    assert main([*base, "--fail-on", "forecast", "--host-regex", "^cap-grow$"]) == 1
    assert main([*base, "--fail-on", "crossed", "--host-regex", "^cap-grow$"]) == 0
    assert main([*base, "--fail-on", "forecast", "--host-regex", "^cap-grow$", "--horizon", "0.1"]) == 0
    capsys.readouterr()
    assert main([*base, "--limit", "vcpus_per_cpu=lots"]) == 2
    assert "--limit vcpus_per_cpu: 'lots' is not a number" in capsys.readouterr().err


def test_missing_or_stale_data_fails_closed(audit_influx: InfluxDB1, capsys: pytest.CaptureFixture[str]) -> None:
    db = "capacity2"
    audit_influx.create_database(db)
    now = int(time.time()) // STEP * STEP
    old_agent = sy.make_host("cap-oldagent", "ept", facts={k: v for k, v in sy.FACTS_EPT.items()
                                                           if k != "cpus_online"})
    sy.post_lines(audit_influx.url, db, sy.fleet_lines([old_agent], now, 3600, STEP))
    sy.post_lines(audit_influx.url, db, sy.fleet_lines([sy.make_host("cap-stopped", "ept")], now - 1800, 3600, STEP))
    # a host without VMs sends kvm_host (vms=0) and no kvm point: nothing to tell, yet nothing missing
    empty = sy.make_host("cap-empty", "ept", n_vms=0, fields=())
    sy.post_lines(audit_influx.url, db, sy.fleet_lines([empty], now, 3600, STEP))
    base = ["capacity", "--url", audit_influx.url, "--database", db, "--window", "2h"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "of 3 hosts, 1 stale (no sample in the last 5m): cap-stopped" in err
    assert "1 without the data capacity needs: cap-oldagent (kvm_host has no cpus_online" in err
    assert main([*base, "--host-regex", "^cap-empty$", "--format", "json"]) == 0
    [h] = json.loads(capsys.readouterr().out)["hosts"]
    assert (h["vms"], h["vcpus"], h["exits_per_s"], h["halt_poll_cpus"], h["headroom_vcpus"]) == (0, 0, 0.0, 0.0, 128)
    assert "no VM in the window: nothing exits or polls" in h["notes"]
    assert main([*base, "--host-regex", "^nothing$"]) == 2
    assert "no kvm samples for hosts matching ^nothing$" in capsys.readouterr().err


def test_write_findings_writes_the_limits_and_a_run_point(audit_influx: InfluxDB1, fleet: str) -> None:
    audit_influx.create_database("capfindings")
    argv = ["capacity", "--url", audit_influx.url, "--database", fleet, "--window", WINDOW, "--stale-after", "15m",
            "--format", "json", "--write-findings", "--write-database", "capfindings"]
    assert main(argv) == 0
    rows = audit_influx.rows('SELECT * FROM "kvmfleet_finding"', db="capfindings")
    assert {(r["host"], r["rule"], r["severity"]) for r in rows} == {("cap-over", "capacity-limit", "critical"),
                                                                     ("cap-grow", "capacity-limit", "warning")}
    over = next(r for r in rows if r["host"] == "cap-over")
    assert (over["value"], over["max"], over["days_to_limit"], over["cpus"], over["vcpus"]) == (5.0, 4.0, 0.0, 32.0,
                                                                                               160.0)
    [run] = audit_influx.rows('SELECT * FROM "kvmfleet_audit_run"', db="capfindings")
    assert (run["command"], run["findings"], run["hosts"], run["stale_hosts"]) == ("capacity", 2, 7, 0)
