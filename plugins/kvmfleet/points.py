"""Samples turned into InfluxDB line protocol (the schema of :mod:`kvmfleet.schema`, ``docs/schema.md``) and into
values dispatched into collectd, fast: the plan that turns stats of one layout into fields is made once per layout
and each VM's line-protocol prefix once per VM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Callable, Protocol

from . import schema
from .collector import HostStats, Sample, VMSample
from .facts import UNKNOWN, HostFacts
from .model import ReasonCounts, StatDesc, Stats, StatType, VMKey
from .options import AgentConfig
from .ship.lineproto import encode_fields, escape_key, int_fields_template, series_prefix
from .statblock import MergedStats, StatBlock, scalar_items
from .tdp import TDP_ENABLED, TDP_UNKNOWN

PLUGIN_NAME = "kvm"  # collectd plugin name of the KVM values
AGENT_PLUGIN_NAME = "kvmfleet"  # collectd plugin name of the agent's own metrics
REASON_PLUGIN_NAME = "kvm_exit_reason"  # collectd plugin name of the exits by reason (type_instance: the reason)
_REASON_PREFIXES_MAX = 65536  # cached kvm_exit_reason prefixes before the cache starts again (VMs come and go)

# collectd's DATA_MAX_NAME_LEN is 128 bytes with the NUL; keep room for "-vcpuNNN".
_MAX_INSTANCE_BYTES = 110


class ValueSink(Protocol):
    """Where dispatched values go (collectd's ``Values.dispatch`` in the glue; a list in tests).

    One call per group of values of one plugin instance and time: ``types[i]`` ("derive" or "gauge"),
    ``names[i]`` (the type_instance, the counter name) and ``values[i]`` line up. Returns how many were taken.
    """

    def __call__(self, plugin: str, plugin_instance: str, time_s: float, types: Sequence[str],
                 names: Sequence[str], values: Sequence[int | float]) -> int: ...


def collectd_type(desc: StatDesc | None) -> str:
    """``derive`` for cumulative counters (and stats of unknown type), ``gauge`` for instant and peak values."""
    if desc is not None and desc.type in (StatType.INSTANT, StatType.PEAK):
        return "gauge"
    return "derive"


def plugin_instance(name: str) -> str:
    """A VM name as a collectd plugin_instance: ``/`` and control characters become ``_``, at most 110 bytes."""
    text = "".join("_" if ch == "/" or ord(ch) < 32 or ord(ch) == 127 else ch for ch in name) or "_"
    raw = text.encode("utf-8")
    if len(raw) > _MAX_INSTANCE_BYTES:
        text = raw[:_MAX_INSTANCE_BYTES].decode("utf-8", "ignore")
    return text


@dataclass
class _Plan:
    """How to turn stats of one layout into fields and dispatched values, fast."""

    names: tuple[str, ...]  # kept scalar names, sorted
    types: tuple[str, ...]  # their collectd types
    get: Callable[[Any], tuple[int, ...]]  # picks their values (from the flat scalars, or a name -> value dict)
    hists: tuple[tuple[str, str], ...]  # kept histograms: (name, escaped "<name>_bucket_")
    hist_parts: tuple[int, ...] = ()  # for stat blocks: which part holds each kept histogram (else looked up by name)
    template: str = ""  # "k1=%di,k2=%di,..." for the values in order

    def __post_init__(self) -> None:
        self.template = int_fields_template(self.names)


def _picker(indexes: Sequence[Any]) -> Callable[[Any], tuple[int, ...]]:
    """``values -> (values[i] for i in indexes)`` as a tuple (positions in a tuple, or keys of a dict)."""
    if not indexes:
        return lambda values: ()
    if len(indexes) == 1:
        only = indexes[0]
        return lambda values: (values[only],)
    return itemgetter(*indexes)


@dataclass
class _Series:
    """Cached per VM: its line-protocol prefixes and collectd plugin_instance."""

    name: str
    prefix: str
    instance: str
    tags: dict[str, str]  # the kvm_vm tags; kvm_vcpu adds vcpu
    vcpu_prefixes: dict[int, str] = field(default_factory=dict)


@dataclass
class _Emission:
    """What one :meth:`PointBuilder.build` gathers: the lines (None: none wanted) and the values dispatched."""

    ts_text: str
    time_s: float
    sink: ValueSink | None
    lines: list[str] | None
    dispatched: int = 0


@dataclass
class BuildResult:
    lines: list[str]
    dispatched: int = 0


class PointBuilder:
    """Sample -> line protocol (``docs/schema.md``) and dispatched values, with per-layout plans and per-VM
    prefixes cached across samples."""

    def __init__(self, config: AgentConfig, hostname: str) -> None:
        self.config = config
        self.hostname = hostname
        base = dict(config.tags)
        base[schema.T_HOST] = hostname
        self.base_tags = base
        self.host_prefix = series_prefix(schema.M_HOST, base)
        self.facts_prefix = series_prefix(schema.M_FACTS, base)
        self.agent_prefix = series_prefix(schema.M_AGENT, base)
        self._keep: dict[str, bool] = {}
        self._plans: dict[tuple[int, ...], _Plan] = {}
        self._loose_plans: dict[tuple[Any, ...], _Plan] = {}
        self._bucket_key_cache: dict[tuple[str, int], tuple[str, ...]] = {}
        self._series: dict[VMKey, _Series] = {}
        self._facts_text = ""
        self._reason_prefixes: dict[tuple[str, str, str], str] = {}  # (vm or "", isa, reason) -> line prefix

    # -- filters and keys
    def keeps(self, name: str) -> bool:
        kept = self._keep.get(name)
        if kept is None:
            kept = self._keep[name] = self.config.keeps(name)
        return kept

    def _block_plan(self, shapes: Sequence[Any]) -> _Plan:
        chosen: dict[str, tuple[int, StatDesc | None]] = {}
        hists: dict[str, int] = {}  # name -> the part (shape) that holds it
        offset = 0
        for part, shape in enumerate(shapes):
            for i, name in enumerate(shape.scalar_names):
                if name not in chosen and name not in hists and self.keeps(name):
                    chosen[name] = (offset + i, shape.descs.get(name))
            for name in shape.hists:
                if name not in chosen and name not in hists and self.keeps(name):
                    hists[name] = part
            offset += len(shape.scalar_names)
        names = tuple(sorted(chosen))
        kept = self._hist_keys(sorted(hists))
        return _Plan(
            names=names,
            types=tuple(collectd_type(chosen[n][1]) for n in names),
            get=_picker([chosen[n][0] for n in names]),
            hists=kept,
            hist_parts=tuple(hists[name] for name, _ in kept),
        )

    def _hist_keys(self, names: Sequence[str]) -> tuple[tuple[str, str], ...]:
        """(histogram, escaped ``<name>_bucket_``) of the kept histograms (none with ``Histograms false``)."""
        if not self.config.histograms:
            return ()
        return tuple((n, escape_key(n + schema.BUCKET_INFIX)) for n in names)

    def _loose_plan(self, stats: Stats, descs: Mapping[str, StatDesc]) -> tuple[_Plan, Sequence[int]]:
        """Plan and values for stats that are not stat blocks: host totals, debugfs dicts (cached by names)."""
        found: Mapping[str, int]
        if isinstance(stats, HostStats):
            found = stats.scalars
        else:
            found = {}
            for name, value in scalar_items(stats):
                found.setdefault(name, value)
        key = (len(descs), *found)
        plan = self._loose_plans.get(key)
        if plan is None:
            names = tuple(sorted(n for n in found if self.keeps(n)))
            hists: tuple[tuple[str, str], ...] = ()
            if self.config.histograms:  # buckets are computed (host totals: added up) only when encoded
                hists = self._hist_keys(sorted(
                    n for n, d in descs.items() if d.type.is_histogram and n not in found and self.keeps(n)))
            plan = _Plan(names, tuple(collectd_type(descs.get(n)) for n in names),
                         _picker(names), hists)
            if len(self._loose_plans) > 4096:
                self._loose_plans.clear()
            self._loose_plans[key] = plan
        return plan, plan.get(found)

    def plan_for(self, stats: Stats, descs: Mapping[str, StatDesc]) -> tuple[_Plan, Sequence[int]]:
        """(plan, kept scalar values in the plan's order) for one VM's, vCPU's or the host's stats."""
        parts: Sequence[Any] = stats.parts if isinstance(stats, MergedStats) else (stats,)
        if parts and all(type(p) is StatBlock for p in parts):
            key = tuple(id(p.shape) for p in parts)
            plan = self._plans.get(key)
            if plan is None:
                plan = self._plans[key] = self._block_plan([p.shape for p in parts])
            if len(parts) == 1:
                flat = parts[0].scalars
            elif len(parts) == 2:
                flat = parts[0].scalars + parts[1].scalars
            else:
                flat = tuple(v for p in parts for v in p.scalars)
            return plan, plan.get(flat)
        return self._loose_plan(stats, descs)

    # -- encoding
    def _bucket_keys(self, prefix: str, count: int) -> tuple[str, ...]:
        keys = self._bucket_key_cache.get((prefix, count))
        if keys is None:
            keys = self._bucket_key_cache[(prefix, count)] = tuple(f"{prefix}{i}=" for i in range(count))
        return keys

    def _body(self, plan: _Plan, values: Sequence[int], stats: Stats) -> str:
        body = plan.template % values
        if plan.hists:
            extra: list[str] = []
            if plan.hist_parts:  # stat blocks: straight to the part that holds each histogram
                parts: Sequence[Any] = stats.parts if isinstance(stats, MergedStats) else (stats,)
                found = [parts[at].hist(name) for (name, _), at in zip(plan.hists, plan.hist_parts)]
            else:
                found = [stats.get(name) for name, _ in plan.hists]
            for (_, prefix), buckets in zip(plan.hists, found):
                if isinstance(buckets, tuple) and any(buckets):
                    keys = self._bucket_keys(prefix, len(buckets))
                    extra += [f"{k}{c}i" for k, c in zip(keys, buckets) if c]
            if extra:
                body = body + "," + ",".join(extra) if body else ",".join(extra)
        return body

    def _series_for(self, vm: VMSample, display: str) -> _Series:
        series = self._series.get(vm.identity.key)
        if series is None or series.name != display:
            ident = vm.identity
            tags = {**self.base_tags, schema.T_VM: display, schema.T_VMM: ident.vmm}
            if ident.uuid:
                tags[schema.T_VM_UUID] = ident.uuid
            series = _Series(display, series_prefix(schema.M_VM, tags), plugin_instance(display), tags)
            self._series[vm.identity.key] = series
        return series

    def _vcpu_prefix(self, series: _Series, vcpu: int) -> str:
        prefix = series.vcpu_prefixes.get(vcpu)
        if prefix is None:
            tags = {**series.tags, schema.T_VCPU: str(vcpu)}
            prefix = series.vcpu_prefixes[vcpu] = series_prefix(schema.M_VCPU, tags)
        return prefix

    @staticmethod
    def display_names(vms: Sequence[VMSample]) -> list[str]:
        """Each VM's name, made unique within the sample: when several VMs share a name (a restarted VM whose
        old process lingers), the oldest (process start time, pid, fd) keeps it, the others get ``-pid<PID>``."""
        names = [vm.identity.name for vm in vms]
        if len(set(names)) == len(names):
            return names
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name, []).append(i)
        for name, members in groups.items():
            if len(members) > 1:
                members.sort(key=lambda i: (vms[i].identity.key.start_time, vms[i].identity.key.pid,
                                            vms[i].identity.key.vm_fd))
                for i in members[1:]:
                    names[i] = f"{name}-pid{vms[i].identity.key.pid}"
        return names

    def build(self, sample: Sample, lines: bool = True, sink: ValueSink | None = None) -> BuildResult:
        """The ``kvm``, ``kvm_vm`` and ``kvm_vcpu`` lines of ``sample`` (if ``lines``) and its host and per-VM
        values dispatched to ``sink`` (if given; per-VM values only with ``dispatches_per_vm()``; per-vCPU values are
        not dispatched: at 200 VMs x 4 vCPUs they would be 34,000 more collectd values a sample, see docs/plugin.md).
        ``kvm_host`` and ``kvmfleet_agent`` lines come from :meth:`facts_line` and :meth:`agent_line`."""
        cfg = self.config
        em = _Emission(str(sample.time_ns), sample.time_ns / 1e9, sink, [] if lines else None)
        self._emit(em, self.host_prefix, "", sample.host, sample.host_descs)
        if sample.exit_reasons:
            self._emit_reasons(em, "", "", sample.exit_reasons, sample.reason_isa)
        per_vm_sink = sink is not None and cfg.dispatches_per_vm()
        per_vm_reasons = any(vm.exit_reasons for vm in sample.vms)
        if (cfg.per_vm or cfg.per_vcpu or per_vm_reasons) and (lines or per_vm_sink):
            live: dict[VMKey, _Series] = {}
            for vm, name in zip(sample.vms, self.display_names(sample.vms)):
                series = live[vm.identity.key] = self._series_for(vm, name)
                if cfg.per_vm:
                    self._emit(em, series.prefix, series.instance if per_vm_sink else None, vm.stats, vm.descs)
                if vm.exit_reasons:
                    self._emit_reasons(em, name, series.instance if per_vm_sink else None,
                                       vm.exit_reasons, sample.reason_isa)
                if cfg.per_vcpu and lines:  # per-vCPU values are shipped, never dispatched (docs/plugin.md)
                    for vcpu in sorted(vm.vcpus):
                        self._emit(em, self._vcpu_prefix(series, vcpu), None, vm.vcpus[vcpu], vm.descs)
            self._series = live  # forget VMs that are gone
        return BuildResult(em.lines or [], em.dispatched)

    def _emit(self, em: _Emission, prefix: str, instance: str | None, stats: Stats,
              descs: Mapping[str, StatDesc]) -> None:
        """One series' line (when lines are wanted) and its values dispatched (unless ``instance`` is None)."""
        plan, values = self.plan_for(stats, descs)
        if em.lines is not None:
            body = self._body(plan, values, stats)
            if body:
                em.lines.append(f"{prefix} {body} {em.ts_text}")
        if em.sink is not None and instance is not None and plan.names:
            em.dispatched += em.sink(PLUGIN_NAME, instance, em.time_s, plan.types, plan.names, values)

    def _emit_reasons(self, em: _Emission, vm: str, instance: str | None, counts: ReasonCounts,
                      isa: Mapping[str, str]) -> None:
        """One ``kvm_exit_reason`` line per reason seen (host-wide: ``vm`` ""), and the counts dispatched as
        derives of plugin ``kvm_exit_reason`` (unless ``instance`` is None)."""
        for by_reason in counts.values():
            names = sorted(by_reason)
            if em.lines is not None:
                for reason in names:
                    em.lines.append(f"{self._reason_prefix(vm, isa.get(reason, 'unknown'), reason)} "
                                    f"{schema.F_COUNT}={by_reason[reason]}i {em.ts_text}")
            if em.sink is not None and instance is not None and names:
                em.dispatched += em.sink(REASON_PLUGIN_NAME, instance, em.time_s, ("derive",) * len(names), names,
                                         [by_reason[reason] for reason in names])

    def _reason_prefix(self, vm: str, isa: str, reason: str) -> str:
        key = (vm, isa, reason)
        prefix = self._reason_prefixes.get(key)
        if prefix is None:
            if len(self._reason_prefixes) >= _REASON_PREFIXES_MAX:
                self._reason_prefixes.clear()
            tags = {**self.base_tags, schema.T_ISA: isa, schema.T_REASON: reason}
            if vm:
                tags[schema.T_VM] = vm
            prefix = self._reason_prefixes[key] = series_prefix(schema.M_EXIT_REASON, tags)
        return prefix

    def set_facts(self, facts: HostFacts) -> None:
        """Pre-encode the fields of ``kvm_host`` that only change when the facts are read again."""
        self._facts_text = encode_fields(facts_fields(facts))

    def facts_line(self, sample: Sample) -> str:
        body = f"vcpus={sample.vcpu_count}i,vms={len(sample.vms)}i"
        if self._facts_text:
            body = f"{self._facts_text},{body}"
        return f"{self.facts_prefix} {body} {sample.time_ns}"

    def agent_line(self, fields: Mapping[str, int | float | str | bool | None], ts_ns: int) -> str:
        body = encode_fields(fields)
        return f"{self.agent_prefix} {body} {ts_ns}" if body else ""


def facts_fields(facts: HostFacts) -> dict[str, int | float | str | bool | None]:
    """The ``kvm_host`` fields that come from :class:`HostFacts` (``None``: unknown, left out of the point)."""
    state = str(facts.tdp.get("state") or TDP_UNKNOWN)
    return {
        "tdp_state": state,
        "tdp_enabled": state == TDP_ENABLED,
        "cpu_ept": facts.cpu_ept,
        "cpu_npt": facts.cpu_npt,
        "ept_param": facts.ept_param,
        "npt_param": facts.npt_param,
        "tdp_mmu": facts.tdp_mmu,
        "nested": facts.nested,
        "is_guest": bool(facts.tdp.get("is_guest")),
        "lockdown": facts.lockdown,
        "kvm_module": facts.kvm_backend or ("none" if facts.kvm_loaded is False else "unknown"),
        "cpus_online": facts.cpus_online,
        "mem_total_bytes": facts.mem_total_bytes,
        "halt_poll_ns": facts.halt_poll_ns,
        "halt_poll_ns_grow": facts.halt_poll_ns_grow,
        "halt_poll_ns_grow_start": facts.halt_poll_ns_grow_start,
        "halt_poll_ns_shrink": facts.halt_poll_ns_shrink,
        "nx_huge_pages": facts.nx_huge_pages,
        "kernel_release": None if facts.kernel_release == UNKNOWN else facts.kernel_release,
    }
