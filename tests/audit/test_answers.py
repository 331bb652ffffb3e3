"""Answers the audit client cannot read (a proxy's page, a broken or hostile server): each is exit 2 with one line
on stderr, never a traceback and never exit 1 (findings). A stub HTTP server on loopback gives the answers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from tests.support.servers import StubHTTPServer

from kvmfleet.audit import client as audit_client
from kvmfleet.audit.client import AuditError, Connection, InfluxQLClient
from kvmfleet.cli import main

pytestmark = pytest.mark.server

ROW = [1_700_000_000, 5]
GOOD = {"name": "kvm", "tags": {"host": "hv1"}, "columns": ["time", "exits"], "values": [ROW]}


def _answer(*series: Any, **result: Any) -> bytes:
    return json.dumps({"results": [{"statement_id": 0, "series": list(series), **result}]}).encode()


BAD_ANSWERS: dict[str, tuple[bytes, str]] = {
    "not JSON": (b"<html>proxy error</html>", "is not JSON"),
    "nested too deep": (b"[" * 100_000 + b"]" * 100_000, "is not JSON"),
    "a list": (b"[1, 2]", "no results list"),
    "results not a list": (b'{"results": {"series": "not a list"}}', "no results list"),
    "result not an object": (b'{"results": ["x"]}', "result 0 is not an object"),
    "statement_id a string": (b'{"results": [{"statement_id": "0x"}]}', "statement_id '0x'"),
    "statement_id out of range": (b'{"results": [{"statement_id": 7}]}', "statement_id 7"),
    "statement answered twice": (b'{"results": [{"statement_id": 0}, {"statement_id": 0}]}', "statement_id 0"),
    "no result": (b'{"results": []}', "no result for statement 0"),
    "series not a list": (b'{"results": [{"statement_id": 0, "series": "not a list"}]}', "are not a list"),
    "series not an object": (_answer("kvm"), "a series is not an object"),
    "name not a string": (_answer(dict(GOOD, name=5)), "series name is not a string"),
    "tag not a string": (_answer(dict(GOOD, tags={"host": 5})), "tags of series 'kvm' are not strings"),
    "no columns": (_answer({k: v for k, v in GOOD.items() if k != "columns"}), "no list of column names"),
    "columns not strings": (_answer(dict(GOOD, columns=["time", 1])), "no list of column names"),
    "values not a list": (_answer(dict(GOOD, values="x")), "not a list of rows"),
    "row not a list": (_answer(dict(GOOD, values=[5])), "not a list of rows"),
    "row too short": (_answer(dict(GOOD, values=[[1_700_000_000]])), "one value per column"),
    "value an object": (_answer(dict(GOOD, values=[[1_700_000_000, {"a": 1}]])), "one value per column"),
    "time a string": (_answer(dict(GOOD, values=[["yesterday", 5]])), "time of series 'kvm' is not a number"),
    "time NaN": (_answer(dict(GOOD, values=[[float("nan"), 5]])), "is not a number"),
}


@pytest.fixture
def stub() -> Iterator[tuple[StubHTTPServer, list[bytes]]]:
    bodies: list[bytes] = []

    def handler(req: Any) -> tuple[int, dict[str, str], bytes]:
        return 200, {"Content-Type": "application/json"}, bodies[0]

    with StubHTTPServer(handler) as server:
        yield server, bodies


def _cli(capsys: pytest.CaptureFixture[str], url: str, *extra: str) -> tuple[int, str, list[str]]:
    rc = main(["audit", "--url", url, "--database", "kvm", "--timeout", "5", *extra])
    out, err = capsys.readouterr()
    return rc, out, err.splitlines()


@pytest.mark.parametrize("case", list(BAD_ANSWERS))
def test_an_answer_of_the_wrong_shape_is_exit_2_with_one_line(case: str, stub: tuple[StubHTTPServer, list[bytes]],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    server, bodies = stub
    body, words = BAD_ANSWERS[case]
    bodies.append(body)
    rc, out, err = _cli(capsys, server.url)
    assert (rc, out) == (2, ""), err
    assert len(err) == 1 and err[0].startswith("kvmfleet audit: error: ") and words in err[0], err
    assert "Traceback" not in err[0]


def test_statement_errors_and_server_words_come_as_one_printable_line(stub: tuple[StubHTTPServer, list[bytes]],
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    server, bodies = stub
    bodies.append(json.dumps({"results": [{"statement_id": 0, "error": "bad\nthing\x1b[2K"}]}).encode())
    rc, _, err = _cli(capsys, server.url)
    assert rc == 2 and err == ["kvmfleet audit: error: query fleet_counters: bad thing [2K"], err
    bodies[0] = json.dumps({"error": "\x1b]0;owned\x07 boom"}).encode()
    rc, _, err = _cli(capsys, server.url)
    assert rc == 2 and len(err) == 1 and err[0].isprintable() and "boom" in err[0], err


def test_a_200_answer_larger_than_the_limit(stub: tuple[StubHTTPServer, list[bytes]],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    server, bodies = stub
    bodies.append(b'{"results": [' + b" " * ((1 << 20) + 1024) + b"]}")  # small past the limit: sent whole
    monkeypatch.setattr(audit_client, "MAX_BODY", 1 << 20)
    c = InfluxQLClient(Connection(url=server.url, database="kvm", timeout=5))
    try:
        with pytest.raises(AuditError, match=r"the answer to query is larger than 1 MiB$"):
            c.query("SELECT 1")
    finally:
        c.close()


def test_a_good_answer_still_reads(stub: tuple[StubHTTPServer, list[bytes]]) -> None:
    server, bodies = stub
    bodies.append(json.dumps({"results": [{"statement_id": 0, "series": [GOOD, {"name": "kvm", "columns": ["x"]}]},
                                          {"statement_id": 1}]}).encode())
    c = InfluxQLClient(Connection(url=server.url, database="kvm", timeout=5))
    try:
        first, second = c.query(["SELECT 1", "SELECT 2"])
    finally:
        c.close()
    assert [(s.tags, s.rows()) for s in first] == [({"host": "hv1"}, [{"time": ROW[0], "exits": 5}]), ({}, [])]
    assert second == []
