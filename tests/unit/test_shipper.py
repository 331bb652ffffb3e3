"""The Shipper with in-memory writers: rejected batches are bisected down to the bad lines only, with bounded work
per cycle; the spool journal keeps what waits, within the documented bound, and nothing when all is well."""

from __future__ import annotations

import math
import random
import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest
from tests.support.waiting import wait_for

from kvmfleet.ship.buffer import LineBuffer
from kvmfleet.ship.shipper import Shipper
from kvmfleet.ship.spool import load_spool, write_spool
from kvmfleet.ship.writers import PermanentWriteError, RetryableWriteError

FAST = {"retry_min": 0.01, "retry_max": 0.05, "linger": 0.0}
BAD = "BAD"


class ServerStub:
    """A writer that behaves like a server: ``mode`` "partial" (InfluxDB 1.x: stores the good lines, 400 if any
    line is bad), "all-or-nothing" (400, nothing stored) or "down" (connection refused); ``too_large`` lines are
    answered 413 whatever else is in the request."""

    name = "stub"

    def __init__(self, mode: str = "partial") -> None:
        self.mode = mode
        self.stored: list[str] = []
        self.requests: list[list[str]] = []
        self.too_large: set[str] = set()
        self.lock = threading.Lock()
        self.on_request: Callable[[int], None] = lambda count: None

    def write(self, body_lines: list[str]) -> None:
        self.on_request(len(self.requests))
        with self.lock:
            self.requests.append(body_lines)
            if self.mode == "down":
                raise RetryableWriteError("stub: connection refused")
            if self.too_large & set(body_lines):
                raise PermanentWriteError("stub: HTTP 413: rejected: too large", 413)
            bad = [t for t in body_lines if BAD in t]
            if self.mode == "partial" or not bad:
                self.stored.extend(t for t in body_lines if BAD not in t)
            if bad:
                raise PermanentWriteError(f"stub: HTTP 400: rejected: partial write: dropped={len(bad)}", 400)

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


def batch(n: int, bad: int, seed: int = 7) -> list[str]:
    """``n`` lines, ``bad`` of them (at seeded random places) holding the bad mark."""
    where = set(random.Random(seed).sample(range(n), bad))
    return [f"kvm_vm,vm=v{i}{BAD if i in where else ''} x={i}i {10**18 + i}" for i in range(n)]


def bound(n: int, bad: int) -> int:
    """Requests to bisect ``n`` lines with ``bad`` bad ones: the whole, then at most two halves per bad line on
    each level below where the bad lines part ways."""
    return 1 + 2 * bad * (math.ceil(math.log2(n / bad)) + 2)


def check_accounting(st: dict[str, object]) -> None:
    assert st["submitted"] == sum(st[k] for k in ("sent", "dropped", "dropped_rejected", "buffered", "spooled",
                                                  "lost_at_stop")), st  # type: ignore[misc]


@pytest.mark.parametrize("mode", ["partial", "all-or-nothing"])
@pytest.mark.parametrize(("n", "bad"), [(5000, 40), (5000, 200), (5000, 1), (64, 64)])
def test_bisection_drops_exactly_the_bad_lines(mode: str, n: int, bad: int) -> None:
    """40 bad lines in a 5,000-line batch lose exactly 40 (the old fixed budget lost 934 good ones with them)."""
    server = ServerStub(mode)
    lines = batch(n, bad)
    sh = Shipper(server, LineBuffer(10_000), None, batch_lines=n, **FAST)
    sh.submit(lines)
    sh.start()
    assert sh.wait_idle(30), sh.stats()
    st = sh.stop(1)
    good = [t for t in lines if BAD not in t]
    times_stored = Counter(server.stored)
    assert set(server.stored) == set(good) and st["dropped_rejected"] == bad and st["sent"] == n - bad, st
    assert st["retries"] == 0 and st["dropped"] == 0
    check_accounting(st)
    assert len(server.requests) <= bound(n, bad), (len(server.requests), bound(n, bad))
    if mode == "partial":  # a good line stored by a partial write is sent again at most once per level
        assert max((times_stored[t] for t in good), default=0) <= math.ceil(math.log2(n)) + 1


def test_work_per_cycle_is_bounded_and_new_lines_go_first() -> None:
    """With 4 bisection requests per cycle, lines submitted while a batch is bisected go out within 5 requests
    (what is left of the cycle, then first in the next), alone; nothing is dropped for want of budget."""
    server = ServerStub("all-or-nothing")
    old = batch(2000, 100)
    new = [f"kvm_host,h=x v={i}i {i}" for i in range(10)]
    sh = Shipper(server, LineBuffer(10_000), None, batch_lines=2000, split_budget=4, **FAST)
    server.on_request = lambda count: sh.submit(new) if count == 100 else None
    sh.submit(old)
    sh.start()
    assert sh.wait_idle(10)
    st = sh.stop(1)
    assert st["dropped_rejected"] == 100 and set(server.stored) == {t for t in old + new if BAD not in t}
    sent_new = next(i for i, body in enumerate(server.requests) if new[0] in body)
    assert 100 < sent_new <= 100 + 4 + 1 < len(server.requests) / 2, (sent_new, len(server.requests))
    assert set(server.requests[sent_new]) == set(new)  # alone, not with the halves being bisected


def test_a_line_refused_alone_as_too_large_is_retried_not_dropped() -> None:
    server = ServerStub("partial")
    lines = batch(100, 0)
    server.too_large = {lines[37]}
    sh = Shipper(server, LineBuffer(1000), None, batch_lines=100, **FAST)
    sh.submit(lines)
    sh.start()
    deadline = time.monotonic() + 5
    while sh.stats()["retries"] < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    st = sh.stats()
    assert st["sent"] == 99 and st["bisecting"] == 1 and st["dropped_rejected"] == 0 and "413" in st["last_error"]
    server.too_large = set()  # the server's limit was raised
    assert sh.wait_idle(5)
    assert sh.stop(1)["sent"] == 100 and set(server.stored) == set(lines)


def test_failure_keeps_pending_within_the_capacity() -> None:
    server = ServerStub("down")
    sh = Shipper(server, LineBuffer(50), None, batch_lines=20, **FAST)
    sh.start()
    for i in range(30):
        sh.submit([f"m v={i}i {i * 10 + j}" for j in range(10)])
        time.sleep(0.002)
    time.sleep(0.1)
    st = sh.stats()
    assert st["buffered"] <= 50 + 20 and st["dropped"] >= 300 - 70
    st = sh.stop(0.5)
    check_accounting(st)
    assert st["sent"] == 0 and st["buffered"] == 0 and 0 < st["lost_at_stop"] <= 50  # no spool: said and counted


# ---------------------------------------------------------------------------------------------- the journal
TICK = 0.1


def journaled_shipper(server: ServerStub, spool: Path, capacity: int = 10_000, **kw: float) -> Shipper:
    opts = {**FAST, "journal_every": TICK, "sync_every": 4 * TICK, **kw}
    return Shipper(server, LineBuffer(capacity), spool, batch_lines=500, **opts)  # type: ignore[arg-type]


def test_nothing_is_written_while_the_server_takes_everything(tmp_path: Path) -> None:
    server = ServerStub("partial")
    sh = journaled_shipper(server, tmp_path / "spool" / "s")
    sh.start()
    for i in range(40):
        sh.submit([f"m v={i}i {i}"])
        time.sleep(TICK / 4)
    assert sh.wait_idle(5)
    st = sh.stop(1)
    assert st["sent"] == 40 and st["journaled"] == 0 and st["spool_syncs"] == 0 and st["spool_rewrites"] == 0
    assert not (tmp_path / "spool").exists()


def test_what_waits_is_on_disk_within_two_ticks_and_a_copy_of_the_file_keeps_it(tmp_path: Path) -> None:
    """A copy of the spool taken at any moment is what a kill -9 would leave: every line submitted more than two
    ticks before holds (less the ones delivered before the outage)."""
    server = ServerStub("partial")
    spool = tmp_path / "s"
    sh = journaled_shipper(server, spool)
    sh.start()
    submitted: list[tuple[float, str]] = []
    for i in range(10):
        text = f"m v={i}i {i}"
        sh.submit([text])
        submitted.append((time.monotonic(), text))
    assert sh.wait_idle(5)
    server.mode = "down"
    copies: list[tuple[float, list[str]]] = []
    for i in range(10, 150):
        text = f"m v={i}i {i}"
        sh.submit([text])
        submitted.append((time.monotonic(), text))
        time.sleep(TICK / 5)
        if i % 7 == 0 and spool.exists():
            shutil.copy(spool, tmp_path / "copy")
            copies.append((time.monotonic(), load_spool(tmp_path / "copy")))
    st = sh.stats()
    assert len(copies) >= 10 and st["journaled"] >= 100 and st["spool_syncs"] >= 2
    for taken, lines in copies:
        must = {t for when, t in submitted[10:] if when < taken - 4 * TICK}  # 2 ticks, and 2 for the scheduler
        assert must <= set(lines), (taken, len(must - set(lines)))
    syncs_bound = (time.monotonic() - submitted[10][0]) / (4 * TICK) + 1
    assert st["spool_syncs"] <= syncs_bound  # fsync at a bounded rate, not every line
    server.mode = "partial"
    assert sh.wait_idle(5)
    deadline = time.monotonic() + 2
    while spool.exists() and time.monotonic() < deadline:
        time.sleep(TICK / 2)
    assert not spool.exists()  # every line delivered: removed
    sh.stop(1)


def test_a_spool_loaded_at_start_is_kept_until_delivered(tmp_path: Path) -> None:
    spool = tmp_path / "s"
    old = [f"m v={i}i {i}" for i in range(30)]
    write_spool(spool, old)
    server = ServerStub("down")
    sh = journaled_shipper(server, spool)
    sh.start()
    sh.submit(["m v=100i 100"])
    wait_for("the spool rewritten with this run's numbers, nothing lost", lambda: set(load_spool(spool)), 5,
             every=TICK / 2, until=lambda lines: lines == {*old, "m v=100i 100"})
    server.mode = "partial"
    assert sh.wait_idle(5)
    deadline = time.monotonic() + 2
    while spool.exists() and time.monotonic() < deadline:
        time.sleep(TICK / 2)
    st = sh.stop(1)
    assert not spool.exists() and st["spool_loaded"] == 30 and st["sent"] == 31


def test_a_long_outage_keeps_the_file_within_about_twice_the_waiting_lines(tmp_path: Path) -> None:
    server = ServerStub("down")
    spool = tmp_path / "s"
    sh = journaled_shipper(server, spool, capacity=2000)
    sh.start()
    sizes = []
    for i in range(300):
        sh.submit([f"kvm_vm,vm=v{j} x={i}i,{'y' * 200}=1i {i * 100 + j}" for j in range(100)])  # 30,000 lines
        time.sleep(TICK / 10)
        if spool.exists():
            sizes.append(spool.stat().st_size)
    time.sleep(3 * TICK)
    st = sh.stats()
    line_bytes = len(f"00000000 L 2999999 \"kvm_vm,vm=v99 x=299i,{'y' * 200}=1i 29999\"\n")
    assert st["spool_rewrites"] >= 2 and st["dropped"] > 20_000
    assert max(sizes) < (2 * (2000 + 500) + 3000) * line_bytes, (max(sizes), line_bytes)
    assert st["journaled"] < 3 * 30_000  # each line written about twice at most (once, plus rewrites)
    final = sh.stop(1)
    assert load_spool(spool) == [f"kvm_vm,vm=v{j} x={i}i,{'y' * 200}=1i {i * 100 + j}"
                                 for i in range(280, 300) for j in range(100)][-final["spooled"]:]


def test_a_server_slower_than_a_tick_does_not_make_the_file_come_and_go(tmp_path: Path) -> None:
    """Lines wait more than two ticks at every write: they are journaled, but the file is created once, appended to,
    fsynced at the bounded rate, and removed only once nothing has waited for a while. The exact looks are in
    test_spool's scripted twin; here real threads: a write takes 2.5 ticks, so a line is there at two looks
    whatever the phase of the journal's ticks, and the gaps between samples (at most 2.5 ticks with nothing
    waiting) stay far below ``sync_every`` (8 ticks) even when the scheduler is late."""
    server = ServerStub("partial")
    slow_write = server.write

    def write(body_lines: list[str]) -> None:
        time.sleep(2.5 * TICK)
        slow_write(body_lines)

    server.write = write  # type: ignore[method-assign]
    sh = journaled_shipper(server, tmp_path / "s", linger=0.0, sync_every=8 * TICK)
    sh.start()
    t0 = time.monotonic()
    for i in range(20):  # a sample every 3 ticks, each waiting 2.5 ticks for its answer
        sh.submit([f"m v={i}i {i}"])
        time.sleep(3 * TICK)
    st = sh.stats()
    assert st["journaled"] >= 5 and st["spool_rewrites"] == 1, st
    assert st["spool_syncs"] <= (time.monotonic() - t0) / (8 * TICK) + 1, st
    assert sh.wait_idle(5)
    deadline = time.monotonic() + 3
    while (tmp_path / "s").exists() and time.monotonic() < deadline:
        time.sleep(TICK / 2)
    assert not (tmp_path / "s").exists()
    assert sh.stop(1)["sent"] == 20


def test_a_shipper_stopped_before_it_started_keeps_the_previous_spool(tmp_path: Path) -> None:
    spool = tmp_path / "s"
    write_spool(spool, ["old v=1i 1"])
    sh = journaled_shipper(ServerStub("down"), spool)
    sh.submit(["new v=2i 2"])
    assert sh.stop(1)["spooled"] == 1
    assert load_spool(spool) == ["old v=1i 1", "new v=2i 2"]
    empty = journaled_shipper(ServerStub("down"), spool)
    empty.stop(1)
    assert load_spool(spool) == ["old v=1i 1", "new v=2i 2"]


def test_lines_submitted_before_the_start_and_the_loaded_spool_are_both_kept(tmp_path: Path) -> None:
    spool = tmp_path / "s"
    write_spool(spool, ["old v=1i 1", "old v=2i 2"])
    server = ServerStub("down")
    sh = journaled_shipper(server, spool)
    sh.submit(["early v=3i 3"])
    sh.start()
    wait_for("the loaded and the early lines in the spool", lambda: sorted(load_spool(spool)), 5, every=TICK / 2,
             until=lambda lines: lines == ["early v=3i 3", "old v=1i 1", "old v=2i 2"])
    server.mode = "partial"
    assert sh.wait_idle(5)
    deadline = time.monotonic() + 3
    while spool.exists() and time.monotonic() < deadline:
        time.sleep(TICK / 2)
    assert not spool.exists() and sh.stop(1)["sent"] == 3
