"""HTTP to InfluxDB, written once (stdlib only): URL checks, TLS, authentication, redaction, a server's error
text, body size limits and a kept-alive connection for POSTs.

The shipping writers, the audit's InfluxQL client and the test helpers talk to the same servers: what they
check, trust, send and show is decided here. Each caller words its own errors (``URLProblem.kind``), so a
collectd log line and an audit command line can name their own options.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import ipaddress
import json
import logging
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

log = logging.getLogger("kvmfleet.influxhttp")

MAX_ERROR_TEXT = 400  # characters of a server's error text kept in a message
MAX_RESPONSE_BODY = 1 << 20  # a write's answer is a 204 or a short JSON error
ERROR_BODY_SCANNED = 64 << 10  # bytes of an error body decoded and parsed: a huge body stays cheap

# URLProblem.kind
URL_UNPARSABLE = "unparsable"
URL_NOT_HTTP = "not-http"
URL_CREDENTIALS = "credentials"
URL_QUERY = "query"
URL_PLAIN_CREDENTIALS = "plain-credentials"


class URLProblem(ValueError):
    """Why a URL cannot be used. ``kind`` (``URL_*``) lets a caller word it for its users; ``shown`` is the
    URL as it may be shown (credentials redacted). The default message is the shipping writers' wording."""

    def __init__(self, kind: str, url: str, detail: str = "") -> None:
        self.kind = kind
        self.shown = redact_url(url)
        messages = {
            URL_UNPARSABLE: f"bad url {self.shown!r}: {detail}",
            URL_NOT_HTTP: f"url must be http(s)://host[:port][/path], got {self.shown!r}",
            URL_CREDENTIALS: "credentials do not belong in the url",
            URL_QUERY: "the url must have no query string or fragment",
            URL_PLAIN_CREDENTIALS: f"credentials would cross the network unencrypted to {self.shown!r} (http://): "
                                   f"use https://, or allow plain http explicitly",
        }
        super().__init__(messages[kind])


class DeadlineExceeded(TimeoutError):
    """An exchange that did not end within its deadline (a slow or stuck server); the socket was shut down."""


class CAFileError(ValueError):
    """A CA file that cannot be loaded; the message starts with the quoted path (the caller names the option)."""


def check_url(url: str) -> urllib.parse.SplitResult:
    """``url`` split, if it is http(s)://host[:port][/path]; :class:`URLProblem` otherwise.

    Credentials are refused because a URL ends up in logs; a query string because the callers add their own."""
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # raises on a bad port
    except ValueError as err:
        raise URLProblem(URL_UNPARSABLE, url, str(err)) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise URLProblem(URL_NOT_HTTP, url)
    if parts.username is not None or parts.password is not None:
        raise URLProblem(URL_CREDENTIALS, url)
    if parts.query or parts.fragment:
        raise URLProblem(URL_QUERY, url)
    return parts


def check_credentials_transport(url: str, credentials: bool, allow_plain: bool = False) -> None:
    """Refuse to send credentials over plain ``http://`` to another machine (anyone on the path reads them),
    unless the operator said so (``allow_plain``): :class:`URLProblem` of kind ``URL_PLAIN_CREDENTIALS``.
    TLS, or a loopback address (the credentials never leave this machine), is always fine."""
    parts = check_url(url)
    if not credentials or allow_plain or parts.scheme == "https" or _is_loopback(parts.hostname or ""):
        return
    raise URLProblem(URL_PLAIN_CREDENTIALS, url)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redact_url(url: str) -> str:
    """``url`` for a message or a log line: a ``user:password@`` part becomes ``***@``, the rest is kept."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def endpoint(url: str, name: str, params: Mapping[str, str] | None = None) -> str:
    """The request path of ``name`` (``/write``, ``/query``) below the url's own path, with ``params``."""
    base = urllib.parse.urlsplit(url).path.rstrip("/")
    return base + name + ("?" + urllib.parse.urlencode(params) if params else "")


def tls_context(verify: bool = True, ca_file: str | None = None, who: str = "", off_by: str = "") -> ssl.SSLContext:
    """The TLS settings of every client: certificates verified (against ``ca_file`` if given) unless ``verify``
    is false, which is logged as a warning naming ``who`` and the option that did it (``off_by``).

    :class:`CAFileError` if ``ca_file`` cannot be loaded."""
    if not verify:
        log.warning("%sTLS certificate verification is disabled%s", f"{who}: " if who else "",
                    f" ({off_by})" if off_by else "")
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as err:
        raise CAFileError(f"{ca_file!r} cannot be used: {err}") from None


def basic_credentials(username: str, password: str) -> str:
    """The base64 text of HTTP Basic authentication (also what a scrubber must hide)."""
    return base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def auth_headers(token: str | None = None, username: str | None = None, password: str | None = None
                 ) -> dict[str, str]:
    """The ``Authorization`` header: ``Token`` (InfluxDB 2.x/3.x) before Basic user:password (1.x); none
    without either. Secrets go in a header, never in a URL."""
    if token:
        return {"Authorization": f"Token {token}"}
    if username:
        return {"Authorization": "Basic " + basic_credentials(username, password or "")}
    return {}


class Scrubber:
    """Replaces secrets, and their Basic encoding with ``username``, by ``***`` in text a server or a library
    made: servers echo the credentials they were sent, libraries print requests."""

    def __init__(self, *secrets: str | None, username: str | None = None) -> None:
        found = {s for s in secrets if s}
        if username:
            found |= {basic_credentials(username, s) for s in list(found)}
        self._secrets = sorted(found, key=len, reverse=True)  # longest first: none is cut by a shorter one

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def server_message(body: bytes | str) -> str:
    """What a server said went wrong, for one log line: a JSON body's ``error`` or ``message``, else its
    text; control characters and runs of white space become one space; past MAX_ERROR_TEXT characters, cut
    and marked with ``...``."""
    if isinstance(body, bytes):
        body = body[:ERROR_BODY_SCANNED].decode("utf-8", "replace")
    text = body[:ERROR_BODY_SCANNED].strip()
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, dict):
        text = str(doc.get("error") or doc.get("message") or text)
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT] + "..."


class _Readable(Protocol):
    def read(self, amt: int, /) -> bytes: ...


def read_limited(stream: _Readable, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of a body, and whether that was all of it: an answer can be of any size."""
    data = stream.read(limit + 1)
    return data[:limit], len(data) <= limit


@dataclass
class Response:
    """A server's answer. ``complete`` is false when the body was longer than the limit and was cut."""

    status: int
    body: bytes
    complete: bool
    headers: http.client.HTTPMessage

    def header(self, name: str) -> str | None:
        value = self.headers.get(name)
        return None if value is None else str(value)


class KeepAliveConnection:
    """One kept-alive HTTP(S) connection to one server, for POSTs.

    A POST that finds its kept-alive connection closed by the server (an idle timeout) is sent once more on a
    new one. ``connect_timeout`` bounds the TCP connect and TLS handshake, ``timeout`` each read and write, and
    ``deadline`` (default ``timeout``) the whole exchange: a server that answers one byte a second resets every
    read's timeout but not the deadline, after which the socket is shut down and :class:`DeadlineExceeded`
    raised. Not thread-safe, except :meth:`abort`. Transport errors propagate as raised (``OSError``,
    ``TimeoutError``, ``ssl.SSLError``, ``http.client.HTTPException``): each caller words them.
    """

    def __init__(self, url: str, tls: ssl.SSLContext | None = None, timeout: float = 10.0,
                 connect_timeout: float | None = None, max_body: int = MAX_RESPONSE_BODY,
                 deadline: float | None = None) -> None:
        parts = check_url(url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._tls = (tls or tls_context()) if self._https else None  # verified unless the caller said otherwise
        self.timeout = float(timeout)
        self.connect_timeout = self.timeout if connect_timeout is None else float(connect_timeout)
        self.max_body = max_body
        self.deadline = self.timeout if deadline is None else float(deadline)
        self.opened = 0  # connections opened so far: few when keep-alive works
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    def post(self, path: str, body: bytes, headers: Mapping[str, str]) -> Response:
        """POST ``body`` to ``path``; the answer with at most ``max_body`` bytes of its body, within ``deadline``
        seconds or :class:`DeadlineExceeded`."""
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            self.abort()

        watchdog = threading.Timer(self.deadline, expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            return self._post(path, body, headers)
        except (OSError, http.client.HTTPException) as err:
            if expired.is_set():
                raise DeadlineExceeded(f"no complete answer within {self.deadline:g}s") from err
            raise
        finally:
            watchdog.cancel()

    def _post(self, path: str, body: bytes, headers: Mapping[str, str]) -> Response:
        for attempt in (1, 2):
            reused = self._conn is not None
            try:
                conn = self._conn if self._conn is not None else self._connect()
                conn.request("POST", path, body=body, headers=dict(headers))
                resp = conn.getresponse()
                data, complete = read_limited(resp, self.max_body)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if reused and attempt == 1:
                    continue  # the server closed an idle kept-alive connection: once more on a new one
                raise
            except BaseException:
                self.close()
                raise
            if resp.will_close or not complete:  # closing, or a body left unread: the next POST needs a new one
                self.close()
            return Response(resp.status, data, complete, resp.msg)
        raise AssertionError("unreachable")

    def _connect(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self._tls is not None:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.connect_timeout, context=self._tls)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.connect_timeout)
        with self._lock:
            self._conn = conn
        self.opened += 1
        conn.connect()
        if conn.sock is not None:
            conn.sock.settimeout(self.timeout)
        return conn

    def abort(self) -> None:
        """From another thread: shut the socket down, so that a POST blocked on it fails now (a stopping
        shipper must not wait for a server that does not answer)."""
        with self._lock:
            conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()

    def __enter__(self) -> KeepAliveConnection:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
