"""InfluxQL over HTTP ``/query`` (stdlib only): InfluxDB 1.x, 2.x (v1 compatibility API with a DBRP mapping) and
3.x (its v1 query API).

Secrets come from files only (a token, or a user's password) and are sent in the ``Authorization`` header, never
in a URL. TLS certificates are verified unless switched off explicitly. One keep-alive connection per thread, so
the audit can run several statements at once.
"""

from __future__ import annotations

import http.client
import json
import math
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


class AnswerShapeError(ValueError):
    """An answer that is JSON but not InfluxDB's shape (a proxy's page, a broken or hostile server)."""


SCALARS = (str, int, float, bool, type(None))
_SCALAR_TYPES = frozenset(SCALARS)  # what json.loads makes of scalars: exactly these types, never subclasses


def parse_series(s: Any) -> Series:
    """One series of an answer, checked: a name, string tags, string columns and rows of as many scalars, the
    time a number (``epoch=s``); :class:`AnswerShapeError` otherwise. The rules can then trust the types."""
    if not isinstance(s, dict):
        raise AnswerShapeError("a series is not an object")
    name, tags, columns, values = s.get("name", ""), s.get("tags") or {}, s.get("columns"), s.get("values", [])
    if not isinstance(name, str):
        raise AnswerShapeError("a series name is not a string")
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise AnswerShapeError(f"the tags of series {name!r} are not strings")
    if not isinstance(columns, list) or not columns or not all(isinstance(c, str) for c in columns):
        raise AnswerShapeError(f"series {name!r} has no list of column names")
    if not isinstance(values, list) or not all(isinstance(row, list) for row in values):
        raise AnswerShapeError(f"the values of series {name!r} are not a list of rows")
    time_at = columns.index("time") if "time" in columns else None
    width = len(columns)
    for row in values:
        if len(row) != width or not _SCALAR_TYPES.issuperset(map(type, row)):
            raise AnswerShapeError(f"a row of series {name!r} does not hold one value per column")
        if time_at is not None and not _is_time(row[time_at]):
            raise AnswerShapeError(f"a time of series {name!r} is not a number of seconds")
    return Series(name=name, tags=dict(tags), columns=list(columns), values=list(values))


def _is_time(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
            raise AuditError(f"{where}: no complete answer to {what} within {self.conn.timeout:g}s") from None
        except OSError as e:
            raise AuditError(f"cannot reach InfluxDB at {where}: {e.strerror or e}") from None
        except http.client.HTTPException as e:
            raise AuditError(f"{where}: broken HTTP answer to {what}: {type(e).__name__}") from None

    def query(self, statements: Sequence[str] | str, what: str = "query") -> list[list[Series]]:
        """Run one or more statements in one request; one list of series per statement, in order.

        :class:`AuditError` on a transport error, an HTTP error, any statement's error or an answer of the wrong
        shape (the message names ``what`` and the server's words, never a secret).
        """
        stmts = [statements] if isinstance(statements, str) else list(statements)
        params = {"q": ";\n".join(stmts), "db": self.conn.db, "epoch": "s"}
        if self.conn.retention_policy:
            params["rp"] = self.conn.retention_policy
        resp = self._post(urllib.parse.urlencode(params).encode(), what)
        with self._lock:
            self.requests += 1
        self._check_status(resp, what)
        if not resp.complete:
            raise AuditError(f"{self._where}: the answer to {what} is larger than {MAX_BODY >> 20} MiB")
        try:
            doc = json.loads(resp.body)
        except (ValueError, RecursionError):
            raise AuditError(f"{self._where}: the answer to {what} is not JSON") from None
        if isinstance(doc, dict) and doc.get("error"):
            raise AuditError(f"{what}: {self._said(doc['error'])}")
        try:
            return self._statements(doc, len(stmts), what)
        except AnswerShapeError as e:
            raise AuditError(f"{self._where}: the answer to {what} is not an InfluxDB answer: {e}") from None

    def _check_status(self, resp: influxhttp.Response, what: str) -> None:
        """:class:`AuditError` for any answer but a 200, worded for the command line."""
        where, status = self._where, resp.status
        if status == 200:
            return
        message = self._said(resp.body)
        if status in (401, 403):
            raise AuditError(f"{where}: HTTP {status}: {message or 'unauthorized'} (check --token-file or "
                             "--username/--password-file)")
        if status == 404:
            raise AuditError(f"{where}: HTTP 404 on /query: {message or 'not found'} (is this an InfluxDB URL? "
                             "InfluxDB 2.x needs a DBRP mapping for the bucket)")
        location = resp.header("Location")
        if 300 <= status < 400 and location:
            raise AuditError(f"{where}: HTTP {status} for {what}: redirected to "
                             f"{self._said(influxhttp.redact_url(location))}, which is not followed (give --url the "
                             "address that answers)")
        raise AuditError(f"{where}: HTTP {status} for {what}: {message or 'no message'}")

    def _said(self, text: object) -> str:
        """What a server said, as one printable line without a secret in it."""
        return self._scrub(influxhttp.server_message(text if isinstance(text, bytes) else str(text)))

    def _statements(self, doc: Any, count: int, what: str) -> list[list[Series]]:
        """The series of each of ``count`` statements; :class:`AuditError` for a statement's error,
        :class:`AnswerShapeError` for anything but InfluxDB's shape (each statement answered once)."""
        results = doc.get("results") if isinstance(doc, dict) else None
        if not isinstance(results, list):
            raise AnswerShapeError("no results list")
        out: list[list[Series] | None] = [None] * count
        for i, res in enumerate(results):
            if not isinstance(res, dict):
                raise AnswerShapeError(f"result {i} is not an object")
            idx = res.get("statement_id", i)
            if type(idx) is not int or not 0 <= idx < count or out[idx] is not None:
                raise AnswerShapeError(f"result {i} has statement_id {self._said(repr(idx))}")
            if res.get("error"):
                hint = ""
                if "database not found" in str(res["error"]):
                    hint = (" (InfluxDB 2.x: create a DBRP mapping for the bucket, e.g. `influx v1 dbrp create "
                            "--db NAME --rp autogen --bucket-id ID`)")
                raise AuditError(f"{what}: {self._said(res['error'])}{hint}")
            series = res.get("series", [])
            if not isinstance(series, list):
                raise AnswerShapeError(f"the series of statement {idx} are not a list")
            out[idx] = [parse_series(s) for s in series]
        missing = [i for i, stmt in enumerate(out) if stmt is None]
        if missing:
            raise AnswerShapeError(f"no result for statement {missing[0]}")
        return [stmt or [] for stmt in out]

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
