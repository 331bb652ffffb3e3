"""Findings written back to InfluxDB (``--write-findings``), so that dashboards and alerting can read them.

Each run writes one ``kvmfleet_finding`` point per current finding, all with the run's timestamp, and one
``kvmfleet_audit_run`` point that says the run happened and how many findings it had (0 included): a finding that
clears is simply not written again, and a dashboard tells "no finding" from "no run" by the run point.

The write target may differ from the one read (its own database and a user allowed to write only there); the
secrets come from files, TLS is verified unless switched off. Any command that produces :class:`Finding` objects
(``kvmfleet audit``, ``kvmfleet capacity``) adds :func:`add_write_findings_args` to its parser and calls
:func:`write_findings` after its report.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..schema import F_SUMMARY, M_AUDIT_RUN, M_FINDING, T_COMMAND, T_HOST, T_RULE, T_SEVERITY
from ..ship.lineproto import FieldValue, encode_point
from .client import AuditError

if TYPE_CHECKING:  # the model loads the query pack: not at every start of the command line
    from .model import Finding

DEFAULT_FINDINGS_DATABASE = "kvmfleet_findings"
NAME_SEPARATOR = "_"  # nested evidence {"a": {"b": 1}} becomes the field a_b


class FindingsWriteError(AuditError):
    """The findings could not be written (bad options, an unreadable secret file, a refused or failed write)."""


# ------------------------------------------------------------------------------------------------ lines
def evidence_fields(evidence: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric evidence as float fields with stable names: nested mappings flattened (``a_b``); booleans,
    strings, lists, None and non-finite numbers left out. Floats always, so that a figure that is an int in one
    run and a float in the next never makes a field type conflict."""
    out: dict[str, float] = {}
    for key, value in evidence.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(evidence_fields(value, name + NAME_SEPARATOR))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    out.pop(F_SUMMARY, None)  # the summary field is the finding's own text
    return out


def finding_lines(findings: Sequence[Finding], ts: float) -> list[str]:
    """One ``kvmfleet_finding`` line per finding, all stamped ``ts`` (unix seconds, kept whole: a run's points
    share one time a query can select)."""
    ts_ns = int(ts) * 10**9
    lines = []
    for f in findings:
        fields: dict[str, FieldValue | None] = {**evidence_fields(f.evidence), F_SUMMARY: f.summary}
        lines.append(encode_point(M_FINDING, {T_HOST: f.host, T_RULE: f.rule, T_SEVERITY: f.severity}, fields, ts_ns))
    return lines


def run_line(command: str, findings: Sequence[Finding], ts: float, hosts: int, elapsed_s: float,
             stale_hosts: int = 0) -> str:
    """The ``kvmfleet_audit_run`` line of one run: written even when there is no finding."""
    fields: dict[str, FieldValue | None] = {
        "findings": len(findings),
        "critical": sum(1 for f in findings if f.severity == "critical"),
        "warning": sum(1 for f in findings if f.severity == "warning"),
        "hosts": hosts,
        "stale_hosts": stale_hosts,
        "elapsed_s": float(elapsed_s),
    }
    return encode_point(M_AUDIT_RUN, {T_COMMAND: command}, fields, int(ts) * 10**9)


# ------------------------------------------------------------------------------------------------ options
def add_write_findings_args(p: argparse.ArgumentParser) -> None:
    """The ``--write-*`` options. TLS (``--ca-file``, ``--no-verify-tls``), ``--allow-plain-http`` and
    ``--timeout`` are the command's own, for both the read and the write."""
    g = p.add_argument_group("writing the findings back (--write-findings)")
    g.add_argument("--write-findings", action="store_true",
                   help=f"after the report, write each finding as a {M_FINDING} point and the run as a "
                        f"{M_AUDIT_RUN} point (a failed write exits 2)")
    g.add_argument("--write-url", metavar="URL", help="InfluxDB to write to (default: --url)")
    where = g.add_mutually_exclusive_group()
    where.add_argument("--write-database", metavar="DB",
                       help=f"InfluxDB 1.x database for the findings (default {DEFAULT_FINDINGS_DATABASE})")
    where.add_argument("--write-bucket", metavar="B", help="InfluxDB 2.x bucket for the findings (with --write-org)")
    g.add_argument("--write-retention-policy", metavar="RP", help="retention policy (default: the database's)")
    g.add_argument("--write-org", metavar="O", help="InfluxDB 2.x organization (with --write-bucket)")
    auth = g.add_mutually_exclusive_group()
    auth.add_argument("--write-token-file", metavar="F", help="file holding the write token alone on one line")
    auth.add_argument("--write-username", metavar="U",
                      help="InfluxDB 1.x user allowed to write the findings database (with --write-password-file); "
                           "the read credentials are never used to write")
    g.add_argument("--write-password-file", metavar="F", help="file holding the password of --write-username")


def write_findings_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the ``--write-*`` options (None if nothing, or if --write-findings is off): for a
    command to check before it runs (``write_findings`` checks again)."""
    if not getattr(args, "write_findings", False):
        return None
    pairs = ((args.write_bucket and not args.write_org, "--write-bucket needs --write-org"),
             (args.write_org and not args.write_bucket, "--write-org goes with --write-bucket"),
             (args.write_username and not args.write_password_file,
              "--write-username needs --write-password-file (secrets are read from files only)"),
             (args.write_password_file and not args.write_username, "--write-password-file needs --write-username"),
             (args.write_bucket and (args.write_username or args.write_retention_policy),
              "--write-bucket (InfluxDB 2.x) takes --write-token-file, not a user or a retention policy"),
             (args.write_token_file and not args.write_bucket,
              "--write-token-file goes with --write-bucket; InfluxDB 1.x takes --write-username and "
              "--write-password-file"))
    for wrong, message in pairs:
        if wrong:
            return message
    for option, path in (("--write-token-file", args.write_token_file),
                         ("--write-password-file", args.write_password_file)):
        if path and not os.path.isfile(path):
            return f"{option} {path!r} does not exist"
    return None


# ------------------------------------------------------------------------------------------------ write
def write_findings(args: argparse.Namespace, command: str, findings: Sequence[Finding], ts: float, hosts: int,
                   elapsed_s: float, stale_hosts: int = 0) -> int:
    """Write this run's findings and its run point in one request, if ``--write-findings``; the number of lines
    written. :class:`FindingsWriteError` (one line, never a secret) if they could not be written."""
    if not getattr(args, "write_findings", False):
        return 0
    problem = write_findings_problem(args)
    if problem:
        raise FindingsWriteError(problem)
    lines = [*finding_lines(findings, ts), run_line(command, findings, ts, hosts, elapsed_s, stale_hosts)]
    from ..ship.writers import ShipConfigError, V1Writer, V2Writer, WriteError, Writer

    url = args.write_url or args.url
    tls = {"verify_tls": not args.no_verify_tls, "ca_file": args.ca_file, "timeout": args.timeout,
           "allow_plain_http": args.allow_plain_http}
    try:
        writer: Writer
        if args.write_bucket:
            writer = V2Writer(url, args.write_org, args.write_bucket, token_file=args.write_token_file, **tls)
        else:
            writer = V1Writer(url, args.write_database or DEFAULT_FINDINGS_DATABASE, args.write_retention_policy,
                              username=args.write_username, password_file=args.write_password_file, **tls)
    except ShipConfigError as err:
        raise FindingsWriteError(f"cannot write the findings: {err}") from None
    try:
        writer.write(lines)
    except WriteError as err:
        raise FindingsWriteError(f"the findings were not written: {err}") from None
    finally:
        writer.close()
    return len(lines)
