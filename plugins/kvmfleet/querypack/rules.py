"""The audit rules' data (``rules.yaml``): thresholds, severities and texts, with an operator's overrides."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..severity import SEVERITIES
from .data import PackError, read_data, yaml_load
from .queries import load_queries


@dataclass
class Rule:
    id: str
    title: str
    severity: str
    queries: list[str]
    counters: list[str]
    thresholds: dict[str, float]
    explanation: str
    remedy: str
    derived_from: str | None = None
    overridden: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "severity": self.severity, "queries": self.queries,
                "counters": self.counters, "thresholds": dict(self.thresholds),
                "explanation": self.explanation.strip(), "remedy": self.remedy.strip(),
                **({"derived_from": self.derived_from} if self.derived_from else {}),
                **({"overridden": dict(self.overridden)} if self.overridden else {})}




def parse_rules(text: str, what: str = "rules.yaml") -> dict[str, Rule]:
    doc = yaml_load(text, what)
    if not isinstance(doc, dict) or not isinstance(doc.get("rules"), list):
        raise PackError(f"{what}: expected a mapping with a 'rules' list")
    queries = load_queries()
    rules: dict[str, Rule] = {}
    for i, raw in enumerate(doc["rules"]):
        if not isinstance(raw, dict) or not isinstance(raw.get("id"), str):
            raise PackError(f"{what}: rule #{i + 1} has no id")
        rid = raw["id"]
        where = f"{what}: rule {rid}"
        missing = [k for k in ("title", "severity", "queries", "explanation", "remedy") if not raw.get(k)]
        if missing:
            raise PackError(f"{where}: missing {', '.join(missing)}")
        if raw["severity"] not in SEVERITIES:
            raise PackError(f"{where}: severity {raw['severity']!r} is not one of {', '.join(SEVERITIES)}")
        unknown_q = [q for q in raw["queries"] if q not in queries]
        if unknown_q:
            raise PackError(f"{where}: unknown queries {', '.join(unknown_q)}")
        thresholds = raw.get("thresholds") or {}
        if not isinstance(thresholds, dict):
            raise PackError(f"{where}: thresholds must be a mapping")
        for k, v in thresholds.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise PackError(f"{where}: threshold {k} must be a number, got {v!r}")
        if rid in rules:
            raise PackError(f"{what}: rule {rid} defined twice")
        rules[rid] = Rule(id=rid, title=str(raw["title"]), severity=raw["severity"], queries=list(raw["queries"]),
                          counters=list(raw.get("counters") or []),
                          thresholds={k: float(v) for k, v in thresholds.items()},
                          explanation=str(raw["explanation"]), remedy=str(raw["remedy"]),
                          derived_from=raw.get("derived_from"))
    return rules


def parse_override(text: str) -> tuple[str, str, float]:
    """``RULE.KEY=VALUE`` -> (rule, key, value)."""
    m = re.match(r"^\s*([A-Za-z0-9_-]+)\.([A-Za-z0-9_]+)\s*=\s*(\S+)\s*$", text)
    if not m:
        raise PackError(f"{text!r}: expected RULE.KEY=VALUE, e.g. shadow-paging.warning_per_exit=0.01")
    try:
        value = float(m.group(3))
    except ValueError:
        raise PackError(f"{text!r}: {m.group(3)!r} is not a number") from None
    return m.group(1), m.group(2), value


def apply_overrides(rules: dict[str, Rule], overrides: Mapping[str, Mapping[str, Any]], what: str) -> None:
    for rid, values in overrides.items():
        if rid not in rules:
            close = difflib.get_close_matches(str(rid), list(rules), n=1)
            raise PackError(f"{what}: no rule {rid!r}" + (f" (did you mean {close[0]}?)" if close else ""))
        if not isinstance(values, Mapping):
            raise PackError(f"{what}: the thresholds of {rid} must be a mapping")
        rule = rules[rid]
        for key, value in values.items():
            if key not in rule.thresholds:
                known = ", ".join(rule.thresholds) or "none"
                raise PackError(f"{what}: rule {rid} has no threshold {key!r} (it has: {known})")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PackError(f"{what}: {rid}.{key} must be a number, got {value!r}")
            rule.thresholds[key] = float(value)
            rule.overridden[key] = float(value)


def load_rules(threshold_files: Sequence[str] = (), sets: Sequence[str] = ()) -> dict[str, Rule]:
    """The pack's rules with operator overrides applied: YAML files (``{rule: {key: value}}``, later files win)
    then ``RULE.KEY=VALUE`` strings."""
    rules = parse_rules(read_data("rules.yaml"))
    for path in threshold_files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise PackError(f"threshold file {path!r} cannot be read: {e.strerror or e}") from None
        doc = yaml_load(text, path)
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise PackError(f"{path}: expected a mapping of rule ids to thresholds")
        apply_overrides(rules, doc, path)
    for text in sets:
        rid, key, value = parse_override(text)
        apply_overrides(rules, {rid: {key: value}}, "--set")
    return rules
