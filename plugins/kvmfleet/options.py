"""The options of the plugin's ``<Module "kvmfleet.collectd_plugin">`` block, said once in :data:`OPTIONS`.

Each :class:`Option` holds its name, its kind (how a value is converted and checked), its default, its allowed
values and one line of doc. Everything else is derived from the table: :func:`parse_config` is a loop over it
(plus the few checks that involve several options), ``kvmfleet collectd-config`` makes its flags and its fragment
from it, ``docs/plugin.md``'s options table is generated from it (``scripts/generate``), and tests check the role's
template and ``meta/argument_specs.yml`` against it (``role_var`` names the role variable behind each option).
"""

from __future__ import annotations

import logging
import math
import os
import re
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from . import privfile, schema, words
from .influxhttp import URL_CREDENTIALS, URLProblem, check_credentials_transport, check_url, redact_url
from .ship import ShipConfig, make_writer
from .ship.writers import ShipConfigError, Writer, read_secret
from .sources import DEFAULT_URI, SOURCE_NAMES

log = logging.getLogger("kvmfleet.options")

ConfigValue = Union[str, float, bool, int]
SHIP_DEFAULTS = ShipConfig()  # the shipping library's defaults are the options' defaults
_SECRETISH = re.compile(r"pass|token|secret|cred|auth|key", re.IGNORECASE)


class Bad(ValueError):
    """A value that does not fit its option; the message says what was expected."""


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


@dataclass(frozen=True)
class Option:
    """One option of the ``<Module>`` block.

    ``kind`` picks the converter (:data:`KINDS`); ``attr`` is the :class:`AgentConfig` field (or, for shipping
    options, the :class:`~kvmfleet.ship.ShipConfig` field) it fills; ``role_var`` the ``kvmfleet_collectd`` role
    variable that sets it (``role_note`` says why there is none). ``shown_default`` replaces the default in the
    docs where the default is not a value (``None``).
    """

    name: str
    kind: str
    default: Any
    doc: str
    attr: str
    choices: tuple[str, ...] = ()
    repeat: bool = False
    shipping: bool = False  # a ShipConfig field: meaningful with InfluxURL only
    api: str = ""  # "v1" or "v2": an option of that InfluxAPI only
    role_var: str | None = None
    role_note: str = ""
    shown_default: str = ""
    flag: str = ""  # the collectd-config flag when it is not derived from the name

    @property
    def key(self) -> str:
        return self.name.lower()


def _role(name: str) -> str:
    return "kvmfleet_collectd_" + name


OPTIONS: tuple[Option, ...] = (
    Option("Source", "choice", "auto", "where to read the counters: `auto` takes per VM the best that works (README, "
           "\"Where the counters come from\"; libvirt: [statistics.md](statistics.md#the-libvirt-source))",
           "source", choices=SOURCE_NAMES, role_var=_role("source")),
    Option("PerVM", "bool", True, "per-VM values: measurement `kvm_vm`, collectd plugin_instance = VM name",
           "per_vm", role_var=_role("per_vm")),
    Option("PerVCPU", "bool", False, "per-vCPU values: measurement `kvm_vcpu` in InfluxDB; they are **not** "
           "dispatched into collectd, so without `InfluxURL` this has no effect (a warning says so)",
           "per_vcpu", role_var=_role("per_vcpu")),
    Option("ExitReasons", "choice", "host", "exits by reason from the `kvm:kvm_exit` and `kvm:kvm_userspace_exit` "
           "tracepoints (measurement `kvm_exit_reason`, collectd plugin `kvm_exit_reason`): `host` host-wide, `vm` "
           "host-wide and per VM, `off` none. On by default: with `bpf` it adds about 0.1-0.2 us to each exit and "
           "well under a millisecond to a sample ([exit-reasons.md](exit-reasons.md): how they are counted, what it "
           "costs, what the host needs; where it cannot count, the log says why once and the rest goes on)",
           "exit_reasons", choices=("off", "host", "vm"),
           role_var=_role("exit_reasons")),
    Option("ExitReasonsMechanism", "choice", "bpf", "how exits are counted by reason: `bpf` (a tiny BPF program "
           "per tracepoint adds each hit to a map in the kernel: 2 fds), `perf-count` (kvm_stat's filtered perf "
           "counters: one fd per reason and CPU, and per reason and thread of each VM; about 4x bpf's cost per "
           "exit), `auto` bpf where it loads, else perf-count", "exit_reasons_mechanism",
           choices=("auto", "bpf", "perf-count"),
           role_var=_role("exit_reasons_mechanism")),
    Option("ExitReasonsMaxFds", "count", 4096, "most file descriptors the exit reasons source may hold (perf "
           "events, BPF maps and programs); past it, per-VM counting is left off for the VMs that do not fit (said "
           "once in the log)", "exit_reasons_max_fds", role_var=_role("exit_reasons_max_fds")),
    Option("Include", "regex", (), "only counters whose name matches one of them (Python `re.search`: `\"^halt_\"`, "
           "`\"exits$\"`); applies to fields and dispatched values, a histogram by its own name",
           "include", repeat=True, role_var=_role("include"), shown_default="none (all)"),
    Option("Exclude", "regex", (), "leave out counters whose name matches one of them (after `Include`)",
           "exclude", repeat=True, role_var=_role("exclude"), shown_default="none"),
    Option("Tag", "tag", {}, "a static tag on every point (`Tag \"cluster\" \"eu1\"`); not "
           + ", ".join(f"`{t}`" for t in schema.RESERVED_TAGS) + ", `time` or `_*`",
           "tags", repeat=True, role_var=_role("tags"), shown_default="none"),
    Option("Dispatch", "bool", True, "also dispatch the values into collectd (any collectd writer then has them); "
           "`false` needs `InfluxURL`", "dispatch", role_var=_role("dispatch")),
    Option("DispatchPerVM", "bool", None, "with `Dispatch`, dispatch each VM's values too (plugin_instance = VM "
           "name), not only the host totals: about 60 values per VM a sample, the plugin's largest cost in collectd "
           "([cost](#what-a-sample-costs))", "dispatch_per_vm", role_var=_role("dispatch_per_vm"),
           shown_default="`true` without `InfluxURL`, `false` with it"),
    Option("Histograms", "bool", True, "ship histogram stats as `<name>_bucket_<n>` fields (non-zero buckets; "
           "[schema.md](schema.md))", "histograms", role_var=_role("histograms")),
    Option("FactsInterval", "seconds", 300.0, "how often the host facts (`kvm_host`: EPT/NPT, lockdown, KVM module, "
           "CPUs, memory, halt polling) are read again; they are written every sample", "facts_interval",
           role_var=_role("facts_interval")),
    Option("Interval", "seconds", None, "seconds between two samples of this plugin (its own read interval)",
           "interval", role_var=_role("plugin_interval"), shown_default="collectd's `Interval`"),
    Option("LibvirtURI", "string", DEFAULT_URI, "the libvirt connection of the `libvirt` source and of `auto`'s "
           "libvirt part; needs `python3-libvirt` visible to collectd's Python (the venv made with "
           "`--system-site-packages`)", "libvirt_uri", role_var=_role("libvirt_uri")),
    Option("InfluxURL", "url", None, "the InfluxDB (or VictoriaMetrics) base URL; no "
           "credentials, query or fragment in it", "url", shipping=True, role_var=_role("influx_url"),
           shown_default="none: no shipping"),
    Option("InfluxAPI", "choice", SHIP_DEFAULTS.api, "`v1`: HTTP `/write?db=...` for InfluxDB 1.x; `v2`: "
           "influxdb-client's write API for InfluxDB 2.x, 3.x, 1.8+ and VictoriaMetrics. Both send the same line "
           "protocol, gzipped", "api", choices=("v1", "v2"), shipping=True, role_var=_role("influx_api"),
           flag="--api"),
    Option("Database", "string", None, "v1 database", "database", shipping=True, api="v1",
           role_var=_role("influx_database"), shown_default="required with v1"),
    Option("RetentionPolicy", "string", None, "v1 retention policy", "retention_policy", shipping=True, api="v1",
           role_var=_role("influx_retention_policy"), shown_default="the database's default"),
    Option("Username", "string", None, "v1 user (needs `PasswordFile`)", "username", shipping=True, api="v1",
           role_var=_role("influx_username"), shown_default="none"),
    Option("PasswordFile", "secretfile", None, "v1: file holding the password alone on one line (mode 0600; needs "
           "`Username`)", "password_file", shipping=True, api="v1", shown_default="none",
           role_note="written by the role from kvmfleet_collectd_influx_password (secrets_dir/influxdb.password)"),
    Option("Org", "string", None, "v2 organization", "org", shipping=True, api="v2",
           role_var=_role("influx_org"), shown_default="required with v2"),
    Option("Bucket", "string", None, "v2 bucket (`database/retention-policy` on InfluxDB 1.8)", "bucket",
           shipping=True, api="v2", role_var=_role("influx_bucket"), shown_default="required with v2"),
    Option("TokenFile", "secretfile", None, "v2: file holding the API token alone on one line (mode 0600)",
           "token_file", shipping=True, api="v2", shown_default="required with v2",
           role_note="written by the role from kvmfleet_collectd_influx_token (secrets_dir/influxdb.token)"),
    Option("VerifyTLS", "bool", SHIP_DEFAULTS.verify_tls, "verify the server's certificate for `https://` (a "
           "warning is logged when off)", "verify_tls", shipping=True, role_var=_role("influx_verify_tls")),
    Option("CAFile", "cafile", None, "PEM bundle to verify the server with", "ca_file", shipping=True,
           role_var=_role("influx_ca_file"), shown_default="system CAs"),
    Option("AllowPlainHTTP", "bool", SHIP_DEFAULTS.allow_plain_http, "send the password or token to an "
           "`http://` `InfluxURL` on another machine, where anyone on the path reads them (refused otherwise; "
           "`https://` and loopback addresses need no such permission)", "allow_plain_http", shipping=True,
           role_var=_role("influx_allow_plain_http")),
    Option("Timeout", "seconds", SHIP_DEFAULTS.timeout, "per request (connect, send, answer); also how long "
           "shutdown flushes before spooling the rest", "timeout", shipping=True, role_var=_role("influx_timeout")),
    Option("BufferLines", "count", SHIP_DEFAULTS.buffer_lines, "most lines held while the server is unreachable, "
           "in memory and in the spool; when full the **oldest** are dropped and counted (`dropped`). 100,000 "
           "holds an hour of host + per-VM points for 200 VMs at 10 s (~120 MB of memory when full, and a spool "
           "file of up to about twice that)", "buffer_lines", shipping=True, role_var=_role("buffer_lines")),
    Option("SpoolPath", "spoolpath", SHIP_DEFAULTS.spool_path, "the lines that wait for the server are kept here "
           "(mode 0600, directory 0700 created if missing; a directory another user can write, or owns, is "
           "refused): appended within 2 s, fsynced within 7 s while the server fails, written at shutdown, sent "
           "after the next start and removed once delivered (\"Durability\" below); `\"\"`: no spool (unsent lines "
           "are lost at shutdown or a crash, and a warning says so)", "spool_path", shipping=True,
           role_var=_role("spool_path")),
    Option("BatchLines", "count", SHIP_DEFAULTS.batch_lines, "most lines per request", "batch_lines", shipping=True,
           role_var=_role("batch_lines")),
    Option("RetryMin", "seconds", SHIP_DEFAULTS.retry_min, "first retry delay after a failed send (tuning)",
           "retry_min", shipping=True, role_var=_role("retry_min")),
    Option("RetryMax", "seconds", SHIP_DEFAULTS.retry_max, "longest retry delay, at least `RetryMin`; retries back "
           "off exponentially with jitter between the two (tuning)", "retry_max", shipping=True,
           role_var=_role("retry_max")),
)
OPTION_BY_KEY = {opt.key: opt for opt in OPTIONS}
DEFAULTS = {opt.name: opt.default for opt in OPTIONS}


def _default_factory(name: str) -> Callable[[], Any]:
    default = DEFAULTS[name]
    return lambda: type(default)(default)


@dataclass
class AgentConfig:
    """The validated options; each default is the one of its :data:`OPTIONS` row."""

    source: str = DEFAULTS["Source"]
    libvirt_uri: str = DEFAULTS["LibvirtURI"]
    per_vm: bool = DEFAULTS["PerVM"]
    per_vcpu: bool = DEFAULTS["PerVCPU"]
    exit_reasons: str = DEFAULTS["ExitReasons"]
    exit_reasons_mechanism: str = DEFAULTS["ExitReasonsMechanism"]
    exit_reasons_max_fds: int = DEFAULTS["ExitReasonsMaxFds"]
    include: tuple[re.Pattern[str], ...] = DEFAULTS["Include"]
    exclude: tuple[re.Pattern[str], ...] = DEFAULTS["Exclude"]
    tags: dict[str, str] = field(default_factory=_default_factory("Tag"))
    dispatch: bool = DEFAULTS["Dispatch"]
    dispatch_per_vm: bool | None = DEFAULTS["DispatchPerVM"]  # None: see dispatches_per_vm
    histograms: bool = DEFAULTS["Histograms"]
    facts_interval: float = DEFAULTS["FactsInterval"]
    interval: float | None = DEFAULTS["Interval"]
    ship: ShipConfig | None = None  # None: no InfluxURL, no shipping

    def keeps(self, name: str) -> bool:
        """Whether counter ``name`` passes Include/Exclude (``re.search``)."""
        if self.include and not any(p.search(name) for p in self.include):
            return False
        return not any(p.search(name) for p in self.exclude)

    def dispatches_per_vm(self) -> bool:
        """Whether per-VM values go into collectd: as DispatchPerVM says; unset, only where they are not shipped
        (collectd is then their only way out)."""
        if not self.dispatch or not self.per_vm:
            return False
        return self.dispatch_per_vm if self.dispatch_per_vm is not None else self.ship is None

    def summary(self) -> str:
        """One line for the log (no secret: files are named, never read out)."""
        parts = [f"source {self.source}", f"per-VM {_onoff(self.per_vm)}", f"per-vCPU {_onoff(self.per_vcpu)}",
                 f"dispatch {_onoff(self.dispatch)}", f"per-VM dispatch {_onoff(self.dispatches_per_vm())}",
                 f"histograms {_onoff(self.histograms)}", f"exit reasons {self.exit_reasons}"]
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


def show_value(value: ConfigValue) -> str:
    """A config value as it would be written in collectd.conf."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"{value:g}" if isinstance(value, float) else str(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)  # a log line stays one line
    return '"' + text + '"'


def shown(key: str, values: Sequence[ConfigValue]) -> str:
    """``key`` and its values for a message: never a secret written inline, never a URL's credentials."""
    if _SECRETISH.search(key) and not key.lower().endswith("file"):
        return f'{key} "***"' if values else key  # a secret written inline by mistake: never echo it
    if key.lower() == "influxurl":
        values = [redact_url(v) if isinstance(v, str) else v for v in values]
    return " ".join([key, *(show_value(v) for v in values)]) if values else f"{key} (no value)"


# ---------------------------------------------------------------------------------------------- converters
# Each takes (option, values, check_files) and returns the option's value, or raises Bad(what was expected).
def _one(opt: Option, values: tuple[ConfigValue, ...], what: str) -> ConfigValue:
    if len(values) != 1:
        raise Bad(f"exactly one value: {what}")
    return values[0]


def _string(opt: Option, values: tuple[ConfigValue, ...], what: str) -> str:
    value = _one(opt, values, what)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise Bad(what)
    if isinstance(value, float):
        return str(int(value)) if value == int(value) else f"{value:g}"
    return str(value)


def _to_bool(opt: Option, values: tuple[ConfigValue, ...], check_files: bool) -> bool:
    value = _one(opt, values, "true or false")
    if isinstance(value, bool):
        return value
    flag = words.parse_bool(value) if isinstance(value, str) else None
    if flag is None:
        raise Bad("a boolean: true or false")
    return flag


def _to_choice(opt: Option, values: tuple[ConfigValue, ...], check_files: bool) -> str:
    what = "one of " + ", ".join(f'"{c}"' for c in opt.choices)
    text = _string(opt, values, what).strip().lower()
    if text not in opt.choices:
        raise Bad(what)
    return text


def _to_number(opt: Option, values: tuple[ConfigValue, ...], integer: bool) -> float:
    what = "a whole number >= 1" if integer else "a number of seconds > 0"
    value = _one(opt, values, what)
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number) or number <= 0 or (integer and number != int(number)):
        raise Bad(what)
    return number


def _to_seconds(opt: Option, values: tuple[ConfigValue, ...], check_files: bool) -> float:
    return _to_number(opt, values, integer=False)


def _to_count(opt: Option, values: tuple[ConfigValue, ...], check_files: bool) -> int:
    return int(_to_number(opt, values, integer=True))


def _to_regexes(opt: Option, values: tuple[ConfigValue, ...], check_files: bool) -> list[re.Pattern[str]]:
    if not values:
        raise Bad("one or more regular expressions (Python re syntax)")
    out = []
    for v in values:
        if not isinstance(v, str):
            raise Bad("quoted regular expressions (Python re syntax)")
        try:
            out.append(re.compile(v))
        except re.error as e:
            raise Bad(f"a valid regular expression ({show_value(v)}: {e})") from None
    return out


def _to_tag(opt: Option, values: tuple[ConfigValue, ...], check_files: bool) -> tuple[str, str]:
    what = "two quoted strings: Tag \"KEY\" \"VALUE\""
    if len(values) != 2 or any(isinstance(v, bool) for v in values):
        raise Bad(what)
    key, value = (show_value(v).strip('"') if not isinstance(v, str) else v for v in values)
    if not key or not value:
        raise Bad(what + " (neither empty)")
    if key in schema.RESERVED_TAGS or key.startswith("_") or key == "time":
        raise Bad(f"a tag key other than {', '.join(schema.RESERVED_TAGS)}, time and _*")
    if any(ch in key + value for ch in "\n\r\t"):
        raise Bad(what + " (no tab or newline)")
    return key, value


def _to_text(opt: Option, values: tuple[ConfigValue, ...], check_files: bool) -> str:
    text = _string(opt, values, "a quoted string")
    if not text.strip():
        raise Bad("a non-empty string")
    return text


def _to_url(opt: Option, values: tuple[ConfigValue, ...], check_files: bool) -> str:
    text = _string(opt, values, "a quoted string").strip()
    try:
        check_url(text)
    except URLProblem as e:
        if e.kind == URL_CREDENTIALS:
            raise Bad("a URL without user:password (put credentials in PasswordFile or TokenFile)") from None
        raise Bad("an http(s) URL such as \"https://influx.example:8086\" (no credentials, query or fragment)"
                  ) from None
    return text


def _to_secret_file(opt: Option, values: tuple[ConfigValue, ...], check_files: bool) -> str:
    text = _string(opt, values, "a quoted string")
    if not text.strip():
        raise Bad("a path to a file holding the secret alone")
    return text  # checked once the options around it are known to be right (check_secret_file)


def _to_ca_file(opt: Option, values: tuple[ConfigValue, ...], check_files: bool) -> str:
    path = _string(opt, values, "a quoted string")
    if check_files:
        if not os.access(path, os.R_OK) or not os.path.isfile(path):
            raise Bad("a readable PEM file of CA certificates")
        try:
            ssl.create_default_context(cafile=path)
        except (OSError, ssl.SSLError) as e:
            raise Bad(f"a PEM file of CA certificates ({e})") from None
    return path


def _to_spool_path(opt: Option, values: tuple[ConfigValue, ...], check_files: bool) -> str:
    path = _string(opt, values, "a quoted string").strip()
    if not path or not (check_files or not os.path.isabs(path)):
        return path
    what = ("\"\" (no spool) or an absolute file path in a directory only root can write (created 0700 if "
            "missing)")
    if not os.path.isabs(path) or path.endswith("/") or os.path.isdir(path):
        raise Bad(what)
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise Bad(what + f" ({parent} is not a writable directory)")
    try:  # the spool's directory, or where it will be created: another user could plant or swap the file
        privfile.check_directory(parent)
    except privfile.PrivateFileError as err:
        raise Bad(what + f" ({err.strerror}: another user could plant the spool)") from None
    return path


Converter = Callable[[Option, tuple[ConfigValue, ...], bool], Any]
KINDS: dict[str, Converter] = {
    "bool": _to_bool, "choice": _to_choice, "seconds": _to_seconds, "count": _to_count, "regex": _to_regexes,
    "tag": _to_tag, "string": _to_text, "url": _to_url, "secretfile": _to_secret_file, "cafile": _to_ca_file,
    "spoolpath": _to_spool_path,
}


# ---------------------------------------------------------------------------------------------- parsing
class _Problems:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def bad(self, name: str, values: Sequence[ConfigValue], expected: str) -> None:
        self.errors.append(f"option {shown(name, values)}: expected {expected}")


def _collect(entries: Iterable[ConfigEntry], check_files: bool, problems: _Problems
             ) -> tuple[dict[str, Any], dict[str, tuple[ConfigValue, ...]]]:
    """The converted value of every option given (repeatable ones gathered), and the raw values seen."""
    given: dict[str, Any] = {}
    seen: dict[str, tuple[ConfigValue, ...]] = {}
    for entry in entries:
        key, values = str(entry.key), tuple(entry.values)
        opt = OPTION_BY_KEY.get(key.strip().lower())
        if opt is None:
            problems.errors.append(f"unknown option {shown(key, values)}: expected one of "
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
        try:
            _store(opt, KINDS[opt.kind](opt, values, check_files), given)
        except Bad as e:
            problems.bad(opt.name, values, str(e))
    return given, seen


def _store(opt: Option, value: Any, given: dict[str, Any]) -> None:
    if opt.kind == "tag":
        key, text = value
        tags = given.setdefault(opt.name, {})
        if key in tags:
            raise Bad(f"each tag key once (\"{key}\" is already \"{tags[key]}\")")
        tags[key] = text
    elif opt.repeat:
        given[opt.name] = (*given.get(opt.name, ()), *value)
    else:
        given[opt.name] = value


def parse_config(entries: Iterable[ConfigEntry], check_files: bool = True) -> AgentConfig:
    """Validate the ``<Module>`` lines into an :class:`AgentConfig`; raise :class:`ConfigError` listing every
    mistake (one line each, naming the option, its value and what was expected).

    Keys are case-insensitive. ``check_files=False`` skips the checks that read the files named (secret files,
    CA file, spool directory): for tools that write a config on another machine. Warnings (options that have no
    effect) are logged on the ``kvmfleet.options`` logger.
    """
    problems = _Problems()
    given, seen = _collect(entries, check_files, problems)
    cfg = AgentConfig(**{o.attr: given[o.name] for o in OPTIONS if not o.shipping and o.name in given})
    if "InfluxURL" not in seen:
        _without_url(cfg, given, seen, problems)
    elif "InfluxURL" in given:
        cfg.ship = _ship_config(problems, given, seen, check_files)
    if given.get("DispatchPerVM") and not cfg.dispatch:
        problems.warnings.append("option DispatchPerVM true has no effect with Dispatch false")
    for text in problems.warnings:
        log.warning("kvmfleet: config: %s", text)
    if problems.errors:
        raise ConfigError(problems.errors)
    return cfg


def _without_url(cfg: AgentConfig, given: dict[str, Any], seen: dict[str, Any], problems: _Problems) -> None:
    shipping_given = [o.name for o in OPTIONS if o.shipping and o.name in seen]
    if shipping_given:
        problems.warnings.append(f"option(s) {', '.join(shipping_given)} have no effect without InfluxURL: "
                                 f"nothing is shipped")
    if cfg.per_vcpu:
        problems.warnings.append("option PerVCPU true has no effect without InfluxURL: per-vCPU values are "
                                 "shipped to InfluxDB, not dispatched into collectd")
    if "Dispatch" in given and not cfg.dispatch:
        problems.errors.append("option Dispatch false: expected InfluxURL too (with neither dispatching "
                               "nor shipping the plugin would do nothing)")


def _ship_config(problems: _Problems, given: dict[str, Any], seen: dict[str, tuple[ConfigValue, ...]],
                 check_files: bool) -> ShipConfig | None:
    """The options that need more than a check of their own value: the InfluxAPI's own options, the ones it
    requires, credentials that come in pairs, the retry bounds, then the secret files."""
    api = given.get("InfluxAPI", DEFAULTS["InfluxAPI"])
    errors_before = len(problems.errors)
    for opt in OPTIONS:
        if opt.api and opt.api != api and opt.name in seen:
            problems.bad(opt.name, seen[opt.name], f"no {opt.name} with InfluxAPI \"{api}\" ({opt.name} is an "
                                                   f"InfluxAPI \"{opt.api}\" option)")
    required = ("Database",) if api == "v1" else ("Bucket", "Org", "TokenFile")
    for name in required:
        if name not in seen:
            problems.errors.append(f"option {name} is missing: expected it with InfluxAPI \"{api}\" (which needs "
                                   f"{', '.join(required)})")
    if api == "v1" and ("Username" in seen) != ("PasswordFile" in seen):
        have, need = ("Username", "PasswordFile") if "Username" in seen else ("PasswordFile", "Username")
        problems.bad(have, seen[have], f"{need} as well (InfluxDB v1 credentials need both)")
    retry_min, retry_max = (given.get(n, DEFAULTS[n]) for n in ("RetryMin", "RetryMax"))
    if retry_min > retry_max:
        problems.bad("RetryMin", seen.get("RetryMin", (retry_min,)), f"at most RetryMax ({retry_max:g})")
    _check_transport(problems, given, seen)
    if check_files and len(problems.errors) == errors_before:
        for name in ("PasswordFile", "TokenFile"):
            if name in given:
                _check_secret_file(problems, name, seen[name], given[name])
    if len(problems.errors) != errors_before:
        return None
    return _ship_from(given, problems)


def _check_transport(problems: _Problems, given: dict[str, Any], seen: dict[str, tuple[ConfigValue, ...]]) -> None:
    credentials = "PasswordFile" in given or "TokenFile" in given
    try:
        check_credentials_transport(given["InfluxURL"], credentials, given.get("AllowPlainHTTP", False))
    except URLProblem:
        problems.bad("InfluxURL", seen["InfluxURL"], "an https:// URL when PasswordFile or TokenFile is given "
                                                     "(the credentials would cross the network unencrypted), or "
                                                     "AllowPlainHTTP true")


def _check_secret_file(problems: _Problems, name: str, values: tuple[ConfigValue, ...], path: str) -> None:
    what = "password" if name == "PasswordFile" else "token"
    if not os.path.isabs(path):
        problems.bad(name, values, f"an absolute path to a file holding the {what} alone")
        return
    try:
        read_secret(path, name)  # read and dropped: the writer reads it again when it is built
    except ShipConfigError as e:
        reason = str(e).replace(f"{name} {path!r} ", "the file ")
        problems.bad(name, values, f"a readable file holding the {what} alone on one line ({reason})")


def _ship_from(given: dict[str, Any], problems: _Problems) -> ShipConfig:
    if "CAFile" in given and not str(given["InfluxURL"]).startswith("https:"):
        problems.warnings.append("option CAFile has no effect with an http:// InfluxURL")
    if not given.get("SpoolPath", DEFAULTS["SpoolPath"]):
        problems.warnings.append("SpoolPath \"\": lines still unsent at shutdown will be lost")
    ship = ShipConfig(**{o.attr: given[o.name] for o in OPTIONS if o.shipping and o.name in given})
    ship.spool_path = ship.spool_path or None
    return ship


def build_writer(cfg: AgentConfig) -> Writer | None:
    """The writer for ``cfg.ship`` (reads the secret files now), or None without shipping; ConfigError naming the
    option if the shipping library refuses the settings."""
    if cfg.ship is None:
        return None
    try:
        return make_writer(cfg.ship)
    except ShipConfigError as e:
        text = str(e)
        name, value = "InfluxURL", redact_url(cfg.ship.url)
        for candidate in ("TokenFile", "PasswordFile", "CAFile", "Bucket", "Database", "Username"):
            attr = OPTION_BY_KEY[candidate.lower()].attr
            if attr in text or candidate in text:
                name, value = candidate, getattr(cfg.ship, attr)
                break
        what = show_value(value) if value is not None else "(no value)"
        raise ConfigError([f"option {name} {what}: refused by the shipping library: {text}"]) from None
