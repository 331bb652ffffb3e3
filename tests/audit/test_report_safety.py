"""Words from the database in the reports: host and VM names, facts, notes. Any hypervisor writes them; none may
drive a terminal (table), inject markup (markdown, HTML) or stretch every row (64 KiB names). JSON keeps them
as they are. And a bug in the audit is still exit 2 with one line, never exit 1 ("findings")."""

from __future__ import annotations

import json
from typing import Any

import pytest
from tests.audit.test_engine import NO_TDP, SHADOW, T0, Canned, run

from kvmfleet.audit import engine
from kvmfleet.audit.report import render
from kvmfleet.cli import main

HOST = "hv\x1b[2K\x1b[1A<b>|*_#"
VM = "vm<img src=x onerror=alert(1)>\x1b]0;owned\x07"
STATE = "<script>alert(1)</script>\x1b[31m"
LONG = "hv-" + "y" * 70_000


def _hostile() -> Canned:
    facts = dict(NO_TDP, tdp_state="unsupported", kvm_module=STATE)
    canned = Canned().host(HOST, SHADOW, facts, vms={VM: SHADOW})
    canned.host(LONG, SHADOW, dict(NO_TDP, tdp_state=STATE), vms={VM: SHADOW})
    return canned


def _printable(text: str) -> bool:
    return all(ch == "\n" or ch.isprintable() for ch in text)


@pytest.mark.parametrize("fmt", ["table", "markdown", "html"])
def test_no_control_character_and_no_markup_from_outside(fmt: str) -> None:
    result, _ = run(_hostile())
    assert {f.host for f in result.findings} == {HOST, LONG}
    text = render(result, fmt, "warning")
    assert _printable(text)
    assert "y" * 201 not in text and "(70003 characters)" in text  # a long name cut, and the cut said
    if fmt == "table":  # no markup to fear in a terminal: the names as they are, controls escaped
        assert "hv\\x1b[2K\\x1b[1A<b>|*_#" in text and "vm<img src=x onerror=alert(1)>\\x1b]0;owned\\x07" in text
        assert "tdp_state=<script>alert(1)</script>\\x1b[31m" in text
        assert max(len(line) for line in text.splitlines() if line.startswith("critical")) < 1000
    else:
        assert "<script" not in text and "<img" not in text and "<b>|" not in text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;\\x1b[31m" in text and "vm&lt;img src=x" in text
    if fmt == "markdown":
        assert "hv\\x1b\\[2K\\x1b\\[1A&lt;b&gt;\\|\\*\\_\\#" in text


def test_json_keeps_the_names_as_they_are() -> None:
    result, _ = run(_hostile())
    doc = json.loads(render(result, "json", "warning"))
    assert {f["host"] for f in doc["findings"]} == {HOST, LONG}
    assert any(v["vm"] == VM for f in doc["findings"] for v in f.get("vms", []))


def test_a_stale_host_is_named_and_noted() -> None:
    result, _ = run(Canned().host("quiet", SHADOW, NO_TDP), now=T0 + 3600 + 1800)
    assert [(s.host, s.age_s) for s in result.stale] == [("quiet", 1800)]
    assert all(any(n.startswith("stale: newest sample 2023-11-14T23:13:20Z, 30m before the audit") for n in f.notes)
               for f in result.findings)
    table = render(result, "table", "warning")
    assert "Stale: 1 host sent no sample in the last 5m (stale): the audit cannot tell whether it is clean:\n" \
           "  quiet: newest sample 2023-11-14T23:13:20Z, 30m before the audit\n" in table
    assert table.rstrip().endswith("; 1 stale")
    result, _ = run(Canned().host("quiet", SHADOW, NO_TDP), now=T0 + 3600 + 1800, stale_after="31m")
    assert result.stale == []


def test_a_bug_is_exit_2_with_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken(*args: Any, **kw: Any) -> None:
        raise KeyError("tdp_state\nsecond line")

    monkeypatch.setattr(engine, "run_audit", broken)
    rc = main(["audit", "--url", "http://127.0.0.1:9", "--database", "kvm"])
    out, err = capsys.readouterr()
    assert (rc, out) == (2, "")
    assert len(err.splitlines()) == 1 and err.startswith(
        "kvmfleet audit: error: internal error, please report it: KeyError: 'tdp_state\\nsecond line' at "), err


def test_a_bad_stale_after_is_refused_before_any_request(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["audit", "--url", "http://127.0.0.1:9", "--database", "kvm", "--stale-after", "soon"])
    assert rc == 2 and capsys.readouterr().err == (
        "kvmfleet audit: error: --stale-after: 'soon' is not a duration such as 30m, 1h, 6h or 1d\n")
