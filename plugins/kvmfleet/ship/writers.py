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

import base64
import gzip
import http.client
import logging
import os
import socket
import ssl
import threading
import urllib.parse
from typing import Any, Protocol

from .. import secretfile

log = logging.getLogger("kvmfleet.ship.writers")

USER_AGENT = "kvmfleet-ship/0.1"
MAX_ERROR_TEXT = 400
MAX_RESPONSE_BODY = 1 << 20


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


def _server_message(body: bytes | str) -> str:
    """The ``error``/``message`` of a JSON error body, else the text; one line, truncated."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    text = text.strip()
    try:
        import json

        obj = json.loads(text)
        if isinstance(obj, dict):
            text = str(obj.get("error") or obj.get("message") or text)
    except ValueError:
        pass
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT] + "..."


def classify_status(
    name: str, status: int, body: bytes | str, retry_after: str | None, hint_auth: str, hint_404: str
) -> WriteError:
    """The :class:`WriteError` for a non-2xx answer."""
    msg = _server_message(body)
    ra = _retry_after(retry_after)
    if status in (400, 413, 422):
        return PermanentWriteError(f"{name}: HTTP {status}: rejected: {msg}", status)
    if status in (401, 403):
        return ConfigWriteError(f"{name}: HTTP {status}: {msg or 'unauthorized'} ({hint_auth})", status, ra)
    if status == 404:
        return ConfigWriteError(f"{name}: HTTP 404: {msg or 'not found'} ({hint_404})", status, ra)
    if "retention policy not found" in msg:
        return ConfigWriteError(f"{name}: HTTP {status}: {msg} (check retention_policy)", status, ra)
    return RetryableWriteError(f"{name}: HTTP {status}: {msg}", status, ra)


class _Scrubber:
    def __init__(self, *secrets: str) -> None:
        self._secrets = [s for s in secrets if s and len(s) >= 1]

    def __call__(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return text


def _check_url(url: str, what: str) -> urllib.parse.SplitResult:
    try:
        u = urllib.parse.urlsplit(url)
        _ = u.port
    except ValueError as e:
        raise ShipConfigError(f"{what}: bad url {url!r}: {e}") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ShipConfigError(f"{what}: url must be http(s)://host[:port][/path], got {url!r}")
    if u.username is not None or u.password is not None:
        raise ShipConfigError(f"{what}: credentials do not belong in the url; use the secret file options")
    if u.query or u.fragment:
        raise ShipConfigError(f"{what}: the url must have no query string or fragment")
    return u


def _ssl_context(verify_tls: bool, ca_file: str | None) -> ssl.SSLContext:
    if not verify_tls:
        log.warning("TLS certificate verification is disabled (verify_tls false)")
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as e:
        raise ShipConfigError(f"ca_file {ca_file!r} cannot be used: {e}") from None


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
    """InfluxDB 1.x ``POST /write?db=DB&rp=RP&precision=ns`` with ``http.client``: one kept-alive connection,
    gzip body, Basic auth from ``password_file``, TLS verified unless ``verify_tls=False``.

    ``timeout`` bounds each socket read/write; ``connect_timeout`` (default: ``timeout``) the TCP connect and
    TLS handshake. Not thread-safe: one sender thread uses it (``abort`` may come from another).
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
        gzip_level: int = 5,
    ) -> None:
        u = _check_url(url, "influxdb v1")
        if not database:
            raise ShipConfigError("influxdb v1: database is required")
        self.url = url
        self.database = database
        self.retention_policy = retention_policy or None
        self.username = username or None
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout if connect_timeout is not None else timeout)
        self.gzip_level = int(gzip_level)
        self._https = u.scheme == "https"
        self._host = u.hostname or ""
        self._port = u.port or (443 if self._https else 80)
        params = {"db": database}
        if self.retention_policy:
            params["rp"] = self.retention_policy
        params["precision"] = "ns"
        self._path = (u.path.rstrip("/") or "") + "/write?" + urllib.parse.urlencode(params)
        self._ctx = _ssl_context(verify_tls, ca_file) if self._https else None
        self.verify_tls = verify_tls
        self.ca_file = ca_file
        self.name = f"influxdb-v1 {u.scheme}://{u.netloc}{u.path} db={database}" + (
            f" rp={self.retention_policy}" if self.retention_policy else "")
        self._headers = {
            "Content-Type": "text/plain; charset=utf-8",
            "Content-Encoding": "gzip",
            "User-Agent": USER_AGENT,
        }
        password = ""
        auth = ""
        if password_file:
            if not self.username:
                raise ShipConfigError("influxdb v1: password_file given without username")
            password = read_secret(password_file, "password_file")
            auth = base64.b64encode(f"{self.username}:{password}".encode()).decode("ascii")
            self._headers["Authorization"] = "Basic " + auth
        elif self.username:
            raise ShipConfigError("influxdb v1: username given without password_file")
        self._scrub = _Scrubber(password, auth)
        self._hint_auth = (f"check username {self.username!r} and password_file {password_file!r}"
                           if self.username else "the server requires credentials: set username and password_file")
        self._hint_404 = f"does database {database!r} exist? is the url path right?"
        self._conn: http.client.HTTPConnection | None = None
        self._conn_lock = threading.Lock()
        self.connections = 0  # connections opened so far (keep-alive reuse shows as few)

    def __repr__(self) -> str:
        return f"V1Writer({self.name})"

    def _connect(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.connect_timeout,
                                               context=self._ctx)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.connect_timeout)
        with self._conn_lock:
            self._conn = conn
        self.connections += 1
        conn.connect()
        if conn.sock is not None:
            conn.sock.settimeout(self.timeout)
        return conn

    def _drop_conn(self) -> None:
        with self._conn_lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass

    def abort(self) -> None:
        with self._conn_lock:
            conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._drop_conn()

    def write(self, body_lines: list[str]) -> None:
        if not body_lines:
            return
        body = gzip.compress("\n".join(body_lines).encode("utf-8"), compresslevel=self.gzip_level, mtime=0)
        for attempt in (1, 2):
            reused = self._conn is not None
            try:
                conn = self._conn if self._conn is not None else self._connect()
                conn.request("POST", self._path, body=body, headers=self._headers)
                resp = conn.getresponse()
                data = resp.read(MAX_RESPONSE_BODY)  # a 204, or a short JSON error
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self._drop_conn()
                if reused and attempt == 1:
                    continue  # the server closed an idle kept-alive connection: once more on a new one
                raise RetryableWriteError(f"{self.name}: connection lost: {self._scrub(str(e) or type(e).__name__)}"
                                          ) from None
            except (TimeoutError, socket.timeout):
                self._drop_conn()
                raise RetryableWriteError(f"{self.name}: timed out (timeout {self.timeout:g}s)") from None
            except ssl.SSLCertVerificationError as e:
                self._drop_conn()
                raise ConfigWriteError(f"{self.name}: TLS certificate verification failed: "
                                       f"{self._scrub(e.verify_message or str(e))} (set ca_file, or verify_tls "
                                       f"false)") from None
            except (OSError, http.client.HTTPException) as e:
                self._drop_conn()
                raise RetryableWriteError(f"{self.name}: {type(e).__name__}: {self._scrub(str(e))}") from None
            if resp.will_close or not resp.isclosed():  # closing, or a body too big to drain: new connection
                self._drop_conn()
            if 200 <= resp.status < 300:
                return
            err = classify_status(self.name, resp.status, data, resp.getheader("Retry-After"), self._hint_auth,
                                  self._hint_404)
            err.args = (self._scrub(str(err)),)
            raise err


class V2Writer:
    """InfluxDB 2.x write API (also VictoriaMetrics' ``/api/v2/write``) through influxdb-client's synchronous
    ``WriteApi``: gzip, the token from ``token_file``, TLS verified unless ``verify_tls=False``.

    The library's batching mode is not used: it drops a batch after its retries and its ``flush()`` does
    nothing; the :class:`~kvmfleet.ship.shipper.Shipper` buffers and retries instead.
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
    ) -> None:
        u = _check_url(url, "influxdb v2")
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
        self._scrub = _Scrubber(token)
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
        if not verify_tls and u.scheme == "https":
            log.warning("%s: TLS certificate verification is disabled (verify_tls false)", self.name)
        if ca_file:
            kwargs["ssl_ca_cert"] = ca_file
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

    def __repr__(self) -> str:
        return f"V2Writer({self.name})"

    def abort(self) -> None:
        """Nothing to interrupt safely inside urllib3: a blocked write ends at its socket timeout."""

    def close(self) -> None:
        try:
            self._client.close()  # type: ignore[no-untyped-call]
        except Exception:  # pragma: no cover - closing is best effort
            pass

    def write(self, body_lines: list[str]) -> None:
        if not body_lines:
            return
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
        except (OSError, urllib3.exceptions.HTTPError, InfluxDBError) as e:  # connect, timeout, TLS
            text = self._scrub(f"{type(e).__name__}: {e}")
            if _is_cert_error(e):
                raise ConfigWriteError(f"{self.name}: TLS certificate verification failed: {text} (set ca_file, "
                                       f"or verify_tls false)") from None
            raise RetryableWriteError(f"{self.name}: {text}") from None
