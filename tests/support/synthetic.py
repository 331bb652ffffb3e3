"""Synthetic fleets written in the kvmfleet InfluxDB schema, for tests, benchmarks and demos.

A :class:`HostSpec` holds VMs (:class:`VMSpec`), each running a *profile*: per-vCPU-second rates of the KVM
counters that follow a known kernel pattern (EPT/NPT idle or busy, shadow paging, nested guests on a TDP host,
emulated I/O, legacy shared interrupts, heavy instruction emulation, wasted halt polling, a hot host). Host
totals (``kvm``) are the sums over the host's VMs, as the collectd plugin writes them; ``kvm_vm`` carries the
per-VM series when ``per_vm`` is on, ``kvm_host`` the host facts. :func:`fleet_lines` yields line protocol and
:func:`post_lines` writes it over one keep-alive connection in big batches.

Knobs for the ugly cases the audit must survive: ``old_names`` (fields named as old kernels named them),
``fields`` (only these fields are written: other collectors, older kernels), ``gaps`` (no samples in these time
ranges), ``resets`` (the counters restart from zero at these times, as after a collector restart) and
``facts=None`` (no ``kvm_host`` at all).

Exit reasons (``kvm_exit_reason``, written only when a host has ``reasons``): host-wide rates per (isa, reason),
exact (no jitter), so that a test knows every count: a reason is counted from ``reason_since`` (an offset; before
the window by default) and written only once its count is above 0, at the host's sample times; at each of
``reason_restarts`` the agent restarted, so the counts start again from 0 at the sample before it (the hits of
that one interval are what the audit cannot tell from a restart). With ``per_vm`` the VMs get per-VM series too
(tag ``vm``, the host's rate split evenly), which the audit's host-wide queries must not add in.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvmfleet import influxhttp, schema
from kvmfleet.ship.lineproto import encode_fields, int_fields_template, series_prefix

# Cumulative counters (per vCPU-second rates in profiles) and instant ones (per-vCPU levels).
CUMULATIVE = (
    "exits", "halt_exits", "halt_wakeup", "halt_successful_poll", "halt_attempted_poll", "halt_poll_invalid",
    "halt_poll_success_ns", "halt_poll_fail_ns", "io_exits", "mmio_exits", "irq_injections", "irq_exits",
    "irq_window_exits", "nmi_injections", "nmi_window_exits", "request_irq_exits", "signal_exits",
    "insn_emulation", "insn_emulation_fail", "pf_fixed", "pf_guest", "invlpg", "mmu_pte_write", "mmu_flooded",
    "mmu_pde_zapped", "mmu_shadow_zapped", "mmu_cache_miss", "mmu_recycled", "nested_run", "tlb_flush",
    "remote_tlb_flush", "host_state_reload", "fpu_reload", "hypercalls", "directed_yield_attempted",
    "directed_yield_successful",
)
INSTANT = ("mmu_unsync", "pages_4k", "pages_2m", "pages_1g")

# Old kernels' names (kvmfleet.schema.OLD_NAMES): new name -> the old name written with ``old_names``.
OLD_NAMES = {new: olds[0] for new, olds in schema.OLD_NAMES.items()}
# Counters old kernels did not have at all.
NEW_ONLY = ("nested_run", "halt_poll_success_ns", "halt_poll_fail_ns", "halt_poll_invalid", "pages_4k",
            "pages_1g", "directed_yield_attempted", "directed_yield_successful")

_BASE: dict[str, float] = {
    # a moderately busy guest on EPT/NPT: mostly halts, interrupts and a little I/O
    "exits": 2000, "halt_exits": 300, "halt_wakeup": 280, "halt_successful_poll": 150, "halt_attempted_poll": 250,
    "halt_poll_invalid": 0, "halt_poll_success_ns": 3.0e6, "halt_poll_fail_ns": 1.5e7, "io_exits": 20,
    "mmio_exits": 10, "irq_injections": 50, "irq_exits": 300, "irq_window_exits": 5, "nmi_injections": 0,
    "nmi_window_exits": 0, "request_irq_exits": 0, "signal_exits": 1, "insn_emulation": 15,
    "insn_emulation_fail": 0, "pf_fixed": 40, "pf_guest": 0.2, "invlpg": 0, "mmu_pte_write": 0, "mmu_flooded": 0,
    "mmu_pde_zapped": 0, "mmu_shadow_zapped": 2, "mmu_cache_miss": 3, "mmu_recycled": 0, "nested_run": 0,
    "tlb_flush": 50, "remote_tlb_flush": 5, "host_state_reload": 400, "fpu_reload": 50, "hypercalls": 5,
    "directed_yield_attempted": 1, "directed_yield_successful": 1,
    "mmu_unsync": 0, "pages_4k": 20000, "pages_2m": 500, "pages_1g": 0,
}


def _profile(**changes: float) -> dict[str, float]:
    p = dict(_BASE)
    p.update(changes)
    return p


PROFILES: dict[str, dict[str, float]] = {
    # EPT/NPT: guest page-table writes are not intercepted; pf_fixed counts EPT violations, the older MMU
    # counts its TDP page-table pages in mmu_cache_miss / mmu_shadow_zapped.
    "ept-idle": _profile(exits=150, halt_exits=90, halt_wakeup=85, halt_successful_poll=40, halt_attempted_poll=80,
                         halt_poll_success_ns=8e5, halt_poll_fail_ns=4e6, irq_exits=30, irq_injections=10,
                         io_exits=1, mmio_exits=1, insn_emulation=2, pf_fixed=2, pf_guest=0.05,
                         mmu_cache_miss=0.5, mmu_shadow_zapped=0.3, tlb_flush=3, host_state_reload=40),
    "ept": _profile(),
    # EPT/NPT with guests touching much new memory: EPT violations (pf_fixed) and TDP page-table pages
    # (mmu_cache_miss, mmu_shadow_zapped with the older MMU) move a lot; guest page-table writes still do not trap.
    "ept-memory": _profile(exits=6000, pf_fixed=4000, mmu_cache_miss=900, mmu_shadow_zapped=700, pf_guest=2,
                           remote_tlb_flush=300, tlb_flush=1500),
    "ept-busy": _profile(exits=20000, halt_exits=1500, halt_wakeup=1400, halt_successful_poll=900,
                         halt_attempted_poll=1200, halt_poll_success_ns=2e7, halt_poll_fail_ns=3e7,
                         irq_exits=4000, irq_injections=400, io_exits=60, mmio_exits=40, insn_emulation=80,
                         pf_fixed=900, pf_guest=3, mmu_cache_miss=120, mmu_shadow_zapped=80, tlb_flush=800,
                         remote_tlb_flush=90, host_state_reload=6000),
    # Shadow paging: guest PTE writes are trapped and emulated, INVLPG intercepted, faults reflected.
    # (KVM maps no guest memory through EPT/NPT there: pages_4k/2m/1g stay 0.)
    "shadow": _profile(exits=6000, halt_exits=600, pages_4k=0, pages_2m=0, mmu_pte_write=900, invlpg=300,
                       mmu_flooded=30,
                       mmu_pde_zapped=60, mmu_unsync=40, pf_guest=500, pf_fixed=1200, mmu_cache_miss=300,
                       mmu_shadow_zapped=250, insn_emulation=950, tlb_flush=900),
    "shadow-idle": _profile(exits=180, halt_exits=100, pages_4k=0, pages_2m=0,
                            halt_wakeup=95, mmu_pte_write=6, invlpg=3, mmu_flooded=0.1,
                            mmu_pde_zapped=0.4, mmu_unsync=3, pf_guest=4, pf_fixed=8, mmu_cache_miss=2,
                            mmu_shadow_zapped=2, insn_emulation=10, io_exits=1, mmio_exits=1, irq_exits=30,
                            irq_injections=10),
    # Nested guests on a TDP host: L0 shadows the L2 page tables (through L1's EPT), so the shadow-only
    # counters move, with nested_run counting the L2 entries that L1 makes.
    "nested": _profile(exits=9000, nested_run=2500, mmu_pte_write=300, mmu_flooded=5, mmu_pde_zapped=20,
                       mmu_unsync=8, invlpg=0, pf_guest=20, pf_fixed=700, mmu_cache_miss=150,
                       mmu_shadow_zapped=100, insn_emulation=400),
    "emulated-io": _profile(exits=9000, io_exits=3000, mmio_exits=1600, insn_emulation=1700),
    "legacy-irq": _profile(exits=9000, irq_injections=2200, io_exits=2400, irq_window_exits=600, irq_exits=900),
    "insn-emulation": _profile(exits=7000, insn_emulation=5200, mmio_exits=300),
    "halt-poll-waste": _profile(exits=5000, halt_exits=2500, halt_wakeup=2400, halt_attempted_poll=2400,
                                halt_successful_poll=90, halt_poll_success_ns=1.5e6, halt_poll_fail_ns=4.5e8),
    "hot": _profile(exits=90000, halt_exits=500, irq_exits=30000, host_state_reload=40000),
    "silent": {name: 0.0 for name in _BASE},  # VMs that exist and do nothing (zero exits)
}

# kvm_host facts as the plugin writes them (docs/schema.md); vms and vcpus are added per sample.
# What the host has to give (capacity): 32 CPUs, 256 GiB, the kernel's default halt polling.
CAPACITY_FACTS: dict[str, Any] = {"cpus_online": 32, "mem_total_bytes": 256 << 30, "halt_poll_ns": 200000,
                                  "halt_poll_ns_grow": 2, "halt_poll_ns_grow_start": 10000, "halt_poll_ns_shrink": 0,
                                  "nx_huge_pages": False, "kernel_release": "6.12.48-amd64"}
FACTS_EPT: dict[str, Any] = {"tdp_state": "enabled", "tdp_enabled": True, "cpu_ept": True, "ept_param": True,
                             "tdp_mmu": True, "nested": False, "is_guest": False, "lockdown": "none",
                             "kvm_module": "kvm_intel", **CAPACITY_FACTS}
FACTS_EPT_NESTED = dict(FACTS_EPT, nested=True)
FACTS_NPT = {"tdp_state": "enabled", "tdp_enabled": True, "cpu_npt": True, "npt_param": True, "tdp_mmu": True,
             "nested": True, "is_guest": False, "lockdown": "none", "kvm_module": "kvm_amd", **CAPACITY_FACTS}
FACTS_EPT_OFF = dict(FACTS_EPT, tdp_state="disabled", tdp_enabled=False, ept_param=False, tdp_mmu=False)
FACTS_NO_TDP = {"tdp_state": "unsupported", "tdp_enabled": False, "cpu_ept": False, "cpu_npt": False,
                "tdp_mmu": False, "is_guest": True, "lockdown": "integrity", "kvm_module": "kvm_pvm",
                **CAPACITY_FACTS}


@dataclass
class VMSpec:
    name: str
    profile: str = "ept"
    vcpus: int = 2
    uuid: str = ""
    vmm: str = "qemu"
    start_s: float = 0.0  # offset from the first sample at which the VM appears (its counters start at 0)
    stop_s: float | None = None  # offset at which it is gone (its counters leave the host totals)

    def present(self, off: float) -> bool:
        return off >= self.start_s and (self.stop_s is None or off < self.stop_s)


@dataclass
class HostSpec:
    """One simulated hypervisor. ``facts``: the ``kvm_host`` fields (None: no ``kvm_host`` at all)."""

    name: str
    vms: list[VMSpec]
    facts: Mapping[str, Any] | None = field(default_factory=lambda: dict(FACTS_EPT))
    tags: Mapping[str, str] = field(default_factory=dict)
    per_vm: bool = True
    per_vcpu: bool = False
    old_names: bool = False
    fields: Sequence[str] | None = None  # write only these (new) counter names
    gaps: Sequence[tuple[float, float]] = ()  # [start, end) offsets in seconds from the first sample
    resets: Sequence[float] = ()  # offsets at which every cumulative counter restarts from 0
    jitter: float = 0.1
    scale: float = 1.0  # every rate multiplied by this (hosts of one profile differ in load)
    counted_s: float = 86400.0  # about how long the counters have been counting at the first sample
    reasons: Mapping[tuple[str, str], float] = field(default_factory=dict)  # (isa, reason) -> hits/s of the host
    reason_since: Mapping[tuple[str, str], float] = field(default_factory=dict)  # offset a reason is counted from
    reason_restarts: Sequence[float] = ()  # offsets at which the agent restarted: reason counts from 0


def _names(spec: HostSpec) -> list[tuple[str, str, bool]]:
    """(counter, field name written, cumulative?) for this host."""
    out = []
    wanted = set(spec.fields) if spec.fields is not None else None
    for name in CUMULATIVE + INSTANT:
        if wanted is not None and name not in wanted:
            continue
        if spec.old_names and name in NEW_ONLY:
            continue
        written = OLD_NAMES.get(name, name) if spec.old_names else name
        out.append((name, written, name in CUMULATIVE))
    return out


def host_lines(spec: HostSpec, end_s: int, duration_s: int, step_s: int = 10, seed: int = 0) -> Iterator[str]:
    """Line protocol (second precision) for one host over ``[end_s - duration_s, end_s]``."""
    rng = random.Random(f"{spec.name}/{seed}")
    names = _names(spec)
    if spec.old_names and (spec.fields is None or "mmu_pte_write" in spec.fields):
        names.append(("mmu_pte_write", "mmu_pte_updated", True))  # the old extra counter, shadow-only too
    template = int_fields_template(written for _, written, _ in names)
    is_cum = [c for _, _, c in names]
    host_prefix = series_prefix(schema.M_HOST, dict(spec.tags, host=spec.name))
    facts_prefix = series_prefix(schema.M_FACTS, dict(spec.tags, host=spec.name))
    facts: dict[str, Any] | None = None
    if spec.facts is not None:
        facts = {k: v for k, v in spec.facts.items() if v is not None}
    # VMs that come and go: kvm_host's vms and vcpus follow them, sample by sample
    churn = facts is not None and any(vm.start_s or vm.stop_s is not None for vm in spec.vms) \
        and "vms" not in facts and "vcpus" not in facts
    facts_text = ""
    if facts is not None:
        facts.setdefault("vms", len(spec.vms))
        facts.setdefault("vcpus", sum(vm.vcpus for vm in spec.vms))
        facts_text = encode_fields(facts)
    vms = []
    for vm in spec.vms:
        tags = dict(spec.tags, host=spec.name, vm=vm.name, vm_uuid=vm.uuid, vmm=vm.vmm)
        prof = PROFILES[vm.profile]
        rates = [prof.get(counter, 0.0) * vm.vcpus * spec.scale for counter, _, _ in names]
        start_vals = [rng.uniform(0.5, 2.0) * spec.counted_s * r if c else 0.0 for r, c in zip(rates, is_cum)]
        vcpu_prefixes = [series_prefix(schema.M_VCPU, dict(tags, vcpu=str(i))) for i in range(vm.vcpus)]
        vms.append((vm, series_prefix(schema.M_VM, tags), vcpu_prefixes, rates, start_vals))
    start = end_s - duration_s
    resets = sorted(spec.resets)
    n = len(names)
    t = start
    prev = start
    while t <= end_s:
        off = t - start
        dt = t - prev
        prev = t
        reset = False
        while resets and off >= resets[0]:
            resets.pop(0)
            reset = True
        in_gap = any(a <= off < b for a, b in spec.gaps)
        host_vals = [0.0] * n
        for vm, prefix, vcpu_prefixes, rates, cum in vms:
            act = max(0.0, 1.0 + rng.uniform(-spec.jitter, spec.jitter))
            if not vm.present(off):
                continue
            born = off - dt < vm.start_s  # its first sample: counters from 0
            for i in range(n):
                if is_cum[i]:
                    cum[i] = 0.0 if born and vm.start_s else (0.0 if reset else cum[i]) + rates[i] * dt * act
                    host_vals[i] += cum[i]
                else:
                    host_vals[i] += rates[i] * act
            if in_gap or not n:
                continue
            vals = [cum[i] if is_cum[i] else rates[i] * act for i in range(n)]
            if spec.per_vm:
                yield f"{prefix} {template % tuple(map(int, vals))} {t}"
            if spec.per_vcpu:
                per = max(1, vm.vcpus)
                text = template % tuple(int(v / per) for v in vals)
                for p in vcpu_prefixes:
                    yield f"{p} {text} {t}"
        if not in_gap:
            if n:
                yield f"{host_prefix} {template % tuple(map(int, host_vals))} {t}"
            if churn and facts is not None:
                here = [vm for vm in spec.vms if vm.present(off)]
                facts_text = encode_fields(dict(facts, vms=len(here), vcpus=sum(vm.vcpus for vm in here)))
            if facts_text:
                yield f"{facts_prefix} {facts_text} {t}"
            yield from _reason_lines(spec, t, off, step_s)
        t += step_s


def reason_count(spec: HostSpec, key: tuple[str, str], off: float, step_s: int) -> int:
    """The ``count`` of one reason at the sample ``off`` seconds after the first: hits since the later of when it
    is counted from and the last agent restart (taken to be at the sample before the first one after it)."""
    starts = [spec.reason_since.get(key, -spec.counted_s)]
    starts += [-(-r // step_s) * step_s - step_s for r in spec.reason_restarts if -(-r // step_s) * step_s <= off]
    return int(spec.reasons[key] * max(0.0, off - max(starts)))


def _reason_lines(spec: HostSpec, t: int, off: float, step_s: int) -> Iterator[str]:
    for key in sorted(spec.reasons):
        count = reason_count(spec, key, off, step_s)
        if count <= 0:
            continue  # the agent writes only reasons seen
        tags = dict(spec.tags, host=spec.name, isa=key[0], reason=key[1])
        yield f"{series_prefix(schema.M_EXIT_REASON, tags)} {encode_fields({schema.F_COUNT: count})} {t}"
        if spec.per_vm and spec.vms:
            share = {schema.F_COUNT: max(1, count // len(spec.vms))}
            for vm in spec.vms:
                yield f"{series_prefix(schema.M_EXIT_REASON, dict(tags, vm=vm.name))} {encode_fields(share)} {t}"


def fleet_lines(hosts: Iterable[HostSpec], end_s: int, duration_s: int, step_s: int = 10, seed: int = 0
                ) -> Iterator[str]:
    for spec in hosts:
        yield from host_lines(spec, end_s, duration_s, step_s, seed)


def make_host(name: str, profile: str, n_vms: int = 2, vcpus: int = 2, facts: Mapping[str, Any] | None = None,
              no_facts: bool = False, **kw: Any) -> HostSpec:
    """A host whose ``n_vms`` VMs all run ``profile``; facts follow the profile unless given (``no_facts``: no
    ``kvm_host`` at all)."""
    if facts is None and not no_facts:
        facts = FACTS_NO_TDP if profile.startswith("shadow") else FACTS_EPT_NESTED if profile == "nested" \
            else FACTS_EPT
    vms = [VMSpec(f"{name}-vm{i}", profile, vcpus, uuid=str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{name}-vm{i}")))
           for i in range(n_vms)]
    return HostSpec(name, vms, facts=None if no_facts else dict(facts or {}), **kw)


# A realistic mix for benchmarks and demos: (profile, share of hosts, facts or None for the profile's).
FLEET_MIX: tuple[tuple[str, float, Mapping[str, Any] | None], ...] = (
    ("shadow", 0.02, None), ("shadow-idle", 0.01, None), ("nested", 0.01, None), ("shadow", 0.01, FACTS_EPT_OFF),
    ("emulated-io", 0.01, None), ("legacy-irq", 0.01, None), ("insn-emulation", 0.01, None),
    ("halt-poll-waste", 0.01, None), ("hot", 0.005, None), ("ept-busy", 0.03, None), ("ept-idle", 0.2, None),
)


def mixed_fleet(n_hosts: int, n_vms: int = 2, vcpus: int = 2, seed: int = 1, per_vm: bool = True,
                prefix: str = "hv") -> list[HostSpec]:
    """``n_hosts`` hosts following :data:`FLEET_MIX` (the rest plain ``ept``), shuffled deterministically; each
    host's load is scaled by a log-normal factor (sigma 0.35), so that the fleet's exit rates form a continuum."""
    kinds: list[tuple[str, Mapping[str, Any] | None]] = []
    for profile, share, facts in FLEET_MIX:
        kinds += [(profile, facts)] * max(1, round(share * n_hosts)) if n_hosts >= 100 else []
    kinds = kinds[:n_hosts]
    kinds += [("ept", None)] * (n_hosts - len(kinds))
    rng = random.Random(seed)
    rng.shuffle(kinds)
    width = len(str(n_hosts - 1))
    return [make_host(f"{prefix}{i:0{width}d}", profile, n_vms=n_vms, vcpus=vcpus, facts=facts, per_vm=per_vm,
                      scale=rng.lognormvariate(0.0, 0.35))
            for i, (profile, facts) in enumerate(kinds)]


class LineWriter:
    """POSTs ready line protocol to InfluxDB 1.x ``/write`` over one keep-alive connection (plain text, no gzip:
    test data and benchmarks)."""

    def __init__(self, url: str, database: str, rp: str | None = None, precision: str = "s",
                 username: str | None = None, password: str | None = None, timeout: float = 120.0) -> None:
        params = {"db": database, "precision": precision}
        if rp:
            params["rp"] = rp
        self._path = influxhttp.endpoint(url, "/write", params)
        self._http = influxhttp.KeepAliveConnection(url, timeout=timeout)
        self._headers = {"Content-Type": "text/plain; charset=utf-8",
                         **influxhttp.auth_headers(username=username, password=password)}
        self.points = 0

    def post(self, lines: Sequence[str]) -> None:
        if not lines:
            return
        resp = self._http.post(self._path, ("\n".join(lines) + "\n").encode(), self._headers)
        if resp.status != 204:
            raise RuntimeError(f"write: HTTP {resp.status}: {influxhttp.server_message(resp.body)}")
        self.points += len(lines)

    def close(self) -> None:
        self._http.close()


def post_lines(url: str, database: str, lines: Iterable[str], batch: int = 10000, **kw: Any) -> int:
    """Write all ``lines`` in batches of ``batch``; returns the number of points written."""
    writer = LineWriter(url, database, **kw)
    try:
        buf: list[str] = []
        for line in lines:
            buf.append(line)
            if len(buf) >= batch:
                writer.post(buf)
                buf = []
        writer.post(buf)
        return writer.points
    finally:
        writer.close()
