"""kvmfleet.options: the option table, validation of the <Module> block, the writer it builds."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
from tests.unit.agentdata import (
    SECRET,
    entries,
    problems,
    secret,
)

from kvmfleet import options as op
from kvmfleet.options import AgentConfig, parse_config


# -- options ------------------------------------------------------------------------------------------------------
def test_defaults_and_no_shipping_without_url() -> None:
    cfg = parse_config([])
    assert (cfg.source, cfg.per_vm, cfg.per_vcpu, cfg.dispatch, cfg.histograms) == ("auto", True, False, True, True)
    assert cfg.facts_interval == 300 and cfg.interval is None and cfg.ship is None and cfg.tags == {}


def test_every_option_has_a_kind_and_defaults_match_the_dataclass() -> None:
    cfg = AgentConfig()
    assert {o.name for o in op.OPTIONS} >= {"Source", "PerVM", "PerVCPU", "Include", "Exclude", "Tag", "Dispatch",
                                            "Histograms", "FactsInterval", "InfluxURL", "InfluxAPI", "Database",
                                            "RetentionPolicy", "Username", "PasswordFile", "Org", "Bucket",
                                            "TokenFile", "VerifyTLS", "CAFile", "Timeout", "BufferLines",
                                            "SpoolPath", "BatchLines"}
    assert (cfg.source, cfg.per_vm, cfg.per_vcpu) == tuple(op.OPTION_BY_KEY[k].default
                                                           for k in ("source", "pervm", "pervcpu"))


def test_keys_are_case_insensitive_and_values_lenient(tmp_path: Path) -> None:
    cfg = parse_config(entries(("source", "STATSFD"), ("PERVCPU", "yes"), ("pervm", False), ("histograms", "off"),
                               ("FactsInterval", "60"), ("interval", 5.0), ("Include", "^halt", "exits$"),
                               ("exclude", "poll"), ("tag", "rack", "r 1"), ("TAG", "dc", 7.0),
                               ("influxurl", "https://db.example:8086/"), ("database", "kvm"),
                               ("BufferLines", 2000.0), ("spoolpath", str(tmp_path / "sp" / "ship.spool")),
                               ("RetryMax", 5.0)))
    assert cfg.source == "statsfd" and cfg.per_vcpu and not cfg.per_vm and not cfg.histograms
    assert cfg.facts_interval == 60 and cfg.interval == 5
    assert [p.pattern for p in cfg.include] == ["^halt", "exits$"] and [p.pattern for p in cfg.exclude] == ["poll"]
    assert cfg.tags == {"rack": "r 1", "dc": "7"}
    assert cfg.ship is not None and cfg.ship.buffer_lines == 2000 and cfg.ship.retry_max == 5
    assert cfg.ship.api == "v1" and cfg.ship.database == "kvm"
    assert cfg.keeps("halt_exits") and cfg.keeps("exits") and not cfg.keeps("halt_poll_exits")
    assert not cfg.keeps("mmio_exits_x")


@pytest.mark.parametrize(("line", "needles"), [
    (("Foo", "bar"), ['unknown option Foo "bar"', "expected one of Source, PerVM"]),
    (("PerVM", 5.0), ["option PerVM 5", "expected a boolean"]),
    (("PerVM",), ["option PerVM (no value)", "exactly one value"]),
    (("Dispatch", "maybe"), ['option Dispatch "maybe"', "true or false"]),
    (("Source", "proc"), ['option Source "proc"', '"auto", "statsfd", "debugfs"']),
    (("FactsInterval", "ten"), ['option FactsInterval "ten"', "a number of seconds > 0"]),
    (("FactsInterval", -1.0), ["option FactsInterval -1", "a number of seconds > 0"]),
    (("Include", "(unclosed"), ['option Include "(unclosed"', "valid regular expression", "missing )"]),
    (("Exclude", 3.0), ["option Exclude 3", "quoted regular expressions"]),
    (("Tag", "rack"), ['option Tag "rack"', 'two quoted strings: Tag "KEY" "VALUE"']),
    (("Tag", "host", "x"), ['option Tag "host" "x"', "a tag key other than host, vm, vm_uuid, vmm, vcpu"]),
    (("Tag", "a", ""), ['option Tag "a" ""', "neither empty"]),
    (("Interval", 0.0), ["option Interval 0", "> 0"]),
    (("ExitReasons", "yes"), ['option ExitReasons "yes"', 'one of "off", "host", "vm"']),
    (("ExitReasonsMaxFds", 0.5), ["option ExitReasonsMaxFds 0.5", "a whole number >= 1"]),
    (("Tag", "reason", "x"), ['option Tag "reason" "x"', "vcpu, isa, reason, time"]),
])
def test_each_mistake_names_option_value_and_expectation(line: tuple[Any, ...], needles: list[str]) -> None:
    found = problems(line)
    assert len(found) == 1, found
    for needle in needles:
        assert needle in found[0], (needle, found[0])


@pytest.mark.parametrize(("lines", "needles"), [
    ([("InfluxURL", "http://x:8086")], ["option Database is missing", 'InfluxAPI "v1"']),
    ([("InfluxURL", "http://x:8086"), ("InfluxAPI", "v2")],
     ["option Bucket is missing", "option Org is missing", "option TokenFile is missing"]),
    ([("InfluxURL", "http://x:8086"), ("InfluxAPI", "v3")], ['option InfluxAPI "v3"', '"v1", "v2"']),
    ([("InfluxURL", "ftp://x"), ("Database", "kvm")], ['option InfluxURL "ftp://x"', "an http(s) URL"]),
    ([("InfluxURL", "http://x:8086"), ("Database", "kvm"), ("PasswordFile", "/etc/p")],
     ['option PasswordFile "/etc/p"', "Username as well"]),
    ([("InfluxURL", "http://x:8086"), ("Database", "kvm"), ("Username", "u")],
     ['option Username "u"', "PasswordFile as well"]),
    ([("InfluxURL", "http://x:8086"), ("Database", "kvm"), ("Bucket", "b")],
     ['option Bucket "b"', 'no Bucket with InfluxAPI "v1"']),
    ([("InfluxURL", "http://x:8086"), ("Database", "kvm"), ("BufferLines", 1.5)],
     ["option BufferLines 1.5", "a whole number >= 1"]),
    ([("InfluxURL", "http://x:8086"), ("Database", "kvm"), ("BatchLines", 0.0)],
     ["option BatchLines 0", "a whole number >= 1"]),
    ([("InfluxURL", "http://x:8086"), ("Database", "kvm"), ("RetryMin", 9.0), ("RetryMax", 2.0)],
     ["option RetryMin 9", "at most RetryMax (2)"]),
    ([("InfluxURL", "http://x:8086"), ("Database", "kvm"), ("CAFile", "/nonexistent/ca.pem")],
     ['option CAFile "/nonexistent/ca.pem"', "a readable PEM file"]),
    ([("InfluxURL", "http://x:8086"), ("Database", "kvm"), ("SpoolPath", "relative/ship.spool")],
     ['option SpoolPath "relative/ship.spool"', "an absolute file path"]),
    ([("InfluxURL", "http://x:8086"), ("Database", "kvm"), ("SpoolPath", "/etc/passwd/x/ship.spool")],
     ["option SpoolPath", "/etc/passwd is not a writable directory"]),
    ([("Dispatch", False)], ["option Dispatch false", "expected InfluxURL too"]),
    ([("PerVM", True), ("PerVM", False)], ["option PerVM false", "the option once (it is already set to true)"]),
])
def test_cross_option_mistakes(lines: list[tuple[Any, ...]], needles: list[str]) -> None:
    text = "\n".join(problems(*lines))
    for needle in needles:
        assert needle in text, (needle, text)


@pytest.mark.parametrize("where", ["world-writable", "foreign owner", "world-writable parent"])
def test_a_spool_directory_other_users_can_write_is_refused(tmp_path: Path, where: str) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    if where == "foreign owner":
        os.chown(shared, 4321, 4321)
    else:
        shared.chmod(0o1777)
    path = shared / "ship.spool" if where != "world-writable parent" else shared / "kvmfleet" / "ship.spool"
    found = problems(("InfluxURL", "http://x:8086"), ("Database", "kvm"), ("SpoolPath", str(path)))
    assert len(found) == 1 and found[0].startswith(f'option SpoolPath "{path}": expected')
    why = "belongs to uid 4321, not to this user or root" if where == "foreign owner" else \
        "is world-writable (mode 1777)"
    assert f"directory {shared} {why}: another user could plant the spool" in found[0]
    shared.chmod(0o755)
    os.chown(shared, 0, 0)
    cfg = parse_config(entries(("InfluxURL", "http://x:8086"), ("Database", "kvm"), ("SpoolPath", str(path))))
    assert cfg.ship is not None and cfg.ship.spool_path == str(path)


def test_secret_files_are_checked_and_never_read_out(tmp_path: Path) -> None:
    base = [("InfluxURL", "https://x:8086"), ("InfluxAPI", "v2"), ("Org", "o"), ("Bucket", "b")]
    missing = problems(*base, ("TokenFile", str(tmp_path / "nope")))
    assert len(missing) == 1 and f'option TokenFile "{tmp_path / "nope"}"' in missing[0]
    assert "No such file or directory" in missing[0] and "holding the token alone" in missing[0]
    a_dir = problems(*base, ("TokenFile", str(tmp_path)))
    assert "is not a regular file" in a_dir[0]
    empty = secret(tmp_path, "empty", "")
    assert "is empty" in problems(*base, ("TokenFile", empty))[0]
    two = secret(tmp_path, "two", SECRET + "\nsecond line")
    text = problems(*base, ("TokenFile", two))[0]
    assert "alone on one line" in text and SECRET not in text
    relative = problems(*base, ("TokenFile", "token.txt"))[0]
    assert "an absolute path" in relative
    cfg = parse_config(entries(*base, ("TokenFile", secret(tmp_path))))
    assert cfg.ship is not None and cfg.ship.token_file and SECRET not in repr(cfg) and SECRET not in cfg.summary()


def test_inline_secrets_and_url_credentials_are_never_echoed() -> None:
    found = problems(("Password", SECRET), ("Token", SECRET), ("InfluxURL", f"http://user:{SECRET}@db:8086"),
                     ("Database", "kvm"))
    text = "\n".join(found)
    assert len(found) == 3 and SECRET not in text
    assert 'unknown option Password "***"' in text and 'option InfluxURL "http://***@db:8086"' in text


def test_all_mistakes_are_reported_together() -> None:
    found = problems(("PerVM", 5.0), ("Foo", 1.0), ("Tag", "x"), ("Source", "nope"))
    assert len(found) == 4


def test_shipping_options_without_url_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kvmfleet"):
        cfg = parse_config(entries(("Database", "kvm"), ("BufferLines", 10.0)))
    assert cfg.ship is None
    assert "Database, BufferLines have no effect without InfluxURL" in caplog.text


def test_v2_config_and_writer(tmp_path: Path) -> None:
    cfg = parse_config(entries(("InfluxURL", "http://127.0.0.1:9"), ("InfluxAPI", "V2"), ("Org", "o"),
                               ("Bucket", "b"), ("TokenFile", secret(tmp_path)), ("SpoolPath", "")))
    assert cfg.ship is not None and (cfg.ship.api, cfg.ship.bucket, cfg.ship.org) == ("v2", "b", "o")
    assert cfg.ship.spool_path is None
    writer = op.build_writer(cfg)
    assert writer is not None and "bucket=b" in writer.name
    writer.close()
    assert op.build_writer(parse_config([])) is None


def test_check_files_false_skips_file_checks() -> None:
    cfg = parse_config(entries(("InfluxURL", "https://x:1"), ("Database", "kvm"), ("Username", "u"),
                               ("PasswordFile", "/nonexistent/pass"), ("CAFile", "/nonexistent/ca")),
                       check_files=False)
    assert cfg.ship is not None and cfg.ship.password_file == "/nonexistent/pass"


@pytest.mark.parametrize(("url", "allow", "refused"), [
    ("http://db.example:8086", None, True),
    ("http://10.1.2.3:8086", None, True),
    ("http://db.example:8086", True, False),
    ("https://db.example:8086", None, False),
    ("http://127.0.0.1:8086", None, False),
    ("http://localhost:8086", None, False),
    ("http://[::1]:8086", None, False),
])
def test_credentials_never_cross_the_network_unencrypted_unless_allowed(tmp_path: Path, url: str,
                                                                        allow: bool | None, refused: bool) -> None:
    lines = [("InfluxURL", url), ("Database", "kvm"), ("Username", "u"), ("PasswordFile", secret(tmp_path))]
    if allow is not None:
        lines.append(("AllowPlainHTTP", allow))
    if refused:
        found = problems(*lines)
        assert len(found) == 1 and f'option InfluxURL "{url}"' in found[0] and "AllowPlainHTTP true" in found[0]
        assert SECRET not in found[0]
    else:
        cfg = parse_config(entries(*lines))
        assert cfg.ship is not None and cfg.ship.allow_plain_http is bool(allow)
    no_credentials = parse_config(entries(("InfluxURL", url), ("Database", "kvm")))
    assert no_credentials.ship is not None  # without credentials plain http is fine: nothing to steal


def test_the_writer_refuses_plain_http_credentials_too(tmp_path: Path) -> None:
    from kvmfleet.ship import ShipConfig, ShipConfigError, make_writer

    cfg = ShipConfig(url="http://db.example:8086", username="u", password_file=secret(tmp_path))
    with pytest.raises(ShipConfigError, match="unencrypted"):
        make_writer(cfg)
    cfg.allow_plain_http = True
    make_writer(cfg).close()
