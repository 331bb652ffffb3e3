"""Writers: send one batch of line protocol to a server, or raise a classified :class:`WriteError`.

Both writers have the interface of :class:`Writer`: ``write(body_lines)`` sends the lines as one request and
returns, or raises

* :class:`RetryableWriteError`: connection refused/reset, timeouts, HTTP 5xx, 429, 408 and other unexpected
  answers: the batch is to be sent again later (``retry_after`` carries a server's ``Retry-After``);
* :class:`ConfigWriteError` (a retryable error): 401/403 (credentials), 404 (database/bucket or URL path), an
  unknown retention policy, TLS verification failure: retried, but a problem an operator must fix;
* :class:`PermanentWriteError`: 400 (unparsable lines, field type conflict: InfluxDB's "partial write"), 413,
  422: sending the same lines again cannot succeed; the caller drops (or splits) the batch.

Secrets (password, token) live in files named by the config, are read once when the writer is made, and
never appear in a URL, a log line or an error message (messages are scrubbed in case a server echoes them).
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import logging
import os
import socket
import ssl
import threading
import urllib.parse
import weakref
from typing import Any, Protocol

from .. import influxhttp, secretfile

USER_AGENT = "kvmfleet-ship/0.1"


class ShipConfigError(ValueError):
    """The shipping configuration cannot work (bad URL, unreadable secret file, ...)."""


class WriteError(Exception):
    """A failed write; ``retryable`` says whether sending the same lines again may succeed."""

    retryable = True

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class RetryableWriteError(WriteError):
    retryable = True


class ConfigWriteError(RetryableWriteError):
    """Retryable, but caused by configuration (credentials, database/bucket, TLS trust): logged as an error."""


class PermanentWriteError(WriteError):
    """The server rejected these lines (HTTP 400/413/422); they must not be retried as they are."""

    retryable = False


class Writer(Protocol):
    """What :class:`~kvmfleet.ship.shipper.Shipper` needs from a writer."""

    name: str

    def write(self, body_lines: list[str]) -> None: ...

    def abort(self) -> None:
        """Best effort, from another thread: make a blocked ``write`` fail now (used by ``stop``)."""

    def close(self) -> None: ...


def read_secret(path: str, what: str) -> str:
    """The secret in ``path``; :class:`ShipConfigError` naming the file (never the secret) if unusable."""
    try:
        return secretfile.read_secret(path, what)
    except secretfile.SecretFileError as err:
        raise ShipConfigError(str(err)) from None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP-date: ignored, our own backoff applies


def classify_status(
    name: str, status: int, body: bytes | str, retry_after: str | None, hint_auth: str, hint_404: str
) -> WriteError:
    """The :class:`WriteError` for a non-2xx answer."""
    msg = influxhttp.server_message(body)
    ra = _retry_after(retry_after)
    if status in (400, 413, 422):
        return PermanentWriteError(f"{name}: HTTP {status}: rejected: {msg}", status)
    if status in (401, 403):
        return ConfigWriteError(f"{name}: HTTP {status}: {msg or 'unauthorized'} ({hint_auth})", status, ra)
    if status == 404:
        return ConfigWriteError(f"{name}: HTTP 404: {msg or 'not found'} ({hint_404})", status, ra)
    if 300 <= status < 400:
        return ConfigWriteError(f"{name}: HTTP {status}: redirected (writes are not redirected: set the url to "
                                f"where the server points)", status, ra)
    if "retention policy not found" in msg:
        return ConfigWriteError(f"{name}: HTTP {status}: {msg} (check retention_policy)", status, ra)
    return RetryableWriteError(f"{name}: HTTP {status}: {msg}", status, ra)


def unexpected_success(name: str, status: int, length: int | None) -> RetryableWriteError | None:
    """A 2xx that is not a write's answer: InfluxDB and VictoriaMetrics answer a write with 204 and no body, so a
    200 with a body (a proxy's page, a misrouted URL) stored nothing we know of and the lines are sent again.
    ``length`` is the body's length (``None``: unknown)."""
    if status == 204 or length == 0:
        return None
    shown = "a body" if length is None else f"a body of {length} bytes"
    return RetryableWriteError(f"{name}: HTTP {status} with {shown}, not a write's answer (204): is the url an "
                               f"InfluxDB?", status)


def _checked_url(url: str, what: str) -> urllib.parse.SplitResult:
    try:
        return influxhttp.check_url(url)
    except influxhttp.URLProblem as problem:
        hint = "; use the secret file options" if problem.kind == influxhttp.URL_CREDENTIALS else ""
        raise ShipConfigError(f"{what}: {problem}{hint}") from None


def _check_transport(url: str, credentials: bool, allow_plain_http: bool, what: str) -> None:
    try:
        influxhttp.check_credentials_transport(url, credentials, allow_plain_http)
    except influxhttp.URLProblem as problem:
        raise ShipConfigError(f"{what}: {problem} (allow_plain_http)") from None


def _tls_context(verify_tls: bool, ca_file: str | None, who: str) -> ssl.SSLContext:
    try:
        return influxhttp.tls_context(verify_tls, ca_file, who=who, off_by="verify_tls false")
    except influxhttp.CAFileError as err:
        raise ShipConfigError(f"ca_file {err}") from None


def _is_cert_error(e: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(cur):
            return True
        cur = cur.__cause__ or cur.__context__ or (cur.args[0] if cur.args and isinstance(cur.args[0],
                                                                                        BaseException) else None)
    return False


class V1Writer:
    """InfluxDB 1.x ``POST /write?db=DB&rp=RP&precision=ns``: one kept-alive connection, gzip body, Basic auth
    from ``password_file``, TLS verified unless ``verify_tls=False``.

    ``timeout`` bounds each socket read/write and the whole exchange (a server answering a byte a second is cut
    off); ``connect_timeout`` (default: ``timeout``) the TCP connect and TLS handshake. Not thread-safe: one
    sender thread uses it (``abort`` may come from another).
    """

    def __init__(
        self,
        url: str,
        database: str,
        retention_policy: str | None = None,
        username: str | None = None,
        password_file: str | None = None,
        verify_tls: bool = True,
        ca_file: str | None = None,
        timeout: float = 10.0,
        connect_timeout: float | None = None,
        gzip_level: int = 1,  # line protocol compresses ~2.6x at 1 and ~2.8x at 5, for a third of the CPU
        allow_plain_http: bool = False,
    ) -> None:
        u = _checked_url(url, "influxdb v1")
        if not database:
            raise ShipConfigError("influxdb v1: database is required")
        self.url = url
        self.database = database
        self.retention_policy = retention_policy or None
        self.username = username or None
        self.verify_tls = verify_tls
        self.ca_file = ca_file
        self.gzip_level = int(gzip_level)
        params = {"db": database}
        if self.retention_policy:
            params["rp"] = self.retention_policy
        params["precision"] = "ns"
        self._path = influxhttp.endpoint(url, "/write", params)
        self.name = f"influxdb-v1 {u.scheme}://{u.netloc}{u.path} db={database}" + (
            f" rp={self.retention_policy}" if self.retention_policy else "")
        tls = _tls_context(verify_tls, ca_file, self.name) if u.scheme == "https" else None
        self._http = influxhttp.KeepAliveConnection(url, tls, timeout, connect_timeout)
        password = self._read_password(password_file)
        _check_transport(url, bool(self.username), allow_plain_http, "influxdb v1")
        self._headers = {
            "Content-Type": "text/plain; charset=utf-8",
            "Content-Encoding": "gzip",
            "User-Agent": USER_AGENT,
            **influxhttp.auth_headers(username=self.username, password=password),
        }
        self._scrub = influxhttp.Scrubber(password, username=self.username)
        self._hint_auth = (f"check username {self.username!r} and password_file {password_file!r}"
                           if self.username else "the server requires credentials: set username and password_file")
        self._hint_404 = f"does database {database!r} exist? is the url path right?"

    def _read_password(self, password_file: str | None) -> str:
        if password_file and not self.username:
            raise ShipConfigError("influxdb v1: password_file given without username")
        if self.username and not password_file:
            raise ShipConfigError("influxdb v1: username given without password_file")
        return read_secret(password_file, "password_file") if password_file else ""

    def __repr__(self) -> str:
        return f"V1Writer({self.name})"

    @property
    def timeout(self) -> float:
        return self._http.timeout

    @property
    def connect_timeout(self) -> float:
        return self._http.connect_timeout

    @property
    def connections(self) -> int:
        """Connections opened so far (keep-alive reuse shows as few)."""
        return self._http.opened

    def abort(self) -> None:
        self._http.abort()

    def close(self) -> None:
        self._http.close()

    def write(self, body_lines: list[str]) -> None:
        if not body_lines:
            return
        body = gzip.compress("\n".join(body_lines).encode("utf-8"), compresslevel=self.gzip_level, mtime=0)
        try:
            resp = self._http.post(self._path, body, self._headers)
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
            raise RetryableWriteError(f"{self.name}: connection lost: {self._scrub(str(e) or type(e).__name__)}"
                                      ) from None
        except influxhttp.DeadlineExceeded as e:
            raise RetryableWriteError(f"{self.name}: timed out: {e}") from None
        except (TimeoutError, socket.timeout):
            raise RetryableWriteError(f"{self.name}: timed out (timeout {self.timeout:g}s)") from None
        except ssl.SSLCertVerificationError as e:
            raise ConfigWriteError(f"{self.name}: TLS certificate verification failed: "
                                   f"{self._scrub(e.verify_message or str(e))} (set ca_file, or verify_tls "
                                   f"false)") from None
        except (OSError, http.client.HTTPException) as e:
            raise RetryableWriteError(f"{self.name}: {type(e).__name__}: {self._scrub(str(e))}") from None
        if 200 <= resp.status < 300:
            odd = unexpected_success(self.name, resp.status, len(resp.body))
            if odd is None:
                return
            raise odd
        err = classify_status(self.name, resp.status, resp.body, resp.header("Retry-After"), self._hint_auth,
                              self._hint_404)
        err.args = (self._scrub(str(err)),)
        raise err


class V2Writer:
    """InfluxDB 2.x write API (also VictoriaMetrics' ``/api/v2/write``) through influxdb-client's synchronous
    ``WriteApi``: gzip, the token from ``token_file``, TLS verified unless ``verify_tls=False``.

    The library's batching mode is not used: it drops a batch after its retries and its ``flush()`` does
    nothing; the :class:`~kvmfleet.ship.shipper.Shipper` buffers and retries instead. The library bounds each
    socket read (``timeout``), not a write: a watchdog shuts the connection's socket down when a write is not
    answered within ``timeout`` seconds in all (as :class:`~kvmfleet.influxhttp.KeepAliveConnection` does for
    v1), and :meth:`abort` does the same at once.
    """

    def __init__(
        self,
        url: str,
        org: str,
        bucket: str,
        token_file: str | None = None,
        verify_tls: bool = True,
        ca_file: str | None = None,
        timeout: float = 10.0,
        connect_timeout: float | None = None,
        allow_plain_http: bool = False,
    ) -> None:
        u = _checked_url(url, "influxdb v2")
        if not bucket:
            raise ShipConfigError("influxdb v2: bucket is required")
        if ca_file and not os.access(ca_file, os.R_OK):
            raise ShipConfigError(f"ca_file {ca_file!r} cannot be read")
        self.url = url
        self.org = org or ""
        self.bucket = bucket
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout if connect_timeout is not None else timeout)
        self.verify_tls = verify_tls
        self.ca_file = ca_file
        self.name = f"influxdb-v2 {u.scheme}://{u.netloc}{u.path} bucket={bucket}"
        token = read_secret(token_file, "token_file") if token_file else ""
        _check_transport(url, bool(token), allow_plain_http, "influxdb v2")
        self._scrub = influxhttp.Scrubber(token)
        self._hint_auth = (f"check token_file {token_file!r}" if token_file
                           else "the server requires a token: set token_file")
        self._hint_404 = f"do org {self.org!r} and bucket {bucket!r} exist? is the url path right?"

        # Never let the client log requests (its debug mode prints headers, i.e. the token).
        for name in ("influxdb_client.client.http", "influxdb_client.client.write_api"):
            logging.getLogger(name).setLevel(logging.WARNING)
        from influxdb_client.client.influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS
        from influxdb_client.domain.write_precision import WritePrecision

        kwargs: dict[str, Any] = {"verify_ssl": bool(verify_tls)}
        if u.scheme == "https":
            kwargs["ssl_context"] = _tls_context(verify_tls, ca_file, self.name)
        if ca_file:
            kwargs["ssl_ca_cert"] = ca_file  # as well: influxdb-client releases before ssl_context ignore it
        self._client = InfluxDBClient(
            url=url,
            token=token,  # "" sends no Authorization header
            org=self.org,
            enable_gzip=True,
            debug=False,
            timeout=(int(self.connect_timeout * 1000), int(self.timeout * 1000)),
            **kwargs,
        )
        self._api = self._client.write_api(write_options=SYNCHRONOUS)
        self._precision: Any = WritePrecision.NS
        self._watch = _Watch()
        self._client.api_client.rest_client.pool_manager.pool_classes_by_scheme = self._watch.pool_classes()

    def __repr__(self) -> str:
        return f"V2Writer({self.name})"

    def abort(self) -> None:
        """From another thread: shut the connection's socket down, so that a blocked write fails now."""
        self._watch.shutdown()

    def close(self) -> None:
        try:
            self._client.close()  # type: ignore[no-untyped-call]
        except Exception:  # pragma: no cover - closing is best effort
            pass
        self._watch.shutdown()  # the client leaves its kept-alive connection open

    def write(self, body_lines: list[str]) -> None:
        """Send the lines; a :class:`WriteError` unless the server answered 204 (or a 2xx without a body) within
        ``timeout`` seconds."""
        if not body_lines:
            return
        self._watch.status = None
        with influxhttp.watchdog(self.timeout, self._watch.shutdown) as expired:
            try:
                self._send(body_lines)
            except RetryableWriteError:
                if expired.is_set():
                    raise RetryableWriteError(f"{self.name}: timed out: no complete answer within {self.timeout:g}s"
                                              ) from None
                raise
        status = self._watch.status  # None: urllib3 did not show the answer; the client's verdict stands
        odd = unexpected_success(self.name, status, self._watch.length) if status is not None else None
        if odd is not None:
            raise odd

    def _send(self, body_lines: list[str]) -> None:
        """influxdb-client's write, its exceptions as :class:`WriteError`."""
        import urllib3
        from influxdb_client.client.exceptions import InfluxDBError
        from influxdb_client.rest import ApiException

        try:
            self._api.write(bucket=self.bucket, org=self.org, record=body_lines, write_precision=self._precision)
        except ApiException as e:
            status = int(e.status or 0)
            if status == 0:  # the client wraps urllib3's SSLError/ProtocolError as ApiException(status=0)
                text = self._scrub(f"{e.reason or e}")
                if "CERTIFICATE_VERIFY_FAILED" in text:
                    raise ConfigWriteError(f"{self.name}: TLS certificate verification failed: {text} (set "
                                           f"ca_file, or verify_tls false)") from None
                raise RetryableWriteError(f"{self.name}: {text}") from None
            headers: Any = e.headers or {}
            ra = headers.get("Retry-After") if hasattr(headers, "get") else None
            err = classify_status(self.name, status, e.body or e.reason or "", ra, self._hint_auth, self._hint_404)
            raise type(err)(self._scrub(str(err)), err.status, err.retry_after) from None
        except UnicodeDecodeError:  # the client decodes every answer's body as UTF-8 before it looks at the status
            status = self._watch.status or 0
            odd = unexpected_success(self.name, status, self._watch.length) if 200 <= status < 300 else None
            raise odd or classify_status(self.name, status, "(a body that is not UTF-8)", None, self._hint_auth,
                                         self._hint_404) from None
        except (OSError, urllib3.exceptions.HTTPError, InfluxDBError) as e:  # connect, timeout, TLS
            text = self._scrub(f"{type(e).__name__}: {e}")
            if _is_cert_error(e):
                raise ConfigWriteError(f"{self.name}: TLS certificate verification failed: {text} (set ca_file, "
                                       f"or verify_tls false)") from None
            raise RetryableWriteError(f"{self.name}: {text}") from None


class _Watch:
    """The sockets one V2Writer's connections opened and the last answer's status and length, seen from inside
    urllib3 (influxdb-client shows neither): a watchdog or :meth:`V2Writer.abort` shuts the sockets down."""

    def __init__(self) -> None:
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._lock = threading.Lock()
        self.status: int | None = None
        self.length: int | None = None

    def opened(self, sock: socket.socket | None) -> None:
        if sock is not None:
            with self._lock:
                self._sockets.add(sock)

    def answered(self, status: int, length: str | None) -> None:
        self.status = status
        self.length = int(length) if length is not None and length.strip().isdigit() else None

    def shutdown(self) -> None:
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def pool_classes(self) -> dict[str, Any]:
        """urllib3 pool classes (for ``PoolManager.pool_classes_by_scheme``) whose connections report here."""
        import urllib3
        from urllib3.connection import HTTPConnection, HTTPSConnection

        class Pool(urllib3.HTTPConnectionPool):
            ConnectionCls = _watched(HTTPConnection, self)

        class TLSPool(urllib3.HTTPSConnectionPool):
            ConnectionCls = _watched(HTTPSConnection, self)

        return {"http": Pool, "https": TLSPool}


def _watched(base: Any, watch: _Watch) -> Any:
    """A subclass of urllib3's connection class ``base`` that tells ``watch`` its socket and its answers."""

    class Watched(base):  # type: ignore[misc]
        def connect(self) -> None:
            super().connect()
            watch.opened(self.sock)

        def getresponse(self, *args: Any, **kwargs: Any) -> Any:
            resp = super().getresponse(*args, **kwargs)
            watch.answered(resp.status, resp.headers.get("Content-Length"))
            return resp

    return Watched
