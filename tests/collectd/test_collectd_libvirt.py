"""collectd ships a libvirt-sourced VM (QEMU 7.2 under libvirtd 9.0, debugfs locked down) to InfluxDB like any other."""

from __future__ import annotations

import os
from pathlib import Path

from tests.collectd.cdhelpers import Collectd, wait_for
from tests.collectd.test_collectd_ship import influx_points, v1_options
from tests.support.libvirtd import Libvirtd, domstats
from tests.support.servers import InfluxDB1


def test_libvirt_domain_arrives_named_by_the_domain_with_virsh_values(influxdb: InfluxDB1, password_file: str,
                                                                      tmp_path: Path) -> None:
    with Libvirtd() as libvirtd:
        dom = libvirtd.domain(f"kfc{os.getpid()}-lv", vcpus=2)
        wait_for("SeaBIOS to count some exits", lambda: domstats(dom.name, "vcpu").get("vcpu.0.exits.sum", 0) > 0, 30)
        dom.suspend()  # values stay put: exact comparison
        want = domstats(dom.name, "vm", "vcpu")
        cd = Collectd(tmp_path / "cd", v1_options(influxdb.url, password_file, tmp_path,
                                                  LibvirtURI="qemu:///system"))
        with cd:
            wait_for("kvm_vm points of the domain",
                     lambda: len(influx_points(influxdb, "kvm_vm", f"AND vm = '{dom.name}'")) >= 2, 60)
            cd.stop()
        log = cd.log()
        assert "[error]" not in log, log
        assert "libvirt qemu:///system" not in log  # the default URI is not worth a word in the summary

    rows = influx_points(influxdb, "kvm_vm", f"AND vm = '{dom.name}'")
    vm_stats = {k.split(".")[1]: v for k, v in want.items() if k.startswith("vm.")}
    vcpu_sums: dict[str, int] = {}
    per_vcpu: dict[str, dict[str, int]] = {}
    for key, value in want.items():
        parts = key.split(".")
        if parts[0] == "vcpu" and len(parts) == 4:
            vcpu_sums[parts[2]] = vcpu_sums.get(parts[2], 0) + value
            per_vcpu.setdefault(parts[1], {})[parts[2]] = value
    assert {"mmu_cache_miss", "mmu_pte_write", "pages_4k"} <= set(vm_stats) and vcpu_sums["exits"] > 0
    for r in rows:  # the same schema as every VM: tags vm, vm_uuid, vmm; one field per counter
        assert (r["vm_uuid"], r["vmm"]) == (dom.uuid, "qemu")
        assert {name: r[name] for name in vm_stats} == vm_stats
        assert {name: r[name] for name in vcpu_sums} == vcpu_sums
    vcpu_rows = influx_points(influxdb, "kvm_vcpu", f"AND vm = '{dom.name}'")
    assert {r["vcpu"] for r in vcpu_rows} == {"0", "1"}
    for r in vcpu_rows:
        assert {name: r[name] for name in per_vcpu[r["vcpu"]]} == per_vcpu[r["vcpu"]]
