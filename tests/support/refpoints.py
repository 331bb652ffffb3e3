"""A sample's lines as influxdb-client's ``Point`` encodes them: the reference the plugin's own encoder
(kvmfleet.points) is checked against byte for byte, and the peer its speed is measured against (bench/ship_cost.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from influxdb_client import Point  # type: ignore[attr-defined]

from kvmfleet import schema


def client_line(measurement: str, tags: Mapping[str, str], stats: Mapping[str, Any], time_ns: int) -> str:
    """One point: scalars as integer fields, histograms as their non-zero ``<name>_bucket_<n>`` fields."""
    p = Point(measurement)
    for k, v in tags.items():
        p.tag(k, v)
    for k, v in stats.items():
        if isinstance(v, tuple):
            for i, c in enumerate(v):
                if c:
                    p.field(f"{k}{schema.BUCKET_INFIX}{i}", c)
        else:
            p.field(k, v)
    return str(p.time(time_ns).to_line_protocol())


def client_lines(sample: Any, hostname: str, tags: Mapping[str, str] | None = None) -> list[str]:
    """The ``kvm``, ``kvm_vm`` and ``kvm_vcpu`` lines of a sample (PointBuilder with per-vCPU on)."""
    base = {**(tags or {}), schema.T_HOST: hostname}
    out = [client_line(schema.M_HOST, base, sample.host, sample.time_ns)]
    for vm in sample.vms:
        ident = vm.identity
        vm_tags = {**base, schema.T_VM: ident.name, schema.T_VMM: ident.vmm}
        if ident.uuid:
            vm_tags[schema.T_VM_UUID] = ident.uuid
        out.append(client_line(schema.M_VM, vm_tags, vm.stats, sample.time_ns))
        for vcpu in sorted(vm.vcpus):
            out.append(client_line(schema.M_VCPU, {**vm_tags, schema.T_VCPU: str(vcpu)}, vm.vcpus[vcpu],
                                   sample.time_ns))
    return out
