"""exit-reason-storm: a host whose exits are dominated by a family of exit reasons that points at a
misconfiguration (MSR accesses, APIC accesses, PAUSE loops, emulated device I/O; device emulation in the VMM for
userspace exits). rules.yaml explains each family with its kernel reasoning.

Judged from ``kvm_exit_reason`` alone, known from the fleet stage on: a host without reasons is not judged and
not listed (the source is off by default). A family is judged by its share of its tracepoint's exits (userspace-io:
of all the host's exits, the kvm ``exits`` counter, since the exits handed to the VMM are nearly all port I/O and
MMIO anyway) and by its rate per vCPU-second (a host without a vCPU count: by the share and the floor alone); the
worst family sets the severity, every family at a level is named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..model import HostData, Outcome, ratio, rounded
from ..reasons import KVM_EXIT, USERSPACE_EXIT, ranked
from .base import HostRule, fmt, ge, ge_or_unknown, level


@dataclass(frozen=True)
class Family:
    """Reasons (names of the kvm_exit or kvm_userspace_exit format tables) that point at one cause together."""

    id: str
    what: str  # words for the summary
    tracepoint: str
    reasons: tuple[str, ...]
    of_all_exits: bool = False  # its share is of the host's exits (kvm exits), not of its tracepoint's

    @property
    def prefix(self) -> str:
        """The thresholds of the family's tracepoint: ``warning_share`` or ``userspace_warning_share``."""
        return "userspace_" if self.tracepoint == USERSPACE_EXIT else ""


FAMILIES: tuple[Family, ...] = (
    Family("msr", "MSR accesses", KVM_EXIT, ("MSR_READ", "MSR_WRITE", "MSR_READ_IMM", "MSR_WRITE_IMM", "msr")),
    Family("apic", "APIC accesses", KVM_EXIT, ("APIC_ACCESS", "APIC_WRITE", "avic_unaccelerated_access")),
    Family("pause", "PAUSE-loop exits", KVM_EXIT, ("PAUSE_INSTRUCTION", "pause")),
    Family("device-io", "port I/O and MMIO (EPT misconfig) exits", KVM_EXIT,
           ("IO_INSTRUCTION", "io", "EPT_MISCONFIG")),
    Family("userspace-io", "port I/O and MMIO exits to the VMM", USERSPACE_EXIT, ("KVM_EXIT_IO", "KVM_EXIT_MMIO"),
           of_all_exits=True),
)


@dataclass(frozen=True)
class Storm:
    """One family of one host, with its numbers and the level it reaches (None: below warning)."""

    family: Family
    per_s: float
    share: float | None
    per_vcpu: float | None
    reasons: dict[str, float]  # per second, of the family's reasons that moved
    severity: str | None


class ExitReasonStorm(HostRule):
    """One finding per host with a family at a level: the worst family's severity, every such family named."""

    id = "exit-reason-storm"
    names_exit_reasons = True

    def storms(self, h: HostData) -> list[Storm]:
        """Every family the host has exits of, worst first (then in FAMILIES order)."""
        th = self.rule.thresholds
        by_tp = ranked(h)
        out = []
        for fam in FAMILIES:
            rows = by_tp.get(fam.tracepoint, [])
            total = sum(r.per_s for r in rows)
            reasons = {r.reason: r.per_s for r in rows if r.reason in fam.reasons and r.per_s > 0}
            per_s = sum(reasons.values())
            if per_s <= 0:
                continue
            # no kvm exits counter: no share, so userspace-io is not judged there
            share = ratio(per_s, h.rate("exits") if fam.of_all_exits else total)
            per_vcpu = h.per_vcpu(per_s)
            p = fam.prefix
            floor = ge(per_s, th[f"{p}min_per_s"])
            severity = level(
                floor and ge(share, th[f"{p}warning_share"]) and ge_or_unknown(per_vcpu, th[f"{p}warning_per_vcpu_s"]),
                floor and ge(share, th[f"{p}critical_share"]) and ge_or_unknown(per_vcpu,
                                                                                th[f"{p}critical_per_vcpu_s"]))
            out.append(Storm(fam, per_s, share, per_vcpu, reasons, severity))
        rank = {"critical": 0, "warning": 1, None: 2}
        return sorted(out, key=lambda s: rank[s.severity])

    def screen(self, h: HostData) -> bool:
        return any(s.severity for s in self.storms(h))

    def evaluate(self, h: HostData) -> Outcome:
        storms = self.storms(h)
        hit = [s for s in storms if s.severity]
        if not hit:
            return Outcome()
        evidence: dict[str, Any] = {"families": {s.family.id: self._family_evidence(s) for s in storms}}
        for tp, rows in ranked(h).items():
            evidence[f"{tp}_per_s"] = rounded(sum(r.per_s for r in rows))
        if h.vcpus is not None:
            evidence["vcpus"] = h.vcpus
        summary = "; ".join(self._words(s) for s in hit)
        return Outcome([self.finding(h.host, hit[0].severity or "warning", summary, evidence)])

    @staticmethod
    def _family_evidence(s: Storm) -> dict[str, Any]:
        out: dict[str, Any] = {"per_s": rounded(s.per_s), "share": rounded(s.share),
                               "reasons_per_s": {k: rounded(v) for k, v in s.reasons.items()}}
        if s.per_vcpu is not None:
            out["per_vcpu_s"] = rounded(s.per_vcpu)
        if s.severity:
            out["level"] = s.severity
        return out

    @staticmethod
    def _words(s: Storm) -> str:
        share = "n/a" if s.share is None else f"{100 * s.share:.0f}%"
        per_vcpu = f", {fmt(s.per_vcpu)} per vCPU-s" if s.per_vcpu is not None else ""
        names = ", ".join(f"{k} {fmt(v)}/s" for k, v in sorted(s.reasons.items(), key=lambda kv: (-kv[1], kv[0])))
        of = "all exits" if s.family.of_all_exits else f"{s.family.tracepoint} exits"
        return f"{s.family.what} are {share} of {of} ({fmt(s.per_s)}/s{per_vcpu}: {names}): {s.family.id}"
