"""What the audit knows about each host, and what it finds."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any

from ..querypack import load_counters
from ..schema import M_VM, OLD_NAMES


def finite(value: Any) -> float | None:
    """A finite float, or None (null, strings, NaN, infinities)."""
    kind = type(value)
    if kind is float:  # what JSON numbers mostly are: the quick way (called for every value of every host)
        return value if math.isfinite(value) else None
    if kind is int:
        return float(value)
    if value is None or isinstance(value, (bool, str)):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


# Instant values (counters.yaml kind "instant"): the audit keeps their last value, not an increase.
INSTANT = frozenset(name for name, doc in load_counters().items() if doc.kind == "instant")


@dataclass
class VMData:
    vm: str
    increases: dict[str, float | None] = field(default_factory=dict)
    instant: dict[str, float | None] = field(default_factory=dict)
    reset: bool = False  # last < first: the VM restarted in the window, its increases are understated
    source: str = M_VM  # the measurement its numbers come from (kvm_vm, or kvm_vcpu added up)

    def rate(self, name: str, span_s: float | None) -> float | None:
        inc = self.increases.get(name)
        if inc is None or span_s is None or span_s <= 0:
            return None
        return max(0.0, inc) / span_s


@dataclass
class HostData:
    """One host's numbers over the window: the increase of each counter between its first and its last sample
    (``increases``), the times of those samples, resets, facts and per-VM detail. ``exact_rates`` holds per-second
    rates measured over every sample (hosts whose counters restarted); :meth:`rate` prefers them."""

    host: str
    t_first: float | None = None
    t_last: float | None = None
    t_seen: float | None = None  # the newest sample of any measurement (kvm, kvm_host): is the host fresh?
    increases: dict[str, float | None] = field(default_factory=dict)
    exact_rates: dict[str, float | None] = field(default_factory=dict)
    instant: dict[str, float | None] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    has_facts: bool = False
    vms: dict[str, VMData] = field(default_factory=dict)
    reset: bool = False
    notes: list[str] = field(default_factory=list)
    # kvm_exit_reason (host-wide): hits of each (isa, reason) between t_first and t_last; empty when the agent does
    # not count reasons. reason_first: the (time, count) of each series' first row, reason_reset: a count restarted.
    reason_hits: dict[tuple[str, str], float] = field(default_factory=dict)
    reason_first: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    reason_reset: bool = False

    @property
    def span_s(self) -> float | None:
        if self.t_first is None or self.t_last is None:
            return None
        span = self.t_last - self.t_first
        return span if span > 0 else None

    @property
    def vcpus(self) -> float | None:
        """vCPUs of the host when known and > 0 (0 means "not seen one by one", i.e. unknown)."""
        v = finite(self.facts.get("vcpus"))
        return v if v is not None and v > 0 else None

    def has(self, name: str) -> bool:
        return self.increases.get(name) is not None or self.exact_rates.get(name) is not None or any(
            self.increases.get(a) is not None for a in OLD_NAMES.get(name, ()))

    def rate(self, name: str) -> float | None:
        """Per-second rate of a cumulative counter over the window (old names tolerated); None if not known."""
        if name in self.exact_rates:
            return self.exact_rates[name]
        inc = self.increases.get(name)
        if inc is None:
            for alias in OLD_NAMES.get(name, ()):
                inc = self.increases.get(alias)
                if inc is not None:
                    break
        span = self.span_s
        if inc is None or span is None:
            return None
        return max(0.0, inc) / span

    def per_vcpu(self, value: float | None) -> float | None:
        return ratio(value, self.vcpus)

    def reason_rates(self) -> dict[tuple[str, str], float]:
        """Per-second rate of each (isa, reason) over the host's window (empty without reasons or span)."""
        span = self.span_s
        if span is None:
            return {}
        return {key: max(0.0, hits) / span for key, hits in self.reason_hits.items()}

    def fact(self, name: str) -> Any:
        return self.facts.get(name)


@dataclass
class Finding:
    host: str
    rule: str
    severity: str
    title: str
    summary: str
    evidence: dict[str, Any]
    vms: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counters: list[str] = field(default_factory=list)  # what the HTML report charts

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"host": self.host, "rule": self.rule, "severity": self.severity,
                               "title": self.title, "summary": self.summary, "evidence": self.evidence}
        if self.vms:
            out["vms"] = self.vms
        if self.notes:
            out["notes"] = self.notes
        return out


@dataclass
class Skipped:
    host: str
    rule: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"host": self.host, "rule": self.rule, "reason": self.reason}


@dataclass
class Stale:
    """A host whose newest sample is older than ``--stale-after``: it may have stopped reporting, so that the
    window shows less than happened; the audit cannot call it clean."""

    host: str
    last_sample: float | None  # unix time; None: no sample time seen
    age_s: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "last_sample": None if self.last_sample is None else iso_time(self.last_sample),
                "age_s": None if self.age_s is None else round(self.age_s)}


def iso_time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def duration_text(seconds: float) -> str:
    """``seconds`` the way an operator says it: 45s, 31m, 2h05m, 3d04h."""
    s = max(0, round(seconds))
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 120:
        return f"{m}m"
    h = m // 60
    return f"{h}h{m % 60:02d}m" if h < 48 else f"{h // 24}d{h % 24:02d}h"


@dataclass
class Outcome:
    """What a rule says about one host: findings, or why it could not judge it (or neither)."""

    findings: list[Finding] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


@dataclass
class FleetOutcome:
    """What a fleet-wide rule says: findings, a top list of hosts and numbers of the whole fleet."""

    findings: list[Finding]
    top: list[dict[str, Any]]
    fleet: dict[str, Any]


def rounded(value: Any, digits: int = 4) -> Any:
    """Numbers made readable for evidence: floats to ``digits`` significant digits, ints kept."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if value == 0:
            return 0.0
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value
