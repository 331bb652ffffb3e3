"""Samples as JSON objects and as kvm_stat-like text tables (what ``kvmfleet stat`` prints)."""

from __future__ import annotations

import re
import socket
from typing import Any

from .collector import Rates, Sample, VMSample
from .model import ReasonCounts, Stats, Usability, Value
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


def reason_rates(prev: ReasonCounts | None, cur: ReasonCounts | None, interval_s: float) -> dict[str, dict[str, float]]:
    """Exits per second by tracepoint and reason between two readings of the reasons source. A reason missing
    from ``prev`` had not been seen (counted 0); a count that went down (the source restarted counting) has no
    rate rather than a wrong one."""
    if prev is None or cur is None or interval_s <= 0:
        return {}
    out: dict[str, dict[str, float]] = {}
    for tracepoint, counts in cur.items():
        before = prev.get(tracepoint, {})
        out[tracepoint] = {reason: (count - before.get(reason, 0)) / interval_s
                           for reason, count in counts.items() if count >= before.get(reason, 0)}
    return out


def _json_reasons(counts: ReasonCounts | None) -> dict[str, dict[str, int]]:
    return {tracepoint: dict(sorted(reasons.items())) for tracepoint, reasons in sorted((counts or {}).items())}


def sample_json(sample: Sample, rates: Rates | None, sources: dict[str, Usability], *, vcpus: bool,
                pattern: re.Pattern[str] | None, reasons_state: Usability | None = None) -> dict[str, Any]:
    """One sample as a JSON object. With a reasons source on, ``exit_reasons`` (tracepoint -> reason -> count)
    in it and in each VM the source counts, and ``exit_reasons_source`` says whether it can count."""
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
        if vm.exit_reasons is not None:  # the reasons source counts per VM
            entry["exit_reasons"] = _json_reasons(vm.exit_reasons)
        if vcpus:
            entry["vcpus"] = [
                {"id": vcpu, "stats": _json_stats(stats, pattern),
                 **({"rates": _json_rates(rates.vcpus.get((key, vcpu), {}), pattern)} if rates else {})}
                for vcpu, stats in sorted(vm.vcpus.items())
            ]
        vms.append(entry)
    obj = {
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
    if sample.exit_reasons is not None:  # a reasons source is on: its counts as they are, never filtered
        obj["exit_reasons"] = _json_reasons(sample.exit_reasons)
    if reasons_state is not None:
        obj["exit_reasons_source"] = {"usable": reasons_state.usable, "reason": reasons_state.reason}
    return obj


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


def _reasons_table(title: str, counts: ReasonCounts, prev: ReasonCounts | None, interval_s: float | None) -> list[str]:
    """kvm_stat -t's rows: ``kvm_exit(HLT)``, ``kvm_userspace_exit(KVM_EXIT_IO)``, with totals and rates."""
    per_second = reason_rates(prev, counts, interval_s) if interval_s else {}
    lines = [title]
    for tracepoint, reasons in sorted(counts.items()):
        for reason, count in sorted(reasons.items()):
            rate = per_second.get(tracepoint, {}).get(reason)
            shown = "" if rate is None else f"{rate:>12.0f}"
            lines.append(f" {for_terminal(f'{tracepoint}({reason})'):<32} {count:>16} {shown}".rstrip())
    return lines


def sample_text(sample: Sample, rates: Rates | None, sources: dict[str, Usability], *, per_vm: bool,
                vcpus: bool, pattern: re.Pattern[str] | None, prev: Sample | None = None,
                reasons_state: Usability | None = None) -> str:
    """One sample as kvm_stat-like tables; ``prev`` (the sample ``rates`` came from) gives the reasons' rates."""
    unusable = [f"{name}: {one_line(state.reason)}" for name, state in sources.items() if not state]
    if reasons_state is not None and not reasons_state.usable:
        unusable.append(f"exit reasons: {one_line(reasons_state.reason)}")
    interval_s = rates.interval_s if rates is not None and prev is not None else None
    header = (f"kvm statistics: host totals, source {sample.source}, {len(sample.vms)} VMs, {sample.vcpu_count} vCPUs"
              + ("" if rates is None else f", rates over {rates.interval_s:.1f} s"))
    refused = [f"  (refused: VM {_shown(ident.name)}, pid {ident.key.pid}: implausible or "
               "unreadable values, left out; the log says why)" for ident in sample.refused]
    lines = [header, *(f"  (unusable: {why})" for why in unusable), *refused, ""]
    lines.append(f" {'counter':<32} {'total':>16} {'' if rates is None else 'per second':>12}".rstrip())
    lines += _table("", sample.host, rates.host if rates else None, pattern)[1:]
    if sample.exit_reasons is not None:
        lines += ["", *_reasons_table("exits by reason", sample.exit_reasons,
                                      prev.exit_reasons if prev else None, interval_s)]
    before = {vm.identity.key: vm for vm in prev.vms} if prev is not None else {}
    for vm in sample.vms if per_vm or vcpus else []:
        key = vm.identity.key
        lines += ["", *_table(_vm_title(vm), vm.stats, rates.vms.get(key) if rates else None, pattern)]
        if vm.exit_reasons is not None:
            old = before.get(key)
            lines += _reasons_table(" exits by reason", vm.exit_reasons, old.exit_reasons if old else None,
                                    interval_s)
        for vcpu, stats in sorted(vm.vcpus.items()) if vcpus else []:
            vcpu_rates = rates.vcpus.get((key, vcpu)) if rates else None
            lines += _table(f" vCPU {vcpu}", stats, vcpu_rates, pattern)
    return "\n".join(lines)
