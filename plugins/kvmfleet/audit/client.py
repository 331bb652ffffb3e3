"""InfluxQL over HTTP ``/query`` (stdlib only): InfluxDB 1.x, 2.x (v1 compatibility API with a DBRP mapping) and
3.x (its v1 query API).

Secrets come from files only (a token, or a user's password) and are sent in the ``Authorization`` header, never
in a URL. TLS certificates are verified unless switched off explicitly. One keep-alive connection per thread, so
the audit can run several statements at once.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import influxhttp, secretfile

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
    allow_plain_http: bool = False  # credentials over http:// to another machine: refused unless true
    timeout: float = 60.0

    @property
    def db(self) -> str:
        return self.database or self.bucket or ""

    def describe(self) -> str:
        where = f"database {self.database}" if self.database else f"bucket {self.bucket} (org {self.org})"
        if self.retention_policy:
            where += f", retention policy {self.retention_policy}"
        return f"{influxhttp.redact_url(self.url)} {where}"


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
        https = _checked_url(conn.url).scheme == "https"
        if not conn.db:
            raise AuditError("a database (--database) or a bucket (--bucket) is needed")
        try:
            influxhttp.check_credentials_transport(conn.url, bool(conn.token or conn.username),
                                                   conn.allow_plain_http)
        except influxhttp.URLProblem:
            raise AuditError(f"--url {influxhttp.redact_url(conn.url)!r}: the credentials would cross the network "
                             f"unencrypted: use https://, or --allow-plain-http") from None
        self.conn = conn
        self._where = influxhttp.redact_url(conn.url)
        self._path = influxhttp.endpoint(conn.url, "/query")
        self._tls: ssl.SSLContext | None = None
        if https:
            try:
                self._tls = influxhttp.tls_context(conn.verify_tls, conn.ca_file, who=self._where,
                                                   off_by="--no-verify-tls")
            except influxhttp.CAFileError as err:
                raise AuditError(f"--ca-file {err}") from None
        self._headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json",
                         "User-Agent": USER_AGENT,
                         **influxhttp.auth_headers(token=conn.token, username=conn.username, password=conn.password)}
        self._scrub = influxhttp.Scrubber(conn.token, conn.password, username=conn.username)
        self.requests = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self._all: list[influxhttp.KeepAliveConnection] = []

    def _connection(self) -> influxhttp.KeepAliveConnection:
        """This thread's own kept-alive connection: the audit runs several statements at once."""
        c: influxhttp.KeepAliveConnection | None = getattr(self._local, "conn", None)
        if c is None:
            c = influxhttp.KeepAliveConnection(self.conn.url, self._tls, self.conn.timeout, max_body=MAX_BODY)
            self._local.conn = c
            with self._lock:
                self._all.append(c)
        return c

    def _post(self, body: bytes, what: str) -> influxhttp.Response:
        """The answer to one request; :class:`AuditError` worded for the command line on a transport error."""
        where = self._where
        try:
            return self._connection().post(self._path, body, self._headers)
        except ssl.SSLError as e:
            raise AuditError(f"{where}: TLS failed ({e.reason or e}); --ca-file names a CA bundle") from None
        except (socket.timeout, TimeoutError):
            raise AuditError(f"{where}: no answer to {what} within {self.conn.timeout:g}s") from None
        except OSError as e:
            raise AuditError(f"cannot reach InfluxDB at {where}: {e.strerror or e}") from None
        except http.client.HTTPException as e:
            raise AuditError(f"{where}: broken HTTP answer to {what}: {type(e).__name__}") from None

    def query(self, statements: Sequence[str] | str, what: str = "query") -> list[list[Series]]:
        """Run one or more statements in one request; one list of series per statement, in order.

        :class:`AuditError` on a transport error, an HTTP error or any statement's error (the message names
        ``what`` and the server's words, never a secret).
        """
        stmts = [statements] if isinstance(statements, str) else list(statements)
        params = {"q": ";\n".join(stmts), "db": self.conn.db, "epoch": "s"}
        if self.conn.retention_policy:
            params["rp"] = self.conn.retention_policy
        resp = self._post(urllib.parse.urlencode(params).encode(), what)
        with self._lock:
            self.requests += 1
        where, status, data = self._where, resp.status, resp.body
        message = self._scrub(influxhttp.server_message(data)) if status != 200 else ""
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


def _checked_url(url: str) -> urllib.parse.SplitResult:
    try:
        return influxhttp.check_url(url)
    except influxhttp.URLProblem as problem:
        if problem.kind == influxhttp.URL_CREDENTIALS:
            raise AuditError("--url must not carry credentials: use --token-file or --username/--password-file"
                             ) from None
        if problem.kind == influxhttp.URL_QUERY:
            raise AuditError("--url must not carry a query string or fragment") from None
        raise AuditError(f"--url {problem.shown!r}: expected http(s)://host[:port][/path]") from None
