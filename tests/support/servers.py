"""Real servers for tests, each on 127.0.0.1 with free ports and a temp dir of its own (stdlib only).

* :class:`InfluxDB1` runs Debian's ``influxd`` 1.6 (package ``influxdb``) with a generated config.
* :class:`VictoriaMetrics` runs Debian's ``victoria-metrics`` (package ``victoria-metrics``).
* :class:`BlackholeServer` accepts TCP connections, reads what is sent and never answers.
* :class:`StubHTTPServer` is a tiny HTTP(S) server whose answers a test chooses (TLS, 401 bodies, ...).

Every server is a context manager with ``.url``, ``.start()`` and ``.stop()``; a stopped process server can be
started again on the same port and data dir (outage tests). A missing binary raises :class:`MissingBinary`,
whose message names the Debian package to install: tests turn it into a failure, never a skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from kvmfleet import influxhttp

LOCALHOST = "127.0.0.1"


class MissingBinary(RuntimeError):
    """A server binary is not installed; the message says which apt package provides it."""


class ServerError(RuntimeError):
    """A server did not start, answer or stop as expected."""


def require_binary(name: str, apt_package: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if path is None:
        raise MissingBinary(
            f"{name!r} is not installed: the Debian package {apt_package!r} is missing "
            f"(apt-get install -y {apt_package})"
        )
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOCALHOST, port))
        except OSError:
            return False
        return True


def _get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """A GET for readiness probes and admin endpoints (what is written or queried goes through :func:`raw_post`)."""
    req = urllib.request.Request(url, method="GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


class _ProcessServer:
    """A server process with a temp dir, a log file, readiness polling and a stop that always ends it."""

    name = "server"
    binary = ""
    apt_package = ""
    #: SIGTERM first, SIGKILL after this many seconds.
    term_timeout = 35.0
    start_timeout = 60.0

    def __init__(self, workdir: os.PathLike[str] | str | None = None) -> None:
        self.exe = require_binary(self.binary, self.apt_package)
        self._own_dir = workdir is None
        self.dir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=f"kvmfleet-{self.name}-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = self.dir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.last_stop_seconds: float | None = None

    # -- to be provided by subclasses
    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _after_start(self) -> None:
        pass

    # -- common machinery
    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def start(self) -> None:
        if self.running:
            return
        deadline = time.monotonic() + 10
        while not _port_is_free(self.port):  # a previous instance may still hold it
            if time.monotonic() > deadline:
                raise ServerError(f"{self.name}: port {self.port} still busy")
            time.sleep(0.1)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                self._argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir
            )
        finally:
            log.close()
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self._ready():
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop(kill=True)
                raise ServerError(f"{self.name} not ready after {self.start_timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)
        self._after_start()

    def stop(self, kill: bool = False, term_timeout: float | None = None) -> None:
        """SIGTERM and wait for the exit (SIGKILL after ``term_timeout``); ``kill`` sends SIGKILL at once."""
        proc = self.proc
        if proc is None:
            return
        t0 = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(self.term_timeout if term_timeout is None else term_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.last_stop_seconds = time.monotonic() - t0
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop for good and remove the temp dir if this object made it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> _ProcessServer:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class InfluxDB1(_ProcessServer):
    """InfluxDB 1.6 (``influxd -config FILE``), reporting off, every dir under the temp dir.

    With ``auth=True`` the HTTP API requires credentials; an admin user ``admin_user``/``admin_password`` is
    created on the first start and :meth:`query` uses it.
    """

    name = "influxdb"
    binary = "influxd"
    apt_package = "influxdb"

    def __init__(
        self,
        workdir: os.PathLike[str] | str | None = None,
        auth: bool = False,
        admin_user: str = "admin",
        admin_password: str = "admin-secret",
    ) -> None:
        super().__init__(workdir)
        self.rpc_port = free_port()
        self.auth = auth
        self.admin_user = admin_user
        self.admin_password = admin_password
        self.config_path = self.dir / "influxdb.conf"
        self._write_config()

    def _write_config(self) -> None:
        d = self.dir
        self.config_path.write_text(
            f"""reporting-enabled = false
bind-address = "{LOCALHOST}:{self.rpc_port}"
[meta]
  dir = "{d}/meta"
[data]
  dir = "{d}/data"
  wal-dir = "{d}/wal"
  query-log-enabled = false
[monitor]
  store-enabled = false
[subscriber]
  enabled = false
[continuous_queries]
  enabled = false
[http]
  enabled = true
  bind-address = "{LOCALHOST}:{self.port}"
  auth-enabled = {"true" if self.auth else "false"}
  log-enabled = false
  pprof-enabled = false
[logging]
  level = "warn"
  suppress-logo = true
"""
        )

    def _argv(self) -> list[str]:
        return [self.exe, "-config", str(self.config_path)]

    def _ready(self) -> bool:
        status, _ = _get(self.url + "/ping", timeout=1)
        return status == 204

    def _after_start(self) -> None:
        if self.auth:
            # Allowed without credentials while no user exists; an error once it does (restart): ignored.
            q = f"CREATE USER {self.admin_user} WITH PASSWORD '{self.admin_password}' WITH ALL PRIVILEGES"
            post_form(self.url + "/query", {"q": q})

    def _auth_headers(self) -> dict[str, str]:
        return influxhttp.auth_headers(username=self.admin_user, password=self.admin_password) if self.auth else {}

    def query(self, influxql: str, db: str | None = None, epoch: str = "ns") -> list[dict[str, Any]]:
        """Run InfluxQL; returns the ``results`` list; raises :class:`ServerError` on an HTTP or query error."""
        params = {"q": influxql, "epoch": epoch}
        if db:
            params["db"] = db
        status, body = post_form(self.url + "/query", params, self._auth_headers())
        if status != 200:
            raise ServerError(f"query {influxql!r}: HTTP {status}: {influxhttp.server_message(body)}")
        results: list[dict[str, Any]] = json.loads(body)["results"]
        for r in results:
            if "error" in r:
                raise ServerError(f"query {influxql!r}: {r['error']}")
        return results

    def rows(self, influxql: str, db: str | None = None) -> list[dict[str, Any]]:
        """Flatten a SELECT into dicts (one per row, with the series tags merged in)."""
        out: list[dict[str, Any]] = []
        for result in self.query(influxql, db=db):
            for series in result.get("series", []):
                tags = series.get("tags", {})
                for values in series.get("values", []):
                    row = dict(zip(series["columns"], values))
                    row.update(tags)
                    out.append(row)
        return out

    def create_database(self, name: str) -> None:
        self.query(f'CREATE DATABASE "{name}"')


class VictoriaMetrics(_ProcessServer):
    """VictoriaMetrics (``victoria-metrics -httpListenAddr=... -storageDataPath=... -retentionPeriod=10y``)."""

    name = "victoria-metrics"
    binary = "victoria-metrics"
    apt_package = "victoria-metrics"
    term_timeout = 20.0

    def _argv(self) -> list[str]:
        return [
            self.exe,
            f"-httpListenAddr={LOCALHOST}:{self.port}",
            f"-storageDataPath={self.dir / 'data'}",
            "-retentionPeriod=10y",
            "-loggerLevel=WARN",
        ]

    def _ready(self) -> bool:
        status, _ = _get(self.url + "/health", timeout=1)
        return status == 200

    def force_flush(self) -> None:
        status, body = _get(self.url + "/internal/force_flush")
        if status != 200:
            raise ServerError(f"force_flush: HTTP {status}: {body[:300]!r}")

    def export(self, match: str = '{__name__=~".+"}', min_samples: int = 1, timeout: float = 5.0
               ) -> list[dict[str, Any]]:
        """``/api/v1/export`` after ``/internal/force_flush``: one dict per series (metric, values, ms stamps).

        New series become searchable a moment after the write was acknowledged, even after a force_flush (seen
        with 1.79: empty right after a 204, there 0.5 s later), so this polls until at least ``min_samples``
        samples are seen (``min_samples=0``: one look); AssertionError if they are not there within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.force_flush()
            status, body = post_form(self.url + "/api/v1/export", {"match[]": match, "start": "0"})
            if status != 200:
                raise ServerError(f"export {match!r}: HTTP {status}: {body[:300]!r}")
            series = [json.loads(line) for line in body.splitlines() if line.strip()]
            seen = sum(len(s["values"]) for s in series)
            if seen >= min_samples:
                return series
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout:g}s waiting for {min_samples} samples of {match} "
                                     f"in VictoriaMetrics (last: {seen})")
            time.sleep(0.1)


class BlackholeServer:
    """Accepts TCP connections on 127.0.0.1, reads and discards what arrives, never answers."""

    def __init__(self) -> None:
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self.accepted = 0

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def start(self) -> None:
        if self._listener is not None:
            return
        self._stop.clear()
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((LOCALHOST, self.port))
        ls.listen(64)
        ls.settimeout(0.1)
        self._listener = ls
        t = threading.Thread(target=self._accept_loop, name="blackhole-accept", daemon=True)
        t.start()
        self._threads = [t]

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            self.accepted += 1
            conn.settimeout(0.1)
            self._conns.append(conn)
            t = threading.Thread(target=self._drain, args=(conn,), name="blackhole-conn", daemon=True)
            t.start()
            self._threads.append(t)

    def _drain(self, conn: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                if not conn.recv(65536):
                    return
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.close()
        self._conns = []
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    close = stop

    def __enter__(self) -> BlackholeServer:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# A stub handler gets (method, path, headers, body) and returns (status, headers, body).
StubRequest = tuple[str, str, dict[str, str], bytes]
StubResponse = tuple[int, dict[str, str], bytes]


class StubHTTPServer:
    """A threaded HTTP/1.1 server (HTTPS if ``certfile`` is given) answering with ``handler``; keeps requests."""

    def __init__(
        self,
        handler: Callable[[StubRequest], StubResponse],
        certfile: str | None = None,
        keyfile: str | None = None,
    ) -> None:
        self.handler = handler
        self.requests: list[StubRequest] = []
        stub = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                req: StubRequest = (self.command, self.path, {k: v for k, v in self.headers.items()}, body)
                stub.requests.append(req)
                status, headers, out = stub.handler(req)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = _any

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((LOCALHOST, 0), _Handler)
        self._server.daemon_threads = True
        self.scheme = "http"
        if certfile:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(certfile, keyfile)
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self.port = int(self._server.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{LOCALHOST}:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="stub-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    close = stop

    def __enter__(self) -> StubHTTPServer:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def make_self_signed_cert(directory: os.PathLike[str] | str) -> tuple[str, str]:
    """A throwaway self-signed certificate for 127.0.0.1/localhost made with ``openssl``: (cert, key) paths."""
    openssl = require_binary("openssl", "openssl")
    d = Path(directory)
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )
    return str(cert), str(key)


@contextlib.contextmanager
def running(server: Any) -> Iterator[Any]:
    """``with running(InfluxDB1()) as s:`` for any server above."""
    server.start()
    try:
        yield server
    finally:
        server.close()


def raw_post(url: str, body: bytes, headers: dict[str, str] | None = None, timeout: float = 10.0
             ) -> tuple[int, bytes]:
    """One HTTP POST on a connection of its own (``url`` may carry a query string), through kvmfleet's own HTTP
    layer; the whole answer (up to 256 MiB)."""
    u = urllib.parse.urlsplit(url)
    path = (u.path or "/") + ("?" + u.query if u.query else "")
    with influxhttp.KeepAliveConnection(f"{u.scheme}://{u.netloc}", timeout=timeout, max_body=256 << 20) as conn:
        resp = conn.post(path, body, headers or {})
    return resp.status, resp.body


def post_form(url: str, params: dict[str, str], headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """:func:`raw_post` of an HTML form (InfluxQL ``/query``, VictoriaMetrics' export)."""
    return raw_post(url, urllib.parse.urlencode(params).encode(),
                    {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})})
