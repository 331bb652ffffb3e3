"""What each KVM counter counts (``counters.yaml``), for ``kvmfleet explain`` and the audit's instant counters."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import lru_cache

from .. import schema
from .data import PackError, read_data, yaml_load

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-.]*$")

@dataclass(frozen=True)
class CounterDoc:
    name: str
    scope: str
    kind: str
    counts: str
    high: str
    old: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()


@lru_cache(maxsize=1)
def load_counters() -> dict[str, CounterDoc]:
    doc = yaml_load(read_data("counters.yaml"), "counters.yaml")
    out: dict[str, CounterDoc] = {}
    for name, raw in (doc.get("counters") or {}).items():
        out[name] = CounterDoc(name=name, scope=str(raw.get("scope", "")), kind=str(raw.get("kind", "")),
                               counts=" ".join(str(raw.get("counts", "")).split()),
                               high=" ".join(str(raw.get("high", "")).split()),
                               old=schema.OLD_NAMES.get(name, ()), rules=tuple(raw.get("rules") or ()))
    return out


def find_counter(name: str) -> CounterDoc:
    """The notes on ``name`` (old names and a ``kvm_vm.``-style prefix accepted); :class:`PackError` with
    suggestions if unknown."""
    counters = load_counters()
    key = name.strip().split(".")[-1]
    if key in counters:
        return counters[key]
    for doc in counters.values():
        if key in doc.old:
            return doc
    for suffix in ("_sum", "_cur", "_max"):
        if key.endswith(suffix) and key[: -len(suffix)] in counters:
            return counters[key[: -len(suffix)]]
    hist = re.match(r"^(.*)_bucket_\d+$", key)
    if hist:
        raise PackError(f"{name!r} is a histogram bucket field of {hist.group(1)} (see docs/schema.md)")
    names = list(counters) + [o for d in counters.values() for o in d.old]
    close = difflib.get_close_matches(key, names, n=4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise PackError(f"no notes on a counter named {name!r}{hint} (kvmfleet explain --list shows them all)")


def explain_text(doc: CounterDoc) -> str:
    import textwrap

    scope = {"vm": "VM stat (struct kvm_vm_stat)", "vcpu": "vCPU stat (struct kvm_vcpu_stat)"}.get(doc.scope,
                                                                                                    doc.scope)
    lines = [f"{doc.name}: {doc.kind} {scope}"]
    if doc.old:
        lines.append(f"  older name{'s' if len(doc.old) > 1 else ''}: {', '.join(doc.old)}")
    lines.append("")
    lines += textwrap.wrap("Counts: " + doc.counts, 100, subsequent_indent="  ")
    lines += textwrap.wrap("A high value: " + doc.high, 100, subsequent_indent="  ")
    if doc.rules:
        lines.append("")
        lines.append(f"Audit rules that read it: {', '.join(doc.rules)} (kvmfleet queries --rules)")
    return "\n".join(lines)


def counter_name_ok(name: str) -> bool:
    return bool(_IDENT.match(name))
