"""The ``*.influxql`` files of the pack (:class:`Query`), and cutting a SELECT into statements over fewer
columns (the audit asks only the columns it needs, in parallel where InfluxDB 1.x is single-threaded per query)."""

from __future__ import annotations

import difflib
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from .data import PACKAGE, PackError
from .params import QueryParams


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

    def render(self, params: QueryParams, comments: bool = True, wrapped: bool = False) -> str:
        """The query filled in: by default each statement on one line ending in ``;`` (the ``influx`` shell runs
        a line at a time), its comments on lines of their own before it; ``wrapped``: the file's own layout."""
        subs = params.substitutions()
        if wrapped:
            if comments:
                return string.Template(self.text).substitute(subs)
            return ";\n".join(string.Template(s).substitute(subs) for s in self.statements)
        lines = []
        for kind, text in _segments(self.text):
            if kind == "statement":
                lines.append(one_line(string.Template(text).substitute(subs)) + ";")
            elif comments:
                lines.append(string.Template(text).substitute(subs))
        return "\n".join(lines)

    def filled(self, params: QueryParams) -> list[str]:
        subs = params.substitutions()
        return [string.Template(s).substitute(subs) for s in self.statements]


def _segments(text: str) -> list[tuple[str, str]]:
    """The file as ``("comment", line)`` and ``("statement", text)`` in file order (placeholders unfilled, so that
    a ``;`` a placeholder brings cannot cut a statement); a comment inside a statement comes before it."""
    out: list[tuple[str, str]] = []
    pending_comments: list[tuple[str, str]] = []
    statement: list[str] = []

    def end_statement() -> None:
        body = "\n".join(statement).strip()
        statement.clear()
        out.extend(pending_comments)
        pending_comments.clear()
        if body:
            out.append(("statement", body))

    for line in text.splitlines():
        if line.strip().startswith("--"):
            pending_comments.append(("comment", line.rstrip()))
            continue
        parts = line.rstrip().split(";")
        for i, part in enumerate(parts):
            statement.append(part)
            if i < len(parts) - 1:
                end_statement()
    end_statement()
    return out


# Where InfluxQL reads a ``/`` as the start of a regex literal rather than a division.
_REGEX_AFTER = re.compile(r"(?:=~|!~|\bFROM|,)\s*$", re.IGNORECASE)


def one_line(statement: str) -> str:
    """``statement`` on one line: each run of whitespace outside literals becomes one space, and comments are
    dropped (a ``--`` one would swallow the rest of the line). Strings, quoted identifiers and ``/regex/`` literals
    are kept byte for byte, escapes included: one holding a newline keeps it (the pack has none: a host regex cannot
    span lines)."""
    out: list[str] = []
    i, n = 0, len(statement)
    while i < n:
        ch = statement[i]
        if ch.isspace():
            while i < n and statement[i].isspace():
                i += 1
            if out and out[-1] not in " (":  # "FROM (SELECT", as one would write it on one line
                out.append(" ")
            continue
        if statement.startswith("--", i):
            while i < n and statement[i] != "\n":
                i += 1
            continue
        if statement.startswith("/*", i):
            end = statement.find("*/", i + 2)
            i = n if end < 0 else end + 2
            if out and out[-1] != " ":
                out.append(" ")
            continue
        if ch in "'\"" or (ch == "/" and _REGEX_AFTER.search("".join(out))):
            j = i + 1
            while j < n and statement[j] != ch:
                j += 2 if statement[j] == "\\" else 1
            out.append(statement[i:j + 1])
            i = j + 1
            continue
        if ch == ")" and out and out[-1] == " ":
            out.pop()
        out.append(ch)
        i += 1
    return "".join(out).strip()


def parse_query_file(name: str, text: str) -> Query:
    meta: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^--\s*([a-z_]+):\s*(.*?)\s*$", line)
        if m and m.group(1) in ("name", "title", "measurement", "stage", "parallel"):
            meta.setdefault(m.group(1), m.group(2))
    statements = tuple(body for kind, body in _segments(text) if kind == "statement")
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
    root = resources.files(PACKAGE)
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
