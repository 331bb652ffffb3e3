"""V1Writer + Shipper against a real InfluxDB 1.6 (auth on), a blackhole, and HTTP(S) stubs."""

from __future__ import annotations

import base64
import gzip
import logging
import os
import stat
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from tests.server.shiphelpers import INFLUX_PASSWORD, INFLUX_USER, secret_file
from tests.support.servers import BlackholeServer, InfluxDB1, StubHTTPServer, StubRequest, StubResponse
from tests.support.waiting import wait_for

from kvmfleet.ship import ShipConfigError, make_shipper
from kvmfleet.ship.buffer import LineBuffer
from kvmfleet.ship.lineproto import encode_point, line, series_prefix
from kvmfleet.ship.shipper import Shipper
from kvmfleet.ship.spool import load_spool
from kvmfleet.ship.writers import ConfigWriteError, PermanentWriteError, RetryableWriteError, V1Writer

pytestmark = pytest.mark.server

FAST = {"retry_min": 0.1, "retry_max": 0.4, "linger": 0.02}


def v1(server_url: str, password_file: str, **kw: Any) -> V1Writer:
    return V1Writer(server_url, "kvm", username=INFLUX_USER, password_file=password_file, **kw)


def check_accounting(st: dict[str, Any]) -> None:
    assert st["submitted"] == (st["sent"] + st["dropped"] + st["dropped_rejected"] + st["buffered"]
                               + st["spooled"] + st["lost_at_stop"]), st


def points(base_ns: int, samples: int = 3, vms: int = 4) -> list[tuple[str, dict[str, str], dict[str, Any], int]]:
    """Host + per-VM points with awkward tags and integer fields (some beyond 2**53)."""
    out: list[tuple[str, dict[str, str], dict[str, Any], int]] = []
    for s in range(samples):
        ts = base_ns + s * 10_000_000_000 + 123_456_789
        out.append(("kvm_host", {"host": "hv 1"}, {"vms": vms, "exits": 2**62 + s}, ts))
        for v in range(vms):
            tags = {"host": "hv 1", "vm": f"web,{v}=x y", "uuid": f"00000000-0000-0000-0000-{v:012d}"}
            fields = {"exits": 2**55 + 1000 * s + v, "halt_exits": -v - 1, "guest_mode": s % 2 == 0,
                      "state": f'run "{v}"\\'}
            out.append(("kvm_vm", tags, fields, ts))
    return out


def test_points_read_back_exactly(influxdb: InfluxDB1, password_file: str) -> None:
    writer = v1(influxdb.url, password_file, retention_policy="rp1")
    sh = Shipper(writer, LineBuffer(1000), None, batch_lines=4, **FAST)
    sh.start()
    base = 1_700_000_000_000_000_000
    pts = points(base)
    sh.submit(encode_point(m, t, f, ts) for m, t, f, ts in pts)
    assert sh.wait_idle(10), sh.stats()
    st = sh.stop(5)
    assert st["sent"] == len(pts) == 15 and st["batches"] >= 4 and st["retries"] == 0, st
    assert writer.connections == 1  # one kept-alive connection for every batch
    check_accounting(st)

    got = {(r["time"], r["vm"], r["uuid"], r["host"], r["exits"], r["halt_exits"], r["guest_mode"], r["state"])
           for r in influxdb.rows('SELECT * FROM "kvm"."rp1"."kvm_vm"')}
    want = {(ts, t["vm"], t["uuid"], t["host"], f["exits"], f["halt_exits"], f["guest_mode"], f["state"])
            for m, t, f, ts in pts if m == "kvm_vm"}
    assert got == want
    hosts = influxdb.rows('SELECT * FROM "kvm"."rp1"."kvm_host"')
    assert sorted((r["time"], r["host"], r["vms"], r["exits"]) for r in hosts) == sorted(
        (ts, t["host"], f["vms"], f["exits"]) for m, t, f, ts in pts if m == "kvm_host")
    # nothing went to the default retention policy
    assert influxdb.rows('SELECT count(*) FROM "kvm"."autogen"."kvm_vm"') == []


def test_outage_every_line_exactly_once(influxdb: InfluxDB1, password_file: str, tmp_path: Path) -> None:
    writer = v1(influxdb.url, password_file, timeout=2)
    sh = Shipper(writer, LineBuffer(10_000), tmp_path / "spool", **FAST)
    sh.start()
    prefixes = [series_prefix("kvm_vm", {"host": "h1", "vm": f"vm{v}"}) for v in range(10)]
    base = (time.time_ns() // 10**9) * 10**9

    def sample(i: int) -> list[str]:
        return [line(p, {"seq": i, "v": v}, base + i * 1_000_000) for v, p in enumerate(prefixes)]

    for i in range(10):
        sh.submit(sample(i))
        time.sleep(0.03)
    assert sh.wait_idle(5)
    assert sh.stats()["sent"] == 100
    influxdb.stop()
    t_down = time.monotonic()
    for i in range(10, 40):  # ~1.5 s of outage while the collector keeps submitting
        sh.submit(sample(i))
        time.sleep(0.05)
    down = wait_for("two failed deliveries during the outage", sh.stats, 10, every=0.02,
                    until=lambda st: st["retries"] >= 2)
    assert down["sent"] == 100 and down["retries"] >= 2 and down["buffered"] == 300, down
    assert "Connection refused" in down["last_error"] or "connection" in down["last_error"].lower()
    influxdb.start()
    outage = time.monotonic() - t_down
    for i in range(40, 50):
        sh.submit(sample(i))
        time.sleep(0.03)
    assert sh.wait_idle(10), sh.stats()
    st = sh.stop(5)
    assert st["sent"] == st["submitted"] == 500 and st["dropped"] == 0 and st["dropped_rejected"] == 0, st
    assert st["last_success"] is not None and st["last_success"] > time.time() - 5
    check_accounting(st)
    assert not (tmp_path / "spool").exists()

    rows = influxdb.rows('SELECT "seq", "v" FROM "kvm"."autogen"."kvm_vm"')
    per_ts = Counter(r["time"] for r in rows)
    assert len(rows) == 500, f"outage {outage:.1f}s"
    assert sorted(per_ts) == [base + i * 1_000_000 for i in range(50)]
    assert set(per_ts.values()) == {10}  # every line exactly once
    assert all(r["time"] == base + r["seq"] * 1_000_000 for r in rows)


def test_blackhole_submit_never_blocks_and_memory_is_bounded(
    blackhole: BlackholeServer, password_file: str, tmp_path: Path
) -> None:
    writer = v1(blackhole.url, password_file, timeout=0.5)
    spool = tmp_path / "spool" / "ship.spool"
    sh = Shipper(writer, LineBuffer(2000), spool, batch_lines=500, retry_min=0.05, retry_max=0.2, linger=0)
    sh.start()
    prefixes = [series_prefix("kvm_vm", {"host": "h1", "vm": f"vm{v}"}) for v in range(201)]
    durations = []
    t_end = time.monotonic() + 1.5
    i = 0
    while time.monotonic() < t_end:  # a collector submitting 201 points every 10 ms, for 1.5 s
        lines = [line(p, {"exits": i, "halt_exits": v}, 10**18 + i) for v, p in enumerate(prefixes)]
        t0 = time.perf_counter()
        sh.submit(lines)
        durations.append(time.perf_counter() - t0)
        i += 1
        time.sleep(0.01)
    st = wait_for("a write timed out in the blackhole", sh.stats, 10, every=0.02,
                  until=lambda st: st["retries"] >= 1 and "timed out" in (st["last_error"] or ""))
    # a submit that waited on the write would take its 0.5 s timeout; what a submit costs is bench/ship_cost.py's
    assert max(durations) < 0.1, f"slowest submit {max(durations) * 1000:.2f} ms"
    assert st["sent"] == 0 and st["retries"] >= 1 and "timed out" in st["last_error"], st
    assert st["buffered"] <= 2000 + 500  # capacity + one in-flight batch
    assert st["dropped"] > 0 and st["dropped"] >= st["submitted"] - 2500
    check_accounting(st)
    assert blackhole.accepted >= 1

    t0 = time.monotonic()
    st = sh.stop(timeout=1.5)
    took = time.monotonic() - t0
    assert took < 1.5, took
    check_accounting(st)
    assert st["spooled"] == st["submitted"] - st["dropped"] and 0 < st["spooled"] <= 2000
    assert stat.S_IMODE(os.stat(spool).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(spool.parent).st_mode) == 0o700
    spooled = load_spool(spool)
    assert len(spooled) == st["spooled"] and spooled[-1].endswith(f" {10**18 + i - 1}")  # newest kept


def test_stop_during_outage_spools_and_next_shipper_sends(
    influxdb: InfluxDB1, password_file: str, tmp_path: Path
) -> None:
    spool = tmp_path / "state" / "ship.spool"
    sh1 = Shipper(v1(influxdb.url, password_file, timeout=2), LineBuffer(1000), spool, **FAST)
    sh1.start()
    first = [f"kvm_vm,vm=a seq={i}i {10**18 + i}" for i in range(5)]
    sh1.submit(first)
    assert sh1.wait_idle(5)
    influxdb.stop()
    later = [f"kvm_vm,vm=a seq={i}i {10**18 + i}" for i in range(5, 25)]
    sh1.submit(later)
    wait_for("a failed delivery while InfluxDB is down", sh1.stats, 5, every=0.02, until=lambda st: st["retries"] >= 1)
    st1 = sh1.stop(timeout=2)
    assert st1["sent"] == 5 and st1["spooled"] == 20 and st1["buffered"] == 0, st1
    check_accounting(st1)
    assert stat.S_IMODE(os.stat(spool).st_mode) == 0o600

    influxdb.start()
    sh2 = Shipper(v1(influxdb.url, password_file), LineBuffer(1000), spool, **FAST)
    sh2.start()
    assert spool.exists()  # loaded, and kept until its lines are delivered
    assert sh2.wait_idle(10), sh2.stats()
    st2 = sh2.stop(5)
    assert st2["spool_loaded"] == 20 and st2["sent"] == 20 and st2["submitted"] == 20, st2
    assert not spool.exists()
    rows = influxdb.rows('SELECT "seq" FROM "kvm"."autogen"."kvm_vm"')
    assert sorted(r["seq"] for r in rows) == list(range(25))


def test_wrong_password_is_a_clear_retryable_error_without_the_secret(
    influxdb: InfluxDB1, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "Wr0ng-Pa55-for-test-777"
    pw = secret_file(tmp_path, "wrong.pass", wrong)
    writer = v1(influxdb.url, pw)
    with pytest.raises(ConfigWriteError) as exc:
        writer.write(["kvm_vm,vm=a x=1i 1"])
    msg = str(exc.value)
    assert exc.value.retryable and exc.value.status == 401
    assert "authorization failed" in msg and INFLUX_USER in msg and pw in msg
    b64 = base64.b64encode(f"{INFLUX_USER}:{wrong}".encode()).decode()
    assert wrong not in msg and b64 not in msg

    caplog.set_level(logging.DEBUG)
    sh = Shipper(v1(influxdb.url, pw), LineBuffer(100), None, **FAST)
    sh.start()
    sh.submit(["kvm_vm,vm=a x=1i 1", "kvm_vm,vm=a x=2i 2"])
    st = wait_for("two deliveries refused with HTTP 401", sh.stats, 5, every=0.02, until=lambda st: st["retries"] >= 2)
    assert st["retries"] >= 2 and st["sent"] == 0 and st["buffered"] == 2 and st["dropped_rejected"] == 0, st
    assert "HTTP 401" in st["last_error"] and wrong not in st["last_error"]
    sh.stop(1)
    assert "HTTP 401" in caplog.text
    assert wrong not in caplog.text and b64 not in caplog.text
    assert any(r.levelno == logging.ERROR and "401" in r.getMessage() for r in caplog.records)


def test_rejected_lines_are_dropped_and_counted_not_retried(influxdb: InfluxDB1, password_file: str) -> None:
    sh = Shipper(v1(influxdb.url, password_file), LineBuffer(1000), None, **FAST)
    good = [f"kvm_vm,vm=a seq={i}i {10**18 + i}" for i in range(20)]
    bad_quote = 'kvm_vm,vm=a seq=bad"x 1000000000000000100'  # an unbalanced quote eats the lines after it
    conflict = "kvm_vm,vm=a seq=1.5 1000000000000000101"  # float into an integer field
    sh.submit(good[:5])
    sh.start()
    assert sh.wait_idle(5)
    sh.submit([*good[5:12], bad_quote, *good[12:16], conflict, *good[16:]])
    assert sh.wait_idle(10), sh.stats()
    st = sh.stop(5)
    assert st["dropped_rejected"] == 2 and st["sent"] == 20 and st["retries"] == 0, st
    assert st["splits"] >= 2 and "HTTP 400" in (st["last_error"] or "")
    check_accounting(st)
    rows = influxdb.rows('SELECT "seq" FROM "kvm"."autogen"."kvm_vm"')
    assert sorted(r["seq"] for r in rows) == list(range(20))


def test_writer_classifies_statuses(influxdb: InfluxDB1, password_file: str) -> None:
    w = v1(influxdb.url, password_file)
    with pytest.raises(PermanentWriteError) as e400:
        w.write(["kvm_vm,vm=a x=1i 1", "not line protocol"])
    assert e400.value.status == 400 and not e400.value.retryable
    w404 = V1Writer(influxdb.url, "nodb", username=INFLUX_USER, password_file=password_file)
    with pytest.raises(ConfigWriteError, match="database not found"):
        w404.write(["kvm_vm,vm=a x=1i 1"])
    wrp = v1(influxdb.url, password_file, retention_policy="nope")
    with pytest.raises(ConfigWriteError, match="retention_policy"):
        wrp.write(["kvm_vm,vm=a x=1i 1"])
    influxdb.stop()
    with pytest.raises(RetryableWriteError, match="Connection refused"):
        w.write(["kvm_vm,vm=a x=1i 1"])


def _tls_handler(req: StubRequest) -> StubResponse:
    return 204, {}, b""


def test_tls_verification_is_on_by_default(tls_cert: tuple[str, str], tmp_path: Path) -> None:
    cert, key = tls_cert
    with StubHTTPServer(_tls_handler, certfile=cert, keyfile=key) as https:
        assert https.url.startswith("https://")
        with pytest.raises(ConfigWriteError, match="certificate verification failed") as exc:
            V1Writer(https.url, "kvm").write(["m x=1i 1"])
        assert exc.value.retryable
        V1Writer(https.url, "kvm", ca_file=cert).write(["m x=1i 1"])
        V1Writer(https.url, "kvm", verify_tls=False).write(["m x=1i 1"])
        assert len(https.requests) == 2


def test_wire_format_gzip_auth_keepalive(password_file: str) -> None:
    def handler(req: StubRequest) -> StubResponse:
        return 204, {}, b""

    with StubHTTPServer(handler) as stub:
        w = V1Writer(stub.url + "/influx/", "kvm db", retention_policy="rp 1", username=INFLUX_USER,
                     password_file=password_file)
        lines = ["m,t=a x=1i 1", 'm,t=b s="x\ny" 2']
        w.write(lines)
        w.write(lines[:1])
        w.close()
    assert len(stub.requests) == 2 and w.connections == 1
    method, path, headers, body = stub.requests[0]
    assert method == "POST" and path == "/influx/write?db=kvm+db&rp=rp+1&precision=ns"
    assert headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body).decode() == "\n".join(lines)
    assert headers["Authorization"] == "Basic " + base64.b64encode(
        f"{INFLUX_USER}:{INFLUX_PASSWORD}".encode()).decode()
    assert INFLUX_PASSWORD not in path and INFLUX_PASSWORD not in repr(w) and INFLUX_PASSWORD not in w.name


def test_secret_file_problems(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = str(tmp_path / "nope.pass")
    with pytest.raises(ShipConfigError, match=r"nope\.pass"):
        V1Writer("http://127.0.0.1:1", "kvm", username="u", password_file=missing)
    empty = secret_file(tmp_path, "empty.pass", "")
    with pytest.raises(ShipConfigError, match=r"empty\.pass.*empty"):
        V1Writer("http://127.0.0.1:1", "kvm", username="u", password_file=empty)
    loose = secret_file(tmp_path, "loose.pass", "pw-loose-123", mode=0o644)
    with caplog.at_level(logging.WARNING):
        V1Writer("http://127.0.0.1:1", "kvm", username="u", password_file=loose)
    assert "loose.pass" in caplog.text and "0644" in caplog.text and "pw-loose-123" not in caplog.text
    with pytest.raises(ShipConfigError, match="credentials do not belong"):
        V1Writer("http://u:p@127.0.0.1:1", "kvm")
    with pytest.raises(ShipConfigError, match="unknown shipping option"):
        make_shipper({"api": "v1", "pasword_file": "x"})


def test_factory_v1(influxdb: InfluxDB1, password_file: str, tmp_path: Path) -> None:
    sh = make_shipper({"api": "v1", "url": influxdb.url, "database": "kvm", "retention_policy": "rp1",
                       "username": INFLUX_USER, "password_file": password_file, "verify_tls": "true",
                       "timeout": "3", "buffer_lines": "500", "spool_path": str(tmp_path / "s")},
                      linger=0.01)
    assert isinstance(sh.writer, V1Writer) and sh.buffer.capacity == 500 and sh.writer.timeout == 3.0
    sh.start()
    sh.submit([f"kvm_vm,vm=f x={i}i {i}" for i in range(300)])
    st = sh.stop(5)  # no wait: stop() flushes what it can
    assert st["sent"] == 300 and st["spooled"] == 0, st
    assert [r["x"] for r in influxdb.rows('SELECT x FROM "kvm"."rp1"."kvm_vm"')] == list(range(300))
    assert not (tmp_path / "s").exists()


def test_stop_interrupts_a_write_stuck_in_a_blackhole(
    blackhole: BlackholeServer, password_file: str, tmp_path: Path
) -> None:
    writer = v1(blackhole.url, password_file, timeout=30)  # the read would block for 30 s
    sh = Shipper(writer, LineBuffer(100), tmp_path / "s", **FAST)
    sh.start()
    sh.submit([f"m x={i}i {i}" for i in range(10)])
    # stuck: the batch in flight on a connection the blackhole accepted (and never answers)
    wait_for("a write stuck in the blackhole", lambda: (sh.stats()["in_flight"], blackhole.accepted), 5, every=0.01,
             until=lambda state: state[0] > 0 and state[1] >= 1)
    t0 = time.monotonic()
    st = sh.stop(timeout=1.0)
    assert time.monotonic() - t0 < 1.0
    assert st["spooled"] == 10 and st["sent"] == 0, st
    assert sh._thread is not None and not sh._thread.is_alive()  # socket shutdown ended the write: no leftover


def test_retry_after_and_5xx_are_retried(password_file: str) -> None:
    answers = [(503, {"Retry-After": "0.4"}, b'{"error":"busy"}'), (429, {}, b'{"error":"slow down"}'),
               (500, {}, b"oops")]
    times: list[float] = []

    def handler(req: StubRequest) -> StubResponse:
        times.append(time.monotonic())
        return answers.pop(0) if answers else (204, {}, b"")

    with StubHTTPServer(handler) as stub:
        sh = Shipper(v1(stub.url, password_file), LineBuffer(10), None, retry_min=0.05, retry_max=1.0, linger=0)
        sh.start()
        sh.submit(["m x=1i 1"])
        assert sh.wait_idle(10), sh.stats()
        st = sh.stop(2)
    assert st["sent"] == 1 and st["retries"] == 3 and "HTTP 500" in st["last_error"], st
    assert times[1] - times[0] >= 0.39  # Retry-After honoured
