"""``kvmfleet collectd-config``: a ready collectd config fragment that loads the plugin.

The fragment is a ``<LoadPlugin python>`` block (``Globals true``) and its ``<Plugin python>`` block: the
``ModulePath`` lines (the directory that holds the installed ``kvmfleet`` package and the site-packages of the
running interpreter, since collectd does not process ``.pth`` files), ``Import "kvmfleet.collectd_plugin"``
and the ``<Module>`` block with the options (``docs/plugin.md``). Every option of :data:`kvmfleet.options.OPTIONS`
has a flag; the options are validated as the plugin's config callback would (without reading the files they
name), so a fragment that prints is one the plugin accepts, secret files aside.

Strings are written as collectd's config parser reads them back: double-quoted with ``\\`` and ``"`` escaped.
Control characters cannot be written in a collectd config and are refused.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import sysconfig
from collections.abc import Sequence
from typing import Any, Callable

from . import agent
from .options import OPTIONS, ConfigEntry, ConfigError, ConfigValue, Option, parse_config

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
        parse_config(entries, check_files=False)
    except ConfigError as e:
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


def flag_of(opt: Option) -> str:
    """The ``collectd-config`` flag of an option: ``--per-vcpu``, ``--no-dispatch`` (a boolean that is on by
    default), ``--influx-url`` ..."""
    if opt.flag:
        return opt.flag
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "-", opt.name).lower()
    return f"--no-{words}" if opt.kind == "bool" and opt.default is True else f"--{words}"


_METAVAR = {"seconds": "SECONDS", "count": "N", "regex": "REGEX", "tag": "KEY=VALUE", "url": "URL",
            "secretfile": "FILE", "cafile": "FILE", "spoolpath": "FILE", "string": "TEXT"}
_NUMBER: dict[str, Callable[[str], Any]] = {"seconds": float, "count": int}


def _help(opt: Option) -> str:
    """The option's doc line as plain text (no markdown), with its default."""
    text = re.sub(r"\[([^]]*)\]\([^)]*\)", r"\1", opt.doc).replace("`", "").replace("**", "")
    if opt.shown_default:
        text += f" ({opt.shown_default.replace('`', '')})"
    elif opt.default not in (None, (), {}):
        text += f" (default {render_value(opt.default)})"
    return f"{opt.name}: {text}".replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``collectd-config`` flags: one per option of :data:`kvmfleet.options.OPTIONS`."""
    sink = parser.add_argument_group("InfluxDB (leave out --influx-url to only dispatch into collectd)")
    what = parser.add_argument_group("what to collect")
    for opt in OPTIONS:
        kwargs: dict[str, Any] = {"dest": opt.key, "help": _help(opt)}
        if opt.kind == "bool":
            kwargs.update(action="store_const", const=not opt.default)
        elif opt.repeat:
            kwargs.update(action="append", metavar=_METAVAR[opt.kind])
        elif opt.kind == "choice":
            kwargs.update(choices=opt.choices)
        else:
            kwargs.update(metavar=_METAVAR[opt.kind], type=_NUMBER.get(opt.kind, str))
        (sink if opt.shipping else what).add_argument(flag_of(opt), **kwargs)
    parser.add_argument("--module-path", action="append", metavar="DIR",
                        help="a ModulePath (repeatable; default: the dir holding the kvmfleet package and this "
                             "interpreter's site-packages)")


def options_from_args(args: argparse.Namespace) -> list[tuple[str, list[ConfigValue]]]:
    """Module options from the ``collectd-config`` flags (only those given), in :data:`OPTIONS` order."""
    opts: list[tuple[str, list[ConfigValue]]] = []
    for opt in OPTIONS:
        value = getattr(args, opt.key, None)
        if value is None:
            continue
        if opt.shipping and opt.name != "InfluxURL" and not getattr(args, "influxurl", None):
            raise FragmentError(f"{flag_of(opt)} needs --influx-url")
        if opt.kind == "tag":
            opts += [("Tag", list(_tag(item))) for item in value]
        elif opt.repeat:
            opts += [(opt.name, [item]) for item in value]
        elif opt.kind in ("secretfile", "cafile"):
            opts.append((opt.name, [os.path.abspath(value)]))
        else:
            opts.append((opt.name, [value]))
    return opts


def _tag(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep:
        raise FragmentError(f"--tag {item!r}: expected KEY=VALUE")
    return key, value


def main(args: argparse.Namespace) -> int:
    try:
        text = render(options_from_args(args), args.module_path)
    except FragmentError as e:
        for problem in str(e).splitlines():
            print(f"kvmfleet collectd-config: {problem}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0
