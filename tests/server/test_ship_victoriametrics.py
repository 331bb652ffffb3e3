"""V2Writer (influxdb-client, synchronous) + Shipper against a real VictoriaMetrics, a blackhole and stubs."""

from __future__ import annotations

import gzip
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from tests.server.shiphelpers import secret_file
from tests.support.servers import BlackholeServer, StubHTTPServer, StubRequest, StubResponse, VictoriaMetrics
from tests.support.waiting import wait_for

from kvmfleet.ship import make_shipper
from kvmfleet.ship.buffer import LineBuffer
from kvmfleet.ship.lineproto import encode_point, line, series_prefix
from kvmfleet.ship.shipper import Shipper
from kvmfleet.ship.writers import ConfigWriteError, RetryableWriteError, V1Writer, V2Writer

pytestmark = pytest.mark.server

FAST = {"retry_min": 0.1, "retry_max": 0.4, "linger": 0.02}
TOKEN = "tok-0123456789-abcdef-SECRET"


@pytest.fixture
def token_file(tmp_path: Path) -> str:
    return secret_file(tmp_path, "influx.token", TOKEN)


def v2(url: str, token_file: str, **kw: Any) -> V2Writer:
    return V2Writer(url, org="kvmorg", bucket="kvm", token_file=token_file, **kw)


def vm_points(base_ms: int) -> list[tuple[str, dict[str, str], dict[str, int], int]]:
    out = []
    for s in range(3):
        ts = (base_ms + s * 10_000) * 1_000_000  # VictoriaMetrics keeps milliseconds
        out.append(("kvm_host", {"host": "hv1"}, {"vms": 2, "exits": 2**50 + s}, ts))
        for v in range(2):
            out.append(("kvm_vm", {"host": "hv1", "vm": f"web {v}", "uuid": f"u-{v}"},
                        {"exits": 10**12 + 100 * s + v, "halt_exits": 7 * s + v}, ts))
    return out


def series_of(export: list[dict[str, Any]]) -> dict[tuple[str, tuple[tuple[str, str], ...]], list[tuple[int, float]]]:
    out = {}
    for s in export:
        metric = dict(s["metric"])
        name = metric.pop("__name__")
        out[(name, tuple(sorted(metric.items())))] = sorted(zip(s["timestamps"], s["values"]))
    return out


def test_v2_to_victoriametrics_read_back(victoria: VictoriaMetrics, token_file: str) -> None:
    before = threading.active_count()
    writer = v2(victoria.url, token_file)
    assert threading.active_count() == before  # making the client starts no thread
    sh = Shipper(writer, LineBuffer(1000), None, batch_lines=3, **FAST)
    sh.start()
    base_ms = (time.time_ns() // 10**6) - 60_000
    pts = vm_points(base_ms)
    sh.submit(encode_point(m, t, f, ts) for m, t, f, ts in pts)
    assert sh.wait_idle(10), sh.stats()
    st = sh.stop(5)
    assert st["sent"] == len(pts) == 9 and st["retries"] == 0 and st["batches"] >= 3, st
    assert threading.active_count() == before

    got = series_of(victoria.export('{__name__=~"kvm_.*"}', min_samples=18))
    want: dict[tuple[str, tuple[tuple[str, str], ...]], list[tuple[int, float]]] = {}
    for m, tags, fields, ts in pts:
        for f, value in fields.items():
            want.setdefault((f"{m}_{f}", tuple(sorted(tags.items()))), []).append((ts // 10**6, value))
    assert got == want


def test_v1_and_v2_send_identical_line_protocol(token_file: str, tmp_path: Path) -> None:
    bodies: dict[str, bytes] = {}

    def handler(req: StubRequest) -> StubResponse:
        _method, path, headers, body = req
        assert headers.get("Content-Encoding") == "gzip"
        bodies[path.split("?")[0]] = gzip.decompress(body)
        return 204, {}, b""

    lines = [encode_point("kvm_vm", {"vm": "a b", "host": "h,1"}, {"x": i, "s": 'q"\\', "f": 1.5}, 10**18 + i)
             for i in range(50)]
    with StubHTTPServer(handler) as stub:
        V1Writer(stub.url, "kvm").write(lines)
        v2(stub.url, token_file).write(lines)
        auth = [r[2].get("Authorization") for r in stub.requests]
    assert set(bodies) == {"/write", "/api/v2/write"}
    assert bodies["/write"] == bodies["/api/v2/write"] == "\n".join(lines).encode()
    assert auth == [None, f"Token {TOKEN}"]


def test_v2_outage_every_line_exactly_once(victoria: VictoriaMetrics, token_file: str) -> None:
    sh = Shipper(v2(victoria.url, token_file, timeout=2), LineBuffer(5000), None, **FAST)
    sh.start()
    prefixes = [series_prefix("kvm_vm", {"host": "h1", "vm": f"vm{v}"}) for v in range(5)]
    base = (time.time_ns() // 10**9 - 120) * 10**9

    def sample(i: int) -> list[str]:
        return [line(p, {"seq": i}, base + i * 10**9) for p in prefixes]

    for i in range(5):
        sh.submit(sample(i))
    assert sh.wait_idle(5)
    victoria.stop()
    for i in range(5, 25):
        sh.submit(sample(i))
        time.sleep(0.05)
    down = wait_for("two failed deliveries during the outage", sh.stats, 10, every=0.02,
                    until=lambda st: st["retries"] >= 2)
    assert down["retries"] >= 2 and down["sent"] == 25 and down["buffered"] == 100, down
    victoria.start()
    assert sh.wait_idle(10), sh.stats()
    st = sh.stop(5)
    assert st["sent"] == st["submitted"] == 125 and st["dropped"] == 0, st
    got = series_of(victoria.export('{__name__="kvm_vm_seq"}', min_samples=125))
    assert len(got) == 5
    for samples in got.values():
        assert samples == [((base + i * 10**9) // 10**6, i) for i in range(25)]


def test_v2_wrong_token_is_clear_and_secret_free(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An InfluxDB 2 stand-in that answers 401 and, worse, echoes the token it got."""

    def handler(req: StubRequest) -> StubResponse:
        got = req[2].get("Authorization", "")
        body = json.dumps({"code": "unauthorized", "message": f"unauthorized access ({got})"}).encode()
        return 401, {"Content-Type": "application/json"}, body

    wrong = secret_file(tmp_path, "wrong.token", "WRONG-token-42-secret")
    caplog.set_level(logging.DEBUG)
    with StubHTTPServer(handler) as stub:
        w = v2(stub.url, wrong)
        with pytest.raises(ConfigWriteError) as exc:
            w.write(["m x=1i 1"])
        assert exc.value.status == 401 and exc.value.retryable
        msg = str(exc.value)
        assert "unauthorized access" in msg and "wrong.token" in msg and "WRONG-token-42-secret" not in msg
        sh = Shipper(v2(stub.url, wrong), LineBuffer(10), None, **FAST)
        sh.start()
        sh.submit(["m x=1i 1"])
        wait_for("two deliveries refused with HTTP 401", sh.stats, 5, every=0.02, until=lambda st: st["retries"] >= 2)
        st = sh.stop(1)
    assert st["retries"] >= 2 and st["sent"] == 0 and st["dropped_rejected"] == 0
    assert "HTTP 401" in st["last_error"] and "WRONG-token-42-secret" not in st["last_error"]
    assert "HTTP 401" in caplog.text and "WRONG-token-42-secret" not in caplog.text


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_v2_tls_verification_is_on_by_default(tls_cert: tuple[str, str], token_file: str) -> None:
    cert, key = tls_cert
    with StubHTTPServer(lambda req: (204, {}, b""), certfile=cert, keyfile=key) as https:
        with pytest.raises(ConfigWriteError, match="certificate verification failed") as exc:
            v2(https.url, token_file).write(["m x=1i 1"])
        assert TOKEN not in str(exc.value)
        v2(https.url, token_file, ca_file=cert).write(["m x=1i 1"])
        v2(https.url, token_file, verify_tls=False).write(["m x=1i 1"])
        assert len(https.requests) == 2


def test_v2_blackhole_stop_returns_in_time(blackhole: BlackholeServer, token_file: str, tmp_path: Path) -> None:
    sh = Shipper(v2(blackhole.url, token_file, timeout=5), LineBuffer(100), tmp_path / "s", **FAST)
    sh.start()
    durations = []
    for i in range(50):
        t0 = time.perf_counter()
        sh.submit([f"m x={i}i {i}"])
        durations.append(time.perf_counter() - t0)
        time.sleep(0.01)
    assert max(durations) < 0.1, durations  # a submit that waited on the write would take its 5 s timeout
    assert sh.stats()["sent"] == 0
    t0 = time.monotonic()
    st = sh.stop(timeout=1.0)  # the write blocks for up to 5 s in urllib3: stop must not wait for it
    assert time.monotonic() - t0 < 1.0
    assert st["spooled"] == 50 and st["sent"] == 0, st


def test_v2_connection_refused_is_retryable(token_file: str) -> None:
    with BlackholeServer() as bh:
        port_url = bh.url
    with pytest.raises(RetryableWriteError) as exc:
        v2(port_url, token_file, timeout=1).write(["m x=1i 1"])
    assert not isinstance(exc.value, ConfigWriteError) and TOKEN not in str(exc.value)


def test_factory_v2(victoria: VictoriaMetrics, token_file: str) -> None:
    sh = make_shipper({"api": "v2", "url": victoria.url, "org": "o", "bucket": "b", "token_file": token_file,
                       "spool_path": "", "buffer_lines": 10}, linger=0.01)
    assert isinstance(sh.writer, V2Writer) and sh.spool_path is None
    sh.start()
    sh.submit(["kvm_factory,h=x v=5i"])
    assert sh.wait_idle(5)
    assert sh.stop(2)["sent"] == 1
    assert [s["values"] for s in victoria.export('{__name__="kvm_factory_v"}')] == [[5]]
