"""Exit reasons (``kvm_exit_reason``) as the audit reads them: each host's reasons ranked per tracepoint with their
share of that tracepoint's exits, the top ones named in the findings about exits, and the paging witness the
shadow-paging rule reads.

Reasons come in two tracepoints: ``kvm:kvm_exit`` (isa ``vmx`` or ``svm``, the hardware exit reasons) and
``kvm:kvm_userspace_exit`` (isa ``userspace``, the exits KVM hands to the VMM). A share is always of one
tracepoint's exits: the two count different events (a port I/O exit may appear in both). A host without reasons
(the agent's source is off by default) gets nothing from this module: no evidence, no words, no finding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .model import Finding, HostData, rounded

KVM_EXIT = "kvm_exit"
USERSPACE_EXIT = "kvm_userspace_exit"
TRACEPOINTS = (KVM_EXIT, USERSPACE_EXIT)
ISA_USERSPACE = "userspace"
TOP_N = 3  # reasons named per tracepoint in a finding

# What shadow paging intercepts and EPT/NPT does not (guest #PF, INVLPG, CR3 loads), and the exits only EPT/NPT
# has (EPT violations and misconfigurations, nested page faults): per isa, names as in the kvm_exit format file.
SHADOW_INTERCEPTS = {"vmx": ("EXCEPTION_NMI", "INVLPG", "CR_ACCESS"),
                     "svm": ("PF excp", "invlpg", "read_cr3", "write_cr3")}
TDP_EXITS = {"vmx": ("EPT_VIOLATION", "EPT_MISCONFIG"), "svm": ("npf",)}


def tracepoint_of(isa: str) -> str:
    return USERSPACE_EXIT if isa == ISA_USERSPACE else KVM_EXIT


@dataclass(frozen=True)
class ReasonRate:
    """One reason of a host over the window: its rate and its share of its tracepoint's exits."""

    isa: str
    reason: str
    per_s: float
    share: float | None  # None when the tracepoint's exits are 0


def ranked(h: HostData) -> dict[str, list[ReasonRate]]:
    """Per tracepoint with reasons, its reasons by rate (largest first, then by name)."""
    rates = h.reason_rates()
    totals: dict[str, float] = {}
    for (isa, _), r in rates.items():
        totals[tracepoint_of(isa)] = totals.get(tracepoint_of(isa), 0.0) + r
    out: dict[str, list[ReasonRate]] = {}
    for (isa, reason), r in sorted(rates.items(), key=lambda kv: (-kv[1], kv[0])):
        tp = tracepoint_of(isa)
        out.setdefault(tp, []).append(ReasonRate(isa, reason, r, r / totals[tp] if totals[tp] > 0 else None))
    return out


def tracepoint_rate(h: HostData, tracepoint: str) -> float | None:
    """Exits per second of one tracepoint, summed over its reasons; None when the host has none of them."""
    rows = ranked(h).get(tracepoint)
    return sum(r.per_s for r in rows) if rows else None


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.0f}%"


def top_text(rows: Sequence[ReasonRate], n: int = TOP_N) -> str:
    """``MSR_WRITE 61%, HLT 20%, EPT_VIOLATION 9%``: the top ``n`` with their shares."""
    return ", ".join(f"{r.reason} {_pct(r.share)}" for r in rows[:n] if r.per_s > 0)


def reasons_evidence(h: HostData, n: int = TOP_N) -> dict[str, Any]:
    """Per tracepoint: its exits per second, its isa, and its top ``n`` reasons with rate and share (empty without
    reasons)."""
    out: dict[str, Any] = {}
    for tp, rows in ranked(h).items():
        out[tp] = {"isa": "+".join(sorted({r.isa for r in rows})), "exits_per_s": rounded(sum(r.per_s for r in rows)),
                   "top": {r.reason: {"per_s": rounded(r.per_s), "share": rounded(r.share)} for r in rows[:n]}}
    return out


def reasons_text(h: HostData, n: int = TOP_N) -> str:
    """``top kvm_exit reasons (vmx): ...; top kvm_userspace_exit reasons: ...`` ("" without reasons)."""
    parts = []
    for tp, rows in ranked(h).items():
        text = top_text(rows, n)
        if text:
            isa = "+".join(sorted({r.isa for r in rows}))
            parts.append(f"top {tp} reasons" + (f" ({isa})" if tp == KVM_EXIT else "") + f": {text}")
    return "; ".join(parts)


def name_top_reasons(f: Finding, h: HostData, n: int = TOP_N) -> None:
    """A finding about exits names the host's top reasons, in its evidence and at the end of its summary; a host
    without reasons leaves it as it is."""
    evidence = reasons_evidence(h, n)
    if not evidence or "exit_reasons" in f.evidence:
        return
    f.evidence["exit_reasons"] = evidence
    text = reasons_text(h, n)
    if text:
        f.summary = f"{f.summary}; {text}"


# ------------------------------------------------------------------------------------------------ paging witness
SHOWS_SHADOW, SHOWS_TDP, SHOWS_BOTH, SHOWS_NEITHER, SHOWS_ABSENT = "shadow", "tdp", "both", "neither", "absent"


@dataclass(frozen=True)
class PagingWitness:
    """What the kvm_exit reasons of a host say about paging, independently of the MMU counters.

    ``shows``: ``shadow`` (shadow intercepts, no EPT/NPT exits), ``tdp`` (EPT/NPT exits, no shadow intercepts),
    ``both``, ``neither``, or ``absent`` (the host counts reasons but kvm_exit gave none: the tracepoint did not
    fire, e.g. a backend that emulates its guests, or the agent did not count it)."""

    isa: str | None
    shadow_per_s: dict[str, float]
    tdp_per_s: dict[str, float]

    @property
    def shows(self) -> str:
        if self.isa is None:
            return SHOWS_ABSENT
        shadow = sum(self.shadow_per_s.values()) > 0
        tdp = sum(self.tdp_per_s.values()) > 0
        return {(True, False): SHOWS_SHADOW, (False, True): SHOWS_TDP, (True, True): SHOWS_BOTH,
                (False, False): SHOWS_NEITHER}[(shadow, tdp)]

    def evidence(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shows": self.shows}
        if self.isa is not None:
            out["isa"] = self.isa
            out["shadow_intercepts_per_s"] = {k: rounded(v) for k, v in self.shadow_per_s.items()}
            out["tdp_exits_per_s"] = {k: rounded(v) for k, v in self.tdp_per_s.items()}
        return out

    def numbers(self, which: str) -> str:
        """``EXCEPTION_NMI 1,200/s, INVLPG 300/s`` of the reasons of ``which`` (shadow or tdp) that moved."""
        rates = self.shadow_per_s if which == SHOWS_SHADOW else self.tdp_per_s
        return ", ".join(f"{k} {v:,.3g}/s" if v < 100 else f"{k} {v:,.0f}/s" for k, v in rates.items() if v > 0)

    def names(self, which: str) -> str:
        return "/".join((SHADOW_INTERCEPTS if which == SHOWS_SHADOW else TDP_EXITS).get(self.isa or "", ()))


def paging_witness(h: HostData) -> PagingWitness | None:
    """The witness of a host that counts reasons (None for a host without any: nothing to say)."""
    rates = h.reason_rates()
    if not rates:  # no reasons, or no span to make rates of
        return None
    by_isa: dict[str, float] = {}
    for (isa, _), r in rates.items():
        if isa in SHADOW_INTERCEPTS:
            by_isa[isa] = by_isa.get(isa, 0.0) + r
    if not by_isa:
        return PagingWitness(None, {}, {})
    isa = max(sorted(by_isa), key=lambda i: by_isa[i])  # one of them in practice; the busier if a host had both
    return PagingWitness(isa, {r: rates.get((isa, r), 0.0) for r in SHADOW_INTERCEPTS[isa]},
                         {r: rates.get((isa, r), 0.0) for r in TDP_EXITS[isa]})
