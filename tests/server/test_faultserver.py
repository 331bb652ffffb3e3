"""The fault server itself answers each fault as documented (the shipper and audit tests rely on it)."""

from __future__ import annotations

import http.client
import urllib.parse

import pytest
from tests.support.faultserver import BAD_MARK, FaultServer

pytestmark = pytest.mark.server


def post(url: str, path: str, body: bytes, timeout: float = 10) -> tuple[int, bytes]:
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=timeout)
    try:
        conn.request("POST", path, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize(("fault", "status", "stored"), [
    ("ok", 400, ["a x=1i", "c x=3i"]), ("partial", 400, ["a x=1i", "c x=3i"]), ("all-or-nothing", 400, []),
    ("413", 413, []), ("429", 429, []), ("500", 500, []), ("garbage", 200, []), ("redirect", 307, []),
])
def test_each_fault_answers_a_write_as_documented(fault: str, status: int, stored: list[str]) -> None:
    with FaultServer([fault]) as server:
        got, _ = post(server.url, "/write?db=kvm", f"a x=1i\nb{BAD_MARK} x=2i\nc x=3i".encode())
        assert (got, server.stored) == (status, stored)
        got, _ = post(server.url, "/write?db=kvm", b"d x=4i")
        assert got == ({"ok": 204, "partial": 204, "all-or-nothing": 204}.get(fault, status))


def test_trickle_and_garbage_query() -> None:
    with FaultServer(["garbage"]) as server:
        status, body = post(server.url, "/query", b"q=SELECT 1")
        assert status == 200 and b'"not a list"' in body
    with FaultServer(["trickle"]) as server, pytest.raises(TimeoutError):
        post(server.url, "/query", b"q=SELECT 1", timeout=0.5)  # a byte a second: the first read waits 1 s
