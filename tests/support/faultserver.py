"""An InfluxDB that misbehaves on purpose, on loopback: what the shipper and the audit must survive.

:class:`FaultServer` answers ``/write`` (gzip or plain line protocol) and ``/query`` (InfluxQL, as InfluxDB 1.x
does) in one of several *faults*, cycled or set by the test:

* ``ok``: a well-behaved InfluxDB; every acceptable line is stored, ``/query`` answers ``empty_answer``;
* ``partial``: InfluxDB 1.x's partial write: good lines stored, 400 ``partial write: ... dropped=N``;
* ``all-or-nothing``: one bad line and nothing of the batch is stored, 400;
* ``413``: the body is too large (nothing stored);
* ``429``: Too Many Requests with ``Retry-After: 1`` (nothing stored);
* ``500``: an internal error (nothing stored);
* ``trickle``: the answer comes one byte a second (after storing: a client that gives up sends again);
* ``huge``: a 500 with a body of ``huge_bytes`` bytes;
* ``garbage``: HTTP 200 whose JSON has the wrong shape (``/query``), or a 200 with a garbage body (``/write``);
* ``redirect``: 307 to another URL (nothing stored).

A line is *bad* (a line the server would refuse alone) when it holds ``BAD_MARK``; every other line is good.
``stored`` keeps the good lines stored, in order; duplicates are kept (a retry after a lost answer), so tests
compare sets.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .servers import LOCALHOST

BAD_MARK = "BAD"
FAULTS = ("ok", "partial", "all-or-nothing", "413", "429", "500", "trickle", "huge", "garbage", "redirect")


class FaultServer:
    """See the module docstring. ``faults`` is cycled one fault per request (or set ``fault`` to pin one)."""

    def __init__(self, faults: Iterable[str] = ("ok",), huge_bytes: int = 8 << 20,
                 empty_answer: dict[str, Any] | None = None) -> None:
        self.faults = list(faults)
        unknown = set(self.faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}")
        self.fault: str | None = None
        self.huge_bytes = huge_bytes
        self.empty_answer = empty_answer if empty_answer is not None else {"results": [{"statement_id": 0}]}
        self.stored: list[str] = []
        self.requests: list[tuple[str, str]] = []  # (path, fault)
        self._lock = threading.Lock()
        self._count = 0
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer((LOCALHOST, 0), self._handler_class())
        self._server.daemon_threads = True
        self.url = f"http://{LOCALHOST}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fault-server", daemon=True)

    # -- what the server does
    def next_fault(self, path: str) -> str:
        with self._lock:
            fault = self.fault or self.faults[self._count % len(self.faults)]
            self._count += 1
            self.requests.append((path, fault))
        return fault

    def store(self, lines: list[str]) -> None:
        with self._lock:
            self.stored.extend(lines)

    def answer_write(self, lines: list[str], fault: str) -> tuple[int, dict[str, str], bytes]:
        good = [ln for ln in lines if BAD_MARK not in ln]
        bad = len(lines) - len(good)
        if fault in ("ok", "partial", "trickle") or (fault == "all-or-nothing" and not bad):
            self.store(good)
            if bad:
                return 400, {}, json.dumps({"error": f"partial write: unable to parse '{BAD_MARK}...': "
                                                     f"dropped={bad}"}).encode()
            return 204, {}, b""
        return self._failure(fault, bad)

    def _failure(self, fault: str, bad: int) -> tuple[int, dict[str, str], bytes]:
        if fault == "all-or-nothing":
            return 400, {}, json.dumps({"error": f"unable to parse '{BAD_MARK}...': invalid field format"}).encode()
        if fault == "413":
            return 413, {}, b'{"error":"Request Entity Too Large"}'
        if fault == "429":
            return 429, {"Retry-After": "1"}, b'{"error":"too many requests"}'
        if fault == "huge":
            return 500, {}, b"x" * self.huge_bytes
        if fault == "garbage":
            return 200, {}, b"\x00\xffnot json{{{"
        if fault == "redirect":
            return 307, {"Location": "http://127.0.0.1:9/write"}, b""
        return 500, {}, b'{"error":"internal error"}'

    def answer_query(self, fault: str) -> tuple[int, dict[str, str], bytes]:
        if fault in ("ok", "trickle"):
            return 200, {}, json.dumps(self.empty_answer).encode()
        if fault == "garbage":
            return 200, {}, b'{"results": {"series": "not a list"}}'
        return self._failure(fault, 0)

    # -- plumbing
    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?", 1)[0]
                fault = server.next_fault(path)
                if path.endswith("/write"):
                    if self.headers.get("Content-Encoding") == "gzip":
                        body = gzip.decompress(body)
                    lines = [ln for ln in body.decode("utf-8", "replace").split("\n") if ln]
                    status, headers, out = server.answer_write(lines, fault)
                else:
                    status, headers, out = server.answer_query(fault)
                server.send(self, status, headers, out, trickle=fault == "trickle")

            do_GET = do_POST

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def send(self, handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes,
             trickle: bool) -> None:
        head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        data = head.encode() + body
        try:
            if not trickle:
                handler.wfile.write(data)
                return
            for i in range(len(data)):
                if self._stop.wait(1.0):
                    return
                handler.wfile.write(data[i:i + 1])
                handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass

    def start(self) -> FaultServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_requests(self, count: int, timeout: float) -> None:
        """Until at least ``count`` requests came (AssertionError naming what was awaited otherwise)."""
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"the fault server got {len(self.requests)} requests, not {count}, "
                                     f"within {timeout:g}s")
            time.sleep(0.05)
