"""``kvmfleet collectd-config``: a ready collectd config fragment that loads the plugin.

The fragment is a ``<LoadPlugin python>`` block (``Globals true``) and its ``<Plugin python>`` block: the
``ModulePath`` lines (the directory that holds the installed ``kvmfleet`` package and the site-packages of the
running interpreter, since collectd does not process ``.pth`` files), ``Import "kvmfleet.collectd_plugin"``
and the ``<Module>`` block with the options (``docs/plugin.md``). The options are validated as the plugin's
config callback would (without reading the files they name), so a fragment that prints is one the plugin
accepts, secret files aside.

Strings are written as collectd's config parser reads them back: double-quoted with ``\\`` and ``"`` escaped.
Control characters cannot be written in a collectd config and are refused.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
from collections.abc import Sequence

from . import agent
from .agent import ConfigEntry, ConfigValue
from .sources import DEFAULT_URI, SOURCE_NAMES

COLLECTD_PLUGIN_DIR = "/usr/lib/collectd"


class FragmentError(ValueError):
    """The options cannot make a valid fragment (the message lists the problems)."""


def quote(text: str) -> str:
    """``text`` as a collectd config string: ``"..."`` with backslash and double quote escaped."""
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise FragmentError(f"{text!r}: control characters (newline, tab, ...) cannot be written in a collectd "
                            f"config string")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_value(value: ConfigValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value == int(value) else repr(value)
    return quote(str(value))


def default_module_paths() -> list[str]:
    """The dir holding the installed kvmfleet package, then this interpreter's site-packages (deduplicated)."""
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(agent.__file__)))
    paths = sysconfig.get_paths()
    out: list[str] = []
    for path in (package_dir, paths.get("purelib", ""), paths.get("platlib", "")):
        if path and path not in out:
            out.append(path)
    return out


def render(options: Sequence[tuple[str, Sequence[ConfigValue]]], module_paths: Sequence[str] | None = None,
           log_traces: bool = True) -> str:
    """The fragment for ``options`` (``(Key, [values...])`` pairs, in order; validated first)."""
    entries = [ConfigEntry(key, tuple(values)) for key, values in options]
    try:
        agent.parse_config(entries, check_files=False)
    except agent.ConfigError as e:
        raise FragmentError("\n".join(e.problems)) from None
    paths = list(module_paths) if module_paths else default_module_paths()
    for path in paths:
        if os.path.normpath(path) == COLLECTD_PLUGIN_DIR:
            raise FragmentError(f"ModulePath {path}: collectd's plugin dir must not be on ModulePath (its csv.so, "
                                f"email.so, uuid.so ... would shadow Python modules of the same name)")
    out = ["<LoadPlugin python>", "  Globals true", "</LoadPlugin>", "", "<Plugin python>"]
    out += [f"  ModulePath {quote(path)}" for path in paths]
    out.append(f"  LogTraces {'true' if log_traces else 'false'}")
    out.append(f"  Import {quote(agent.MODULE_NAME)}")
    out.append(f"  <Module {quote(agent.MODULE_NAME)}>")
    for key, values in options:
        out.append("    " + " ".join([key, *(render_value(v) for v in values)]))
    out += ["  </Module>", "</Plugin>", ""]
    return "\n".join(out)


def options_from_args(args: argparse.Namespace) -> list[tuple[str, list[ConfigValue]]]:
    """Module options from the ``collectd-config`` flags (only what differs from the defaults, and the sink)."""
    opts: list[tuple[str, list[ConfigValue]]] = []
    if args.source != "auto":
        opts.append(("Source", [args.source]))
    if args.libvirt_uri is not None:
        opts.append(("LibvirtURI", [args.libvirt_uri]))
    if args.no_per_vm:
        opts.append(("PerVM", [False]))
    if args.per_vcpu:
        opts.append(("PerVCPU", [True]))
    opts += [("Include", [pattern]) for pattern in args.include or []]
    opts += [("Exclude", [pattern]) for pattern in args.exclude or []]
    for item in args.tag or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise FragmentError(f"--tag {item!r}: expected KEY=VALUE")
        opts.append(("Tag", [key, value]))
    if args.no_dispatch:
        opts.append(("Dispatch", [False]))
    if args.interval is not None:
        opts.append(("Interval", [args.interval]))
    if args.influx_url:
        opts.append(("InfluxURL", [args.influx_url]))
        opts.append(("InfluxAPI", [args.api]))
        for flag, key in (("database", "Database"), ("retention_policy", "RetentionPolicy"),
                          ("username", "Username"), ("password_file", "PasswordFile"), ("org", "Org"),
                          ("bucket", "Bucket"), ("token_file", "TokenFile"), ("ca_file", "CAFile"),
                          ("spool_path", "SpoolPath")):
            value = getattr(args, flag)
            if value is not None:
                opts.append((key, [os.path.abspath(value) if flag.endswith("_file") else value]))
        if args.no_verify_tls:
            opts.append(("VerifyTLS", [False]))
        if args.buffer_lines is not None:
            opts.append(("BufferLines", [args.buffer_lines]))
    else:
        for flag in ("database", "retention_policy", "username", "password_file", "org", "bucket", "token_file",
                     "ca_file", "spool_path", "buffer_lines"):
            if getattr(args, flag) is not None:
                raise FragmentError(f"--{flag.replace('_', '-')} needs --influx-url")
    return opts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``collectd-config`` flags."""
    sink = parser.add_argument_group("InfluxDB (leave out --influx-url to only dispatch into collectd)")
    sink.add_argument("--influx-url", metavar="URL", help="InfluxDB base URL, e.g. https://influx.example:8086")
    sink.add_argument("--api", choices=("v1", "v2"), default="v1",
                      help="v1: /write with --database (InfluxDB 1.x); v2: influxdb-client with --bucket, --org, "
                           "--token-file (InfluxDB 2.x, 3.x, 1.8+, VictoriaMetrics). Default v1")
    sink.add_argument("--database", help="v1 database")
    sink.add_argument("--retention-policy", help="v1 retention policy")
    sink.add_argument("--username", help="v1 user")
    sink.add_argument("--password-file", metavar="FILE", help="v1: file holding the password alone (mode 0600)")
    sink.add_argument("--bucket", help="v2 bucket")
    sink.add_argument("--org", help="v2 organization")
    sink.add_argument("--token-file", metavar="FILE", help="v2: file holding the token alone (mode 0600)")
    sink.add_argument("--ca-file", metavar="FILE", help="CA bundle to verify the server's certificate")
    sink.add_argument("--no-verify-tls", action="store_true", help="do not verify the server's certificate")
    sink.add_argument("--spool-path", metavar="FILE", help="file for unsent lines at shutdown "
                                                           "(default /var/lib/kvmfleet/spool/ship.spool)")
    sink.add_argument("--buffer-lines", type=int, metavar="N", help="most lines buffered during an outage")
    what = parser.add_argument_group("what to collect")
    what.add_argument("--source", choices=SOURCE_NAMES, default="auto",
                      help="where to read the counters (default auto)")
    what.add_argument("--libvirt-uri", metavar="URI", help=f"libvirt connection of the libvirt source (and of "
                                                          f"auto's libvirt part; default {DEFAULT_URI})")
    what.add_argument("--no-per-vm", action="store_true", help="no per-VM values")
    what.add_argument("--per-vcpu", action="store_true", help="per-vCPU values too")
    what.add_argument("--include", action="append", metavar="REGEX", help="only counters matching (repeatable)")
    what.add_argument("--exclude", action="append", metavar="REGEX", help="leave out counters matching (repeatable)")
    what.add_argument("--tag", action="append", metavar="KEY=VALUE", help="static tag on every point (repeatable)")
    what.add_argument("--no-dispatch", action="store_true", help="do not dispatch the values into collectd")
    what.add_argument("--interval", type=float, metavar="SECONDS",
                      help="seconds between samples (default: collectd's Interval)")
    parser.add_argument("--module-path", action="append", metavar="DIR",
                        help="a ModulePath (repeatable; default: the dir holding the kvmfleet package and this "
                             "interpreter's site-packages)")


def main(args: argparse.Namespace) -> int:
    try:
        text = render(options_from_args(args), args.module_path)
    except FragmentError as e:
        for problem in str(e).splitlines():
            print(f"kvmfleet collectd-config: {problem}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0
