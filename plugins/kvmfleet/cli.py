"""``kvmfleet``: the operator's command line."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import __version__
from .sources import DEFAULT_URI, SOURCE_NAMES


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _regex(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as err:
        raise argparse.ArgumentTypeError(f"invalid regular expression {text!r}: {err}") from err


def _live_view_wanted(args: argparse.Namespace) -> bool:
    """The full-screen view is for an operator at a terminal; -n (print and exit), --json, --plain and output
    to a pipe or file keep the plain samples."""
    return not (args.json or args.plain or args.count) and sys.stdout.isatty() and sys.stdin.isatty()


def cmd_stat(args: argparse.Namespace) -> int:
    from .collector import Collector, rates
    from .sources import make_source
    from .statview import sample_json, sample_text

    live = _live_view_wanted(args)
    if live:
        from .livescreen import terminal_problem
        from .textsafe import one_line

        problem = terminal_problem()
        if problem is not None:  # still useful: the plain samples
            print(f"kvmfleet stat: no live view on this terminal: {one_line(problem)}; printing samples",
                  file=sys.stderr)
            live = False
    source = make_source(args.source, libvirt_uri=args.libvirt_uri)
    reasons = None
    if args.reasons:
        from .exitreasons import ExitReasonSource

        # per VM where VMs are shown: the live view can pick one at any time
        reasons = ExitReasonSource(per_vm=args.vm or args.vcpu or live)
    collector = Collector(source, reasons=reasons)
    printed, prev = 0, None
    try:
        if live:
            return _live_view(args, collector)
        while True:
            sample = collector.sample()
            rate = rates(prev, sample) if prev is not None else None
            sources = source.sources_used()
            reasons_state = reasons.usability() if reasons is not None else None
            if args.json:
                obj = sample_json(sample, rate, sources, vcpus=args.vcpu, pattern=args.fields,
                                  reasons_state=reasons_state)
                print(json.dumps(obj, sort_keys=False), flush=True)
            else:
                print(sample_text(sample, rate, sources, per_vm=args.vm, vcpus=args.vcpu, pattern=args.fields,
                                  prev=prev, reasons_state=reasons_state))
                print(flush=True)
            printed += 1
            if args.count and printed >= args.count:
                return 0
            prev = sample
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    finally:
        collector.close()


def _live_view(args: argparse.Namespace, collector: Any) -> int:
    from .livescreen import run
    from .liveview import LiveModel

    model = LiveModel(interval=args.interval, pattern=args.fields)
    model.drill = args.vcpu

    def sample() -> Any:
        taken = collector.sample()
        model.sources = collector.source.sources_used()
        if collector.reasons is not None:
            model.reasons_state = collector.reasons.usability()
        return taken

    return run(model, sample)


def cmd_facts(args: argparse.Namespace) -> int:
    from .facts import format_text, gather
    from .logsay import SayOnce
    from .sources import LibvirtSource, make_source

    facts = gather()
    quiet = SayOnce(quiet=True)  # the output says why a source is unusable
    with make_source("auto", say=quiet, libvirt_uri=args.libvirt_uri) as source:
        source.read()
        facts.sources = {name: {"usable": state.usable, "reason": state.reason}
                         for name, state in source.sources_used().items()}
    with LibvirtSource(args.libvirt_uri, say=quiet) as libvirt:  # asked even where auto does not need it
        libvirt.read()
        facts.libvirt = libvirt.facts()
    if args.json:
        print(json.dumps(facts.to_dict(), indent=2, sort_keys=True))
    else:
        print(format_text(facts))
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    from .selftest import run_selftest

    result = run_selftest(loops=args.loops, vcpus=args.vcpus, timeout=args.timeout)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.text())
    return 0 if result.ok else 1


def cmd_collectd_config(args: argparse.Namespace) -> int:
    from .collectd_config import main as collectd_config_main

    return collectd_config_main(args)


def cmd_audit(args: argparse.Namespace) -> int:
    from .audit.cli import run_audit_command

    return run_audit_command(args)


def cmd_capacity(args: argparse.Namespace) -> int:
    from .audit.cli import run_capacity_command

    return run_capacity_command(args)


def cmd_queries(args: argparse.Namespace) -> int:
    from .audit.cli import run_queries_command

    return run_queries_command(args)


def cmd_explain(args: argparse.Namespace) -> int:
    from .audit.cli import run_explain_command

    return run_explain_command(args)


def _add_stat(sub: Any) -> None:
    stat = sub.add_parser("stat", help="KVM counters of this host, like kvm_stat",
                          description="Totals and per-second rates of the KVM counters of this host.")
    stat.add_argument("--vm", action="store_true", help="also per VM")
    stat.add_argument("--vcpu", action="store_true", help="also per vCPU (implies --vm in text output)")
    stat.add_argument("-f", "--fields", type=_regex, metavar="REGEX", help="only counters matching REGEX")
    stat.add_argument("-i", "--interval", type=_positive_float, default=1.0, metavar="SECONDS",
                      help="seconds between samples (default 1)")
    stat.add_argument("-n", "--count", type=int, default=0, metavar="COUNT",
                      help="stop after COUNT samples (default: run until interrupted); -n 1 prints the "
                           "current totals at once")
    stat.add_argument("--source", choices=SOURCE_NAMES, default="auto",
                      help="where to read the counters (default auto: the best that works per VM)")
    stat.add_argument("--libvirt-uri", default=DEFAULT_URI, metavar="URI",
                      help=f"libvirt connection of the libvirt source (default {DEFAULT_URI})")
    stat.add_argument("--json", action="store_true", help="one JSON object per sample")
    stat.add_argument("--reasons", action="store_true",
                      help="also count exits by reason (kvm:kvm_exit, kvm:kvm_userspace_exit tracepoints), like "
                           "kvm_stat -t; per VM with --vm, --vcpu or in the live view (docs/exit-reasons.md)")
    stat.add_argument("--plain", action="store_true",
                      help="print samples as text even on a terminal (without -n, --json or --plain, a terminal "
                           "gets the live full-screen view: press h there for its keys)")
    stat.set_defaults(func=cmd_stat)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmfleet", description="KVM statistics for hypervisor fleets.")
    parser.add_argument("--version", action="version", version=f"kvmfleet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what sources skip and why")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_stat(sub)

    facts = sub.add_parser("facts", help="host facts: CPU, KVM module, EPT/NPT verdict, lockdown, sources")
    facts.add_argument("--json", action="store_true")
    facts.add_argument("--libvirt-uri", default=DEFAULT_URI, metavar="URI",
                       help=f"libvirt connection to describe (default {DEFAULT_URI})")
    facts.set_defaults(func=cmd_facts)

    selftest = sub.add_parser("selftest", help="run a tiny real VM and check every usable source reads it exactly")
    selftest.add_argument("--loops", type=int, default=1000, help="hlt instructions per vCPU (default 1000)")
    selftest.add_argument("--vcpus", type=int, default=2, help="vCPUs of the test VM (default 2)")
    selftest.add_argument("--timeout", type=_positive_float, default=30.0, help="seconds to wait for the VM")
    selftest.add_argument("--json", action="store_true")
    selftest.set_defaults(func=cmd_selftest)

    from .collectd_config import add_arguments as collectd_config_arguments

    ccfg = sub.add_parser("collectd-config", help="print a collectd config fragment that loads the plugin",
                          description="Print a <LoadPlugin python> and <Plugin python> fragment for collectd.conf "
                                      "(see docs/plugin.md).")
    collectd_config_arguments(ccfg)
    ccfg.set_defaults(func=cmd_collectd_config)

    from .audit.cli import add_audit_args, add_capacity_args, add_explain_args, add_queries_args

    audit = sub.add_parser("audit", help="audit the fleet in InfluxDB: shadow paging, EPT/NPT, I/O, interrupts, ...",
                           description="Run the query pack against InfluxDB and the rules against the answers. Exit "
                                       "status 0: every host reported, nothing at or above --fail-on; 1: findings; "
                                       "2: the audit cannot tell (an error, no data, a stale host) or "
                                       "--write-findings could not write, with one line on stderr.")
    add_audit_args(audit)
    audit.set_defaults(func=cmd_audit)

    capacity = sub.add_parser(
        "capacity", help="capacity of the fleet in InfluxDB: overcommit, polling, exits, growth, room",
        description="Per host and for the fleet: VMs, vCPUs and CPUs (overcommit, mean and peak), CPUs spent on "
                    "halt polling, exits per second, guest memory KVM maps, the trends and the days until a limit "
                    "(--limit) is crossed, where N more vCPUs would go (--place). Exit status 0; 1 with --fail-on "
                    "and a limit crossed (or forecast within --horizon days); 2 when it cannot tell (an error, no "
                    "data, a stale host or one without the facts capacity needs), with one line on stderr.")
    add_capacity_args(capacity)
    capacity.set_defaults(func=cmd_capacity)

    queries = sub.add_parser("queries", help="print the InfluxQL query pack with the window and filters filled in")
    add_queries_args(queries)
    queries.set_defaults(func=cmd_queries)

    explain = sub.add_parser("explain", help="what a KVM counter (or an audit rule) means")
    add_explain_args(explain)
    explain.set_defaults(func=cmd_explain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args))
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
