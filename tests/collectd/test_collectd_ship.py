"""collectd running the plugin on real guests ships exact counts to InfluxDB 1.6 (v1) and VictoriaMetrics (v2)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

from tests.collectd.cdhelpers import HOSTNAME, Collectd, unmatched, wait_for
from tests.collectd.conftest import Guests
from tests.server.shiphelpers import INFLUX_PASSWORD, INFLUX_USER, secret_file
from tests.support.servers import InfluxDB1, VictoriaMetrics

from kvmfleet.facts import HALT_POLL_PARAMS, gather

TOKEN = "vm-T0ken-0123456789abcdef-never-logged"
AWKWARD_TAG = 'row "7", rack\\3 = a b'  # quotes, a backslash, comma, equals, spaces: through collectd's parser
SUM_FIELDS = ("halt_exits", "mmio_exits", "exits", "insn_emulation")


def v1_options(url: str, password_file: str, tmp_path: Path, **extra: Any) -> list[tuple[str, list[Any]]]:
    opts: list[tuple[str, list[Any]]] = [
        ("PerVCPU", [True]),
        ("Tag", ["rack", AWKWARD_TAG]),
        ("InfluxURL", [url]),
        ("Database", ["kvm"]),
        ("Username", [INFLUX_USER]),
        ("PasswordFile", [password_file]),
        ("SpoolPath", [str(tmp_path / "spool" / "ship.spool")]),
        ("RetryMin", [0.2]),
        ("RetryMax", [2]),
    ]
    opts = [(k, [extra.pop(k)] if k in extra else v) for k, v in opts]
    return opts + [(k, [v]) for k, v in extra.items()]


def influx_points(db: InfluxDB1, measurement: str, where: str = "") -> list[dict[str, Any]]:
    q = f'SELECT * FROM "{measurement}" WHERE host = \'{HOSTNAME}\' {where} GROUP BY *'
    return db.rows(q, db="kvm")


def host_totals_from_vms(vms: dict[Any, dict[int, dict[str, Any]]], times: list[int],
                         fields: tuple[str, ...] = SUM_FIELDS) -> dict[int, dict[str, Any]]:
    """The host totals the plugin must have sent at each of ``times``, from each VM's points (``{VM: {time:
    {field: value}}}``): the sum over the VMs sampled then, plus the last values of every VM that went before (host
    totals never go backwards; other processes' guests on this machine may come and go while the test runs)."""
    want: dict[int, dict[str, Any]] = {}
    for t in times:
        total = dict.fromkeys(fields, 0)
        for points in vms.values():
            if t in points:
                point = points[t]  # sampled at t
            elif max(points) < t:
                point = points[max(points)]  # gone before t: retired with its last values
            else:
                continue  # not there yet
            for f in fields:
                total[f] += point[f] or 0
        want[t] = total
    return want


def secrets_nowhere(secret: str, places: list[Path], allowed: set[str], cd: Collectd) -> None:
    """``secret`` is not in collectd's log, not in any process's command line, and every file under ``places``
    that holds it is one of ``allowed`` (the secret files themselves, mode 0600)."""
    assert secret not in cd.log()
    ps = subprocess.run(["ps", "-eo", "pid,args", "ww"], capture_output=True, text=True, check=True).stdout
    assert secret not in ps
    for place in places:
        for root, _dirs, files in os.walk(place):
            for name in files:
                path = os.path.join(root, name)
                try:
                    data = Path(path).read_bytes()
                except OSError:
                    continue
                if secret.encode() in data:
                    assert path in allowed, f"{path} holds the secret"
                    assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, f"{path} is readable by others"


def test_v1_influxdb16_exact_counts_totals_and_schema(guests: Guests, influxdb: InfluxDB1, password_file: str,
                                                      tmp_path: Path) -> None:
    # per-VM values into collectd too (with InfluxURL they are shipped only, by default): the csv check below
    cd = Collectd(tmp_path / "cd", v1_options(influxdb.url, password_file, tmp_path, DispatchPerVM=True))
    with cd:
        wait_for("kvm_vm points of the test guests", lambda: len(influx_points(
            influxdb, "kvm_vm", f"AND vm = '{guests.names[0]}'")) >= 4, 60)
        took = cd.stop()
    log = cd.log()
    assert "[error]" not in log, log
    active = (f"kvmfleet: active on host {HOSTNAME}: source auto, per-VM on, per-vCPU on, dispatch on, "
              "per-VM dispatch on,")
    assert active in log
    stopped = cd.log_lines("kvmfleet: stopped:")
    assert stopped and " 0 lost" in stopped[0] and " 0 dropped (buffer full)" in stopped[0], stopped
    assert took < 15

    vm_rows = influx_points(influxdb, "kvm_vm")
    ours = [r for r in vm_rows if r["vm"] in guests.names]
    assert {r["vm"] for r in ours} == set(guests.names)
    for r in ours:
        assert {f: r[f] for f in ("halt_exits", "mmio_exits")} == guests.expected[r["vm"]], r
        assert (r["vm_uuid"], r["vmm"], r["rack"]) == (guests.uuids[r["vm"]], "kvmfleet-guestvmm", AWKWARD_TAG)
        assert isinstance(r["exits"], int) and r["exits"] >= r["halt_exits"] + r["mmio_exits"]

    # host totals equal the sum over every VM on the host (not only ours) at the same timestamp
    host_rows = influx_points(influxdb, "kvm")
    assert len(host_rows) >= 4
    vm_points: dict[Any, dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in vm_rows:
        vm_points[(r["vm"], r["vm_uuid"])][r["time"]] = r
    want = host_totals_from_vms(vm_points, sorted(h["time"] for h in host_rows))
    for h in host_rows:
        assert h["rack"] == AWKWARD_TAG
        assert {f: h[f] for f in SUM_FIELDS} == want[h["time"]], h["time"]

    # one point per host / VM / vCPU per sample, all stamped with the sample's time
    times = sorted(h["time"] for h in host_rows)
    assert len(set(times)) == len(times)
    for name in guests.names:
        assert sorted(r["time"] for r in ours if r["vm"] == name) == times
    vcpu_rows = [r for r in influx_points(influxdb, "kvm_vcpu") if r["vm"] in guests.names]
    assert len(vcpu_rows) == len(times) * sum(guests.vcpus.values())
    for r in vcpu_rows:
        per_vcpu = {k: v // guests.vcpus[r["vm"]] for k, v in guests.expected[r["vm"]].items()}
        assert {f: r[f] for f in ("halt_exits", "mmio_exits")} == per_vcpu

    facts = influx_points(influxdb, "kvm_host")
    assert sorted(f["time"] for f in facts) == times
    last = max(facts, key=lambda f: f["time"])
    assert last["tdp_state"] in ("enabled", "disabled", "unsupported", "unknown")
    assert last["vms"] >= len(guests.names) and last["vcpus"] >= sum(guests.vcpus.values())
    assert isinstance(last["kvm_module"], str) and isinstance(last["is_guest"], bool)
    # the capacity facts of this machine, as `kvmfleet facts` reads them (tests/unit/test_facts.py checks those
    # against other readings); a fact that cannot be read is no column
    here = gather()
    capacity = ("cpus_online", "mem_total_bytes", *HALT_POLL_PARAMS, "nx_huge_pages")
    assert {k: last.get(k) for k in capacity} == {k: getattr(here, k) for k in capacity}
    assert last["kernel_release"] == os.uname().release
    agent = influx_points(influxdb, "kvmfleet_agent")
    assert sorted(a["time"] for a in agent) == times
    assert agent[-1]["last_error"] == "" and agent[-1]["dropped"] == 0 and agent[-1]["sample_duration_s"] > 0

    # the same values went into collectd: csv has the per-VM derive, equal to what InfluxDB holds
    name = guests.names[0]
    csv_rows = cd.csv_values(f"kvm-{name}", "derive-halt_exits")
    assert csv_rows and {v for _, v in csv_rows} == {guests.expected[name]["halt_exits"]}
    assert len(csv_rows) == len(times) and not unmatched([round(t * 1000) for t, _ in csv_rows], times)

    secrets_nowhere(INFLUX_PASSWORD, [tmp_path], {password_file}, cd)


def test_v2_victoriametrics_exact_counts_and_totals(guests: Guests, victoria: VictoriaMetrics,
                                                    tmp_path: Path) -> None:
    token_file = secret_file(tmp_path, "influx.token", TOKEN)
    opts: list[tuple[str, list[Any]]] = [
        ("InfluxURL", [victoria.url]), ("InfluxAPI", ["v2"]), ("Org", ["kvmorg"]), ("Bucket", ["kvm"]),
        ("TokenFile", [token_file]), ("SpoolPath", [str(tmp_path / "ship.spool")]), ("RetryMin", [0.2]),
        ("RetryMax", [2]), ("Tag", ["cluster", "c1"]),
    ]
    cd = Collectd(tmp_path / "cd", opts)

    def export(match: str) -> list[dict[str, Any]]:
        return victoria.export(match, min_samples=0)

    with cd:
        wait_for("kvm_vm_halt_exits samples", lambda: sum(len(s["values"]) for s in export(
            f'{{__name__="kvm_vm_halt_exits",vm="{guests.names[0]}"}}')) >= 4, 60)
        cd.stop()
    assert "[error]" not in cd.log(), cd.log()
    victoria.force_flush()
    series = export('{__name__=~"kvm_vm_(halt|mmio)_exits"}')
    seen: dict[str, set[int]] = defaultdict(set)
    for s in series:
        m = s["metric"]
        assert m["host"] == HOSTNAME and m["cluster"] == "c1"
        if m["vm"] in guests.names:
            field = m["__name__"][len("kvm_vm_"):]
            assert set(s["values"]) == {guests.expected[m["vm"]][field]}, (m, s["values"][:5])
            assert m["vm_uuid"] == guests.uuids[m["vm"]]
            seen[m["vm"]].add(len(s["values"]))
    assert set(seen) == set(guests.names)

    host = {s["metric"]["__name__"]: dict(zip(s["timestamps"], s["values"]))
            for s in export('{__name__=~"kvm_(halt|mmio)_exits"}')}
    for field in ("halt_exits", "mmio_exits"):
        vm_points: dict[Any, dict[int, dict[str, Any]]] = defaultdict(dict)
        for s in export(f'{{__name__="kvm_vm_{field}"}}'):
            for ts, v in zip(s["timestamps"], s["values"]):
                vm_points[(s["metric"]["vm"], s["metric"].get("vm_uuid"))][ts] = {field: v}
        want = host_totals_from_vms(vm_points, sorted(host[f"kvm_{field}"]), (field,))
        assert host[f"kvm_{field}"] and host[f"kvm_{field}"] == {t: w[field] for t, w in want.items()}
    facts = export('{__name__="kvm_host_vms"}')
    assert facts and min(facts[0]["values"]) >= len(guests.names)
    # the default with InfluxURL: per-VM values shipped (above), only the host totals dispatched into collectd
    assert cd.csv_values("kvm", "derive-halt_exits")
    assert not list((cd.csv_dir / HOSTNAME).glob("kvm-*")), sorted(os.listdir(cd.csv_dir / HOSTNAME))
    # VictoriaMetrics keeps booleans as 1/0 and stores string fields as 0 (text lost): tdp_enabled is there for it
    assert export('{__name__="kvm_host_tdp_enabled"}') and export('{__name__="kvm_host_is_guest"}')
    assert {v for s in export('{__name__="kvm_host_tdp_state"}') for v in s["values"]} == {0}
    secrets_nowhere(TOKEN, [tmp_path], {token_file}, cd)
    assert TOKEN not in json.dumps(series)
