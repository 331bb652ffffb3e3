"""What fills a query's placeholders: InfluxQL durations, the host regex as a regex literal, the retention policy
and the ``GROUP BY time()`` bucket."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .data import PackError

_DURATION = re.compile(r"^(?:\d+(?:ns|us|µs|u|ms|s|m|h|d|w))+$")
_DURATION_PART = re.compile(r"(\d+)(ns|us|µs|u|ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "u": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
                 "d": 86400.0, "w": 604800.0}

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
    """A regex matching exactly these host names (RE2 syntax: every non-word ASCII character escaped).

    Any hypervisor can write a host name: a control character (a newline) is written ``\\xHH``, so that the
    regex stays on one line and the name is still matched."""
    def esc(c: str) -> str:
        if c.isalnum() or c == "_" or (ord(c) > 0xFF):
            return c
        return "\\" + c if c.isprintable() and ord(c) < 0x80 else f"\\x{ord(c):02x}"

    return "^(?:" + "|".join("".join(map(esc, h)) for h in sorted(set(hosts))) + ")$"


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
