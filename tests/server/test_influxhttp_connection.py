"""kvmfleet.influxhttp.KeepAliveConnection against loopback servers that misbehave on purpose: keep-alive reuse,
a kept-alive connection the server closed, a reset on a new one, a body over the limit, abort, TLS."""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from tests.support.servers import LOCALHOST, BlackholeServer, StubHTTPServer, StubRequest, StubResponse

from kvmfleet.influxhttp import DeadlineExceeded, KeepAliveConnection

pytestmark = pytest.mark.server

OK = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"


class RawServer:
    """Accepts connections one after another; ``serve(sock)`` does what it likes with each, then it is closed."""

    def __init__(self, serve: Callable[[socket.socket], None]) -> None:
        self.listener = socket.create_server((LOCALHOST, 0))
        self.url = f"http://{LOCALHOST}:{self.listener.getsockname()[1]}"
        self.served = threading.Event()  # set each time a connection was served and closed
        self.accepted = 0
        self._serve = serve
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            with sock:
                self._serve(sock)
            self.served.set()

    def close(self) -> None:
        self.listener.close()


def read_request(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next((h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")),
                      b"0"))
    while len(body) < length:
        body += sock.recv(65536)
    return head


@pytest.fixture
def raw_server() -> Iterator[Callable[[Callable[[socket.socket], None]], RawServer]]:
    made: list[RawServer] = []

    def make(serve: Callable[[socket.socket], None]) -> RawServer:
        made.append(RawServer(serve))
        return made[-1]

    yield make
    for server in made:
        server.close()


def test_keep_alive_reuses_one_connection() -> None:
    def handler(req: StubRequest) -> StubResponse:
        return 204, {}, b""

    with StubHTTPServer(handler) as stub, KeepAliveConnection(stub.url) as conn:
        for _ in range(3):
            assert conn.post("/write", b"x", {}).status == 204
        assert conn.opened == 1 and len(stub.requests) == 3


def test_a_kept_alive_connection_the_server_closed_is_retried_once_on_a_new_one(raw_server: Callable) -> None:
    def answer_once_then_close(sock: socket.socket) -> None:  # keep-alive promised, then an idle close
        read_request(sock)
        sock.sendall(OK)

    server = raw_server(answer_once_then_close)
    with KeepAliveConnection(server.url, timeout=5) as conn:
        assert conn.post("/write", b"1", {}).status == 204
        assert server.served.wait(5)  # the server has closed the kept-alive connection
        assert conn.post("/write", b"2", {}).status == 204
        assert conn.opened == 2 and server.accepted == 2


def test_a_new_connection_that_is_cut_is_not_retried(raw_server: Callable) -> None:
    server = raw_server(read_request)  # reads and closes without an answer
    with KeepAliveConnection(server.url, timeout=5) as conn, pytest.raises(http.client.RemoteDisconnected):
        conn.post("/write", b"1", {})
    assert conn.opened == 1


def test_a_body_over_the_limit_is_cut_and_the_connection_dropped() -> None:
    def handler(req: StubRequest) -> StubResponse:
        return 200, {}, b"x" * 1000

    with StubHTTPServer(handler) as stub, KeepAliveConnection(stub.url, max_body=100) as conn:
        resp = conn.post("/query", b"", {})
        assert resp.status == 200 and resp.body == b"x" * 100 and not resp.complete
        resp = KeepAliveConnection(stub.url, max_body=1000).post("/query", b"", {})
        assert resp.body == b"x" * 1000 and resp.complete
        conn.post("/query", b"", {})
        assert conn.opened == 2  # the unread rest would have spoilt the next answer


def test_abort_from_another_thread_ends_a_blocked_post() -> None:
    with BlackholeServer() as hole:
        conn = KeepAliveConnection(hole.url, timeout=30)
        threading.Timer(0.3, conn.abort).start()
        t0 = time.monotonic()
        with pytest.raises((OSError, http.client.HTTPException)):
            conn.post("/write", b"x", {})
        assert time.monotonic() - t0 < 5


def test_https_is_verified_unless_told(tls_cert: tuple[str, str]) -> None:
    cert, key = tls_cert
    with StubHTTPServer(lambda req: (204, {}, b""), certfile=cert, keyfile=key) as https:
        with pytest.raises(ssl.SSLCertVerificationError):
            KeepAliveConnection(https.url).post("/write", b"x", {})
        ctx = ssl.create_default_context(cafile=cert)
        assert KeepAliveConnection(https.url, tls=ctx).post("/write", b"x", {}).status == 204


def test_a_server_that_trickles_its_answer_hits_the_deadline(raw_server) -> None:  # type: ignore[no-untyped-def]
    """One byte a second keeps every read within its timeout: only the deadline of the whole exchange ends it."""
    stop = threading.Event()

    def trickle(sock: socket.socket) -> None:
        read_request(sock)
        for byte in OK * 10:
            if stop.wait(0.5):
                return
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return

    server = raw_server(trickle)
    try:
        with KeepAliveConnection(server.url, timeout=2, deadline=1.5) as conn:
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded, match=r"no complete answer within 1\.5s"):
                conn.post("/write", b"x", {})
            assert 1.4 < time.monotonic() - t0 < 4
    finally:
        stop.set()
