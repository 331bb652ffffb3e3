"""Run the query pack against a fleet and the rules against the answers.

Stages (each a handful of grouped queries over many hosts, never one query per host):

1. *fleet*: ``fleet_counters`` (each host's first and last sample in the window: exits and every rule's trigger
   counter) and ``host_tdp`` (the TDP verdict and vCPUs) for every host
   matching ``--host-regex``. Hosts with a counter that went down in the window (a restart) get their rates from
   ``exact_rates`` (derivatives over every sample) instead.
2. *screen*: each rule's screen picks the hosts that may trigger it; exit-load is judged on the whole fleet.
3. *detail*: each rule's own query, ``host_facts`` and ``vm_counters`` (``vcpu_counters`` where no ``kvm_vm``
   exists), only for the hosts picked, with a regex of exactly those hosts.
4. *evaluate*; for the HTML report, ``counter_rates`` of the hosts with findings for the charts.

Independent requests of a stage run in parallel (``parallel`` at once).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..querypack import (
    QueryParams,
    Rule,
    duration_seconds,
    exact_hosts_regex,
    get_query,
    interval_for,
    select_columns,
    split_columns,
)
from ..severity import severity_rank
from . import rules as R
from .client import AuditError, InfluxQLClient, Series
from .model import INSTANT, Finding, HostData, Skipped, VMData, finite

DETAIL_QUERIES = {
    "shadow-paging": "shadow_paging",
    "emulated-io": "emulated_io",
    "irq-injection": "irq_injection",
    "insn-emulation": "insn_emulation",
    "halt-polling": "halt_polling",
}
ALL_RULES = ("shadow-paging", "nested-shadow", "tdp-disabled", "tdp-unavailable", "emulated-io", "irq-injection",
             "insn-emulation", "halt-polling", "exit-load")
SCREENS: dict[str, Callable[[HostData, Rule], bool]] = {
    "shadow-paging": R.screen_shadow, "emulated-io": R.screen_emulated_io, "irq-injection": R.screen_irq,
    "insn-emulation": R.screen_insn, "halt-polling": R.screen_halt}
EVALS: dict[str, Callable[[HostData, Rule], R.Outcome]] = {
    "emulated-io": R.eval_emulated_io, "irq-injection": R.eval_irq, "insn-emulation": R.eval_insn,
    "halt-polling": R.eval_halt}
SHARDS = 4  # a query marked "parallel: fields" runs as this many statements
HOSTS_PER_QUERY = 400  # a detail query's regex names at most this many hosts; more make more queries


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

    def count(self, at_least: str) -> int:
        rank = severity_rank(at_least)
        return sum(1 for f in self.findings if severity_rank(f.severity) >= rank)


@dataclass
class _Job:
    key: str
    query: str
    hosts: Sequence[str] | None = None  # None: every host of --host-regex
    columns: Sequence[str] | None = None  # only these select items
    interval: str | None = None


class _Runner:
    def __init__(self, client: InfluxQLClient, params: QueryParams, parallel: int) -> None:
        self.client = client
        self.params = params
        self.pool = ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="kvmfleet-audit")
        self.log: list[dict[str, Any]] = []

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def _params(self, hosts: Sequence[str] | None, interval: str | None) -> QueryParams:
        return QueryParams(window=self.params.window,
                           host_regex=self.params.host_regex if hosts is None else exact_hosts_regex(hosts),
                           retention_policy=self.params.retention_policy, interval=interval)

    def run(self, jobs: Sequence[_Job]) -> dict[str, list[list[Series]]]:
        """Run the jobs' statements as parallel requests; per job key, the series of each statement of its query
        (a statement cut into several requests gets their series together)."""
        requests: list[tuple[str, int, str, str]] = []  # (key, statement index, query name, text)
        for job in jobs:
            q = get_query(job.query)
            host_groups: list[Sequence[str] | None] = [None] if job.hosts is None else [
                job.hosts[i:i + HOSTS_PER_QUERY] for i in range(0, len(job.hosts), HOSTS_PER_QUERY)]
            for hosts in host_groups:
                for idx, stmt in enumerate(q.filled(self._params(hosts, job.interval))):
                    if job.columns is not None:
                        stmt = select_columns(stmt, job.columns)
                    for part in split_columns(stmt, SHARDS) if q.parallel_fields else [stmt]:
                        requests.append((job.key, idx, job.query, part))
            self.log.append({"query": job.query, "hosts": "all" if job.hosts is None else len(job.hosts)})
        t0 = time.monotonic()
        answers = list(self.pool.map(lambda r: self.client.query(r[3], what=f"query {r[2]}"), requests))
        took = round(time.monotonic() - t0, 3)
        for entry in self.log[-len(jobs):]:
            entry["stage_s"] = took
        out: dict[str, list[list[Series]]] = {}
        for (key, idx, _, _), ans in zip(requests, answers):
            stmts = out.setdefault(key, [])
            while len(stmts) <= idx:
                stmts.append([])
            stmts[idx].extend(ans[0] if ans else [])
        return out


def _row(series: Series) -> dict[str, Any] | None:
    rows = series.rows()
    return rows[0] if rows else None


def _first_last(statements: Sequence[Sequence[Series]]) -> dict[tuple[tuple[str, str], ...], list[Any]]:
    """Pair the rows of a two-statement query (first sample, last sample) by series tags."""
    pairs: dict[tuple[tuple[str, str], ...], list[Any]] = {}
    for idx, stmt in enumerate(statements[:2]):
        for s in stmt:
            key = tuple(sorted(s.tags.items()))
            entry = pairs.setdefault(key, [None, None])
            entry[idx] = _row(s)
    return pairs


def _increases(first: dict[str, Any] | None, last: dict[str, Any] | None
               ) -> tuple[dict[str, float | None], dict[str, float | None], bool]:
    """(increases, instant values, reset?) of one first/last pair of rows."""
    inc: dict[str, float | None] = {}
    inst: dict[str, float | None] = {}
    reset = False
    cols = set(first or {}) | set(last or {})
    cols.discard("time")
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


def _merge_host_pairs(hosts: dict[str, HostData], statements: Sequence[Sequence[Series]]) -> None:
    for key, (first, last) in _first_last(statements).items():
        host = dict(key).get("host")
        if not host:
            continue
        h = hosts.get(host)
        if h is None:
            h = hosts[host] = HostData(host)
        inc, inst, reset = _increases(first, last)
        for col, v in inc.items():
            if v is not None or col not in h.increases:
                h.increases[col] = v
        h.instant.update(inst)
        h.reset = h.reset or reset
        t0 = finite((first or {}).get("time"))
        t1 = finite((last or {}).get("time"))
        if t0 is not None:
            h.t_first = t0 if h.t_first is None else min(h.t_first, t0)
        if t1 is not None:
            h.t_last = t1 if h.t_last is None else max(h.t_last, t1)


def _merge_vm_pairs(hosts: dict[str, HostData], statements: Sequence[Sequence[Series]], source: str) -> None:
    for key, (first, last) in _first_last(statements).items():
        tags = dict(key)
        host = tags.get("host")
        if not host or host not in hosts:
            continue
        name = tags.get("vm") or "(no vm tag)"
        h = hosts[host]
        vm = h.vms.get(name)
        if vm is None:
            vm = h.vms[name] = VMData(name, source=source)
        inc, inst, reset = _increases(first, last)
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


def _merge_last_row(hosts: dict[str, HostData], statements: Sequence[Sequence[Series]]) -> None:
    for stmt in statements:
        for s in stmt:
            host = s.tags.get("host")
            row = _row(s)
            if not host or row is None:
                continue
            h = hosts.get(host)
            if h is None:
                h = hosts[host] = HostData(host)
            h.has_facts = True
            for k, v in row.items():
                if k != "time" and v is not None:
                    h.facts[k] = v


def run_audit(client: InfluxQLClient, options: AuditOptions, source: str = "") -> AuditResult:
    """Every stage against ``client``; :class:`AuditError` on a server or query error."""
    started = time.time()
    t0 = time.monotonic()
    window_s = duration_seconds(options.window)
    wanted = set(options.only) if options.only else set(ALL_RULES)
    if "shadow-paging" in wanted:
        wanted.add("nested-shadow")
    unknown = wanted - set(options.rules)
    if unknown:
        raise AuditError(f"rules without a definition: {', '.join(sorted(unknown))}")
    params = QueryParams(window=options.window, host_regex=options.host_regex,
                         retention_policy=options.retention_policy)
    params.substitutions()  # validates window, regex and RP before any request
    runner = _Runner(client, params, options.parallel)
    try:
        return _run(runner, client, options, wanted, window_s, started, t0, source)
    finally:
        runner.close()


def _run(runner: _Runner, client: InfluxQLClient, options: AuditOptions, wanted: set[str], window_s: float,
         started: float, t0: float, source: str) -> AuditResult:
    rules = options.rules
    hosts: dict[str, HostData] = {}
    skipped: list[Skipped] = []
    # ---- stage 1: the whole fleet
    ans = runner.run([_Job("fleet_counters", "fleet_counters"), _Job("host_tdp", "host_tdp")])
    counters = ans.get("fleet_counters", [])
    _merge_host_pairs(hosts, counters)
    _merge_last_row(hosts, ans.get("host_tdp", []))
    # ---- hosts whose counters went down: exact rates from every sample
    reset_hosts = sorted(n for n, h in hosts.items() if h.reset)
    if reset_hosts:
        ans = runner.run([_Job("exact_rates", "exact_rates", reset_hosts)])
        for stmt in ans.get("exact_rates", []):
            for s in stmt:
                host, row = s.tags.get("host"), _row(s)
                if host in hosts and row is not None:
                    for col, value in row.items():
                        if col != "time":
                            hosts[host].exact_rates[col] = finite(value)
        for name in reset_hosts:
            hosts[name].exact_rates.setdefault("exits", None)
            hosts[name].notes.append("a counter went down in the window (collector or VM restart): rates of the "
                                     "trigger counters from every sample (exact_rates), other evidence understated")
    for name, h in sorted(hosts.items()):
        if h.span_s is None and h.increases:
            skipped.append(Skipped(name, "*", "fewer than two samples in the window: no rates"))
        elif h.span_s is not None and h.vcpus is None:
            skipped.extend(Skipped(name, rid, R.UNKNOWN_VCPUS) for rid in R.NEEDS_VCPUS if rid in wanted)
    # ---- screens
    cand: dict[str, list[str]] = {rid: [] for rid in DETAIL_QUERIES}
    for name, h in sorted(hosts.items()):
        for rid, screen in SCREENS.items():
            if rid in wanted and screen(h, rules[rid]):
                cand[rid].append(name)
    tdp_cand = [n for n, h in sorted(hosts.items()) if R.screen_tdp(h)] \
        if wanted & {"tdp-disabled", "tdp-unavailable"} else []
    exit_load = R.eval_exit_load(hosts, rules["exit-load"]) if "exit-load" in wanted else None
    outliers = sorted({f.host for f in exit_load.findings}) if exit_load else []
    # ---- stage 2: detail for the hosts picked
    jobs = [_Job(rid, DETAIL_QUERIES[rid], hs) for rid, hs in cand.items() if hs]
    facts_hosts = [n for n in sorted(set(cand["shadow-paging"]) | set(tdp_cand)) if hosts[n].has_facts]
    if facts_hosts:
        jobs.append(_Job("host_facts", "host_facts", facts_hosts))
    vm_columns: dict[str, set[str]] = {}
    for rid, hs in [*cand.items(), ("exit-load", outliers)]:
        for n in hs:
            vm_columns.setdefault(n, set()).update(R.VM_COLUMNS[rid])
    # two groups: hosts that only need exits per VM (exit-load outliers), and the others with every column
    exits_only = sorted(n for n, cols in vm_columns.items() if cols <= set(R.VM_COLUMNS["exit-load"]))
    others = sorted(set(vm_columns) - set(exits_only))
    union = sorted(set().union(*(vm_columns[n] for n in others))) if others else []
    for key, hs, cols in (("vm_counters", others, union), ("vm_counters/exits", exits_only,
                                                           list(R.VM_COLUMNS["exit-load"]))):
        if hs:
            jobs.append(_Job(key, "vm_counters", hs, cols))
    ans = runner.run(jobs) if jobs else {}
    for rid in cand:
        _merge_host_pairs(hosts, ans.get(rid, []))
    _merge_last_row(hosts, ans.get("host_facts", []))
    _merge_vm_pairs(hosts, ans.get("vm_counters", []), "kvm_vm")
    _merge_vm_pairs(hosts, ans.get("vm_counters/exits", []), "kvm_vm")
    no_vm = [n for n in sorted(vm_columns) if not hosts[n].vms]
    if no_vm:
        cols = sorted(set().union(*(vm_columns[n] for n in no_vm)))
        ans = runner.run([_Job("vcpu_counters", "vcpu_counters", no_vm, cols)])
        _merge_vm_pairs(hosts, ans.get("vcpu_counters", []), "kvm_vcpu")
    # ---- evaluate
    findings: list[Finding] = []
    for name, h in sorted(hosts.items()):
        outs: list[R.Outcome] = []
        if "shadow-paging" in wanted:
            if name in cand["shadow-paging"]:
                outs.append(R.eval_shadow(h, rules["shadow-paging"], rules.get("nested-shadow")))
            elif h.span_s is not None and not h.has("mmu_pte_write") and not h.has("invlpg"):
                outs.append(R.Outcome([], [Skipped(name, "shadow-paging",
                                                   "neither mmu_pte_write nor invlpg is reported")]))
        if wanted & {"tdp-disabled", "tdp-unavailable"}:
            outs.append(R.eval_tdp(h, rules["tdp-disabled"], rules["tdp-unavailable"], rules["shadow-paging"]))
        for rid, fn in EVALS.items():
            if rid in wanted and name in cand[rid]:
                outs.append(fn(h, rules[rid]))
        for o in outs:
            for f in o.findings:
                if f.rule in wanted:
                    f.notes.extend(h.notes)
                    findings.append(f)
            skipped.extend(o.skipped)
    top: list[dict[str, Any]] = []
    fleet: dict[str, Any] = {"hosts": len(hosts)}
    if exit_load is not None:
        exit_load = R.eval_exit_load(hosts, rules["exit-load"])  # again, now with the VMs of the outliers
        findings.extend(exit_load.findings)
        top = exit_load.top
        fleet.update(exit_load.fleet)
    findings.sort(key=lambda f: (-severity_rank(f.severity), f.host, f.rule))
    charts: dict[str, dict[str, list[tuple[float, float]]]] = {}
    if options.charts and findings:
        flagged = sorted({f.host for f in findings})
        cols = sorted({c for f in findings for c in f.counters})
        # buckets over the data actually there (a host may have reported for less than the window)
        spans = [hosts[n].span_s or 0.0 for n in flagged]
        span = min(window_s, max(spans)) if spans and max(spans) > 0 else window_s
        ans = runner.run([_Job("counter_rates", "counter_rates", flagged, cols,
                               interval_for(span, options.chart_buckets, minimum_s=1))])
        for stmt in ans.get("counter_rates", []):
            for s in stmt:
                host = s.tags.get("host")
                if not host:
                    continue
                per = charts.setdefault(host, {})
                rows = s.rows()[:-1]  # the last bucket is still filling: its rate would dip
                for row in rows:
                    t = finite(row.get("time"))
                    for col, value in row.items():
                        v = finite(value)
                        if t is not None and col != "time" and v is not None:
                            per.setdefault(col, []).append((t, v))
    return AuditResult(window=options.window, window_s=window_s, host_regex=options.host_regex, source=source,
                       hosts=hosts, findings=findings, skipped=skipped, top_exit_rate=top, fleet=fleet, rules=rules,
                       queries=runner.log, requests=client.requests, elapsed_s=time.monotonic() - t0,
                       started_at=started, charts=charts)


__all__ = ["AuditError", "AuditOptions", "AuditResult", "run_audit"]
