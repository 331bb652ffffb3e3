"""InfluxQL over HTTP ``/query`` (stdlib only): InfluxDB 1.x, 2.x (v1 compatibility API with a DBRP mapping) and
3.x (its v1 query API).

Secrets come from files only (a token, or a user's password) and are sent in the ``Authorization`` header, never
in a URL. TLS certificates are verified unless switched off explicitly. One keep-alive connection per thread, so
the audit can run several statements at once.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import secretfile

USER_AGENT = "kvmfleet-audit/0.1"
MAX_BODY = 256 << 20


class AuditError(RuntimeError):
    """The audit cannot go on (server unreachable, authentication refused, a query rejected, bad settings)."""


def read_secret_file(path: str, what: str) -> str:
    """The secret alone on one line in ``path``; :class:`AuditError` naming the file (never the secret)."""
    try:
        return secretfile.read_secret(path, what)
    except secretfile.SecretFileError as err:
        raise AuditError(str(err)) from None


@dataclass
class Connection:
    """Where and how to query. Exactly one of ``database`` / ``bucket``."""

    url: str
    database: str | None = None
    retention_policy: str | None = None
    bucket: str | None = None
    org: str | None = None
    token: str | None = None
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    verify_tls: bool = True
    timeout: float = 60.0

    @property
    def db(self) -> str:
        return self.database or self.bucket or ""

    def describe(self) -> str:
        where = f"database {self.database}" if self.database else f"bucket {self.bucket} (org {self.org})"
        if self.retention_policy:
            where += f", retention policy {self.retention_policy}"
        return f"{redact(self.url)} {where}"


def redact(url: str) -> str:
    u = urllib.parse.urlsplit(url)
    netloc = u.hostname or ""
    if u.port:
        netloc += f":{u.port}"
    return urllib.parse.urlunsplit((u.scheme, netloc, u.path, "", ""))


@dataclass
class Series:
    name: str
    tags: dict[str, str]
    columns: list[str]
    values: list[list[Any]]

    def rows(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, v)) for v in self.values]


class InfluxQLClient:
    def __init__(self, conn: Connection) -> None:
        u = urllib.parse.urlsplit(conn.url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise AuditError(f"--url {conn.url!r}: expected http(s)://host[:port][/path]")
        if u.username or u.password:
            raise AuditError("--url must not carry credentials: use --token-file or --username/--password-file")
        if u.query or u.fragment:
            raise AuditError("--url must not carry a query string or fragment")
        if not conn.db:
            raise AuditError("a database (--database) or a bucket (--bucket) is needed")
        self.conn = conn
        self._scheme = u.scheme
        self._host = u.hostname
        self._port = u.port
        self._base = u.path.rstrip("/")
        self._local = threading.local()
        self._ssl: ssl.SSLContext | None = None
        if self._scheme == "https":
            ctx = ssl.create_default_context(cafile=conn.ca_file) if conn.ca_file else ssl.create_default_context()
            if not conn.verify_tls:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._ssl = ctx
        self._headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json",
                         "User-Agent": USER_AGENT}
        if conn.token:
            self._headers["Authorization"] = f"Token {conn.token}"
        elif conn.username:
            basic = base64.b64encode(f"{conn.username}:{conn.password or ''}".encode()).decode()
            self._headers["Authorization"] = f"Basic {basic}"
        self.requests = 0
        self._lock = threading.Lock()
        self._all: list[http.client.HTTPConnection] = []

    def _connection(self) -> http.client.HTTPConnection:
        c = getattr(self._local, "conn", None)
        if c is None:
            if self._ssl is not None:
                c = http.client.HTTPSConnection(self._host, self._port, timeout=self.conn.timeout, context=self._ssl)
            else:
                c = http.client.HTTPConnection(self._host, self._port, timeout=self.conn.timeout)
            self._local.conn = c
            with self._lock:
                self._all.append(c)
        return c

    def _drop_connection(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
        self._local.conn = None

    def _post(self, body: bytes) -> tuple[int, bytes]:
        path = self._base + "/query"
        for attempt in (1, 2):
            c = self._connection()
            try:
                c.request("POST", path, body=body, headers=self._headers)
                resp = c.getresponse()
                data = resp.read(MAX_BODY)
                if resp.getheader("Connection", "").lower() == "close":
                    self._drop_connection()
                return resp.status, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._drop_connection()  # a keep-alive connection the server closed: once more on a new one
                if attempt == 2:
                    raise
            except BaseException:
                self._drop_connection()
                raise
        raise AssertionError("unreachable")

    def query(self, statements: Sequence[str] | str, what: str = "query") -> list[list[Series]]:
        """Run one or more statements in one request; one list of series per statement, in order.

        :class:`AuditError` on a transport error, an HTTP error or any statement's error (the message names
        ``what`` and the server's words, never a secret).
        """
        stmts = [statements] if isinstance(statements, str) else list(statements)
        params = {"q": ";\n".join(stmts), "db": self.conn.db, "epoch": "s"}
        if self.conn.retention_policy:
            params["rp"] = self.conn.retention_policy
        body = urllib.parse.urlencode(params).encode()
        where = redact(self.conn.url)
        try:
            status, data = self._post(body)
        except ssl.SSLError as e:
            raise AuditError(f"{where}: TLS failed ({e.reason or e}); --ca-file names a CA bundle") from None
        except (socket.timeout, TimeoutError):
            raise AuditError(f"{where}: no answer to {what} within {self.conn.timeout:g}s") from None
        except OSError as e:
            raise AuditError(f"cannot reach InfluxDB at {where}: {e.strerror or e}") from None
        except http.client.HTTPException as e:
            raise AuditError(f"{where}: broken HTTP answer to {what}: {type(e).__name__}") from None
        with self._lock:
            self.requests += 1
        message = _error_text(data)
        if status in (401, 403):
            raise AuditError(f"{where}: HTTP {status}: {message or 'unauthorized'} (check --token-file or "
                             "--username/--password-file)")
        if status == 404:
            raise AuditError(f"{where}: HTTP 404 on /query: {message or 'not found'} (is this an InfluxDB URL? "
                             "InfluxDB 2.x needs a DBRP mapping for the bucket)")
        if status != 200:
            raise AuditError(f"{where}: HTTP {status} for {what}: {message or 'no message'}")
        try:
            doc = json.loads(data)
        except ValueError:
            raise AuditError(f"{where}: the answer to {what} is not JSON") from None
        if isinstance(doc, dict) and doc.get("error"):
            raise AuditError(f"{what}: {doc['error']}")
        results = doc.get("results") if isinstance(doc, dict) else None
        if not isinstance(results, list):
            raise AuditError(f"{where}: the answer to {what} has no results")
        out: list[list[Series]] = [[] for _ in stmts]
        for i, res in enumerate(results):
            idx = int(res.get("statement_id", i)) if isinstance(res, dict) else i
            if not isinstance(res, dict) or idx >= len(out):
                continue
            if res.get("error"):
                hint = ""
                if "database not found" in str(res["error"]):
                    hint = (" (InfluxDB 2.x: create a DBRP mapping for the bucket, e.g. `influx v1 dbrp create "
                            "--db NAME --rp autogen --bucket-id ID`)")
                raise AuditError(f"{what}: {res['error']}{hint}")
            for s in res.get("series") or []:
                out[idx].append(Series(name=str(s.get("name", "")), tags=dict(s.get("tags") or {}),
                                       columns=list(s.get("columns") or []), values=list(s.get("values") or [])))
        return out

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for c in conns:
            c.close()


def _error_text(data: bytes) -> str:
    text = data[:2000].decode("utf-8", "replace").strip()
    try:
        obj = json.loads(text)
        if isinstance(obj, dict):
            text = str(obj.get("error") or obj.get("message") or text)
    except ValueError:
        pass
    text = " ".join(text.split())
    return text[:400]
