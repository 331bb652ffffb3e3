"""Samples as JSON objects and as kvm_stat-like text tables (what ``kvmfleet stat`` prints)."""

from __future__ import annotations

import re
import socket
from typing import Any

from .collector import Rates, Sample, VMSample
from .model import Stats, Usability, Value
from .textsafe import for_terminal, one_line, shortened

NAME_CHARS = 200  # a VM name longer than this is cut in text output (a guest owner chooses it)


def _filtered(stats: Stats, pattern: re.Pattern[str] | None) -> Stats:
    if pattern is None:
        return dict(sorted(stats.items()))
    return {name: value for name, value in sorted(stats.items()) if pattern.search(name)}


def _json_value(value: Value) -> int | list[int]:
    return list(value) if isinstance(value, tuple) else value


def _json_stats(stats: Stats, pattern: re.Pattern[str] | None) -> dict[str, int | list[int]]:
    return {name: _json_value(value) for name, value in _filtered(stats, pattern).items()}


def _json_rates(rates: dict[str, float], pattern: re.Pattern[str] | None) -> dict[str, float]:
    return {name: round(rate, 3) for name, rate in sorted(rates.items()) if not pattern or pattern.search(name)}


def sample_json(sample: Sample, rates: Rates | None, sources: dict[str, Usability], *, vcpus: bool,
                pattern: re.Pattern[str] | None) -> dict[str, Any]:
    vms = []
    for vm in sample.vms:
        key = vm.identity.key
        entry: dict[str, Any] = {
            "name": vm.identity.name,
            "uuid": vm.identity.uuid,
            "vmm": vm.identity.vmm,
            "pid": key.pid,
            "start_time": key.start_time,
            "vm_fd": key.vm_fd,
            "source": vm.source,
            "stats": _json_stats(vm.stats, pattern),
        }
        if rates is not None:
            entry["rates"] = _json_rates(rates.vms.get(key, {}), pattern)
        if vcpus:
            entry["vcpus"] = [
                {"id": vcpu, "stats": _json_stats(stats, pattern),
                 **({"rates": _json_rates(rates.vcpus.get((key, vcpu), {}), pattern)} if rates else {})}
                for vcpu, stats in sorted(vm.vcpus.items())
            ]
        vms.append(entry)
    return {
        "time_ns": sample.time_ns,
        "hostname": socket.gethostname(),
        "source": sample.source,
        "sources": {name: {"usable": state.usable, "reason": state.reason} for name, state in sources.items()},
        "vm_count": len(sample.vms),
        "vcpu_count": sample.vcpu_count,
        "host": _json_stats(sample.host, pattern),
        "rates": _json_rates(rates.host, pattern) if rates else {},
        "vms": vms,
        "refused": [{"name": ident.name, "pid": ident.key.pid, "vm_fd": ident.key.vm_fd} for ident in sample.refused],
    }


def _table(title: str, stats: Stats, rates: dict[str, float] | None, pattern: re.Pattern[str] | None) -> list[str]:
    lines = [title]
    for name, value in _filtered(stats, pattern).items():
        shown = " ".join(str(v) for v in value) if isinstance(value, tuple) else str(value)
        rate = "" if rates is None or name not in rates else f"{rates[name]:>12.0f}"
        lines.append(f" {for_terminal(name):<32} {shown:>16} {rate}".rstrip())
    return lines


def _shown(name: str) -> str:
    """A name from outside (a VMM's command line or comm) as the terminal may show it."""
    return for_terminal(shortened(name, NAME_CHARS))


def _vm_title(vm: VMSample) -> str:
    """Name, VMM kind and UUID come from the VMM's command line and comm: escaped for the terminal."""
    ident = vm.identity
    uuid = f" uuid {_shown(ident.uuid)}" if ident.uuid else ""
    return (f"VM {_shown(ident.name)} ({_shown(ident.vmm)}, pid {ident.key.pid}{uuid}, source {vm.source}, "
            f"{len(vm.vcpus)} vCPUs seen)")


def sample_text(sample: Sample, rates: Rates | None, sources: dict[str, Usability], *, per_vm: bool,
                vcpus: bool, pattern: re.Pattern[str] | None) -> str:
    unusable = [f"{name}: {one_line(state.reason)}" for name, state in sources.items() if not state]
    header = (f"kvm statistics: host totals, source {sample.source}, {len(sample.vms)} VMs, {sample.vcpu_count} vCPUs"
              + ("" if rates is None else f", rates over {rates.interval_s:.1f} s"))
    refused = [f"  (refused: VM {_shown(ident.name)}, pid {ident.key.pid}: implausible or "
               "unreadable values, left out; the log says why)" for ident in sample.refused]
    lines = [header, *(f"  (unusable: {why})" for why in unusable), *refused, ""]
    lines.append(f" {'counter':<32} {'total':>16} {'' if rates is None else 'per second':>12}".rstrip())
    lines += _table("", sample.host, rates.host if rates else None, pattern)[1:]
    for vm in sample.vms if per_vm or vcpus else []:
        key = vm.identity.key
        lines += ["", *_table(_vm_title(vm), vm.stats, rates.vms.get(key) if rates else None, pattern)]
        for vcpu, stats in sorted(vm.vcpus.items()) if vcpus else []:
            vcpu_rates = rates.vcpus.get((key, vcpu)) if rates else None
            lines += _table(f" vCPU {vcpu}", stats, vcpu_rates, pattern)
    return "\n".join(lines)
