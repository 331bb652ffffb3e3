"""The audit's outputs: a text table, JSON, Markdown and a self-contained HTML report with inline SVG charts."""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import json
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from .. import __version__
from ..severity import severity_rank
from ..textsafe import for_markdown, for_terminal, one_line
from .engine import AuditResult
from .model import Finding, duration_text, iso_time

FORMATS = ("table", "json", "markdown", "html")
MAX_SKIPPED_LINES = 12
MAX_NAME_SHOWN = 200  # characters of a host or VM name shown in the table, markdown and HTML (JSON: all of it)
MAX_ANCHOR = 64  # characters of a host section's id; a longer name gets its hash after them
MAX_HOST_COLUMN = 40  # a longer name overflows its cell instead of widening every row


def to_dict(result: AuditResult, fail_on: str | None = None) -> dict[str, Any]:
    by_sev = Counter(f.severity for f in result.findings)
    out: dict[str, Any] = {
        "findings": [f.to_dict() for f in result.findings],
        "summary": {"critical": by_sev.get("critical", 0), "warning": by_sev.get("warning", 0),
                    "info": by_sev.get("info", 0), "hosts": len(result.hosts),
                    "hosts_with_findings": len({f.host for f in result.findings})},
        "top_exit_rate": result.top_exit_rate,
        "fleet": result.fleet,
        "skipped": [s.to_dict() for s in result.skipped],
        "window": result.window,
        "host_regex": result.host_regex,
        "source": result.source,
        "thresholds_overridden": {rid: r.overridden for rid, r in result.rules.items() if r.overridden},
        "queries": result.queries,
        "requests": result.requests,
        "elapsed_s": round(result.elapsed_s, 3),
        "generated_at": iso_time(result.started_at),
        "kvmfleet": __version__,
    }
    if result.stale:  # only then: the report of a fleet whose hosts all report is as it was
        out["summary"]["stale"] = len(result.stale)
        out["stale"] = [st.to_dict() for st in result.stale]
        out["stale_after"] = result.stale_after
    if fail_on:
        out["fail_on"] = fail_on
    return out


def _evidence_text(evidence: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_num(v)}" for k, v in evidence.items())


def _num(v: Any) -> str:
    if isinstance(v, dict):  # nested evidence (exit reasons): {key: value, ...} without Python's quotes
        return "{" + ", ".join(f"{k}: {_num(x)}" for k, x in v.items()) + "}"
    if isinstance(v, bool) or v is None:
        return str(v).lower() if isinstance(v, bool) else "n/a"
    if isinstance(v, float):
        if v == int(v) and abs(v) < 1e15:
            return str(int(v))
        return f"{v:g}"
    return str(v)


def _name(name: object, escape: Callable[[object], str] = for_terminal, cut: int = MAX_NAME_SHOWN) -> str:
    """A host or VM name from outside (any hypervisor writes them), escaped; past ``cut`` characters cut, and the
    cut said (JSON keeps the whole name)."""
    s = str(name)
    if len(s) <= cut:
        return escape(s)
    return escape(s[:cut]) + f"...({len(s)} characters)"


def names_text(names: Sequence[str], most: int = 5, escape: Callable[[object], str] = for_terminal,
               cut: int = MAX_NAME_SHOWN) -> str:
    """The first ``most`` names, escaped, and how many more."""
    shown = ", ".join(_name(n, escape, cut) for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _vm_text(vm: dict[str, Any], name: Callable[[object], str] = _name, text: Callable[[str], str] = str) -> str:
    rest = ", ".join(f"{k}={_num(v)}" for k, v in vm.items() if k != "vm")
    return name(vm["vm"]) + (text(f" ({rest})") if rest else "")


def _skipped_summary(result: AuditResult, escape: Callable[[object], str] = for_terminal,
                     text: Callable[[str], str] = str) -> list[str]:
    by_reason = Counter((s.rule, s.reason) for s in result.skipped)
    lines = []
    for (rule, reason), n in by_reason.most_common():
        hosts = sorted({s.host for s in result.skipped if s.rule == rule and s.reason == reason})
        lines.append(text(f"{rule}: {reason}: {n} host{'s' if n != 1 else ''} (") + names_text(hosts, 5, escape)
                     + ")")
    return lines


def _stale_lines(result: AuditResult, name: Callable[[object], str] = _name) -> list[str]:
    """Each stale host and how old its newest sample is."""
    return [f"{name(st.host)}: " + ("no sample time seen" if st.last_sample is None else
                                   f"newest sample {iso_time(st.last_sample)}, "
                                   f"{duration_text(st.age_s or 0)} before the audit") for st in result.stale]


def _stale_title(result: AuditResult) -> str:
    n = len(result.stale)
    return (f"{n} host{'s' if n != 1 else ''} sent no sample in the last {result.stale_after} (stale): the audit "
            f"cannot tell whether {'they are' if n != 1 else 'it is'} clean")


def _header(result: AuditResult) -> str:
    return (f"kvmfleet audit of {len(result.hosts)} hosts over the last {result.window} (host regex "
            f"{result.host_regex}) from {result.source}: {result.requests} requests in {result.elapsed_s:.2f}s")


def _summary_line(result: AuditResult) -> str:
    c = Counter(f.severity for f in result.findings)
    stale = f"; {len(result.stale)} stale" if result.stale else ""
    return (f"{c.get('critical', 0)} critical, {c.get('warning', 0)} warning, {c.get('info', 0)} info "
            f"on {len({f.host for f in result.findings})} hosts{stale}")


def _table_findings(result: AuditResult) -> list[str]:
    if not result.findings:
        return ["No findings."]
    hosts = {f.host: _name(f.host) for f in result.findings}
    wh = min(MAX_HOST_COLUMN, max(4, *(len(h) for h in hosts.values())))
    wr = max(4, *(len(f.rule) for f in result.findings))
    lines = [f"{'SEVERITY':<9} {'HOST':<{wh}} {'RULE':<{wr}} SUMMARY"]
    pad = " " * (9 + 1 + wh + 1 + wr + 1)
    for f in result.findings:
        lines.append(f"{f.severity:<9} {hosts[f.host]:<{wh}} {f.rule:<{wr}} {f.summary}")
        lines.append(f"{pad}evidence: {_evidence_text(f.evidence)}")
        if f.vms:
            lines.append(f"{pad}VMs: " + "; ".join(_vm_text(v) for v in f.vms))
        for note in f.notes:
            lines.append(f"{pad}note: {note}")
    return lines


def render_table(result: AuditResult) -> str:
    """The report for a terminal: every line one printable line (names escaped, text from outside too)."""
    lines = [_header(result), ""]
    if result.stale:
        stale = _stale_lines(result)
        lines += [f"Stale: {_stale_title(result)}:"] + [f"  {s}" for s in stale[:MAX_SKIPPED_LINES]]
        if len(stale) > MAX_SKIPPED_LINES:
            lines.append(f"  ... {len(stale) - MAX_SKIPPED_LINES} more (--format json lists them all)")
        lines.append("")
    lines += _table_findings(result)
    if result.top_exit_rate:
        lines += ["", "Top hosts by exit rate:"]
        for t in result.top_exit_rate:
            per = f", {_num(t['exits_per_vcpu_s'])} per vCPU" if t.get("exits_per_vcpu_s") is not None else ""
            lines.append(f"  {_name(t['host'])}: {_num(t['exits_per_s'])} exits/s{per}")
    skipped = _skipped_summary(result)
    if skipped:
        lines += ["", "Not judged:"]
        lines += [f"  {s}" for s in skipped[:MAX_SKIPPED_LINES]]
        if len(skipped) > MAX_SKIPPED_LINES:
            lines.append(f"  ... {len(skipped) - MAX_SKIPPED_LINES} more reasons (--format json lists them all)")
    lines += ["", _summary_line(result)]
    return "\n".join(map(one_line, lines)) + "\n"


def _md(text: Any) -> str:
    """The project's own text (rules.yaml) in a markdown cell or line."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _mdt(text: Any) -> str:
    """Text that may hold words from outside (facts, notes naming VMs, a server's name): one printable line, HTML
    shown as text, cell marks escaped."""
    return html.escape(one_line(text), quote=False).replace("|", "\\|")


def _mdn(name: object) -> str:
    return _name(name, for_markdown)


def _md_finding(result: AuditResult, f: Finding) -> list[str]:
    out = [f"## {_mdn(f.host)}: {f.rule} ({f.severity})", "", _mdt(f.summary), ""]
    out += ["| evidence | value |", "|---|---|"]
    out += [f"| {k} | {_mdt(_num(v))} |" for k, v in f.evidence.items()]
    out.append("")
    if f.vms:
        out.append("VMs: " + "; ".join(_vm_text(v, _mdn, _mdt) for v in f.vms))
        out.append("")
    for note in f.notes:
        out.append(f"- {_mdt(note)}")
    rule = result.rules.get(f.rule)
    if rule:
        out += ["", f"**Why:** {_md(rule.explanation.strip())}", "",
                f"**What to do:** {_md(rule.remedy.strip())}", ""]
    return out


def render_markdown(result: AuditResult) -> str:
    """The report as markdown: names escaped (no markup, no control character), text from outside as text."""
    out = [f"# kvmfleet audit: {_summary_line(result)}", "", _mdt(_header(result)), ""]
    if result.stale:
        out += ["## Stale hosts", "", _mdt(_stale_title(result)) + ":", ""]
        out += [f"- {s}" for s in _stale_lines(result, _mdn)] + [""]
    if result.findings:
        out += ["| severity | host | rule | summary |", "|---|---|---|---|"]
        out += [f"| {f.severity} | {_mdn(f.host)} | {f.rule} | {_mdt(f.summary)} |" for f in result.findings]
        out.append("")
        for f in result.findings:
            out += _md_finding(result, f)
    else:
        out += ["No findings.", ""]
    if result.top_exit_rate:
        out += ["## Top hosts by exit rate", "", "| host | exits/s | exits/s per vCPU |", "|---|---|---|"]
        out += [f"| {_mdn(t['host'])} | {_num(t['exits_per_s'])} | {_num(t.get('exits_per_vcpu_s'))} |"
                for t in result.top_exit_rate]
        out.append("")
    skipped = _skipped_summary(result, for_markdown, _mdt)
    if skipped:
        out += ["## Not judged", ""] + [f"- {s}" for s in skipped] + [""]
    return "\n".join(out)


def render_json(result: AuditResult, fail_on: str | None = None) -> str:
    return json.dumps(to_dict(result, fail_on), indent=2, sort_keys=False) + "\n"


# ------------------------------------------------------------------------------------------------ HTML
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:20px}
header p{margin:0;color:#c6ccd8;font-size:13px}main{padding:18px 28px;max-width:1280px}
table{border-collapse:collapse;background:#fff;margin:8px 0 16px;width:100%}
th,td{border:1px solid #dfe3ea;padding:5px 8px;text-align:left;vertical-align:top}th{background:#eef1f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.sev{display:inline-block;border-radius:10px;padding:1px 9px;font-size:12px;font-weight:600;color:#fff}
.critical{background:#c0392b}.warning{background:#d68910}.info{background:#2e86c1}
.cards{display:flex;gap:12px;margin:6px 0 18px}.card{background:#fff;border:1px solid #dfe3ea;border-radius:8px;
padding:10px 16px;min-width:110px}.card b{display:block;font-size:24px}
section.host{background:#fff;border:1px solid #dfe3ea;border-radius:8px;padding:12px 18px;margin:0 0 18px}
section.host h2{margin:0 0 8px;font-size:17px}.finding{border-top:1px solid #eef1f5;padding-top:8px;margin-top:8px}
.finding h3{font-size:15px;margin:0 0 4px}.charts{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0}
.chart{border:1px solid #eef1f5;border-radius:6px;padding:4px 6px;background:#fbfcfd}
.note{color:#6b4f00;background:#fff6db;border-radius:4px;padding:3px 8px;margin:3px 0}
details{margin:6px 0}summary{cursor:pointer;color:#35506b}small{color:#69707d}
.wide{overflow-x:auto}table.narrow{width:auto;min-width:420px}
"""


def _svg_chart(title: str, points: Sequence[tuple[float, float]], width: int = 300, height: int = 90,
               unit: str = "/s") -> str:
    pad_l, pad_r, pad_t, pad_b = 44, 8, 16, 18
    w, h = width - pad_l - pad_r, height - pad_t - pad_b
    esc = html.escape
    if len(points) < 2:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">'
                f'<text x="4" y="12" font-size="11" fill="#1d2330">{esc(title)}</text>'
                f'<text x="{width // 2}" y="{height // 2 + 6}" font-size="11" fill="#69707d" text-anchor="middle">'
                "not enough samples</text></svg>")
    ts = [p[0] for p in points]
    vs = [p[1] for p in points]
    t0, t1 = min(ts), max(ts)
    vmax = max(vs) or 1.0
    span = (t1 - t0) or 1.0
    coords = " ".join(f"{pad_l + (t - t0) / span * w:.1f},{pad_t + h - (v / vmax) * h:.1f}" for t, v in points)
    area = f"{pad_l:.1f},{pad_t + h:.1f} {coords} {pad_l + w:.1f},{pad_t + h:.1f}"
    mean = sum(vs) / len(vs)

    def hhmm(t: float) -> str:
        return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%H:%M")

    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{esc(title)}">'
        f'<text x="4" y="11" font-size="11" font-weight="600" fill="#1d2330">{esc(title)}</text>'
        f'<text x="{width - 4}" y="11" font-size="10" fill="#69707d" text-anchor="end">'
        f"mean {_short(mean)}{esc(unit)}</text>"
        f'<line x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}" stroke="#c9ced8"/>'
        f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + h}" stroke="#c9ced8"/>'
        f'<text x="{pad_l - 3}" y="{pad_t + 8}" font-size="9" fill="#69707d" text-anchor="end">{_short(vmax)}</text>'
        f'<text x="{pad_l - 3}" y="{pad_t + h}" font-size="9" fill="#69707d" text-anchor="end">0</text>'
        f'<text x="{pad_l}" y="{height - 4}" font-size="9" fill="#69707d">{hhmm(t0)}</text>'
        f'<text x="{pad_l + w}" y="{height - 4}" font-size="9" fill="#69707d" text-anchor="end">{hhmm(t1)} UTC</text>'
        f'<polygon points="{area}" fill="#d6e6f5"/>'
        f'<polyline points="{coords}" fill="none" stroke="#2e6da4" stroke-width="1.4"/>'
        "</svg>"
    )


def _short(v: float) -> str:
    a = abs(v)
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def _sev(s: str) -> str:
    return f'<span class="sev {html.escape(s)}">{html.escape(s)}</span>'


def _h(text: Any) -> str:
    """Text for HTML: shown as text, on one printable line (``cat report.html`` cannot drive a terminal)."""
    return html.escape(one_line(text))


def _html_head(result: AuditResult, fail_on: str | None) -> list[str]:
    esc = _h
    c = Counter(f.severity for f in result.findings)
    return ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>kvmfleet audit: {esc(_summary_line(result))}</title>", f"<style>{_CSS}</style></head><body>",
            f"<header><h1>kvmfleet audit</h1><p>{esc(_header(result))}; generated {iso_time(result.started_at)}"
            + (f"; fails on {esc(fail_on)}" if fail_on else "") + "</p></header><main>",
            '<div class="cards">' + "".join(
                f'<div class="card"><b>{n}</b>{label}</div>' for n, label in (
                    (len(result.hosts), "hosts"), (c.get("critical", 0), _sev("critical")),
                    (c.get("warning", 0), _sev("warning")), (c.get("info", 0), _sev("info")),
                    (len({f.host for f in result.findings}), "hosts with findings"),
                    *(((len(result.stale), "stale hosts"),) if result.stale else ()))) + "</div>"]


def _html_tables(result: AuditResult) -> list[str]:
    """The summary of the findings and the top hosts by exit rate."""
    esc = _h
    parts = []
    if result.findings:
        parts.append("<h2>Summary</h2><table><tr><th>severity</th><th>host</th><th>rule</th><th>summary</th></tr>")
        for f in result.findings:
            parts.append(f'<tr><td>{_sev(f.severity)}</td><td><a href="#host-{esc(_anchor(f.host))}">'
                         f"{esc(_name(f.host))}</a></td><td>{esc(f.rule)}</td><td>{esc(f.summary)}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p>No findings.</p>")
    if result.top_exit_rate:
        parts.append("<h2>Top hosts by exit rate</h2><table><tr><th>host</th><th>exits/s</th>"
                     "<th>exits/s per vCPU</th><th>vCPUs</th></tr>")
        for t in result.top_exit_rate:
            parts.append(f"<tr><td>{esc(_name(t['host']))}</td><td class=num>{esc(_num(t['exits_per_s']))}</td>"
                         f"<td class=num>{esc(_num(t.get('exits_per_vcpu_s')))}</td>"
                         f"<td class=num>{esc(_num(t.get('vcpus')))}</td></tr>")
        parts.append("</table>")
    return parts


def _html_finding(result: AuditResult, f: Finding, charts: dict[str, list[tuple[float, float]]]) -> list[str]:
    esc = _h
    parts = [f'<div class="finding"><h3>{_sev(f.severity)} {esc(f.rule)}: {esc(f.title)}</h3><p>{esc(f.summary)}</p>']
    drawn = [name for name in f.counters if name in charts]
    if drawn:
        parts.append('<div class="charts">' + "".join(
            f'<div class="chart">{_svg_chart(name + " /s", charts[name])}</div>' for name in drawn) + "</div>")
    elif result.charts is not None and f.counters and charts == {}:
        parts.append("<p><small>(no per-sample series for charts)</small></p>")
    parts.append('<table class="narrow"><tr><th>evidence</th><th>value</th></tr>' + "".join(
        f"<tr><td>{esc(k)}</td><td class=num>{esc(_num(v))}</td></tr>" for k, v in f.evidence.items()) + "</table>")
    if f.vms:
        cols = sorted({k for v in f.vms for k in v if k != "vm"})
        parts.append('<div class="wide"><table><tr><th>VM</th>' + "".join(f"<th>{esc(k)}</th>" for k in cols)
                     + "</tr>")
        for v in f.vms:
            parts.append(f"<tr><td>{esc(_name(v['vm']))}</td>" + "".join(
                f"<td class=num>{esc(_num(v.get(k)) if k in v else '')}</td>" for k in cols) + "</tr>")
        parts.append("</table></div>")
    parts += [f'<div class="note">{esc(note)}</div>' for note in f.notes]
    rule = result.rules.get(f.rule)
    if rule:
        parts.append(f"<details><summary>Why, and what to do</summary><p>{html.escape(rule.explanation.strip())}</p>"
                     f"<p><b>What to do:</b> {html.escape(rule.remedy.strip())}</p></details>")
    parts.append("</div>")
    return parts


def _html_hosts(result: AuditResult) -> list[str]:
    """A section per host with findings, the most severe first."""
    by_host: dict[str, list[Finding]] = {}
    for f in result.findings:
        by_host.setdefault(f.host, []).append(f)
    parts = ["<h2>Hosts with findings</h2>"] if by_host else []
    for host in sorted(by_host, key=lambda h: (-max(severity_rank(f.severity) for f in by_host[h]), h)):
        parts.append(f'<section class="host" id="host-{_h(_anchor(host))}"><h2>{_h(_name(host))}</h2>')
        for f in by_host[host]:
            parts += _html_finding(result, f, result.charts.get(host, {}))
        parts.append("</section>")
    return parts


def render_html(result: AuditResult, fail_on: str | None = None) -> str:
    esc = _h
    parts = [*_html_head(result, fail_on)]
    if result.stale:
        parts.append(f'<h2>Stale hosts</h2><div class="note">{esc(_stale_title(result))}</div><ul>'
                     + "".join(f"<li>{esc(s)}</li>" for s in _stale_lines(result)) + "</ul>")
    parts += [*_html_tables(result), *_html_hosts(result)]
    skipped = _skipped_summary(result)
    if skipped:
        parts.append("<h2>Not judged</h2><ul>" + "".join(f"<li>{esc(s)}</li>" for s in skipped) + "</ul>")
    parts.append(f"<p><small>kvmfleet {esc(__version__)}; queries: "
                 + esc(", ".join(f"{q['query']} ({q['hosts']} hosts)" for q in result.queries)) + "</small></p>")
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


def _anchor(host: str) -> str:
    """An id for the host's section: word characters only; a long name cut and told apart by its hash."""
    text = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in host)
    if len(text) <= MAX_ANCHOR:
        return text
    return text[:MAX_ANCHOR] + "-" + hashlib.sha256(host.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def render(result: AuditResult, fmt: str, fail_on: str | None = None) -> str:
    if fmt == "json":
        return render_json(result, fail_on)
    if fmt == "markdown":
        return render_markdown(result)
    if fmt == "html":
        return render_html(result, fail_on)
    return render_table(result)
