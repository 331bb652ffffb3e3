"""``kvmfleet capacity``: how much each host carries against what it has, what it burns on polling and exits, how
fast it grows and when it crosses a limit; the fleet's totals, imbalance and room.

A handful of grouped queries of the pack (never one per host), in two stages:

1. *fleet*: ``capacity_facts`` (the last ``kvm_host`` row: CPUs, memory, VMs, vCPUs, halt polling settings),
   ``capacity_load`` (vCPUs and VMs per time bucket: mean, peak, trend), ``capacity_exits`` (exits per bucket:
   the trend of the exit rate), ``capacity_counters`` (first and last samples: exit rate, halt polling time,
   mapped memory) and ``capacity_vms`` (first and last samples per VM: the exit-heavy VMs);
2. *resets*: hosts whose counters went down in the window get their exit rate from the buckets and their polling
   time from ``capacity_polling`` (bucket by bucket, the interval of a restart left out).

Everything else is arithmetic on those answers (:func:`evaluate`), documented figure by figure in
docs/queries.md. What cannot be computed is None with a note saying why, never 0.
"""

from __future__ import annotations

import heapq
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..querypack import PackError, QueryParams, duration_seconds, interval_for
from ..schema import T_HOST, T_VM
from .client import AuditError, InfluxQLClient, Series
from .merge import TIME, first_last, increases
from .model import Finding, Stale, duration_text, finite, iso_time, ratio
from .runner import Answers, InfluxQLRunner, Job, QueryRunner

DAY_S = 86400.0
PAGE_BYTES = {"pages_4k": 4 << 10, "pages_2m": 2 << 20, "pages_1g": 1 << 30}
RULE = "capacity-limit"  # the rule name of capacity's findings (kvmfleet_finding, --fail-on)
BUCKETS = 60  # time buckets over the window for the load and the trends
MIN_TREND_POINTS = 3  # fewer buckets than this give no slope worth forecasting with
TOP_VMS = 3  # exit-heavy VMs named per host
TOP_FLEET = 10  # hosts and VMs in the fleet's lists

# The limits capacity knows: name -> (default, what it divides, whether a trend can forecast it).
LIMITS: dict[str, tuple[float | None, str]] = {
    "vcpus_per_cpu": (4.0, "vCPUs per online CPU (overcommit); forecast from the vCPUs' trend"),
    "exits_per_s_per_cpu": (None, "exits per second per online CPU; forecast from the exit rate's trend"),
    "halt_poll_share": (None, "share of the host's CPUs spent polling halted vCPUs (0-1); not forecast"),
}
FAIL_ON = ("crossed", "forecast")


def parse_limits(items: Sequence[str]) -> dict[str, float]:
    """``--limit NAME=VALUE`` (repeatable) over the defaults; :class:`PackError` naming what is wrong."""
    limits = {name: default for name, (default, _) in LIMITS.items() if default is not None}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or name not in LIMITS:
            raise PackError(f"--limit {item!r}: expected NAME=VALUE with NAME one of {', '.join(LIMITS)}")
        try:
            value = float(text)
        except ValueError:
            raise PackError(f"--limit {name}: {text.strip()!r} is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise PackError(f"--limit {name}: expected a number > 0, got {text.strip()}")
        limits[name] = value
    return limits


@dataclass
class CapacityOptions:
    window: str = "24h"
    host_regex: str = ".*"
    retention_policy: str | None = None
    limits: dict[str, float] = field(default_factory=lambda: parse_limits([]))
    horizon_days: float = 30.0  # a limit forecast to be crossed within this many days is a warning
    place: int = 0  # vCPUs to place on the hosts with the most room
    parallel: int = 4
    stale_after: str = "5m"
    charts: bool = False
    now: float | None = None


@dataclass
class HostCapacity:
    """One host's figures; None where the data does not allow one (``notes`` says why)."""

    host: str
    vms: float | None = None
    vcpus: float | None = None
    cpus: float | None = None
    vms_mean: float | None = None
    vms_peak: float | None = None
    vcpus_mean: float | None = None
    vcpus_peak: float | None = None
    vcpus_per_cpu: float | None = None
    vcpus_per_cpu_mean: float | None = None
    vcpus_per_cpu_peak: float | None = None
    halt_poll_cpus: float | None = None
    halt_poll_fail_cpus: float | None = None
    halt_poll_share: float | None = None
    exits_per_s: float | None = None
    exits_per_s_per_cpu: float | None = None
    vcpus_per_day: float | None = None
    exits_per_s_per_day: float | None = None
    days_to_limit: float | None = None
    headroom_vcpus: int | None = None
    mem_total_bytes: float | None = None
    mem_mapped_bytes: float | None = None
    mem_mapped_share: float | None = None
    exit_heavy_vms: list[dict[str, Any]] = field(default_factory=list)
    limits: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # halt polling parameters, nx_huge_pages, kernel
    last_sample: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            if k == "last_sample":
                v = None if v is None else iso_time(v)
            out[k] = round_figures(v)
        return out


@dataclass
class Missing:
    """A host capacity cannot judge: the command says so and exits 2."""

    host: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"host": self.host, "reason": self.reason}


@dataclass
class CapacityResult:
    window: str
    host_regex: str
    source: str
    limits: dict[str, float]
    horizon_days: float
    hosts: list[HostCapacity]
    fleet: dict[str, Any]
    findings: list[Finding]
    missing: list[Missing]
    stale: list[Stale]
    stale_after: str
    queries: list[dict[str, Any]]
    requests: int
    elapsed_s: float
    started_at: float
    charts: dict[str, dict[str, list[tuple[float, float]]]] = field(default_factory=dict)

    def crossed(self, fail_on: str) -> list[Finding]:
        """The findings ``--fail-on fail_on`` fails on: limits crossed, or also forecast within the horizon."""
        return [f for f in self.findings if fail_on == "forecast" or f.severity == "critical"]


# ------------------------------------------------------------------------------------------------ arithmetic
def slope_per_day(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (unix time, value) points, per day; None with fewer than MIN_TREND_POINTS."""
    if len(points) < MIN_TREND_POINTS:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var <= 0:
        return None
    return sum((t - mt) * (v - mv) for t, v in points) / var * DAY_S


def bucket_rates(rows: Sequence[tuple[float, float]]) -> tuple[list[tuple[float, float]], float, float, bool]:
    """Rates between consecutive buckets' last values: ((time, rate) points, increase kept, seconds kept, reset
    seen). The last bucket is still filling (its value is not at its end) and is left out; so is every interval
    whose increase is negative (a restart)."""
    rows = sorted(rows)[:-1]
    points, inc, secs, reset = [], 0.0, 0.0, False
    for (t0, v0), (t1, v1) in zip(rows, rows[1:]):
        d, dt = v1 - v0, t1 - t0
        if dt <= 0:
            continue
        if d < 0:
            reset = True
            continue
        points.append((t1, d / dt))
        inc += d
        secs += dt
    return points, inc, secs, reset


def round_figures(value: Any) -> Any:
    """Floats to 6 significant digits (NaN and infinities as None), through dicts and lists."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: round_figures(v) for k, v in value.items()}
    if isinstance(value, list):
        return [round_figures(v) for v in value]
    return value


def spread(values: Sequence[float]) -> dict[str, float] | None:
    """How unevenly a per-CPU load is spread over hosts: min, max, mean, the coefficient of variation (standard
    deviation over mean: 0 is perfectly even) and max over mean (how much more the busiest host carries)."""
    if not values:
        return None
    mean = statistics.fmean(values)
    return {"hosts": len(values), "min": min(values), "max": max(values), "mean": mean,
            "cv": statistics.pstdev(values) / mean if mean > 0 else 0.0,
            "max_over_mean": max(values) / mean if mean > 0 else 0.0}


def place(hosts: Sequence[HostCapacity], vcpus: int) -> dict[str, Any]:
    """Where ``vcpus`` more vCPUs would go: one at a time to the host with the most room left (so that the load
    stays even), never past its limit."""
    heap = [(-h.headroom_vcpus, h.host) for h in hosts if h.headroom_vcpus]
    heapq.heapify(heap)
    given: dict[str, int] = {}
    left = vcpus
    while left and heap:
        room, host = heapq.heappop(heap)
        given[host] = given.get(host, 0) + 1
        left -= 1
        if room + 1 < 0:
            heapq.heappush(heap, (room + 1, host))
    placed = [{"host": h, "vcpus": n} for h, n in sorted(given.items(), key=lambda kv: (-kv[1], kv[0]))]
    return {"vcpus": vcpus, "placed": placed, "unplaced": left}


# ------------------------------------------------------------------------------------------------ answers
def _bucket_rows(statements: Sequence[Sequence[Series]]) -> dict[str, dict[float, dict[str, Any]]]:
    """host -> bucket time -> columns (a ``parallel: fields`` query answers each column group apart)."""
    out: dict[str, dict[float, dict[str, Any]]] = {}
    for stmt in statements:
        for s in stmt:
            host = s.tags.get(T_HOST)
            if not host:
                continue
            per = out.setdefault(host, {})
            if TIME not in s.columns:
                continue
            at = s.columns.index(TIME)
            cols = [(i, c) for i, c in enumerate(s.columns) if i != at]
            for row in s.values:  # tens of thousands of rows on a big fleet: no dict per row
                t = finite(row[at])
                if t is not None:
                    bucket = per.setdefault(t, {})
                    for i, c in cols:
                        bucket[c] = row[i]
    return out


def _column(rows: Mapping[float, Mapping[str, Any]], col: str) -> list[tuple[float, float]]:
    return [(t, v) for t, r in sorted(rows.items()) if (v := finite(r.get(col))) is not None]


def _facts(statements: Sequence[Sequence[Series]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for stmt in statements:
        for s in stmt:
            rows = s.rows()
            if s.tags.get(T_HOST) and rows:
                out.setdefault(s.tags[T_HOST], {}).update({k: v for k, v in rows[0].items() if v is not None})
    return out


@dataclass
class _Pairs:
    increases: dict[str, float | None]
    instant: dict[str, float | None]
    reset: bool
    span_s: float | None
    t_last: float | None


def _host_pairs(statements: Sequence[Sequence[Series]]) -> dict[str, _Pairs]:
    out = {}
    for key, (first, last) in first_last(statements).items():
        host = dict(key).get(T_HOST)
        if not host:
            continue
        inc, inst, reset = increases(first, last)
        t0, t1 = finite((first or {}).get(TIME)), finite((last or {}).get(TIME))
        span = t1 - t0 if t0 is not None and t1 is not None and t1 > t0 else None
        out[host] = _Pairs(inc, inst, reset, span, t1)
    return out


def _vm_rates(statements: Sequence[Sequence[Series]]) -> tuple[dict[str, list[dict[str, Any]]], set[str]]:
    """Per host, its VMs' exit rates, the highest first; and the hosts with a VM left out (restarted)."""
    vms: dict[str, dict[str, float]] = {}
    restarted = set()
    for key, (first, last) in first_last(statements).items():
        tags = dict(key)
        host, name = tags.get(T_HOST), tags.get(T_VM) or "(no vm tag)"
        if not host:
            continue
        inc, _, reset = increases(first, last)
        t0, t1 = finite((first or {}).get(TIME)), finite((last or {}).get(TIME))
        if reset:
            restarted.add(host)
            continue
        exits = inc.get("exits")
        if exits is None or t0 is None or t1 is None or t1 <= t0:
            continue
        per = vms.setdefault(host, {})
        per[name] = per.get(name, 0.0) + exits / (t1 - t0)  # series of one VM (a new vm_uuid) add up
    out: dict[str, list[dict[str, Any]]] = {
        host: [{"vm": n, "exits_per_s": r} for n, r in sorted(per.items(), key=lambda kv: (-kv[1], kv[0]))]
        for host, per in vms.items()}
    return out, restarted


# ------------------------------------------------------------------------------------------------ judging one host
def _judge_limits(h: HostCapacity, limits: Mapping[str, float], horizon_days: float) -> list[Finding]:
    """Each limit's value now, whether it is crossed, and in how many days its trend crosses it."""
    now_values = {"vcpus_per_cpu": (h.vcpus_per_cpu, ratio(h.vcpus_per_day, h.cpus)),
                  "exits_per_s_per_cpu": (h.exits_per_s_per_cpu, ratio(h.exits_per_s_per_day, h.cpus)),
                  "halt_poll_share": (h.halt_poll_share, None)}
    findings = []
    for name, limit in limits.items():
        value, per_day = now_values[name]
        if value is None:
            h.limits[name] = {"limit": limit, "value": None, "crossed": None, "days_to_limit": None}
            continue
        crossed = value >= limit
        days = 0.0 if crossed else (limit - value) / per_day if per_day is not None and per_day > 0 else None
        h.limits[name] = {"limit": limit, "value": value, "crossed": crossed, "days_to_limit": days}
        if name == "vcpus_per_cpu":
            h.days_to_limit = days
        evidence = {"limit": name, "value": value, "max": limit, "days_to_limit": days, "per_day": per_day,
                    "cpus": h.cpus, "vcpus": h.vcpus, "exits_per_s": h.exits_per_s}
        if crossed:
            findings.append(Finding(h.host, RULE, "critical", f"{name} at or above its limit",
                                    f"{name} {value:.3g} is at or above the limit {limit:g}"
                                    + _because(h, name), evidence, counters=["exits"]))
        elif days is not None and days <= horizon_days:
            findings.append(Finding(h.host, RULE, "warning", f"{name} forecast to reach its limit",
                                    f"{name} {value:.3g} reaches the limit {limit:g} in {days:.1f} days at "
                                    f"{per_day:+.3g} a day" + _because(h, name), evidence, counters=["exits"]))
    return findings


def _because(h: HostCapacity, name: str) -> str:
    if name == "vcpus_per_cpu":
        return f" ({h.vcpus:.0f} vCPUs on {h.cpus:.0f} CPUs)"
    if name == "exits_per_s_per_cpu":
        return f" ({h.exits_per_s:,.0f} exits/s on {h.cpus:.0f} CPUs)"
    return f" ({h.halt_poll_cpus:.3g} of {h.cpus:.0f} CPUs polling)"


def _memory(h: HostCapacity, pairs: _Pairs | None, tdp_state: Any) -> None:
    pages = {k: (pairs.instant.get(k) if pairs else None) for k in PAGE_BYTES}
    if all(v is None for v in pages.values()):
        h.notes.append("mapped memory not computed: no pages_4k/pages_2m/pages_1g counters (a kernel before 5.13, "
                       "or a source without them)")
        return
    mapped = sum((v or 0.0) * PAGE_BYTES[k] for k, v in pages.items())
    if mapped == 0 and tdp_state != "enabled":
        h.notes.append("mapped memory not computed: the pages_* counters count EPT/NPT mappings only and stay 0 "
                       f"under shadow paging (tdp_state {tdp_state or 'unknown'})")
        return
    h.mem_mapped_bytes = mapped
    h.mem_mapped_share = ratio(mapped, h.mem_total_bytes)


def host_capacity(name: str, facts: Mapping[str, Any], load: Mapping[float, Mapping[str, Any]],
                  exits_rows: Sequence[tuple[float, float]], pairs: _Pairs | None,
                  polling: Mapping[float, Mapping[str, Any]] | None, vms: Sequence[Mapping[str, Any]],
                  options: CapacityOptions) -> tuple[HostCapacity, list[Finding]]:
    """Every figure of one host from the answers about it (``polling``: only for a host whose counters
    restarted)."""
    h = HostCapacity(name)
    h.vms, h.vcpus, h.cpus = finite(facts.get("vms")), finite(facts.get("vcpus")), finite(facts.get("cpus_online"))
    h.mem_total_bytes = finite(facts.get("mem_total_bytes"))
    h.last_sample = finite(facts.get(TIME))
    h.settings = {k: facts.get(k) for k in ("halt_poll_ns", "halt_poll_ns_grow", "halt_poll_ns_grow_start",
                                            "halt_poll_ns_shrink", "nx_huge_pages", "kernel_release",
                                            "tdp_state")}
    # per bucket, the most VMs and vCPUs the host carried: their max is the peak, their mean the mean
    vcpus_peaks, vms_peaks = _column(load, "vcpus_peak"), _column(load, "vms_peak")
    h.vcpus_mean = statistics.fmean(v for _, v in vcpus_peaks) if vcpus_peaks else None
    h.vcpus_peak = max((v for _, v in vcpus_peaks), default=None)
    h.vms_mean = statistics.fmean(v for _, v in vms_peaks) if vms_peaks else None
    h.vms_peak = max((v for _, v in vms_peaks), default=None)
    h.vcpus_per_cpu = ratio(h.vcpus, h.cpus)
    h.vcpus_per_cpu_mean = ratio(h.vcpus_mean, h.cpus)
    h.vcpus_per_cpu_peak = ratio(h.vcpus_peak, h.cpus)
    h.vcpus_per_day = slope_per_day(vcpus_peaks)
    if h.vcpus_per_day is None:
        h.notes.append(f"no trend: vCPUs seen in {len(vcpus_peaks)} time bucket(s) of the window, "
                       f"{MIN_TREND_POINTS} needed")

    rate_points, inc, secs, bucket_reset = bucket_rates(exits_rows)
    exits_inc = pairs.increases.get("exits") if pairs else None
    reset = bool(pairs and pairs.reset) or bucket_reset
    if exits_inc is not None and not reset and pairs and pairs.span_s:
        h.exits_per_s = exits_inc / pairs.span_s  # exact: first and last sample
    elif secs > 0:
        h.exits_per_s = inc / secs
        h.notes.append("counters went down in the window (a restart, or a VM that stopped): rates from the time "
                       "buckets, the intervals of the drops left out")
    idle = not (h.vms_peak or h.vms)  # no VM in the window: an agent sends no kvm point then
    if h.exits_per_s is None and idle and not exits_rows and pairs is None:
        h.exits_per_s = 0.0
        h.notes.append("no VM in the window: nothing exits or polls")
    h.exits_per_s_per_cpu = ratio(h.exits_per_s, h.cpus)
    h.exits_per_s_per_day = slope_per_day(rate_points)

    if pairs and not reset and pairs.span_s:
        ok = pairs.increases.get("halt_poll_success_ns")
        fail = pairs.increases.get("halt_poll_fail_ns")
        span = pairs.span_s
    else:
        _, ok, ok_s, _ = bucket_rates(_column(polling or {}, "halt_poll_success_ns"))
        _, fail, fail_s, _ = bucket_rates(_column(polling or {}, "halt_poll_fail_ns"))
        span = ok_s if ok_s == fail_s and ok_s > 0 else 0.0
    if ok is not None and fail is not None and span:
        h.halt_poll_cpus = (ok + fail) / span / 1e9
        h.halt_poll_fail_cpus = fail / span / 1e9
        h.halt_poll_share = ratio(h.halt_poll_cpus, h.cpus)
    elif idle and pairs is None:
        h.halt_poll_cpus = h.halt_poll_fail_cpus = h.halt_poll_share = 0.0
    else:
        h.notes.append("halt polling not computed: no halt_poll_success_ns/halt_poll_fail_ns (a kernel before 5.8, "
                       "or a source without them)")
    _memory(h, pairs, facts.get("tdp_state"))

    for vm in vms[:TOP_VMS]:
        h.exit_heavy_vms.append(dict(vm, share=ratio(vm["exits_per_s"], h.exits_per_s)))
    limit = options.limits.get("vcpus_per_cpu")
    if limit is not None and h.cpus is not None:
        # the room below the limit left by the most vCPUs the host carried in the window
        h.headroom_vcpus = max(0, math.floor(limit * h.cpus + 1e-9) - math.ceil(
            max(h.vcpus or 0.0, h.vcpus_peak or 0.0) - 1e-9))
    return h, _judge_limits(h, options.limits, options.horizon_days)


def fleet_figures(hosts: Sequence[HostCapacity], options: CapacityOptions) -> dict[str, Any]:
    def total(attr: str) -> float | None:
        values = [getattr(h, attr) for h in hosts if getattr(h, attr) is not None]
        return math.fsum(values) if values else None

    out: dict[str, Any] = {"hosts": len(hosts)}
    for attr in ("vms", "vcpus", "cpus", "halt_poll_cpus", "halt_poll_fail_cpus", "exits_per_s", "vcpus_per_day",
                 "mem_total_bytes", "mem_mapped_bytes", "headroom_vcpus"):
        out[attr] = total(attr)
    out["vcpus_per_cpu"] = ratio(out["vcpus"], out["cpus"])
    out["exits_per_s_per_cpu"] = ratio(out["exits_per_s"], out["cpus"])
    out["imbalance"] = {attr: spread([getattr(h, attr) for h in hosts if getattr(h, attr) is not None])
                        for attr in ("vcpus_per_cpu", "exits_per_s_per_cpu")}
    roomy = sorted((h for h in hosts if h.headroom_vcpus is not None), key=lambda h: (-(h.headroom_vcpus or 0), h.host))
    out["most_headroom"] = [{"host": h.host, "headroom_vcpus": h.headroom_vcpus, "vcpus_per_cpu": h.vcpus_per_cpu}
                            for h in roomy[:TOP_FLEET]]
    out["exit_heavy_vms"] = sorted(({"host": h.host, **vm} for h in hosts for vm in h.exit_heavy_vms),
                                   key=lambda d: (-d["exits_per_s"], d["host"], d["vm"]))[:TOP_FLEET]
    if options.place:
        out["place"] = place(roomy, options.place)
    return out


# ------------------------------------------------------------------------------------------------ entry points
def capacity_with(runner: QueryRunner, options: CapacityOptions, source: str = "") -> CapacityResult:
    """Ask ``runner`` the pack's capacity queries and work out every figure; :class:`AuditError` when nothing
    was seen or a query failed."""
    started = time.time()
    t0 = time.monotonic()
    window_s = duration_seconds(options.window)
    params = QueryParams(window=options.window, host_regex=options.host_regex,
                         retention_policy=options.retention_policy)
    params.substitutions()  # validates window, regex and RP before any request
    stale_s = duration_seconds(options.stale_after)
    now = started if options.now is None else options.now
    interval = interval_for(window_s, BUCKETS)
    log: list[dict[str, Any]] = []

    def ask(jobs: Sequence[Job]) -> Answers:
        log.extend({"query": j.query, "hosts": "all" if j.hosts is None else len(j.hosts)} for j in jobs)
        return runner.run(jobs)

    ans = ask([Job("facts", "capacity_facts"), Job("load", "capacity_load", interval=interval),
               Job("exits", "capacity_exits", interval=interval), Job("counters", "capacity_counters"),
               Job("vms", "capacity_vms")])
    facts = _facts(ans.get("facts", []))
    load = _bucket_rows(ans.get("load", []))
    exits = _bucket_rows(ans.get("exits", []))
    pairs = _host_pairs(ans.get("counters", []))
    vm_rates, restarted = _vm_rates(ans.get("vms", []))
    names = sorted(set(facts) | set(load) | set(exits) | set(pairs))
    if not names:
        where = f" in {source}" if source else ""
        raise AuditError(f"no kvm samples for hosts matching {options.host_regex} in the last {options.window}"
                         f"{where}: are the collectors running? is the database (and retention policy) right?")
    exit_rows = {n: _column(exits.get(n, {}), "exits") for n in names}
    reset = sorted(n for n in names if (pairs.get(n) and pairs[n].reset) or bucket_rates(exit_rows[n])[3])
    polling = _bucket_rows(ask([Job("polling", "capacity_polling", reset, interval=interval)]).get("polling", [])) \
        if reset else {}

    hosts, findings, missing, stale = [], [], [], []
    for n in names:
        h, found = host_capacity(n, facts.get(n, {}), load.get(n, {}), exit_rows[n], pairs.get(n),
                                 polling.get(n), vm_rates.get(n, []), options)
        if n in restarted:
            h.notes.append("a VM restarted under the same name in the window: left out of the exit-heavy VMs")
        seen = max((t for t in (h.last_sample, pairs[n].t_last if n in pairs else None) if t is not None),
                   default=None)
        if seen is None or now - seen > stale_s:
            age = None if seen is None else now - seen
            stale.append(Stale(n, seen, age))
            h.notes.append("stale: " + ("no sample time seen" if seen is None else
                                        f"newest sample {iso_time(seen)}, {duration_text(age or 0)} before the "
                                        f"report (more than --stale-after {options.stale_after})"))
        if n not in facts:
            missing.append(Missing(n, "no kvm_host sample in the window: its CPUs, VMs and vCPUs are unknown"))
        elif h.cpus is None:
            missing.append(Missing(n, "kvm_host has no cpus_online: an agent older than the capacity facts "
                                      "(upgrade it); its overcommit is unknown"))
        elif h.exits_per_s is None:
            missing.append(Missing(n, "no exit rate: fewer than two samples of exits in the window"))
        hosts.append(h)
        findings += found
    fleet = fleet_figures([h for h in hosts if h.host not in {s.host for s in stale}], options)
    findings.sort(key=lambda f: (f.severity != "critical", f.host))
    result = CapacityResult(window=options.window, host_regex=options.host_regex, source=source,
                            limits=dict(options.limits), horizon_days=options.horizon_days, hosts=hosts, fleet=fleet,
                            findings=findings, missing=missing, stale=stale, stale_after=options.stale_after,
                            queries=log, requests=runner.requests, elapsed_s=0.0, started_at=started)
    if options.charts:
        result.charts = {n: {"vcpus": _column(load.get(n, {}), "vcpus_peak"),
                             "exits/s": bucket_rates(exit_rows[n])[0]} for n in _charted(result)}
    result.elapsed_s = time.monotonic() - t0
    return result


def _charted(result: CapacityResult) -> list[str]:
    """The hosts the HTML report draws: those with findings, then the most loaded per CPU."""
    first = sorted({f.host for f in result.findings})
    busiest = sorted((h for h in result.hosts if h.vcpus_per_cpu is not None),
                     key=lambda h: (-(h.vcpus_per_cpu or 0.0), h.host))
    return (first + [h.host for h in busiest if h.host not in first])[:max(TOP_FLEET, len(first))]


def run_capacity(client: InfluxQLClient, options: CapacityOptions, source: str = "") -> CapacityResult:
    params = QueryParams(window=options.window, host_regex=options.host_regex,
                         retention_policy=options.retention_policy)
    runner = InfluxQLRunner(client, params, options.parallel)
    try:
        return capacity_with(runner, options, source)
    finally:
        runner.close()


__all__ = ["FAIL_ON", "LIMITS", "RULE", "CapacityOptions", "CapacityResult", "HostCapacity", "Missing",
           "bucket_rates", "capacity_with", "parse_limits", "place", "round_figures", "run_capacity", "slope_per_day",
           "spread"]
