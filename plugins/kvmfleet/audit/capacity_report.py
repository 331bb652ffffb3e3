"""The outputs of ``kvmfleet capacity``: a text table, JSON (the names scripts read), Markdown and HTML with the
charts the audit report draws."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .. import __version__
from ..textsafe import for_markdown, for_terminal
from .capacity import CapacityResult, HostCapacity, round_figures
from .model import iso_time
from .report import _CSS, _anchor, _h, _name, _sev, _svg_chart, names_text

# The per-host table: (heading, attribute, format). Every format shows "-" for None.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("vms", "vms", "{:.0f}"), ("vcpus", "vcpus", "{:.0f}"), ("cpus", "cpus", "{:.0f}"),
    ("vcpu/cpu", "vcpus_per_cpu", "{:.2f}"), ("peak", "vcpus_per_cpu_peak", "{:.2f}"),
    ("poll cpus", "halt_poll_cpus", "{:.3g}"), ("exits/s", "exits_per_s", "{:,.0f}"),
    ("exits/s/cpu", "exits_per_s_per_cpu", "{:,.0f}"), ("vcpus/day", "vcpus_per_day", "{:+.3g}"),
    ("days to limit", "days_to_limit", "{:.1f}"), ("room", "headroom_vcpus", "{:d}"),
    ("mapped mem", "mem_mapped_share", "{:.0%}"),
)


def _cell(h: HostCapacity | dict[str, Any], attr: str, fmt: str) -> str:
    v = h.get(attr) if isinstance(h, dict) else getattr(h, attr)
    return "-" if v is None else fmt.format(v)


def to_dict(result: CapacityResult, fail_on: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "hosts": [h.to_dict() for h in result.hosts],
        "fleet": round_figures(result.fleet),
        "findings": [f.to_dict() for f in result.findings],
        "missing": [m.to_dict() for m in result.missing],
        "stale": [s.to_dict() for s in result.stale],
        "limits": result.limits,
        "horizon_days": result.horizon_days,
        "window": result.window,
        "host_regex": result.host_regex,
        "source": result.source,
        "stale_after": result.stale_after,
        "queries": result.queries,
        "requests": result.requests,
        "elapsed_s": round(result.elapsed_s, 3),
        "generated_at": iso_time(result.started_at),
        "kvmfleet": __version__,
    }
    if fail_on:
        out["fail_on"] = fail_on
    return out


def render_json(result: CapacityResult, fail_on: str | None = None) -> str:
    return json.dumps(to_dict(result, fail_on), indent=2) + "\n"


def _header(result: CapacityResult) -> str:
    limits = ", ".join(f"{k} {v:g}" for k, v in result.limits.items())
    return (f"{len(result.hosts)} host(s), window {result.window}, limits: {limits}, horizon "
            f"{result.horizon_days:g} days; source {result.source}")


def _fleet_lines(result: CapacityResult, name: Callable[[object], str]) -> list[str]:
    f = result.fleet
    out = [f"fleet: {_cell(f, 'vms', '{:.0f}')} VMs, {_cell(f, 'vcpus', '{:.0f}')} vCPUs on "
           f"{_cell(f, 'cpus', '{:.0f}')} CPUs ({_cell(f, 'vcpus_per_cpu', '{:.2f}')} per CPU), "
           f"{_cell(f, 'exits_per_s', '{:,.0f}')} exits/s, {_cell(f, 'halt_poll_cpus', '{:.3g}')} CPUs polling "
           f"({_cell(f, 'halt_poll_fail_cpus', '{:.3g}')} of them failed polling), growth "
           f"{_cell(f, 'vcpus_per_day', '{:+.3g}')} vCPUs/day, room for {_cell(f, 'headroom_vcpus', '{:.0f}')} "
           "more vCPUs within the limit"]
    for attr, sp in (f.get("imbalance") or {}).items():
        if sp:
            out.append(f"imbalance of {attr}: min {sp['min']:.3g}, mean {sp['mean']:.3g}, max {sp['max']:.3g} "
                       f"(max/mean {sp['max_over_mean']:.2f}, coefficient of variation {sp['cv']:.2f})")
    if f.get("most_headroom"):
        out.append("most headroom: " + ", ".join(f"{name(r['host'])} ({r['headroom_vcpus']} vCPUs)"
                                                 for r in f["most_headroom"][:5]))
    if f.get("exit_heavy_vms"):
        out.append("exit-heavy VMs: " + ", ".join(f"{name(r['vm'])} on {name(r['host'])} "
                                                  f"({r['exits_per_s']:,.0f}/s)" for r in f["exit_heavy_vms"][:5]))
    if "place" in f:
        p = f["place"]
        where = ", ".join(f"{name(r['host'])} +{r['vcpus']}" for r in p["placed"][:20])
        more = f" and {len(p['placed']) - 20} more hosts" if len(p["placed"]) > 20 else ""
        left = f"; {p['unplaced']} do not fit anywhere within the limit" if p["unplaced"] else ""
        out.append(f"placing {p['vcpus']} vCPUs: {where or 'nowhere'}{more}{left}")
    return out


def _problems(result: CapacityResult, name: Callable[[object], str]) -> list[str]:
    out = []
    if result.stale:
        out.append(f"stale (no sample in the last {result.stale_after}): "
                   + names_text([s.host for s in result.stale], escape=name))
    out += [f"cannot judge {name(m.host)}: {m.reason}" for m in result.missing]
    return out


def render_table(result: CapacityResult) -> str:
    name = for_terminal
    width = min(40, max([4] + [len(name(h.host)) for h in result.hosts]))
    rows = [["host", *(c[0] for c in COLUMNS)]]
    rows += [[name(h.host)[:width], *(_cell(h, attr, fmt) for _, attr, fmt in COLUMNS)] for h in result.hosts]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"kvmfleet capacity: {_header(result)}", ""]
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    lines.append("")
    lines += _fleet_lines(result, name)
    if result.findings:
        lines += ["", "limits:"] + [f"  {f.severity:<8} {name(f.host)}: {f.summary}" for f in result.findings]
    problems = _problems(result, name)
    if problems:
        lines += ["", *problems]
    notes = [(h.host, n) for h in result.hosts for n in h.notes if not n.startswith("stale")]
    if notes:
        lines += ["", "notes:"] + [f"  {name(host)}: {n}" for host, n in notes[:40]]
        if len(notes) > 40:
            lines.append(f"  ... and {len(notes) - 40} more (--format json lists them all)")
    return "\n".join(lines) + "\n"


def render_markdown(result: CapacityResult) -> str:
    def name(text: object) -> str:
        return for_markdown(text)

    lines = ["# kvmfleet capacity", "", for_markdown(_header(result)), "",
             "| host | " + " | ".join(c[0] for c in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    lines += ["| " + name(_name(h.host, for_markdown)) + " | "
              + " | ".join(_cell(h, attr, fmt) for _, attr, fmt in COLUMNS) + " |" for h in result.hosts]
    lines += ["", "## Fleet", ""] + [f"- {line}" for line in _fleet_lines(result, name)]
    if result.findings:
        lines += ["", "## Limits", ""] + [f"- **{f.severity}** {name(f.host)}: {for_markdown(f.summary)}"
                                          for f in result.findings]
    problems = _problems(result, name)
    if problems:
        lines += ["", "## Cannot judge", ""] + [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n"


def _html_charts(charts: Mapping[str, Sequence[tuple[float, float]]]) -> str:
    return '<div class="charts">' + "".join(
        f'<div class="chart">{_svg_chart(title, pts, unit="" if title == "vcpus" else "/s")}</div>'
        for title, pts in charts.items()) + "</div>"


def render_html(result: CapacityResult, fail_on: str | None = None) -> str:
    esc = _h
    f = result.fleet
    cards = ((f.get("hosts", 0), "hosts"), (_cell(f, "vcpus", "{:.0f}"), "vCPUs"), (_cell(f, "cpus", "{:.0f}"),
             "CPUs"), (_cell(f, "vcpus_per_cpu", "{:.2f}"), "vCPUs per CPU"),
             (_cell(f, "halt_poll_cpus", "{:.3g}"), "CPUs polling"), (len(result.findings), "limits"))
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>kvmfleet capacity: {esc(_header(result))}</title><style>{_CSS}</style></head><body>",
             f"<header><h1>kvmfleet capacity</h1><p>{esc(_header(result))}; generated "
             f"{iso_time(result.started_at)}" + (f"; fails on {esc(fail_on)}" if fail_on else "")
             + "</p></header><main>",
             '<div class="cards">' + "".join(f'<div class="card"><b>{esc(n)}</b>{esc(label)}</div>'
                                             for n, label in cards) + "</div>"]
    problems = _problems(result, str)
    if problems:
        parts.append("<h2>Cannot judge</h2><ul>" + "".join(f"<li>{esc(p)}</li>" for p in problems) + "</ul>")
    if result.findings:
        parts.append("<h2>Limits</h2><table><tr><th>severity</th><th>host</th><th>summary</th></tr>")
        parts += [f'<tr><td>{_sev(x.severity)}</td><td><a href="#host-{esc(_anchor(x.host))}">{esc(_name(x.host))}'
                  f"</a></td><td>{esc(x.summary)}</td></tr>" for x in result.findings]
        parts.append("</table>")
    parts.append("<h2>Fleet</h2><ul>" + "".join(f"<li>{esc(line)}</li>" for line in _fleet_lines(result, str))
                 + "</ul>")
    parts.append('<h2>Hosts</h2><div class="wide"><table><tr><th>host</th>'
                 + "".join(f"<th>{esc(c[0])}</th>" for c in COLUMNS) + "</tr>")
    parts += ["<tr><td>" + esc(_name(h.host)) + "</td>"
              + "".join(f'<td class="num">{esc(_cell(h, attr, fmt))}</td>' for _, attr, fmt in COLUMNS) + "</tr>"
              for h in result.hosts]
    parts.append("</table></div>")
    by_name = {h.host: h for h in result.hosts}
    for host, charts in result.charts.items():
        h = by_name[host]
        parts.append(f'<section class="host" id="host-{esc(_anchor(host))}"><h2>{esc(_name(host))}</h2>'
                     + _html_charts(charts)
                     + "".join(f'<div class="note">{esc(n)}</div>' for n in h.notes) + "</section>")
    parts.append(f"<p><small>kvmfleet {esc(__version__)}; queries: "
                 + esc(", ".join(f"{q['query']} ({q['hosts']} hosts)" for q in result.queries)) + "</small></p>")
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


def render(result: CapacityResult, fmt: str, fail_on: str | None = None) -> str:
    if fmt == "json":
        return render_json(result, fail_on)
    if fmt == "markdown":
        return render_markdown(result)
    if fmt == "html":
        return render_html(result, fail_on)
    return render_table(result)


__all__ = ["COLUMNS", "render", "render_html", "render_json", "render_markdown", "render_table", "to_dict"]
