"""The writers against tests/support/faultserver.py: every misbehaviour ends within the deadline, as a retry or a
rejection, and a 200 that is not a write's answer is not taken for a delivery."""

from __future__ import annotations

import random
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.server.shiphelpers import secret_file
from tests.support.faultserver import BAD_MARK, FaultServer
from tests.support.servers import BlackholeServer
from tests.unit.agentdata import ListSource, entries, reading

import kvmfleet
from kvmfleet.agent import Agent
from kvmfleet.options import parse_config
from kvmfleet.ship.writers import ConfigWriteError, PermanentWriteError, RetryableWriteError, V1Writer, V2Writer

pytestmark = pytest.mark.server
PLUGINS = Path(kvmfleet.__file__).parent


@pytest.fixture(autouse=True)
def no_thread_left() -> Iterator[None]:
    """The fault server's handler threads (daemons, not joined by its stop) end before the next test counts
    threads."""
    before = threading.active_count()
    yield
    deadline = time.monotonic() + 10
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)


def v2(url: str, tmp_path: Path, timeout: float) -> V2Writer:
    return V2Writer(url, org="o", bucket="kvm", token_file=secret_file(tmp_path, "token", "tok"), timeout=timeout)


def writer(api: str, url: str, tmp_path: Path, timeout: float = 5.0) -> V1Writer | V2Writer:
    return V1Writer(url, "kvm", timeout=timeout) if api == "v1" else v2(url, tmp_path, timeout)


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_a_server_answering_a_byte_a_second_is_cut_off_at_the_deadline(api: str, tmp_path: Path) -> None:
    """Each byte comes within the per-read timeout: only the deadline of the whole write ends it."""
    with FaultServer(["trickle"]) as server:
        w = writer(api, server.url, tmp_path, timeout=1.5)
        t0 = time.monotonic()
        with pytest.raises(RetryableWriteError, match=r"within 1\.5s") as exc:
            w.write(["m x=1i 1"])
        took = time.monotonic() - t0
        w.close()
    assert 1.4 < took < 2.5, took
    assert exc.value.retryable


def test_v2_abort_ends_a_write_stuck_in_a_blackhole(tmp_path: Path) -> None:
    with BlackholeServer() as hole:
        writer = v2(hole.url, tmp_path, timeout=30)
        threading.Timer(0.5, writer.abort).start()
        t0 = time.monotonic()
        with pytest.raises(RetryableWriteError):
            writer.write(["m x=1i 1"])
    assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_a_200_with_a_body_is_not_a_delivery(api: str, tmp_path: Path) -> None:
    with FaultServer(["garbage"]) as server:
        w = writer(api, server.url, tmp_path)
        with pytest.raises(RetryableWriteError, match=r"HTTP 200 with a body of \d+ bytes, not a write's answer"):
            w.write(["m x=1i 1"])
        assert server.stored == []
        server.fault = "ok"
        w.write(["m x=1i 1"])
        assert server.stored == ["m x=1i 1"]
        w.close()


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_each_fault_is_a_retry_or_a_rejection(api: str, tmp_path: Path) -> None:
    expected = {"partial": PermanentWriteError, "all-or-nothing": PermanentWriteError, "413": PermanentWriteError,
                "429": RetryableWriteError, "500": RetryableWriteError, "huge": RetryableWriteError,
                "redirect": ConfigWriteError}
    for fault, error in expected.items():
        with FaultServer([fault], huge_bytes=4 << 20) as server:
            w = writer(api, server.url, tmp_path)
            with pytest.raises(error) as exc:
                w.write(["a x=1i 1", "bBAD x=2i 2"])
            w.close()
            assert type(exc.value) is error, (fault, exc.value)
            if fault == "429":
                assert exc.value.retry_after == 1.0
            if fault == "redirect":
                assert "redirected" in str(exc.value)


# ---------------------------------------------------------------------------------------------- adversarial
FAULT_CYCLE = ["partial", "all-or-nothing", "ok", "413", "429", "500", "trickle", "huge", "garbage", "redirect"]
READ_EVERY = 0.1
FAULT_SECONDS = 12.0


class Recorder:
    """Keeps a bytes copy of every line the agent submits (copies: the lines themselves may be freed)."""

    def __init__(self, shipper: Any) -> None:
        self.lines: list[bytes] = []
        self._submit = shipper.submit
        shipper.submit = self.submit

    def submit(self, lines: list[str]) -> int:
        self.lines.extend(text.encode() for text in lines)
        return int(self._submit(lines))


class CountingFaultServer(FaultServer):
    """A FaultServer that also notes how many bad lines each write held."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rejected_with: set[int] = set()  # bad lines in each write rejected (400, or 413: split too)

    def answer_write(self, lines: list[str], fault: str) -> tuple[int, dict[str, str], bytes]:
        answer = super().answer_write(lines, fault)
        if answer[0] in (400, 413):
            self.rejected_with.add(sum(BAD_MARK in t for t in lines))
        return answer


def backlog(bad_counts: list[int]) -> list[str]:
    """Blocks of 500 lines with these numbers of bad lines (as a spool read at start would queue them)."""
    rng = random.Random(5)
    out = []
    for block, bad in enumerate(bad_counts):
        where = set(rng.sample(range(500), bad))
        out += [f"kvm_vm,host=hv1,vm=old{i}{BAD_MARK if i in where else ''} x={block}i {10**18 + block * 500 + i}"
                for i in range(500)]
    return out


def kvmfleet_bytes() -> int:
    """Bytes still allocated by kvmfleet's own code (tracemalloc), whatever the test or the server hold."""
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, f"{PLUGINS}/*")])
    return sum(stat.size for stat in snap.statistics("filename"))


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_adversarial_server_loses_no_acceptable_line_and_reads_never_wait(api: str, tmp_path: Path) -> None:
    """The fault server cycles through every fault, one per request, for FAULT_SECONDS; then answers well. A
    backlog of batches with 1 to 200 bad lines goes first; the agent reads every READ_EVERY seconds throughout,
    with 0 to 12 VMs whose lines are bad among 24 good ones."""
    rng = random.Random(12)
    good_vms = [reading(1000 + i, f"vm{i}") for i in range(24)]
    bad_vms = [reading(2000 + i, f"vm{i}-{BAD_MARK}") for i in range(24)]
    cfg = parse_config(entries(("InfluxURL", "http://127.0.0.1:9"), ("Database", "kvm"),
                               ("SpoolPath", str(tmp_path / "spool" / "ship.spool")), ("BufferLines", 20_000),
                               ("BatchLines", 500), ("RetryMin", 0.02), ("RetryMax", 0.2)))
    assert cfg.ship is not None
    tracemalloc.start()
    with CountingFaultServer(FAULT_CYCLE, huge_bytes=2 << 20) as server:
        agent = Agent(cfg, writer(api, server.url, tmp_path, timeout=0.2))
        source = ListSource(good_vms)
        agent.start("hv1", source=source)
        assert agent.shipper is not None
        shipper, recorder = agent.shipper, Recorder(agent.shipper)
        shipper.submit(backlog([1, 10, 50, 120, 200]))
        durations, held = [], []
        start = time.monotonic()
        for n in range(int(FAULT_SECONDS / READ_EVERY)):
            source.readings = good_vms + rng.sample(bad_vms, rng.choice([0, 0, 0, 0, 1, 1, 2, 4, 8, 12]))
            t0 = time.perf_counter()
            agent.read()
            durations.append(time.perf_counter() - t0)
            st = shipper.stats()
            held.append((st["buffered"], kvmfleet_bytes() if n % 40 == 39 else 0))
            time.sleep(max(0.0, start + (n + 1) * READ_EVERY - time.monotonic()))
        faulty = shipper.stats()
        server.fault = "ok"
        assert shipper.wait_idle(60), shipper.stats()
        final = agent.stop()
    tracemalloc.stop()
    assert final is not None
    submitted = [b.decode() for b in recorder.lines]
    good = {t for t in submitted if BAD_MARK not in t}
    stored = set(server.stored)
    assert good <= stored and not (stored - good), (len(good - stored), len(stored - good))
    assert final["sent"] == len(good) and final["dropped_rejected"] == len(submitted) - len(good)
    assert final["dropped"] == final["lost_at_stop"] == final["spooled"] == 0 and final["splits"] > 10
    assert faulty["retries"] > 20 and faulty["journaled"] > 0, faulty
    assert not (tmp_path / "spool" / "ship.spool").exists()
    faults_seen = {fault for _, fault in server.requests}
    assert faults_seen >= set(FAULT_CYCLE), faults_seen
    assert {1, 10, 50, 120, 200} <= server.rejected_with, sorted(server.rejected_with)
    # memory: what kvmfleet holds follows the lines it holds (at most BufferLines + BatchLines), no more
    per_line = max(len(t) for t in submitted) + 120
    for buffered, allocated in held:
        assert buffered <= 20_000 + 2 * 500
        assert allocated <= buffered * per_line + (4 << 20), (buffered, allocated)
    # cadence: a read never waited for the server (timeout 0.2 s) or the disk
    durations.sort()
    assert durations[-1] < 0.15 and durations[len(durations) // 2] < 0.02, durations[-5:]
    assert time.monotonic() - start < FAULT_SECONDS + 60
