"""What the InfluxDB benchmarks share: writing a big synthetic fleet fast (lines made in a child process, posted
in batches over one keep-alive connection) and waiting until influxd has settled after it."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Sequence

from tests.support import synthetic

BATCH = 10000


def _produce(queue: mp.Queue, hosts: Sequence[synthetic.HostSpec], end: int, duration: int, step: int) -> None:
    buf: list[str] = []
    for line in synthetic.fleet_lines(hosts, end, duration, step):
        buf.append(line)
        if len(buf) >= BATCH:
            queue.put(buf)
            buf = []
    queue.put(buf)
    queue.put(None)


def write_fleet(url: str, db: str, hosts: Sequence[synthetic.HostSpec], duration: int, step: int,
                end: int | None = None) -> tuple[int, float]:
    """``hosts`` over ``duration`` seconds ending at ``end`` (default now); (points written, seconds taken)."""
    end = (int(time.time()) if end is None else end) // step * step
    ctx = mp.get_context("fork")
    queue: mp.Queue = ctx.Queue(maxsize=8)
    proc = ctx.Process(target=_produce, args=(queue, hosts, end, duration, step), daemon=True)
    t0 = time.monotonic()
    proc.start()
    writer = synthetic.LineWriter(url, db)
    try:
        while True:
            batch = queue.get()
            if batch is None:
                break
            writer.post(batch)
    finally:
        writer.close()
        proc.join(30)
    return writer.points, time.monotonic() - t0


def settle(pid: int, quiet: float = 0.1, every: float = 3.0, limit: float = 300.0) -> float:
    """Wait until influxd uses less than ``quiet`` of a CPU over ``every`` seconds (its compactions of the fresh
    write are done); returns the seconds waited."""
    tck = os.sysconf("SC_CLK_TCK")

    def cpu() -> float:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tck

    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        c0 = cpu()
        time.sleep(every)
        if (cpu() - c0) / every < quiet:
            break
    return time.monotonic() - t0
