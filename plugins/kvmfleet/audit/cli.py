"""Arguments and bodies of ``kvmfleet audit``, ``kvmfleet queries`` and ``kvmfleet explain``.

Exit status of ``audit``: 0 when every host reported and no finding is at or above ``--fail-on``, 1 when there is
one, 2 when the audit cannot tell (bad arguments, InfluxDB unreachable or misbehaving, a query refused, an answer
it cannot read, no data, a stale host, findings that ``--write-findings`` could not write) with one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

from ..querypack import (
    PackError,
    QueryParams,
    duration_seconds,
    explain_text,
    find_counter,
    get_query,
    load_counters,
    load_queries,
    load_rules,
)
from ..replacefile import replace_file
from ..severity import SEVERITIES
from ..textsafe import one_line
from .findings import add_write_findings_args, write_findings, write_findings_problem

if TYPE_CHECKING:
    from .capacity import CapacityResult
    from .client import Connection
    from .engine import AuditResult

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2


def _err(prog: str, message: str) -> int:
    """One line on stderr, whatever the message holds (a server's words, a host name), and exit status 2."""
    print(one_line(f"kvmfleet {prog}: error: {message}"), file=sys.stderr)
    return EXIT_ERROR


# ------------------------------------------------------------------------------------------------ audit
def add_connection_args(p: argparse.ArgumentParser, window: str) -> None:
    """What every command reading the fleet's InfluxDB takes: where, as whom, over what window, which hosts,
    in which format."""
    p.add_argument("--url", required=True, help="InfluxDB base URL, http(s)://host:port[/path] (no credentials)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--database", metavar="DB", help="InfluxDB 1.x database (or a 3.x database)")
    where.add_argument("--bucket", metavar="B", help="InfluxDB 2.x bucket, queried through /query with its DBRP "
                                                     "mapping (the bucket name as database)")
    p.add_argument("--retention-policy", metavar="RP", help="retention policy (default: the database's default)")
    p.add_argument("--org", metavar="O", help="InfluxDB 2.x organization (with --bucket)")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--token-file", metavar="F", help="file holding an API token alone on one line (2.x/3.x)")
    auth.add_argument("--username", metavar="U", help="InfluxDB 1.x user (with --password-file)")
    p.add_argument("--password-file", metavar="F", help="file holding the password of --username")
    p.add_argument("--window", default=window, help=f"how far back to look: an InfluxQL duration (default {window})")
    p.add_argument("--host-regex", default=".*", metavar="RE", help="only hosts whose name matches (default all)")
    p.add_argument("--format", choices=("table", "json", "markdown", "html"), default="table")
    p.add_argument("--output", "-o", metavar="FILE", help="write the report to FILE instead of stdout")
    p.add_argument("--ca-file", metavar="F", help="PEM bundle to verify the server's certificate with")
    p.add_argument("--no-verify-tls", action="store_true", help="do not verify the server's certificate (unsafe)")
    p.add_argument("--allow-plain-http", action="store_true",
                   help="send the token or password to an http:// URL on another machine, unencrypted (refused "
                        "otherwise; https:// and loopback need no such permission)")
    p.add_argument("--stale-after", default="5m", metavar="DURATION",
                   help="a host whose newest sample is older is stale: the audit then exits 2, as it cannot tell "
                        "whether that host is clean (default 5m; an InfluxQL duration)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="the most one request may take, connect to last byte (default 60)")
    p.add_argument("--parallel", type=int, default=4, metavar="N", help="requests in flight at once (default 4)")
    add_write_findings_args(p)


def add_audit_args(p: argparse.ArgumentParser) -> None:
    add_connection_args(p, window="1h")
    p.add_argument("--fail-on", choices=("warning", "critical"), default="warning",
                   help="exit 1 when a finding is at least this severe (default warning)")
    p.add_argument("--rules", metavar="ID[,ID...]", help="only these rules (default all; kvmfleet queries --rules "
                                                          "lists them)")
    p.add_argument("--thresholds", action="append", default=[], metavar="FILE",
                   help="YAML file of threshold overrides, {rule-id: {key: value}} (repeatable)")
    p.add_argument("--set", action="append", default=[], dest="set_thresholds", metavar="RULE.KEY=VALUE",
                   help="override one threshold (repeatable), e.g. shadow-paging.warning_per_exit=0.01")


def run_audit_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """The audit and its exit status: 1 means findings and nothing else; whatever keeps the audit from telling
    (an error, no data, a stale host, an answer it cannot read, even a bug) is 2 with one line on stderr."""
    return _guarded("audit", _audit, args, out or sys.stdout)


def _guarded(prog: str, body: Callable[[argparse.Namespace, TextIO], int], args: argparse.Namespace,
             out: TextIO) -> int:
    """``body``'s exit status; whatever keeps it from telling (an error, an answer it cannot read, even a bug) is
    2 with one line on stderr, never "nothing found"."""
    from .client import AuditError

    try:
        return body(args, out)
    except (PackError, AuditError) as e:
        return _err(prog, str(e))
    except OSError as e:
        return _err(prog, f"{e.filename or ''}: {e.strerror or e}")
    except Exception as e:  # a bug, or data no check foresaw: "could not tell"
        return _err(prog, f"internal error, please report it: {_raised_at(e)}")


def _audit(args: argparse.Namespace, out: TextIO) -> int:
    from .client import InfluxQLClient
    from .engine import AuditOptions, run_audit
    from .report import render

    problem = _audit_args_problem(args)
    if problem:
        return _err("audit", problem)
    rules = load_rules(args.thresholds, args.set_thresholds)
    only = [r.strip() for r in args.rules.split(",") if r.strip()] if args.rules else None
    unknown = [r for r in only or [] if r not in rules]
    if unknown:
        return _err("audit", f"unknown rule(s) {', '.join(unknown)}; known: {', '.join(rules)}")
    conn = _connection(args)
    client = InfluxQLClient(conn)
    try:
        options = AuditOptions(window=args.window, host_regex=args.host_regex, retention_policy=args.retention_policy,
                               rules=rules, only=only, charts=args.format == "html", parallel=args.parallel,
                               stale_after=args.stale_after)
        result = run_audit(client, options, source=conn.describe())
    finally:
        client.close()
    _publish(args, out, "audit", render(result, args.format, args.fail_on), result)
    return _verdict(result, args)


def _publish(args: argparse.Namespace, out: TextIO, command: str, text: str,
             result: AuditResult | CapacityResult) -> None:
    """The report to ``--output`` or ``out``; then, with ``--write-findings``, its findings to InfluxDB (after the
    report: a failed write leaves it printed, and exits 2; a finding that clears is simply not written again)."""
    if args.output:
        replace_file(args.output, text.encode("utf-8"))
    else:
        out.write(text)
        out.flush()
    write_findings(args, command, result.findings, result.started_at, hosts=len(result.hosts),
                   elapsed_s=result.elapsed_s, stale_hosts=len(result.stale))


def _audit_args_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, before anything is read or asked."""
    pairs = ((args.bucket and not args.org, "--bucket needs --org"),
             (args.org and not args.bucket, "--org goes with --bucket (InfluxDB 2.x); use --database for 1.x"),
             (args.username and not args.password_file,
              "--username needs --password-file (secrets are read from files only)"),
             (args.password_file and not args.username, "--password-file needs --username"),
             (args.parallel < 1, "--parallel must be at least 1"),
             (args.timeout <= 0, "--timeout must be > 0"))
    for wrong, message in pairs:
        if wrong:
            return message
    problem = write_findings_problem(args)
    if problem:
        return problem
    try:
        duration_seconds(args.stale_after)
    except PackError as e:
        return f"--stale-after: {e}"
    return None


def _connection(args: argparse.Namespace) -> Connection:
    from .client import AuditError, Connection, read_secret_file

    token = read_secret_file(args.token_file, "--token-file") if args.token_file else None
    password = read_secret_file(args.password_file, "--password-file") if args.password_file else None
    conn = Connection(url=args.url, database=args.database, retention_policy=args.retention_policy,
                      bucket=args.bucket, org=args.org, token=token, username=args.username, password=password,
                      ca_file=args.ca_file, verify_tls=not args.no_verify_tls,
                      allow_plain_http=args.allow_plain_http, timeout=args.timeout)
    if args.ca_file and not os.path.isfile(args.ca_file):
        raise AuditError(f"--ca-file {args.ca_file!r} does not exist")
    return conn


def _verdict(result: AuditResult, args: argparse.Namespace) -> int:
    """The exit status, and the one line on stderr that says it when there is something to say."""
    from .report import names_text

    c = result.count("critical")
    counts = f"{c} critical, {result.count('warning') - c} warning"
    written = f"report written to {args.output}" if args.output else ""
    if result.stale:
        n, hosts = len(result.stale), len(result.hosts)
        return _err("audit", f"{n} of {hosts} host{'s' if hosts != 1 else ''} stale (no sample in the last "
                             f"{result.stale_after}): {names_text([st.host for st in result.stale], cut=60)}: the "
                             f"audit cannot tell whether {'they are' if n != 1 else 'it is'} clean ({counts} "
                             f"found{'; ' + written if written else ''})")
    if written:
        print(one_line(f"kvmfleet audit: {written}: {counts}"), file=sys.stderr)
    return EXIT_FINDINGS if result.count(args.fail_on) else EXIT_OK


def _raised_at(e: BaseException) -> str:
    """``e`` and where it was raised, for one line a developer can act on."""
    frames = traceback.extract_tb(e.__traceback__)
    at = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    return f"{type(e).__name__}: {e}{at}"


# ------------------------------------------------------------------------------------------------ capacity
def add_capacity_args(p: argparse.ArgumentParser) -> None:
    from .capacity import FAIL_ON, LIMITS

    add_connection_args(p, window="24h")
    known = "; ".join(f"{name} ({doc}; default {'off' if default is None else f'{default:g}'})"
                      for name, (default, doc) in LIMITS.items())
    p.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                   help=f"a limit to judge and forecast (repeatable): {known}")
    p.add_argument("--horizon", type=float, default=30.0, metavar="DAYS",
                   help="a limit forecast to be crossed within this many days is a warning (default 30)")
    p.add_argument("--place", type=int, default=0, metavar="N",
                   help="where N more vCPUs would go: the hosts with the most room, none past its limit")
    p.add_argument("--fail-on", choices=FAIL_ON, default=None,
                   help="exit 1 when a limit is crossed, or (forecast) also when one is forecast to be crossed "
                        "within --horizon days (default: exit 0 whatever the figures)")


def run_capacity_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """The capacity report; exit 0, 1 with ``--fail-on`` and a limit crossed (or forecast), 2 when it cannot
    tell (an error, no data, a stale host or one without the facts capacity needs)."""
    return _guarded("capacity", _capacity, args, out or sys.stdout)


def _capacity(args: argparse.Namespace, out: TextIO) -> int:
    from .capacity import CapacityOptions, parse_limits, run_capacity
    from .capacity_report import render
    from .client import InfluxQLClient
    from .report import names_text

    problem = _audit_args_problem(args) or (
        "--horizon must be >= 0" if args.horizon < 0 else "--place must be >= 0" if args.place < 0 else None)
    if problem:
        return _err("capacity", problem)
    options = CapacityOptions(window=args.window, host_regex=args.host_regex, retention_policy=args.retention_policy,
                              limits=parse_limits(args.limit), horizon_days=args.horizon, place=args.place,
                              parallel=args.parallel, stale_after=args.stale_after, charts=args.format == "html")
    conn = _connection(args)
    client = InfluxQLClient(conn)
    try:
        result = run_capacity(client, options, source=conn.describe())
    finally:
        client.close()
    _publish(args, out, "capacity", render(result, args.format, args.fail_on), result)
    if result.stale or result.missing:
        why = [f"{len(result.stale)} stale (no sample in the last {result.stale_after}): "
               f"{names_text([s.host for s in result.stale], cut=60)}"] if result.stale else []
        why += [f"{len(result.missing)} without the data capacity needs: "
                f"{names_text([m.host for m in result.missing], cut=60)} ({result.missing[0].reason})"] \
            if result.missing else []
        return _err("capacity", f"of {len(result.hosts)} hosts, {'; '.join(why)}: cannot tell whether they are "
                                f"within their limits")
    crossed = result.crossed(args.fail_on) if args.fail_on else []
    if args.output or crossed:
        print(one_line(f"kvmfleet capacity: {len(result.findings)} limit(s) crossed or forecast"
                       + (f"; report written to {args.output}" if args.output else "")), file=sys.stderr)
    return EXIT_FINDINGS if crossed else EXIT_OK


# ------------------------------------------------------------------------------------------------ queries
def add_queries_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="one query of the pack (default: all of them)")
    p.add_argument("--window", default="1h", help="InfluxQL duration for ${window} (default 1h)")
    p.add_argument("--host-regex", default=".*", metavar="RE", help="regex for ${host_regex} (default .*)")
    p.add_argument("--retention-policy", metavar="RP", help="qualify measurements with this retention policy")
    p.add_argument("--interval", help="GROUP BY time() bucket for ${interval} (default: window/60, >= 10s)")
    p.add_argument("--list", action="store_true", help="names and titles only")
    p.add_argument("--rules", action="store_true", help="the rules, their queries and thresholds")
    p.add_argument("--thresholds", action="append", default=[], metavar="FILE",
                   help="with --rules: show the thresholds after these overrides")
    p.add_argument("--no-comments", action="store_true", help="statements only, without the explanations")
    p.add_argument("--wrapped", action="store_true",
                   help="statements over several lines, for reading (the influx shell runs one line at a time: "
                        "by default each statement is on one line)")


def run_queries_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        if args.rules:
            rules = load_rules(args.thresholds)
            for rule in rules.values():
                out.write(f"{rule.id} ({rule.severity} at most): {rule.title}\n")
                out.write(f"  queries: {', '.join(rule.queries)}\n")
                for k, v in rule.thresholds.items():
                    mark = "  (overridden)" if k in rule.overridden else ""
                    out.write(f"  {k} = {v:g}{mark}\n")
                out.write("\n")
            return EXIT_OK
        queries = load_queries()
        if args.list:
            width = max(len(n) for n in queries)
            for q in queries.values():
                out.write(f"{q.name:<{width}}  {q.stage:<6}  {q.title}\n")
            return EXIT_OK
        params = QueryParams(window=args.window, host_regex=args.host_regex,
                             retention_policy=args.retention_policy, interval=args.interval)
        chosen = [get_query(args.name)] if args.name else list(queries.values())
        if not args.wrapped:
            # no blank line between queries: `influx -execute` stops at one ("empty input")
            out.write("\n".join(q.render(params, comments=not args.no_comments) for q in chosen) + "\n")
            return EXIT_OK
        texts = []
        for q in chosen:
            text = q.render(params, comments=not args.no_comments, wrapped=True).rstrip()
            texts.append(text if text.endswith(";") or len(chosen) == 1 else text + ";")
        out.write("\n\n".join(texts) + "\n")
    except PackError as e:
        return _err("queries", str(e))
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ explain
def add_explain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("counter", nargs="?", help="a KVM counter (exits, mmu_pte_write, ...) or an audit rule id")
    p.add_argument("--list", action="store_true", help="every counter with notes")


def run_explain_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        if args.list or not args.counter:
            if not args.list:
                return _err("explain", "name a counter (kvmfleet explain --list shows them)")
            for doc in load_counters().values():
                old = f" (old: {', '.join(doc.old)})" if doc.old else ""
                out.write(f"{doc.name}{old}: {textwrap.shorten(doc.counts, 90)}\n")
            return EXIT_OK
        rules = load_rules()
        if args.counter in rules:
            rule = rules[args.counter]
            out.write(f"{rule.id}: {rule.title} ({rule.severity} at most)\n\n")
            out.write(textwrap.fill(" ".join(rule.explanation.split()), 100) + "\n\n")
            out.write(textwrap.fill("What to do: " + " ".join(rule.remedy.split()), 100) + "\n")
            if rule.thresholds:
                out.write("\nThresholds: " + ", ".join(f"{k}={v:g}" for k, v in rule.thresholds.items()) + "\n")
            return EXIT_OK
        out.write(explain_text(find_counter(args.counter)) + "\n")
    except PackError as e:
        return _err("explain", str(e))
    return EXIT_OK


__all__ = [
    "EXIT_ERROR", "EXIT_FINDINGS", "EXIT_OK", "SEVERITIES", "add_audit_args", "add_capacity_args",
    "add_connection_args", "add_explain_args", "add_queries_args", "run_audit_command", "run_capacity_command",
    "run_explain_command", "run_queries_command",
]
