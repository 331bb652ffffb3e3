"""The query pack: InfluxQL files, the audit rules and the counter notes, shipped as package data.

* ``*.influxql``: one file per question, a header of ``-- key: value`` lines and comments, then one or more
  statements (``;``-separated), each grouped over the whole fleet. Placeholders, filled by :func:`render`:
  ``${window}`` (an InfluxQL duration), ``${host_regex}`` (a regular expression; ``/`` is escaped for the regex
  literal), ``${rp}`` (``"rp".`` or nothing) and ``${interval}`` (``GROUP BY time()`` bucket).
* ``rules.yaml``: the rules (:func:`load_rules`), with thresholds an operator may override.
* ``counters.yaml``: what each KVM counter counts (``kvmfleet explain``).

Only the portable InfluxQL subset is used (InfluxDB 1.6+, 2.x through ``/query`` with a DBRP mapping, 3.x):
``first``/``last``/``min``/``mean``, arithmetic between them, ``non_negative_derivative``, subqueries,
``GROUP BY time(), "host"``, ``fill()``; no ``SLIMIT``, ``INTEGRAL``, ``SAMPLE`` or ``SHOW``.
"""

from __future__ import annotations

import difflib
import importlib
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from .. import schema
from ..severity import SEVERITIES

_DURATION = re.compile(r"^(?:\d+(?:ns|us|µs|u|ms|s|m|h|d|w))+$")
_DURATION_PART = re.compile(r"(\d+)(ns|us|µs|u|ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "u": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
                 "d": 86400.0, "w": 604800.0}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-.]*$")


class PackError(ValueError):
    """A query, rule file, override or parameter that cannot be used; the message says which and why."""


# ------------------------------------------------------------------------------------------------- parameters
def duration_seconds(text: str) -> float:
    """Seconds of an InfluxQL duration (``1h``, ``90m``, ``1h30m``); :class:`PackError` if it is not one."""
    text = text.strip()
    if not _DURATION.match(text):
        raise PackError(f"{text!r} is not a duration such as 30m, 1h, 6h or 1d")
    seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))
    if seconds <= 0:
        raise PackError(f"duration {text!r} must be longer than 0")
    return seconds


def regex_literal(regex: str) -> str:
    """``regex`` as the inside of an InfluxQL ``/.../`` literal (``/`` escaped); checked to compile."""
    try:
        re.compile(regex)
    except re.error as e:
        raise PackError(f"invalid regular expression {regex!r}: {e}") from None
    if "\n" in regex or "\r" in regex:
        raise PackError("a host regular expression cannot span lines")
    out = []
    escaped = False
    for ch in regex:
        if ch == "/" and not escaped:
            out.append("\\/")
        else:
            out.append(ch)
        escaped = ch == "\\" and not escaped
    return "".join(out)


def exact_hosts_regex(hosts: Sequence[str]) -> str:
    """A regex matching exactly these host names (RE2 syntax: every non-word ASCII character escaped)."""
    def esc(name: str) -> str:
        return "".join(c if (c.isalnum() or c == "_" or ord(c) > 127) else "\\" + c for c in name)

    return "^(?:" + "|".join(esc(h) for h in sorted(set(hosts))) + ")$"


def interval_for(window_s: float, buckets: int = 60, minimum_s: int = 10) -> str:
    """A ``GROUP BY time()`` bucket giving about ``buckets`` points over the window (whole seconds, >= 10 s)."""
    return f"{max(minimum_s, int(window_s // buckets))}s"


@dataclass(frozen=True)
class QueryParams:
    """What fills the placeholders. ``host_regex`` is a plain regular expression (not yet escaped)."""

    window: str = "1h"
    host_regex: str = ".*"
    retention_policy: str | None = None
    interval: str | None = None

    def substitutions(self) -> dict[str, str]:
        window_s = duration_seconds(self.window)
        rp = ""
        if self.retention_policy:
            if '"' in self.retention_policy or "\n" in self.retention_policy:
                raise PackError(f"retention policy {self.retention_policy!r} cannot contain quotes or newlines")
            rp = f'"{self.retention_policy}".'
        interval = self.interval or interval_for(window_s)
        duration_seconds(interval)
        return {"window": self.window.strip(), "host_regex": regex_literal(self.host_regex), "rp": rp,
                "interval": interval}


# ------------------------------------------------------------------------------------------------- queries
@dataclass(frozen=True)
class Query:
    """One ``.influxql`` file of the pack."""

    name: str
    title: str
    measurement: str
    stage: str  # "fleet": runs over every host; "detail": the audit runs it for the hosts that need it
    parallel_fields: bool  # the audit may run the select list's columns as separate statements
    text: str  # the whole file
    statements: tuple[str, ...]  # without comments, placeholders unfilled

    def render(self, params: QueryParams, comments: bool = True) -> str:
        subs = params.substitutions()
        if comments:
            return string.Template(self.text).substitute(subs)
        return ";\n".join(string.Template(s).substitute(subs) for s in self.statements)

    def filled(self, params: QueryParams) -> list[str]:
        subs = params.substitutions()
        return [string.Template(s).substitute(subs) for s in self.statements]


def _strip_comments(text: str) -> str:
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("--"):
            continue
        lines.append(line.rstrip())
    return "\n".join(lines)


def parse_query_file(name: str, text: str) -> Query:
    meta: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^--\s*([a-z_]+):\s*(.*?)\s*$", line)
        if m and m.group(1) in ("name", "title", "measurement", "stage", "parallel"):
            meta.setdefault(m.group(1), m.group(2))
    body = _strip_comments(text)
    statements = tuple(s.strip() for s in body.split(";") if s.strip())
    if not statements:
        raise PackError(f"query file {name}.influxql holds no statement")
    for s in statements:
        if not s.upper().startswith("SELECT"):
            raise PackError(f"query file {name}.influxql: only SELECT statements belong in the pack")
    if meta.get("name", name) != name:
        raise PackError(f"query file {name}.influxql says its name is {meta['name']!r}")
    return Query(name=name, title=meta.get("title", name), measurement=meta.get("measurement", ""),
                 stage=meta.get("stage", "detail"), parallel_fields=meta.get("parallel", "") == "fields",
                 text=text if text.endswith("\n") else text + "\n", statements=statements)


@lru_cache(maxsize=1)
def load_queries() -> dict[str, Query]:
    """Every query of the pack by name, in name order."""
    out: dict[str, Query] = {}
    root = resources.files(__name__)
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".influxql"):
            name = entry.name[: -len(".influxql")]
            out[name] = parse_query_file(name, entry.read_text(encoding="utf-8"))
    return out


def get_query(name: str) -> Query:
    queries = load_queries()
    if name not in queries:
        close = difflib.get_close_matches(name, list(queries), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else f" (known: {', '.join(queries)})"
        raise PackError(f"no query named {name!r}{hint}")
    return queries[name]


# -- splitting a SELECT into per-column statements (the audit's parallelism on InfluxDB 1.x)
def _split_top(text: str, sep: str = ",") -> list[str]:
    parts, depth, cur, quote = [], 0, [], ""
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = ""
            continue
        if ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return parts


def _find_top(text: str, word: str, start: int = 0) -> int:
    """Index of the keyword ``word`` at parenthesis depth 0 (case-insensitive), or -1."""
    depth, i, n, wl = 0, start, len(text), len(word)
    while i < n:
        ch = text[i]
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch in "'\"":
            j = text.find(ch, i + 1)
            i = n if j < 0 else j
        elif depth == 0 and text[i:i + wl].upper() == word and (i == 0 or not text[i - 1].isalnum()) \
                and (i + wl >= n or not (text[i + wl].isalnum() or text[i + wl] == "_")):
            return i
        i += 1
    return -1


def _alias(item: str) -> str:
    m = re.search(r"\s+AS\s+\"?([A-Za-z0-9_]+)\"?\s*$", item, re.IGNORECASE)
    return m.group(1) if m else item


def split_columns(statement: str, groups: int) -> list[str]:
    """Split ``SELECT a, b, c FROM ...`` (optionally ``FROM (SELECT ... ) ...``) into up to ``groups`` statements
    over disjoint column sets; the inner select list of a subquery is split by the same aliases."""
    s = statement.strip()
    if not s.upper().startswith("SELECT") or groups <= 1:
        return [statement]
    frm = _find_top(s, "FROM", 6)
    if frm < 0:
        return [statement]
    items = _split_top(s[6:frm])
    if len(items) <= 1:
        return [statement]
    rest = s[frm + 4:].lstrip()
    inner_items: list[str] | None = None
    inner_from = after = ""
    if rest.startswith("("):
        depth, end = 0, -1
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                end = i
                break
        if end < 0:
            return [statement]
        inner = rest[1:end].strip()
        after = rest[end + 1:]
        ifrm = _find_top(inner, "FROM", 6)
        if not inner.upper().startswith("SELECT") or ifrm < 0:
            return [statement]
        inner_items = _split_top(inner[6:ifrm])
        inner_from = inner[ifrm:]
    groups = min(groups, len(items))
    chunks = [items[i::groups] for i in range(groups)]
    out = []
    for chunk in chunks:
        if inner_items is None:
            out.append(f"SELECT {', '.join(chunk)} FROM {rest}")
        else:
            wanted = {_alias(i) for i in chunk}
            inner_chunk = [i for i in inner_items if _alias(i) in wanted] or inner_items
            out.append(f"SELECT {', '.join(chunk)} FROM (SELECT {', '.join(inner_chunk)} {inner_from}){after}")
    return out


def select_columns(statement: str, wanted: Sequence[str]) -> str:
    """``statement`` with only the select items whose alias (or bare field name) is in ``wanted`` (all of them if
    none would be left)."""
    s = statement.strip()
    frm = _find_top(s, "FROM", 6)
    if not s.upper().startswith("SELECT") or frm < 0:
        return statement
    items = _split_top(s[6:frm])
    keep = [i for i in items if _alias(i) in set(wanted)]
    if not keep or len(keep) == len(items):
        return statement
    return f"SELECT {', '.join(keep)} {s[frm:]}"


# ------------------------------------------------------------------------------------------------- rules
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


def _yaml_load(text: str, what: str) -> Any:
    try:
        yaml: Any = importlib.import_module("yaml")  # PyYAML (untyped; no stubs needed)
    except ImportError as e:  # pragma: no cover - PyYAML is a dependency
        raise PackError("PyYAML is needed to read rules (pip install PyYAML)") from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PackError(f"{what}: not valid YAML: {e}") from None


def _read_data(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def parse_rules(text: str, what: str = "rules.yaml") -> dict[str, Rule]:
    doc = _yaml_load(text, what)
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
    rules = parse_rules(_read_data("rules.yaml"))
    for path in threshold_files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise PackError(f"threshold file {path!r} cannot be read: {e.strerror or e}") from None
        doc = _yaml_load(text, path)
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise PackError(f"{path}: expected a mapping of rule ids to thresholds")
        apply_overrides(rules, doc, path)
    for text in sets:
        rid, key, value = parse_override(text)
        apply_overrides(rules, {rid: {key: value}}, "--set")
    return rules


# ------------------------------------------------------------------------------------------------- counters
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
    doc = _yaml_load(_read_data("counters.yaml"), "counters.yaml")
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
