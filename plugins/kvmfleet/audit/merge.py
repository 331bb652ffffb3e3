"""The answers of the pack's queries turned into what the audit knows of each host (:class:`~.model.HostData`).

Most queries answer with two statements, each series' first sample in the window and its last one: their
difference is the counter's increase (:func:`merge_host_pairs` per host, :func:`merge_vm_pairs` per VM, the series
of one VM added up). ``host_tdp`` and ``host_facts`` answer with the last row (:func:`merge_facts`),
``exact_rates`` with one rate per counter (:func:`merge_exact_rates`), ``counter_rates`` with rates over time
(:func:`chart_series`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ..schema import F_COUNT, T_HOST, T_ISA, T_REASON, T_VM
from .client import Series
from .model import INSTANT, HostData, VMData, finite

TIME = "time"  # InfluxDB's time column
Statements = Sequence[Sequence[Series]]
SeriesKey = tuple[tuple[str, str], ...]


def _row(series: Series) -> dict[str, Any] | None:
    """The first row of a series (the only one of a LIMIT 1 query) as a dict; None if it has none."""
    return dict(zip(series.columns, series.values[0])) if series.values else None


def first_last(statements: Statements) -> dict[SeriesKey, list[Any]]:
    """Pair the rows of a two-statement query (first sample, last sample) by series tags."""
    pairs: dict[SeriesKey, list[Any]] = {}
    for idx, stmt in enumerate(statements[:2]):
        for s in stmt:
            tags = s.tags
            key = tuple(tags.items()) if len(tags) == 1 else tuple(sorted(tags.items()))
            entry = pairs.setdefault(key, [None, None])
            entry[idx] = _row(s)
    return pairs


def increases(first: dict[str, Any] | None, last: dict[str, Any] | None
              ) -> tuple[dict[str, float | None], dict[str, float | None], bool]:
    """(increases, instant values, reset?) of one first/last pair of rows."""
    inc: dict[str, float | None] = {}
    inst: dict[str, float | None] = {}
    reset = False
    cols = set(first or {}) | set(last or {})
    cols.discard(TIME)
    for col in cols:
        lv = finite((last or {}).get(col))
        if col in INSTANT:
            inst[col] = lv
            continue
        fv = finite((first or {}).get(col))
        if fv is None or lv is None:
            inc[col] = None
        elif lv < fv:
            reset = True
            inc[col] = None
        else:
            inc[col] = lv - fv
    return inc, inst, reset


def _host(hosts: dict[str, HostData], name: str) -> HostData:
    h = hosts.get(name)
    if h is None:
        h = hosts[name] = HostData(name)
    return h


def seen(h: HostData, t: float | None) -> None:
    """``t`` is the time of one of ``h``'s samples: keep the newest (is the host still reporting?)."""
    if t is not None and (h.t_seen is None or t > h.t_seen):
        h.t_seen = t


def merge_host_pairs(hosts: dict[str, HostData], statements: Statements) -> None:
    for key, (first, last) in first_last(statements).items():
        name = dict(key).get(T_HOST)
        if not name:
            continue
        h = _host(hosts, name)
        inc, inst, reset = increases(first, last)
        for col, v in inc.items():
            if v is not None or col not in h.increases:
                h.increases[col] = v
        h.instant.update(inst)
        h.reset = h.reset or reset
        t0 = finite((first or {}).get(TIME))
        t1 = finite((last or {}).get(TIME))
        if t0 is not None:
            h.t_first = t0 if h.t_first is None else min(h.t_first, t0)
        if t1 is not None:
            h.t_last = t1 if h.t_last is None else max(h.t_last, t1)
            seen(h, t1)


def merge_vm_pairs(hosts: dict[str, HostData], statements: Statements, source: str) -> None:
    for key, (first, last) in first_last(statements).items():
        tags = dict(key)
        host = tags.get(T_HOST)
        if not host or host not in hosts:
            continue
        name = tags.get(T_VM) or "(no vm tag)"
        h = hosts[host]
        vm = h.vms.get(name)
        if vm is None:
            vm = h.vms[name] = VMData(name, source=source)
        inc, inst, reset = increases(first, last)
        vm.reset = vm.reset or reset
        for col, v in inc.items():  # series of one VM (vCPUs, a new vm_uuid) add up
            if v is None:
                vm.increases.setdefault(col, None)
            else:
                vm.increases[col] = (vm.increases.get(col) or 0.0) + v
        for col, v in inst.items():
            if v is not None:
                vm.instant[col] = (vm.instant.get(col) or 0.0) + v
            else:
                vm.instant.setdefault(col, None)


# What the tracepoints' format files name reasons (MSR_WRITE, PF excp, KVM_EXIT_MMIO, npf): anything else in the
# isa or reason tag of a series (control characters, markup, a 64 KiB string) is not a reason, and would end up
# in the summaries.
REASON_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_ ]{0,63}$")
ODD_REASONS_NOTE = "exit reason series whose isa or reason tag is not a reason name were left out: {}"


def _reason_key(tags: dict[str, str]) -> tuple[str, tuple[str, str]] | None:
    """(host, (isa, reason)) of a kvm_exit_reason series; None without a host, an isa or a reason."""
    host, isa, reason = tags.get(T_HOST), tags.get(T_ISA), tags.get(T_REASON)
    return (host, (isa, reason)) if host and isa and reason else None


def _from_window_start(h: HostData, t_first_row: float) -> bool:
    """Was the series' first row the host's first sample? A reason is written only once seen, so a series whose
    first row is later was at 0 at the host's first sample in the window."""
    return h.t_first is None or t_first_row <= h.t_first


def merge_exit_reasons(hosts: dict[str, HostData], statements: Statements) -> None:
    """``exit_reasons`` (first and last row of each host-wide series) into :attr:`HostData.reason_hits`, for the
    hosts ``fleet_counters`` knows; a count that went down marks :attr:`HostData.reason_reset` (its hits until then:
    the count since the restart, until ``exit_reason_resets`` says better). Series whose tags are no reason names
    are left out, and their host's findings say how many."""
    odd: dict[str, int] = {}
    for key, (first, last) in first_last(statements).items():
        where = _reason_key(dict(key))
        if where is None or where[0] not in hosts or first is None or last is None:
            continue
        h, series = hosts[where[0]], where[1]
        if not all(REASON_NAME.match(name) for name in series):
            odd[h.host] = odd.get(h.host, 0) + 1
            continue
        t0, v0, v1 = finite(first.get(TIME)), finite(first.get(F_COUNT)), finite(last.get(F_COUNT))
        if t0 is None or v0 is None or v1 is None:
            continue
        h.reason_first[series] = (t0, v0)
        if v1 < v0:
            h.reason_reset = True
            h.reason_hits[series] = v1
        else:
            h.reason_hits[series] = v1 - (v0 if _from_window_start(h, t0) else 0.0)
    for name, count in sorted(odd.items()):
        hosts[name].notes.append(ODD_REASONS_NOTE.format(count))


def merge_reason_resets(hosts: dict[str, HostData], statements: Statements) -> None:
    """``exit_reason_resets`` (the sum of the non-negative increases of each series) for hosts whose counts
    restarted: the hits of every series of such a host, plus the first count of a series not seen at the host's
    first sample."""
    for stmt in statements:
        for s in stmt:
            where, row = _reason_key(s.tags), _row(s)
            if where is None or where[0] not in hosts or row is None:
                continue
            h, series = hosts[where[0]], where[1]
            increase = finite(row.get(F_COUNT))
            if increase is None or series not in h.reason_first:  # only the series exit_reasons accepted
                continue
            t0, v0 = h.reason_first[series]
            h.reason_hits[series] = increase + (0.0 if _from_window_start(h, t0) else v0)


def _host_rows(statements: Statements) -> list[tuple[str, dict[str, Any]]]:
    """(host, row) of every series with a host tag and a row."""
    out = []
    for stmt in statements:
        for s in stmt:
            host, row = s.tags.get(T_HOST), _row(s)
            if host and row is not None:
                out.append((host, row))
    return out


def merge_facts(hosts: dict[str, HostData], statements: Statements) -> None:
    """The last ``kvm_host`` row of each host: its facts (a host with a row has facts, even empty ones)."""
    for host, row in _host_rows(statements):
        h = _host(hosts, host)
        h.has_facts = True
        seen(h, finite(row.get(TIME)))
        for k, v in row.items():
            if k != TIME and v is not None:
                h.facts[k] = v


def merge_exact_rates(hosts: dict[str, HostData], statements: Statements) -> None:
    for host, row in _host_rows(statements):
        if host in hosts:
            for col, value in row.items():
                if col != TIME:
                    hosts[host].exact_rates[col] = finite(value)


def chart_series(statements: Statements) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Per host and counter, the (time, rate) points of ``counter_rates``."""
    charts: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for stmt in statements:
        for s in stmt:
            host = s.tags.get(T_HOST)
            if not host:
                continue
            per = charts.setdefault(host, {})
            for row in s.rows()[:-1]:  # the last bucket is still filling: its rate would dip
                t = finite(row.get(TIME))
                for col, value in row.items():
                    v = finite(value)
                    if t is not None and col != TIME and v is not None:
                        per.setdefault(col, []).append((t, v))
    return charts
