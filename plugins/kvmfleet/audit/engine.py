"""Run the query pack against a fleet and the rules against the answers, in named stages (:data:`STAGES`).

Each stage asks a handful of grouped queries over many hosts, never one query per host; independent requests of a
stage run in parallel (``parallel`` at once):

1. *fleet*: ``fleet_counters`` (each host's first and last sample in the window: exits and every rule's trigger
   counter), ``host_tdp`` (the TDP verdict and vCPUs) and ``exit_reasons`` (each host-wide exit reason's first and
   last count; none where the agent does not count reasons) for every host matching ``--host-regex``;
2. *fresh*: no host at all is an error (:class:`AuditError`: nothing was seen, so nothing can be called clean);
   hosts whose newest sample is older than ``stale_after`` are stale (listed, their findings noted);
3. *resets*: hosts with a counter that went down in the window (a restart) get their rates from ``exact_rates``
   (derivatives over every sample) instead, hosts whose reason counts restarted their reasons from
   ``exit_reason_resets``;
4. *screen*: the hosts no rule can judge are listed; each host-wide rule's screen picks the hosts that may trigger
   it, each fleet-wide rule (exit-load) the hosts it flags;
5. *detail*: each rule's own query, ``host_facts`` and ``vm_counters``, only for the hosts picked, with a regex of
   exactly those hosts;
6. *vms*: ``vcpu_counters`` for the hosts picked that have no ``kvm_vm``;
7. *evaluate*: every rule on every host (fleet-wide rules on the fleet); the findings of the rules about exits
   name the host's top exit reasons where it has any;
8. *charts*: for the HTML report, ``counter_rates`` of the hosts with findings.

What each rule needs (its detail query, its VM columns, vCPUs, facts) comes from its unit in :mod:`.rules`. The
stages ask through a :class:`~.runner.QueryRunner`: :func:`run_audit` gives them InfluxDB, :func:`audit_with` any
runner (a test's canned answers).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..querypack import QueryParams, Rule, duration_seconds, interval_for
from ..schema import M_VCPU, M_VM
from ..severity import severity_rank
from .client import AuditError, InfluxQLClient
from .merge import (
    chart_series,
    merge_exact_rates,
    merge_exit_reasons,
    merge_facts,
    merge_host_pairs,
    merge_reason_resets,
    merge_vm_pairs,
)
from .model import Finding, HostData, Skipped, Stale, duration_text, iso_time
from .reasons import name_top_reasons
from .rules import UNKNOWN_VCPUS, Units, wanted_rules
from .runner import Answers, InfluxQLRunner, Job, QueryRunner

RESET_NOTE = ("a counter went down in the window (collector or VM restart): rates of the trigger counters from "
              "every sample (exact_rates), other evidence understated")
REASON_RESET_NOTE = ("exit reason counts restarted in the window (agent restart): reasons from every sample "
                     "(exit_reason_resets), the interval of each restart left out")
VM_WIDE, VM_NARROW = "vm_counters", "vm_counters/narrow"  # job keys of the two vm_counters groups


@dataclass
class AuditOptions:
    window: str = "1h"
    host_regex: str = ".*"
    retention_policy: str | None = None
    rules: dict[str, Rule] = field(default_factory=dict)
    only: Sequence[str] | None = None  # rule ids to evaluate (None: all)
    charts: bool = False
    parallel: int = 4
    chart_buckets: int = 60
    stale_after: str = "5m"  # a host whose newest sample is older is stale (an InfluxQL duration)
    now: float | None = None  # what "older" is measured from (unix time); None: when the audit starts


@dataclass
class AuditResult:
    window: str
    window_s: float
    host_regex: str
    source: str
    hosts: dict[str, HostData]
    findings: list[Finding]
    skipped: list[Skipped]
    top_exit_rate: list[dict[str, Any]]
    fleet: dict[str, Any]
    rules: dict[str, Rule]
    queries: list[dict[str, Any]]
    requests: int
    elapsed_s: float
    started_at: float
    charts: dict[str, dict[str, list[tuple[float, float]]]] = field(default_factory=dict)
    stale: list[Stale] = field(default_factory=list)
    stale_after: str = "5m"

    def count(self, at_least: str) -> int:
        rank = severity_rank(at_least)
        return sum(1 for f in self.findings if severity_rank(f.severity) >= rank)


@dataclass
class Audit:
    """What the stages share: the options, the units, the runner, and all that is known so far."""

    options: AuditOptions
    units: Units
    wanted: set[str]  # the rule ids reported
    runner: QueryRunner
    window_s: float
    now: float
    source: str = ""
    hosts: dict[str, HostData] = field(default_factory=dict)
    stale: list[Stale] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    picked: dict[str, list[str]] = field(default_factory=dict)  # unit id -> the hosts it picked, sorted
    vm_columns: dict[str, set[str]] = field(default_factory=dict)  # host -> the kvm_vm columns its findings show
    findings: list[Finding] = field(default_factory=list)
    top: list[dict[str, Any]] = field(default_factory=list)
    fleet: dict[str, Any] = field(default_factory=dict)
    charts: dict[str, dict[str, list[tuple[float, float]]]] = field(default_factory=dict)
    log: list[dict[str, Any]] = field(default_factory=list)  # each job asked, its hosts and its stage's time

    def ask(self, jobs: Sequence[Job]) -> Answers:
        """One batch of jobs, run in parallel, and logged."""
        if not jobs:
            return {}
        entries: list[dict[str, Any]] = [
            {"query": j.query, "hosts": "all" if j.hosts is None else len(j.hosts)} for j in jobs]
        self.log += entries
        t0 = time.monotonic()
        answers = self.runner.run(jobs)
        took = round(time.monotonic() - t0, 3)
        for entry in entries:
            entry["stage_s"] = took
        return answers


# ------------------------------------------------------------------------------------------------ stages
def stage_fleet(a: Audit) -> None:
    ans = a.ask([Job("fleet_counters", "fleet_counters"), Job("host_tdp", "host_tdp"),
                 Job("exit_reasons", "exit_reasons")])
    merge_host_pairs(a.hosts, ans.get("fleet_counters", []))
    merge_facts(a.hosts, ans.get("host_tdp", []))
    merge_exit_reasons(a.hosts, ans.get("exit_reasons", []))  # after fleet_counters: it reads t_first


def stage_fresh(a: Audit) -> None:
    """No sample at all is an error (stopped collectors, a regex matching nothing, a wrong retention policy), not
    a clean fleet; a host whose newest sample is older than ``stale_after`` is stale, and its findings say so."""
    o = a.options
    if not a.hosts:
        where = f" in {a.source}" if a.source else ""
        raise AuditError(f"no kvm samples for hosts matching {o.host_regex} in the last {o.window}{where}: are the "
                         f"collectors running? is the database (and retention policy) right?")
    limit = duration_seconds(o.stale_after)
    for name, h in sorted(a.hosts.items()):
        age = None if h.t_seen is None else a.now - h.t_seen
        if age is not None and age <= limit:
            continue
        a.stale.append(Stale(name, h.t_seen, age))
        since = "no sample time seen" if h.t_seen is None else \
            f"newest sample {iso_time(h.t_seen)}, {duration_text(age or 0)} before the audit"
        h.notes.append(f"stale: {since} (more than --stale-after {o.stale_after}): it may have stopped reporting")


def stage_resets(a: Audit) -> None:
    reset = sorted(n for n, h in a.hosts.items() if h.reset)
    reason_reset = sorted(n for n, h in a.hosts.items() if h.reason_reset)
    jobs = [Job(key, key, hosts) for key, hosts in (("exact_rates", reset), ("exit_reason_resets", reason_reset))
            if hosts]
    ans = a.ask(jobs)
    merge_exact_rates(a.hosts, ans.get("exact_rates", []))
    merge_reason_resets(a.hosts, ans.get("exit_reason_resets", []))
    for name in reset:
        a.hosts[name].exact_rates.setdefault("exits", None)
        a.hosts[name].notes.append(RESET_NOTE)
    for name in reason_reset:
        a.hosts[name].notes.append(REASON_RESET_NOTE)


def stage_screen(a: Audit) -> None:
    needs_vcpus = [u.id for u in a.units.all if u.needs_vcpus]
    hosts = sorted(a.hosts.items())  # once: every host rule screens the whole fleet
    for name, h in hosts:
        if h.span_s is None and h.increases:
            a.skipped.append(Skipped(name, "*", "fewer than two samples in the window: no rates"))
        elif h.span_s is not None and h.vcpus is None:
            a.skipped += [Skipped(name, rid, UNKNOWN_VCPUS) for rid in needs_vcpus]
    for unit in a.units.host:
        a.picked[unit.id] = [n for n, h in hosts if unit.screen(h)]
    for fleet_unit in a.units.fleet:
        a.picked[fleet_unit.id] = fleet_unit.pick(a.hosts)
    for u in a.units.all:
        for n in a.picked[u.id] if u.vm_columns else []:
            a.vm_columns.setdefault(n, set()).update(u.vm_columns)


def _vm_jobs(a: Audit) -> list[Job]:
    """vm_counters in two groups: the hosts that need only the fleet-wide rules' columns (exit-load outliers:
    exits), and the others with every column any of their rules shows."""
    narrow = {c for u in a.units.fleet for c in u.vm_columns}
    narrow_hosts = sorted(n for n, cols in a.vm_columns.items() if cols <= narrow)
    wide_hosts = sorted(set(a.vm_columns) - set(narrow_hosts))
    wide = sorted(set().union(*(a.vm_columns[n] for n in wide_hosts)))
    return [Job(key, "vm_counters", hosts, cols) for key, hosts, cols in (
        (VM_WIDE, wide_hosts, wide), (VM_NARROW, narrow_hosts, sorted(narrow))) if hosts]


def stage_detail(a: Audit) -> None:
    jobs = [Job(u.id, u.detail_query, a.picked[u.id]) for u in a.units.host if u.detail_query and a.picked[u.id]]
    facts = sorted({n for u in a.units.all if u.needs_facts for n in a.picked[u.id] if a.hosts[n].has_facts})
    if facts:
        jobs.append(Job("host_facts", "host_facts", facts))
    ans = a.ask(jobs + _vm_jobs(a))
    for u in a.units.host:
        merge_host_pairs(a.hosts, ans.get(u.id, []))
    merge_facts(a.hosts, ans.get("host_facts", []))
    for key in (VM_WIDE, VM_NARROW):
        merge_vm_pairs(a.hosts, ans.get(key, []), M_VM)


def stage_vms(a: Audit) -> None:
    no_vm = [n for n in sorted(a.vm_columns) if not a.hosts[n].vms]
    if no_vm:
        cols = sorted(set().union(*(a.vm_columns[n] for n in no_vm)))
        ans = a.ask([Job("vcpu_counters", "vcpu_counters", no_vm, cols)])
        merge_vm_pairs(a.hosts, ans.get("vcpu_counters", []), M_VCPU)


def stage_evaluate(a: Audit) -> None:
    picked = {uid: set(hosts) for uid, hosts in a.picked.items()}
    for name, h in sorted(a.hosts.items()):
        for unit in a.units.host:
            out = unit.evaluate(h) if name in picked[unit.id] else unit.unpicked(h)
            if out is None:
                continue
            for f in out.findings:
                if f.rule in a.wanted:
                    f.notes.extend(h.notes)
                    if unit.names_exit_reasons:
                        name_top_reasons(f, h)
                    a.findings.append(f)
            a.skipped += out.skipped
    a.fleet = {"hosts": len(a.hosts)}
    for fleet_unit in a.units.fleet:  # again, now with the VMs of the hosts it flagged
        fo = fleet_unit.evaluate_fleet(a.hosts)
        for f in fo.findings if fleet_unit.names_exit_reasons else []:
            if f.host in a.hosts:
                name_top_reasons(f, a.hosts[f.host])
        a.findings += fo.findings
        a.top += fo.top
        a.fleet.update(fo.fleet)
    a.findings.sort(key=lambda f: (-severity_rank(f.severity), f.host, f.rule))


def stage_charts(a: Audit) -> None:
    if not (a.options.charts and a.findings):
        return
    flagged = sorted({f.host for f in a.findings})
    cols = sorted({c for f in a.findings for c in f.counters})
    # buckets over the data actually there (a host may have reported for less than the window)
    spans = [a.hosts[n].span_s or 0.0 for n in flagged]
    span = min(a.window_s, max(spans)) if spans and max(spans) > 0 else a.window_s
    job = Job("counter_rates", "counter_rates", flagged, cols, interval_for(span, a.options.chart_buckets,
                                                                            minimum_s=1))
    a.charts = chart_series(a.ask([job]).get("counter_rates", []))


STAGES: tuple[tuple[str, Callable[[Audit], None]], ...] = (
    ("fleet", stage_fleet), ("fresh", stage_fresh), ("resets", stage_resets), ("screen", stage_screen),
    ("detail", stage_detail), ("vms", stage_vms), ("evaluate", stage_evaluate), ("charts", stage_charts))


# ------------------------------------------------------------------------------------------------ entry points
def _query_params(options: AuditOptions) -> QueryParams:
    return QueryParams(window=options.window, host_regex=options.host_regex,
                       retention_policy=options.retention_policy)


def audit_with(runner: QueryRunner, options: AuditOptions, source: str = "") -> AuditResult:
    """Every stage, asking ``runner``; :class:`AuditError` on unknown rules, on a server or query error."""
    started = time.time()
    t0 = time.monotonic()
    window_s = duration_seconds(options.window)
    wanted = wanted_rules(options.only)
    unknown = wanted - set(options.rules)
    if unknown:
        raise AuditError(f"rules without a definition: {', '.join(sorted(unknown))}")
    _query_params(options).substitutions()  # validates window, regex and RP before any request
    duration_seconds(options.stale_after)
    now = started if options.now is None else options.now
    a = Audit(options, Units.make(options.rules, wanted), wanted, runner, window_s, now, source)
    for _, stage in STAGES:
        stage(a)
    return AuditResult(window=options.window, window_s=window_s, host_regex=options.host_regex, source=source,
                       hosts=a.hosts, findings=a.findings, skipped=a.skipped, top_exit_rate=a.top, fleet=a.fleet,
                       rules=options.rules, queries=a.log, requests=runner.requests,
                       elapsed_s=time.monotonic() - t0, started_at=started, charts=a.charts, stale=a.stale,
                       stale_after=options.stale_after)


def run_audit(client: InfluxQLClient, options: AuditOptions, source: str = "") -> AuditResult:
    """Every stage against ``client``'s InfluxDB; :class:`AuditError` on a server or query error."""
    runner = InfluxQLRunner(client, _query_params(options), options.parallel)
    try:
        return audit_with(runner, options, source)
    finally:
        runner.close()


__all__ = ["STAGES", "Audit", "AuditError", "AuditOptions", "AuditResult", "audit_with", "run_audit"]
