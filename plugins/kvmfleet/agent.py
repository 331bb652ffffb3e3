"""kvmfleet's collectd agent without collectd: options, validation, points, dispatch plans, the sampler.

:mod:`kvmfleet.collectd_plugin` is the thin glue that hands collectd's ``<Module>`` block to
:func:`parse_config`, builds an :class:`Agent` in its init callback and calls :meth:`Agent.read` from its read
callback. Nothing here imports ``collectd``: tests and tools use it as a plain library.

Per read, :meth:`Agent.read` takes one :meth:`Collector.sample`, turns it into InfluxDB line protocol
(:class:`PointBuilder`; the schema is in ``docs/schema.md``), hands the lines to the shipper's bounded buffer
(never the network) and, when dispatching, passes the values to a :class:`ValueSink` (collectd's
``Values.dispatch`` in the glue). Options are documented in ``docs/plugin.md``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import ssl
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Callable, Protocol, Union

from .collector import Collector, HostStats, Sample, VMSample
from .facts import HostFacts, gather
from .logsay import SayOnce
from .model import StatDesc, Stats, StatType, VMKey
from .ship import DEFAULT_CAPACITY, DEFAULT_SPOOL_PATH, LineBuffer, ShipConfig, Shipper, make_writer
from .ship.lineproto import encode_fields, escape_key, series_prefix
from .ship.writers import ShipConfigError, Writer, read_secret
from .sources import DEFAULT_URI, SOURCE_NAMES, make_source
from .sources.base import Source
from .statblock import MergedStats, StatBlock, scalar_items

log = logging.getLogger("kvmfleet.agent")

PLUGIN_NAME = "kvm"  # collectd plugin name of the KVM values
AGENT_PLUGIN_NAME = "kvmfleet"  # collectd plugin name of the agent's own metrics
MODULE_NAME = "kvmfleet.collectd_plugin"

# Measurements (docs/schema.md).
M_HOST = "kvm"
M_VM = "kvm_vm"
M_VCPU = "kvm_vcpu"
M_FACTS = "kvm_host"
M_AGENT = "kvmfleet_agent"

# Tags the agent sets itself; a static Tag may not take these names.
RESERVED_TAGS = ("host", "vm", "vm_uuid", "vmm", "vcpu")

# collectd's DATA_MAX_NAME_LEN is 128 bytes with the NUL; keep room for "-vcpuNNN".
_MAX_INSTANCE_BYTES = 110

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
_SECRETISH = re.compile(r"pass|token|secret|cred|auth|key", re.IGNORECASE)

ConfigValue = Union[str, float, bool, int]


# --------------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class Option:
    """One option of the ``<Module>`` block (``docs/plugin.md`` documents each by ``name``)."""

    name: str
    kind: str  # bool, choice, seconds, count, string, regex, tag, url, secretfile, cafile, spoolpath
    default: Any
    help: str
    repeat: bool = False
    choices: tuple[str, ...] = ()
    shipping: bool = False  # only meaningful with InfluxURL


OPTIONS: tuple[Option, ...] = (
    Option("Source", "choice", "auto", "where to read the counters", choices=SOURCE_NAMES),
    Option("PerVM", "bool", True, "per-VM values (measurement kvm_vm, plugin_instance NAME)"),
    Option("PerVCPU", "bool", False, "per-vCPU values (measurement kvm_vcpu; shipped only, not dispatched)"),
    Option("Include", "regex", (), "only counters whose name matches one of these regexes", repeat=True),
    Option("Exclude", "regex", (), "leave out counters whose name matches one of these regexes", repeat=True),
    Option("Tag", "tag", {}, "a static tag KEY VALUE added to every point", repeat=True),
    Option("Dispatch", "bool", True, "also dispatch the values into collectd"),
    Option("Histograms", "bool", True, "ship histogram buckets as <name>_bucket_<n> fields"),
    Option("FactsInterval", "seconds", 300.0, "seconds between two reads of the host facts"),
    Option("Interval", "seconds", None, "seconds between two samples (default: collectd's Interval)"),
    Option("LibvirtURI", "string", DEFAULT_URI,
           "libvirt connection of the libvirt source and of auto's libvirt part"),
    Option("InfluxURL", "url", None, "InfluxDB base URL; absent: no shipping"),
    Option("InfluxAPI", "choice", "v1", "v1 (/write) or v2 (influxdb-client)", choices=("v1", "v2"),
           shipping=True),
    Option("Database", "string", None, "v1 database", shipping=True),
    Option("RetentionPolicy", "string", None, "v1 retention policy", shipping=True),
    Option("Username", "string", None, "v1 user", shipping=True),
    Option("PasswordFile", "secretfile", None, "v1 file holding the password alone", shipping=True),
    Option("Org", "string", None, "v2 organization", shipping=True),
    Option("Bucket", "string", None, "v2 bucket", shipping=True),
    Option("TokenFile", "secretfile", None, "v2 file holding the token alone", shipping=True),
    Option("VerifyTLS", "bool", True, "verify the server's TLS certificate", shipping=True),
    Option("CAFile", "cafile", None, "CA bundle to verify the server with", shipping=True),
    Option("Timeout", "seconds", 10.0, "seconds per request; also the flush budget at shutdown", shipping=True),
    Option("BufferLines", "count", DEFAULT_CAPACITY, "most lines held while the server is unreachable",
           shipping=True),
    Option("SpoolPath", "spoolpath", DEFAULT_SPOOL_PATH, "file for unsent lines at shutdown (\"\": none)",
           shipping=True),
    Option("BatchLines", "count", 5000, "most lines per request", shipping=True),
    Option("RetryMin", "seconds", 1.0, "first retry delay, seconds", shipping=True),
    Option("RetryMax", "seconds", 60.0, "longest retry delay, seconds", shipping=True),
)
OPTION_BY_KEY = {opt.name.lower(): opt for opt in OPTIONS}
V1_ONLY = ("Database", "RetentionPolicy", "Username", "PasswordFile")
V2_ONLY = ("Org", "Bucket", "TokenFile")


class ConfigError(ValueError):
    """The ``<Module>`` block is unusable; ``problems`` holds one operator-readable line per mistake."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class ConfigEntry:
    """One line of the ``<Module>`` block as collectd hands it over: key, values, number of child lines."""

    key: str
    values: tuple[ConfigValue, ...]
    children: int = 0


@dataclass
class AgentConfig:
    """The validated options (defaults as in :data:`OPTIONS`)."""

    source: str = "auto"
    libvirt_uri: str = DEFAULT_URI
    per_vm: bool = True
    per_vcpu: bool = False
    include: tuple[re.Pattern[str], ...] = ()
    exclude: tuple[re.Pattern[str], ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    dispatch: bool = True
    histograms: bool = True
    facts_interval: float = 300.0
    interval: float | None = None
    ship: ShipConfig | None = None  # None: no InfluxURL, no shipping

    def keeps(self, name: str) -> bool:
        """Whether counter ``name`` passes Include/Exclude (``re.search``)."""
        if self.include and not any(p.search(name) for p in self.include):
            return False
        return not any(p.search(name) for p in self.exclude)

    def summary(self) -> str:
        """One line for the log (no secret: files are named, never read out)."""
        parts = [f"source {self.source}", f"per-VM {_onoff(self.per_vm)}", f"per-vCPU {_onoff(self.per_vcpu)}",
                 f"dispatch {_onoff(self.dispatch)}", f"histograms {_onoff(self.histograms)}"]
        if self.libvirt_uri != DEFAULT_URI:
            parts.append(f"libvirt {self.libvirt_uri}")
        if self.include or self.exclude:
            parts.append(f"{len(self.include)} include / {len(self.exclude)} exclude pattern(s)")
        if self.tags:
            parts.append("tags " + ",".join(f"{k}={v}" for k, v in sorted(self.tags.items())))
        if self.interval:
            parts.append(f"interval {self.interval:g}s")
        if self.ship is None:
            parts.append("no shipping (InfluxURL not set)")
        else:
            s = self.ship
            where = f"db {s.database}" if s.api == "v1" else f"org {s.org} bucket {s.bucket}"
            parts.append(f"shipping {s.api} to {redact_url(s.url)} {where}, buffer {s.buffer_lines} lines, "
                         f"spool {s.spool_path or 'off'}")
        return ", ".join(parts)


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"


def redact_url(url: str) -> str:
    """``url`` with any user:password part replaced by ``***`` (for log lines)."""
    try:
        u = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if u.username is None and u.password is None:
        return url
    host = u.hostname or ""
    if u.port:
        host += f":{u.port}"
    return urllib.parse.urlunsplit((u.scheme, "***@" + host, u.path, u.query, u.fragment))


def show_value(value: ConfigValue) -> str:
    """A config value as it would be written in collectd.conf."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"{value:g}" if isinstance(value, float) else str(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)  # a log line stays one line
    return '"' + text + '"'


def _shown(key: str, values: Sequence[ConfigValue]) -> str:
    if _SECRETISH.search(key) and not key.lower().endswith("file"):
        return f'{key} "***"' if values else key  # a secret written inline by mistake: never echo it
    if key.lower() == "influxurl":
        values = [redact_url(v) if isinstance(v, str) else v for v in values]
    return " ".join([key, *(show_value(v) for v in values)]) if values else f"{key} (no value)"


class _Problems:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def bad(self, name: str, values: Sequence[ConfigValue], expected: str) -> None:
        self.errors.append(f"option {_shown(name, values)}: expected {expected}")


def _one(problems: _Problems, opt: Option, values: tuple[ConfigValue, ...], what: str) -> ConfigValue | None:
    if len(values) != 1:
        problems.bad(opt.name, values, f"exactly one value: {what}")
        return None
    return values[0]


def _as_bool(problems: _Problems, opt: Option, values: tuple[ConfigValue, ...]) -> bool | None:
    value = _one(problems, opt, values, "true or false")
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if value is not None:
        problems.bad(opt.name, values, "a boolean: true or false")
    return None


def _as_number(problems: _Problems, opt: Option, values: tuple[ConfigValue, ...], integer: bool) -> float | None:
    what = "a whole number >= 1" if integer else "a number of seconds > 0"
    value = _one(problems, opt, values, what)
    if value is None:
        return None
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number) or number <= 0 or (integer and number != int(number)):
        problems.bad(opt.name, values, what)
        return None
    return number


def _as_string(problems: _Problems, opt: Option, values: tuple[ConfigValue, ...], what: str) -> str | None:
    value = _one(problems, opt, values, what)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        problems.bad(opt.name, values, what)
        return None
    if isinstance(value, float):
        return str(int(value)) if value == int(value) else f"{value:g}"
    return str(value)


def check_url(problems: _Problems, opt: Option, values: tuple[ConfigValue, ...], text: str) -> str | None:
    expected = "an http(s) URL such as \"https://influx.example:8086\" (no credentials, query or fragment)"
    try:
        u = urllib.parse.urlsplit(text)
        _ = u.port
    except ValueError:
        problems.bad(opt.name, values, expected)
        return None
    if u.scheme not in ("http", "https") or not u.hostname or u.query or u.fragment:
        problems.bad(opt.name, values, expected)
        return None
    if u.username is not None or u.password is not None:
        problems.bad(opt.name, values, "a URL without user:password (put credentials in PasswordFile or TokenFile)")
        return None
    return text


def _check_secret_file(problems: _Problems, opt: Option, values: tuple[ConfigValue, ...], path: str,
                       what: str) -> None:
    if not os.path.isabs(path):
        problems.bad(opt.name, values, f"an absolute path to a file holding the {what} alone")
        return
    try:
        read_secret(path, opt.name)  # read and dropped: the writer reads it again when it is built
    except ShipConfigError as e:
        reason = str(e).replace(f"{opt.name} {path!r} ", "the file ")
        problems.bad(opt.name, values, f"a readable file holding the {what} alone on one line ({reason})")


def _check_ca_file(problems: _Problems, opt: Option, values: tuple[ConfigValue, ...], path: str) -> None:
    if not os.access(path, os.R_OK) or not os.path.isfile(path):
        problems.bad(opt.name, values, "a readable PEM file of CA certificates")
        return
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as e:
        problems.bad(opt.name, values, f"a PEM file of CA certificates ({e})")


def _check_spool_path(problems: _Problems, opt: Option, values: tuple[ConfigValue, ...], path: str) -> None:
    what = "\"\" (no spool) or an absolute file path in a directory root can write (created 0700 if missing)"
    if not os.path.isabs(path) or path.endswith("/") or os.path.isdir(path):
        problems.bad(opt.name, values, what)
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        problems.bad(opt.name, values, what + f" ({parent} is not a writable directory)")


def parse_config(entries: Iterable[ConfigEntry], check_files: bool = True) -> AgentConfig:
    """Validate the ``<Module>`` lines into an :class:`AgentConfig`; raise :class:`ConfigError` listing every
    mistake (one line each, naming the option, its value and what was expected).

    Keys are case-insensitive. ``check_files=False`` skips the checks that read the files named (secret files,
    CA file, spool directory): for tools that write a config on another machine. Warnings (options that have no
    effect) are logged on the ``kvmfleet.agent`` logger.
    """
    problems = _Problems()
    seen: dict[str, tuple[ConfigValue, ...]] = {}
    include: list[re.Pattern[str]] = []
    exclude: list[re.Pattern[str]] = []
    tags: dict[str, str] = {}
    given: dict[str, Any] = {}

    for entry in entries:
        key = str(entry.key)
        values = tuple(entry.values)
        opt = OPTION_BY_KEY.get(key.strip().lower())
        if opt is None:
            problems.errors.append(f"unknown option {_shown(key, values)}: expected one of "
                                   f"{', '.join(o.name for o in OPTIONS)}")
            continue
        if entry.children:
            problems.bad(opt.name, values, "a simple option line, not a block")
            continue
        if not opt.repeat and opt.name in seen:
            problems.bad(opt.name, values, f"the option once (it is already set to "
                                           f"{' '.join(show_value(v) for v in seen[opt.name])})")
            continue
        seen[opt.name] = values
        value: Any = None
        if opt.kind == "bool":
            value = _as_bool(problems, opt, values)
        elif opt.kind == "choice":
            text = _as_string(problems, opt, values, "one of " + ", ".join(f'"{c}"' for c in opt.choices))
            if text is not None:
                value = text.strip().lower()
                if value not in opt.choices:
                    problems.bad(opt.name, values, "one of " + ", ".join(f'"{c}"' for c in opt.choices))
                    value = None
        elif opt.kind in ("seconds", "count"):
            number = _as_number(problems, opt, values, integer=opt.kind == "count")
            value = None if number is None else (int(number) if opt.kind == "count" else number)
        elif opt.kind == "regex":
            if not values:
                problems.bad(opt.name, values, "one or more regular expressions (Python re syntax)")
            for v in values:
                if not isinstance(v, str):
                    problems.bad(opt.name, values, "quoted regular expressions (Python re syntax)")
                    continue
                try:
                    (include if opt.name == "Include" else exclude).append(re.compile(v))
                except re.error as e:
                    problems.bad(opt.name, values, f"a valid regular expression ({show_value(v)}: {e})")
            continue
        elif opt.kind == "tag":
            _parse_tag(problems, opt, values, tags)
            continue
        else:  # string-like
            text = _as_string(problems, opt, values, "a quoted string")
            if text is None:
                continue
            if opt.kind == "url":
                value = check_url(problems, opt, values, text.strip())
            elif opt.kind == "spoolpath":
                value = text.strip()
                if value and (check_files or not os.path.isabs(value)):
                    _check_spool_path(problems, opt, values, value)
            elif opt.kind == "secretfile":
                value = text
                if not text.strip():
                    problems.bad(opt.name, values, "a path to a file holding the secret alone")
                    value = None
            elif opt.kind == "cafile":
                value = text
                if check_files:
                    _check_ca_file(problems, opt, values, text)
            else:
                value = text
                if not text.strip():
                    problems.bad(opt.name, values, "a non-empty string")
                    value = None
        if value is not None:
            given[opt.name] = value

    cfg = AgentConfig(
        source=given.get("Source", "auto"),
        libvirt_uri=given.get("LibvirtURI", DEFAULT_URI),
        per_vm=given.get("PerVM", True),
        per_vcpu=given.get("PerVCPU", False),
        include=tuple(include),
        exclude=tuple(exclude),
        tags=tags,
        dispatch=given.get("Dispatch", True),
        histograms=given.get("Histograms", True),
        facts_interval=given.get("FactsInterval", 300.0),
        interval=given.get("Interval"),
    )
    shipping_given = [o.name for o in OPTIONS if o.shipping and o.name in seen]
    if "InfluxURL" not in seen:
        if shipping_given:
            problems.warnings.append(f"option(s) {', '.join(shipping_given)} have no effect without InfluxURL: "
                                     f"nothing is shipped")
        if cfg.per_vcpu:
            problems.warnings.append("option PerVCPU true has no effect without InfluxURL: per-vCPU values are "
                                     "shipped to InfluxDB, not dispatched into collectd")
        if "Dispatch" in given and not cfg.dispatch:
            problems.errors.append("option Dispatch false: expected InfluxURL too (with neither dispatching "
                                   "nor shipping the plugin would do nothing)")
    elif "InfluxURL" in given:
        cfg.ship = _ship_config(problems, given, seen, check_files)

    for text in problems.warnings:
        log.warning("kvmfleet: config: %s", text)
    if problems.errors:
        raise ConfigError(problems.errors)
    return cfg


def _parse_tag(problems: _Problems, opt: Option, values: tuple[ConfigValue, ...], tags: dict[str, str]) -> None:
    what = "two quoted strings: Tag \"KEY\" \"VALUE\""
    if len(values) != 2 or any(isinstance(v, bool) for v in values):
        problems.bad(opt.name, values, what)
        return
    key, value = (show_value(v).strip('"') if not isinstance(v, str) else v for v in values)
    if not key or not value:
        problems.bad(opt.name, values, what + " (neither empty)")
    elif key in RESERVED_TAGS or key.startswith("_") or key == "time":
        problems.bad(opt.name, values, f"a tag key other than {', '.join(RESERVED_TAGS)}, time and _*")
    elif key in tags:
        problems.bad(opt.name, values, f"each tag key once (\"{key}\" is already \"{tags[key]}\")")
    elif any(ch in key + value for ch in "\n\r\t"):
        problems.bad(opt.name, values, what + " (no tab or newline)")
    else:
        tags[key] = value


def _ship_config(problems: _Problems, given: dict[str, Any], seen: dict[str, tuple[ConfigValue, ...]],
                 check_files: bool) -> ShipConfig | None:
    api = given.get("InfluxAPI", "v1")
    errors_before = len(problems.errors)
    wrong = V2_ONLY if api == "v1" else V1_ONLY
    for name in wrong:
        if name in seen:
            other = "v2" if api == "v1" else "v1"
            problems.bad(name, seen[name], f"no {name} with InfluxAPI \"{api}\" ({name} is an InfluxAPI \"{other}\" "
                                           f"option)")
    required = ("Database",) if api == "v1" else ("Bucket", "Org", "TokenFile")
    for name in required:
        if name not in seen:
            problems.errors.append(f"option {name} is missing: expected it with InfluxAPI \"{api}\" (which needs "
                                   f"{', '.join(required)})")
    if api == "v1" and ("Username" in seen) != ("PasswordFile" in seen):
        have, need = ("Username", "PasswordFile") if "Username" in seen else ("PasswordFile", "Username")
        problems.bad(have, seen[have], f"{need} as well (InfluxDB v1 credentials need both)")
    if given.get("RetryMin", 1.0) > given.get("RetryMax", 60.0):
        problems.bad("RetryMin", seen.get("RetryMin", (1.0,)), f"at most RetryMax ({given.get('RetryMax', 60.0):g})")
    if check_files and len(problems.errors) == errors_before:
        for name, what in (("PasswordFile", "password"), ("TokenFile", "token")):
            if name in given:
                _check_secret_file(problems, OPTION_BY_KEY[name.lower()], seen[name], given[name], what)
    if len(problems.errors) != errors_before:
        return None
    if "CAFile" in given and not str(given["InfluxURL"]).startswith("https:"):
        problems.warnings.append("option CAFile has no effect with an http:// InfluxURL")
    spool = given.get("SpoolPath", DEFAULT_SPOOL_PATH)
    if not spool:
        problems.warnings.append("SpoolPath \"\": lines still unsent at shutdown will be lost")
    return ShipConfig(
        api=api,
        url=given["InfluxURL"],
        database=given.get("Database", "kvm"),
        retention_policy=given.get("RetentionPolicy"),
        username=given.get("Username"),
        password_file=given.get("PasswordFile"),
        org=given.get("Org", ""),
        bucket=given.get("Bucket"),
        token_file=given.get("TokenFile"),
        verify_tls=given.get("VerifyTLS", True),
        ca_file=given.get("CAFile"),
        timeout=given.get("Timeout", 10.0),
        buffer_lines=given.get("BufferLines", DEFAULT_CAPACITY),
        spool_path=spool or None,
        batch_lines=given.get("BatchLines", 5000),
        retry_min=given.get("RetryMin", 1.0),
        retry_max=given.get("RetryMax", 60.0),
    )


def build_writer(cfg: AgentConfig) -> Writer | None:
    """The writer for ``cfg.ship`` (reads the secret files now), or None without shipping; ConfigError if the
    shipping library refuses the settings."""
    if cfg.ship is None:
        return None
    try:
        return make_writer(cfg.ship)
    except ShipConfigError as e:
        text = str(e)
        option, value = "InfluxURL", redact_url(cfg.ship.url)
        for attr, name in (("token_file", "TokenFile"), ("password_file", "PasswordFile"), ("ca_file", "CAFile"),
                           ("bucket", "Bucket"), ("database", "Database"), ("username", "Username")):
            if attr in text or name in text:
                option, value = name, getattr(cfg.ship, attr)
                break
        shown = show_value(value) if value is not None else "(no value)"
        raise ConfigError([f"option {option} {shown}: refused by the shipping library: {text}"]) from None


# --------------------------------------------------------------------------------------------------- points
class ValueSink(Protocol):
    """Where dispatched values go (collectd's ``Values.dispatch`` in the glue; a list in tests).

    One call per group of values of one plugin instance and time: ``types[i]`` ("derive" or "gauge"),
    ``names[i]`` (the type_instance, the counter name) and ``values[i]`` line up. Returns how many were taken.
    """

    def __call__(self, plugin: str, plugin_instance: str, time_s: float, types: Sequence[str],
                 names: Sequence[str], values: Sequence[int | float]) -> int: ...


def collectd_type(desc: StatDesc | None) -> str:
    """``derive`` for cumulative counters (and stats of unknown type), ``gauge`` for instant and peak values."""
    if desc is not None and desc.type in (StatType.INSTANT, StatType.PEAK):
        return "gauge"
    return "derive"


def plugin_instance(name: str) -> str:
    """A VM name as a collectd plugin_instance: ``/`` and control characters become ``_``, at most 110 bytes."""
    text = "".join("_" if ch == "/" or ord(ch) < 32 or ord(ch) == 127 else ch for ch in name) or "_"
    raw = text.encode("utf-8")
    if len(raw) > _MAX_INSTANCE_BYTES:
        text = raw[:_MAX_INSTANCE_BYTES].decode("utf-8", "ignore")
    return text


@dataclass
class _Plan:
    """How to turn stats of one layout into fields and dispatched values, fast."""

    names: tuple[str, ...]  # kept scalar names, sorted
    keys: tuple[str, ...]  # their escaped field keys with "="
    types: tuple[str, ...]  # their collectd types
    get: Callable[[Any], tuple[int, ...]]  # picks their values (from the flat scalars, or a name -> value dict)
    hists: tuple[tuple[str, str], ...]  # kept histograms: (name, escaped "<name>_bucket_")
    template: str = ""  # "k1=%di,k2=%di,..." for the values in order

    def __post_init__(self) -> None:
        self.template = ",".join(key.replace("%", "%%") + "%di" for key in self.keys)


def _picker(indexes: Sequence[Any]) -> Callable[[Any], tuple[int, ...]]:
    """``values -> (values[i] for i in indexes)`` as a tuple (positions in a tuple, or keys of a dict)."""
    if not indexes:
        return lambda values: ()
    if len(indexes) == 1:
        only = indexes[0]
        return lambda values: (values[only],)
    return itemgetter(*indexes)


@dataclass
class _Series:
    """Cached per VM: its line-protocol prefixes and collectd plugin_instance."""

    name: str
    prefix: str
    instance: str
    vcpu_prefixes: dict[int, str] = field(default_factory=dict)


@dataclass
class BuildResult:
    lines: list[str]
    dispatched: int = 0


class PointBuilder:
    """Sample -> line protocol (``docs/schema.md``) and dispatched values, with per-layout plans and per-VM
    prefixes cached across samples."""

    def __init__(self, config: AgentConfig, hostname: str) -> None:
        self.config = config
        self.hostname = hostname
        base = dict(config.tags)
        base["host"] = hostname
        self.base_tags = base
        self.host_prefix = series_prefix(M_HOST, base)
        self.facts_prefix = series_prefix(M_FACTS, base)
        self.agent_prefix = series_prefix(M_AGENT, base)
        self._keep: dict[str, bool] = {}
        self._plans: dict[tuple[int, ...], _Plan] = {}
        self._loose_plans: dict[tuple[Any, ...], _Plan] = {}
        self._bucket_key_cache: dict[tuple[str, int], tuple[str, ...]] = {}
        self._series: dict[VMKey, _Series] = {}
        self._field_keys: dict[str, str] = {}
        self._facts_text = ""

    # -- filters and keys
    def keeps(self, name: str) -> bool:
        kept = self._keep.get(name)
        if kept is None:
            kept = self._keep[name] = self.config.keeps(name)
        return kept

    def _key(self, name: str) -> str:
        key = self._field_keys.get(name)
        if key is None:
            key = self._field_keys[name] = escape_key(name) + "="
        return key

    def _block_plan(self, shapes: Sequence[Any]) -> _Plan:
        chosen: dict[str, tuple[int, StatDesc | None]] = {}
        hists: dict[str, None] = {}
        offset = 0
        for shape in shapes:
            for i, name in enumerate(shape.scalar_names):
                if name not in chosen and name not in hists and self.keeps(name):
                    chosen[name] = (offset + i, shape.descs.get(name))
            for name in shape.hists:
                if name not in chosen and name not in hists and self.keeps(name):
                    hists[name] = None
            offset += len(shape.scalar_names)
        names = tuple(sorted(chosen))
        return _Plan(
            names=names,
            keys=tuple(self._key(n) for n in names),
            types=tuple(collectd_type(chosen[n][1]) for n in names),
            get=_picker([chosen[n][0] for n in names]),
            hists=tuple((n, escape_key(n + "_bucket_")) for n in sorted(hists)) if self.config.histograms else (),
        )

    def _loose_plan(self, stats: Stats, descs: Mapping[str, StatDesc]) -> tuple[_Plan, Sequence[int]]:
        """Plan and values for stats that are not stat blocks: host totals, debugfs dicts (cached by names)."""
        found: Mapping[str, int]
        if isinstance(stats, HostStats):
            found = stats.scalars
        else:
            found = {}
            for name, value in scalar_items(stats):
                found.setdefault(name, value)
        key = (len(descs), *found)
        plan = self._loose_plans.get(key)
        if plan is None:
            names = tuple(sorted(n for n in found if self.keeps(n)))
            hists: tuple[tuple[str, str], ...] = ()
            if self.config.histograms:  # buckets are computed (host totals: added up) only when encoded
                hists = tuple((n, escape_key(n + "_bucket_")) for n in sorted(
                    n for n, d in descs.items() if d.type.is_histogram and n not in found and self.keeps(n)))
            plan = _Plan(names, tuple(self._key(n) for n in names), tuple(collectd_type(descs.get(n)) for n in names),
                         _picker(names), hists)
            if len(self._loose_plans) > 4096:
                self._loose_plans.clear()
            self._loose_plans[key] = plan
        return plan, plan.get(found)

    def plan_for(self, stats: Stats, descs: Mapping[str, StatDesc]) -> tuple[_Plan, Sequence[int]]:
        """(plan, kept scalar values in the plan's order) for one VM's, vCPU's or the host's stats."""
        parts: Sequence[Any] = stats.parts if isinstance(stats, MergedStats) else (stats,)
        if parts and all(type(p) is StatBlock for p in parts):
            key = tuple(id(p.shape) for p in parts)
            plan = self._plans.get(key)
            if plan is None:
                plan = self._plans[key] = self._block_plan([p.shape for p in parts])
            if len(parts) == 1:
                flat = parts[0].scalars
            elif len(parts) == 2:
                flat = parts[0].scalars + parts[1].scalars
            else:
                flat = tuple(v for p in parts for v in p.scalars)
            return plan, plan.get(flat)
        return self._loose_plan(stats, descs)

    # -- encoding
    def _bucket_keys(self, prefix: str, count: int) -> tuple[str, ...]:
        keys = self._bucket_key_cache.get((prefix, count))
        if keys is None:
            keys = self._bucket_key_cache[(prefix, count)] = tuple(f"{prefix}{i}=" for i in range(count))
        return keys

    def _body(self, plan: _Plan, values: Sequence[int], stats: Stats) -> str:
        body = plan.template % values
        if plan.hists:
            extra: list[str] = []
            for name, prefix in plan.hists:
                buckets = stats.get(name)
                if isinstance(buckets, tuple) and any(buckets):
                    keys = self._bucket_keys(prefix, len(buckets))
                    extra += [f"{k}{c}i" for k, c in zip(keys, buckets) if c]
            if extra:
                body = body + "," + ",".join(extra) if body else ",".join(extra)
        return body

    def _series_for(self, vm: VMSample, display: str) -> _Series:
        series = self._series.get(vm.identity.key)
        if series is None or series.name != display:
            ident = vm.identity
            tags = dict(self.base_tags)
            tags.update(vm=display, vmm=ident.vmm)
            if ident.uuid:
                tags["vm_uuid"] = ident.uuid
            series = _Series(display, series_prefix(M_VM, tags), plugin_instance(display))
            self._series[vm.identity.key] = series
        return series

    def _vcpu_prefix(self, vm: VMSample, series: _Series, vcpu: int) -> str:
        prefix = series.vcpu_prefixes.get(vcpu)
        if prefix is None:
            ident = vm.identity
            tags = dict(self.base_tags)
            tags.update(vm=series.name, vmm=ident.vmm, vcpu=str(vcpu))
            if ident.uuid:
                tags["vm_uuid"] = ident.uuid
            prefix = series.vcpu_prefixes[vcpu] = series_prefix(M_VCPU, tags)
        return prefix

    @staticmethod
    def display_names(vms: Sequence[VMSample]) -> list[str]:
        """Each VM's name, made unique within the sample: when several VMs share a name (a restarted VM whose
        old process lingers), the oldest (process start time, pid, fd) keeps it, the others get ``-pid<PID>``."""
        names = [vm.identity.name for vm in vms]
        if len(set(names)) == len(names):
            return names
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name, []).append(i)
        for name, members in groups.items():
            if len(members) > 1:
                members.sort(key=lambda i: (vms[i].identity.key.start_time, vms[i].identity.key.pid,
                                            vms[i].identity.key.vm_fd))
                for i in members[1:]:
                    names[i] = f"{name}-pid{vms[i].identity.key.pid}"
        return names

    def build(self, sample: Sample, lines: bool = True, sink: ValueSink | None = None) -> BuildResult:
        """The ``kvm``, ``kvm_vm`` and ``kvm_vcpu`` lines of ``sample`` (if ``lines``) and its host and per-VM
        values dispatched to ``sink`` (if given; per-vCPU values are not dispatched: at 200 VMs x 4 vCPUs they would
        be 34,000 more collectd values a sample, see docs/plugin.md). ``kvm_host`` and ``kvmfleet_agent`` lines come
        from :meth:`facts_line` and :meth:`agent_line`."""
        cfg = self.config
        ts = sample.time_ns
        ts_text = str(ts)
        time_s = ts / 1e9
        out: list[str] = []
        dispatched = 0

        plan, values = self.plan_for(sample.host, sample.host_descs)
        if lines:
            body = self._body(plan, values, sample.host)
            if body:
                out.append(f"{self.host_prefix} {body} {ts_text}")
        if sink is not None and plan.names:
            dispatched += sink(PLUGIN_NAME, "", time_s, plan.types, plan.names, values)

        if cfg.per_vm or cfg.per_vcpu:
            display = self.display_names(sample.vms)
            live: dict[VMKey, _Series] = {}
            for vm, name in zip(sample.vms, display):
                series = self._series_for(vm, name)
                live[vm.identity.key] = series
                if cfg.per_vm:
                    plan, values = self.plan_for(vm.stats, vm.descs)
                    if lines:
                        body = self._body(plan, values, vm.stats)
                        if body:
                            out.append(f"{series.prefix} {body} {ts_text}")
                    if sink is not None and plan.names:
                        dispatched += sink(PLUGIN_NAME, series.instance, time_s, plan.types, plan.names, values)
                if cfg.per_vcpu and lines:  # per-vCPU values are shipped, never dispatched (docs/plugin.md)
                    for vcpu in sorted(vm.vcpus):
                        stats = vm.vcpus[vcpu]
                        plan, values = self.plan_for(stats, vm.descs)
                        body = self._body(plan, values, stats)
                        if body:
                            out.append(f"{self._vcpu_prefix(vm, series, vcpu)} {body} {ts_text}")
            self._series = live  # forget VMs that are gone
        return BuildResult(out, dispatched)

    def set_facts(self, facts: HostFacts) -> None:
        """Pre-encode the fields of ``kvm_host`` that only change when the facts are read again."""
        self._facts_text = encode_fields(facts_fields(facts))

    def facts_line(self, sample: Sample) -> str:
        body = f"vcpus={sample.vcpu_count}i,vms={len(sample.vms)}i"
        if self._facts_text:
            body = f"{self._facts_text},{body}"
        return f"{self.facts_prefix} {body} {sample.time_ns}"

    def agent_line(self, fields: Mapping[str, int | float | str | bool | None], ts_ns: int) -> str:
        body = encode_fields(fields)
        return f"{self.agent_prefix} {body} {ts_ns}" if body else ""


def facts_fields(facts: HostFacts) -> dict[str, int | float | str | bool | None]:
    """The ``kvm_host`` fields that come from :class:`HostFacts` (``None``: unknown, left out of the point)."""
    state = str(facts.tdp.get("state") or "unknown")
    return {
        "tdp_state": state,
        "tdp_enabled": state == "enabled",
        "cpu_ept": facts.cpu_ept,
        "cpu_npt": facts.cpu_npt,
        "ept_param": facts.ept_param,
        "npt_param": facts.npt_param,
        "tdp_mmu": facts.tdp_mmu,
        "nested": facts.nested,
        "is_guest": bool(facts.tdp.get("is_guest")),
        "lockdown": facts.lockdown,
        "kvm_module": facts.kvm_backend or ("none" if facts.kvm_loaded is False else "unknown"),
    }


# --------------------------------------------------------------------------------------------------- agent
# Self-metrics dispatched into collectd as derives (plugin kvmfleet); buffered, sample_duration_s and read_cpu_s
# go as gauges.
AGENT_DERIVES = ("sent", "dropped", "dropped_rejected", "retries")


@dataclass
class ReadStats:
    """What the last read did (also the ``kvmfleet_agent`` point)."""

    sample_duration_s: float = 0.0  # Collector.sample() wall time
    read_duration_s: float = 0.0  # the whole read callback up to building the agent point, wall
    read_cpu_s: float = 0.0  # the same in CPU time of the read thread
    points: int = 0
    dispatched: int = 0
    vms: int = 0
    reads: int = 0
    failures: int = 0


class Agent:
    """The sampler: one :class:`Collector` sample per :meth:`read`, lines to the shipper, values to the sink.

    Life cycle (collectd's callbacks): ``Agent(cfg, writer)`` after :func:`parse_config` and
    :func:`build_writer` (config), :meth:`start` (init: opens the source, loads the spool, starts the one sender
    thread), :meth:`read` (read: no network I/O, never waits on the sender), :meth:`stop` (shutdown: flush
    within ``Timeout`` seconds, spool the rest, join the thread).
    """

    def __init__(self, config: AgentConfig, writer: Writer | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.writer = writer
        self.shipper: Shipper | None = None
        self.collector: Collector | None = None
        self.builder: PointBuilder | None = None
        self.sink: ValueSink | None = None
        self.facts: HostFacts | None = None
        self.stats = ReadStats()
        self.say = SayOnce(logging.getLogger("kvmfleet"))
        self._clock = clock
        self._facts_at = -math.inf
        self._gather = gather

    def start(self, hostname: str, sink: ValueSink | None = None, source: Source | None = None) -> None:
        cfg = self.config
        self.builder = PointBuilder(cfg, hostname)
        self.sink = sink if cfg.dispatch else None
        self.collector = Collector(source if source is not None else make_source(cfg.source, say=self.say,
                                                                                   libvirt_uri=cfg.libvirt_uri))
        if cfg.ship is not None:
            writer = self.writer if self.writer is not None else make_writer(cfg.ship)
            self.writer = writer
            self.shipper = Shipper(writer, LineBuffer(cfg.ship.buffer_lines), cfg.ship.spool_path or None,
                                   batch_lines=cfg.ship.batch_lines, retry_min=cfg.ship.retry_min,
                                   retry_max=cfg.ship.retry_max)
            self.shipper.start()
        self._refresh_facts()

    def _refresh_facts(self) -> None:
        now = self._clock()
        if now - self._facts_at < self.config.facts_interval:
            return
        self._facts_at = now
        try:
            self.facts = self._gather()
        except Exception as e:  # gather() is not meant to raise; keep sampling with the facts we had
            self.say("facts", f"kvmfleet: cannot read host facts: {type(e).__name__}: {e}")
            return
        self.say.forget("facts")
        if self.builder is not None:
            self.builder.set_facts(self.facts)

    def read(self) -> ReadStats:
        """Take one sample, ship and dispatch it. Never raises: failures are logged once per kind."""
        if self.collector is None or self.builder is None:
            raise RuntimeError("Agent.read() before start()")
        c0, t0 = time.thread_time(), time.perf_counter()
        st = self.stats
        st.reads += 1
        try:
            sample = self.collector.sample()
        except Exception as e:
            st.failures += 1
            self.say("sample", f"kvmfleet: reading the KVM statistics failed: {type(e).__name__}: {e}",
                     logging.ERROR)
            log.debug("sample failure", exc_info=True)
            return st
        self.say.forget("sample")
        try:
            self._refresh_facts()
            shipping = self.shipper is not None
            result = self.builder.build(sample, lines=shipping, sink=self.sink)
            lines = result.lines
            if shipping:
                lines.append(self.builder.facts_line(sample))
            st.sample_duration_s = sample.duration_s
            st.vms = len(sample.vms)
            st.dispatched = result.dispatched
            st.points = len(lines) + (1 if shipping else 0)
            st.read_duration_s = time.perf_counter() - t0
            st.read_cpu_s = time.thread_time() - c0
            ship = self.shipper.stats() if self.shipper is not None else None
            if shipping:
                text = self.builder.agent_line(self.agent_fields(ship), sample.time_ns)
                if text:
                    lines.append(text)
                assert self.shipper is not None
                self.shipper.submit(lines)
            if self.sink is not None:
                self._dispatch_self(ship, sample.time_ns / 1e9)
            self.say.forget("build")
        except Exception as e:
            st.failures += 1
            self.say("build", f"kvmfleet: building or queueing points failed: {type(e).__name__}: {e}",
                     logging.ERROR)
            log.debug("build failure", exc_info=True)
        return st

    def agent_fields(self, ship: Mapping[str, Any] | None) -> dict[str, int | float | str | bool | None]:
        st = self.stats
        fields: dict[str, int | float | str | bool | None] = {
            "sample_duration_s": round(st.sample_duration_s, 6),
            "read_duration_s": round(st.read_duration_s, 6),
            "read_cpu_s": round(st.read_cpu_s, 6),
            "points": st.points,
            "dispatched": st.dispatched,
            "read_failures": st.failures,
        }
        if ship is not None:
            fields.update(
                sent=int(ship["sent"]),
                buffered=int(ship["buffered"]),
                dropped=int(ship["dropped"]),
                dropped_rejected=int(ship["dropped_rejected"]),
                retries=int(ship["retries"]),
                last_error=str(ship["last_error"] or ""),
                spool_loaded=int(ship["spool_loaded"]),
            )
        return fields

    def _dispatch_self(self, ship: Mapping[str, Any] | None, time_s: float) -> None:
        assert self.sink is not None
        st = self.stats
        types: list[str] = ["gauge", "gauge"]
        names: list[str] = ["sample_duration_s", "read_cpu_s"]
        values: list[int | float] = [st.sample_duration_s, st.read_cpu_s]
        if ship is not None:
            for name in AGENT_DERIVES:
                types.append("derive")
                names.append(name)
                values.append(int(ship[name]))
            types.append("gauge")
            names.append("buffered")
            values.append(int(ship["buffered"]))
        self.sink(AGENT_PLUGIN_NAME, "", time_s, types, names, values)

    def stop(self, timeout: float | None = None) -> dict[str, Any] | None:
        """Stop the sender (flush for up to ``timeout``, default the Timeout option; spool the rest), close the
        source. Returns the shipper's final stats (None without shipping)."""
        final = None
        if self.shipper is not None:
            budget = timeout if timeout is not None else (self.config.ship.timeout if self.config.ship else 10.0)
            final = self.shipper.stop(timeout=budget)
            self.shipper = None
        if self.collector is not None:
            try:
                self.collector.close()
            finally:
                self.collector = None
        return final
