#!/usr/bin/env python3
"""What the collectd plugin costs per sample, against the core library's own sample cost, and how fast it encodes.

Starts VMS real guests with VCPUS vCPUs each (kvmfleet-guestvmm, stats fds held like QEMU >= 8.1), then, in the
same run and over the same VMs:

* library: the CPU time of one ``Collector.sample()`` with the plugin's default options (source ``auto``, exit
  reasons host-wide with bpf) in this process: the mean of SAMPLES samples INTERVAL apart, as collectd takes them
  (so garbage collections count, and caches are as cold as the plugin finds them), the figure the ratios divide by;
  the median of REPEAT samples back to back is shown too;
* collectd: Debian's collectd (``collectd -f``, ``Interval INTERVAL``) loading the plugin, shipping v1 to a null
  HTTP server in this process (answers 204, keeps the ``kvmfleet_agent`` lines) and, for the dispatched values,
  collectd's ``network`` writer (UDP to a port nobody reads). Its process CPU time (utime + stime of all its
  threads, /proc/<pid>/stat) over SAMPLES samples, minus an idle baseline (the same collectd without the plugin,
  same wall time), divided by SAMPLES: the plugin's cost per sample inside collectd, including the shipper thread
  and the writer's share of the dispatched values. Measured with the default options (per-VM shipped; dispatched:
  what the plugin dispatches by default with InfluxURL), then with per-vCPU on and every VM dispatched
  (``DispatchPerVM true`` where the plugin has it), then per-vCPU on with ``Dispatch false``. The plugin's own
  ``read_cpu_s`` (read thread CPU up to the agent point) is shown too;
* encoding: lines per second of the plugin's line-protocol path (:class:`kvmfleet.points.PointBuilder`) against
  influxdb-client's ``Point`` building the same lines (checked equal), over one sample of the fleet.

Prints a table; the last lines are ``plugin_overhead_ratio_no_dispatch=``,
``plugin_overhead_ratio_every_vm_dispatched=``, ``plugin_overhead_ratio=`` (plugin CPU per sample in collectd with
the default options / library sample CPU) and ``encode_speedup=`` (Point time / PointBuilder time).
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kvmfleet.collectd_config import render
from kvmfleet.collector import Collector
from kvmfleet.exitreasons import ExitReasonSource
from kvmfleet.options import OPTION_BY_KEY, AgentConfig
from kvmfleet.points import PointBuilder
from kvmfleet.sources import make_source

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.support
from tests.support.guestfleet import launch_fleet
from tests.support.refpoints import client_lines

CLK_TCK = os.sysconf("SC_CLK_TCK")


class NullInflux:
    """An HTTP server that answers every write with 204 and keeps the kvmfleet_agent lines it was sent."""

    def __init__(self) -> None:
        self.agent_lines: list[str] = []
        self.lines = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                text = body.decode()
                lines = text.split("\n")
                sink.lines += len(lines)
                sink.agent_lines.extend(t for t in lines if t.startswith("kvmfleet_agent,"))
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def agent_field(self, name: str) -> list[float]:
        out = []
        for text in self.agent_lines:
            m = re.search(rf"[ ,]{name}=([0-9.e+-]+)i?[, ]", text)
            if m:
                out.append(float(m.group(1)))
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def collectd_conf(workdir: str, interval: float, fragment: str) -> str:
    path = os.path.join(workdir, "collectd.conf")
    with open(path, "w") as f:
        f.write(f"""Hostname "bench-hv"
FQDNLookup false
Interval {interval:g}
AutoLoadPlugin false
BaseDir "{workdir}"
PIDFile "{workdir}/collectd.pid"
LoadPlugin logfile
<Plugin logfile>
  LogLevel info
  File "{workdir}/collectd.log"
  PrintSeverity true
</Plugin>
LoadPlugin network
<Plugin network>
  Server "127.0.0.1" "9"
</Plugin>
{fragment}""")
    return path


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"error: timed out waiting for {what}")
        time.sleep(0.05)


def run_collectd(workdir: str, interval: float, fragment: str, samples: int, sink: NullInflux | None,
                 wall: float | None = None, settle: float = 65.0) -> dict[str, float]:
    """Run collectd; measure its CPU over ``samples`` samples (plugin) or over ``wall`` seconds (baseline)."""
    os.makedirs(workdir, exist_ok=True)
    conf = collectd_conf(workdir, interval, fragment)
    exe = shutil.which("collectd") or "/usr/sbin/collectd"
    proc = subprocess.Popen([exe, "-f", "-C", conf], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    launched = time.monotonic()
    try:
        if sink is None:
            time.sleep(2 * interval)  # warm-up like the plugin runs get
            c0, t0 = proc_cpu(proc.pid), time.monotonic()
            time.sleep(wall or samples * interval)
            return {"cpu": proc_cpu(proc.pid) - c0, "wall": time.monotonic() - t0}
        start = len(sink.agent_lines)
        wait_for(lambda: len(sink.agent_lines) >= start + 2, 300, "the first samples")
        # warm-up: the statsfd source rescans the fds of processes younger than 60 s every sample, collectd's own
        # (it holds the borrowed fds) included; measure the steady state after that
        time.sleep(max(0.0, settle - (time.monotonic() - launched)))
        first = len(sink.agent_lines)
        c0, t0 = proc_cpu(proc.pid), time.monotonic()
        wait_for(lambda: len(sink.agent_lines) >= first + samples, samples * interval * 4 + 60, "the samples")
        c1, t1 = proc_cpu(proc.pid), time.monotonic()
        n = len(sink.agent_lines) - first
        read_cpu = statistics.median(sink.agent_field("read_cpu_s")[first - start:])
        sample_s = statistics.median(sink.agent_field("sample_duration_s")[first - start:])
        points = sink.agent_field("points")[-1]
        dispatched = sink.agent_field("dispatched")[-1]
        return {"cpu": c1 - c0, "wall": t1 - t0, "n": n, "read_cpu": read_cpu, "sample_s": sample_s,
                "points": points, "dispatched": dispatched}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def spaced_cpu(func: Callable[[], object], samples: int, interval: float) -> float:
    """Mean CPU seconds (this thread) of ``samples`` calls ``interval`` seconds apart, after one warm-up: what the
    plugin's figure is too (its process CPU over its samples, divided by their number, collectd's interval apart),
    garbage collections and caches cooled by the wait included."""
    func()
    total = 0.0
    for _ in range(samples):
        time.sleep(interval)
        c0 = time.thread_time()
        func()
        total += time.thread_time() - c0
    return total / samples


def cpu_timed(func: Callable[[], object], repeat: int) -> float:
    """Median CPU seconds (this thread) of ``repeat`` calls after one warm-up."""
    func()
    runs = []
    for _ in range(repeat):
        c0 = time.thread_time()
        func()
        runs.append(time.thread_time() - c0)
    return statistics.median(runs)




def canon(text: str) -> tuple[str, frozenset[str], str]:
    head, fields, ts = re.split(r"(?<!\\) ", text)
    return head, frozenset(re.split(r"(?<!\\),", fields)), ts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vms", type=int, default=200)
    parser.add_argument("--vcpus", type=int, default=4)
    parser.add_argument("--samples", type=int, default=15, help="samples measured per collectd run")
    parser.add_argument("--interval", type=float, default=2.0, help="collectd Interval, seconds")
    parser.add_argument("--repeat", type=int, default=20, help="library samples / encodings timed")
    parser.add_argument("--settle", type=float, default=65.0,
                        help="measure once the VMMs and collectd are this old (seconds): the statsfd source rescans "
                             "the fds of processes younger than 60 s every sample, older ones every 30 s")
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.vms * (args.vcpus + 4) + 512  # the fleet's pipes here, the borrowed fds in collectd (inherits)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))

    work = tempfile.mkdtemp(prefix="kvmfleet-shipbench-")
    sink = NullInflux()
    started = time.perf_counter()
    try:
        with launch_fleet(args.vms, vcpus=args.vcpus, workload="halt", loops=100, name_prefix="shipbench") as fleet:
            fleet.wait_ready(600)
            start_s = time.perf_counter() - started
            pids = set(fleet.pids)
            time.sleep(max(0.0, args.settle - (time.perf_counter() - started)))

            # -- library, in this process, with the plugin's defaults: source auto, exit reasons host-wide with bpf
            defaults = AgentConfig()
            collector = Collector(make_source(defaults.source),
                                  reasons=ExitReasonSource(per_vm=defaults.exit_reasons == "vm",
                                                           mechanism=defaults.exit_reasons_mechanism)
                                  if defaults.exit_reasons != "off" else None)
            first = collector.sample()
            ours = [vm for vm in first.vms if vm.identity.key.pid in pids]
            if len(ours) != args.vms or any(len(vm.vcpus) != args.vcpus for vm in ours):
                print(f"error: saw {len(ours)} of {args.vms} VMs with all vCPUs", file=sys.stderr)
                return 1

            def full_sample() -> None:
                for vm in collector.sample().vms:
                    vm.stats.get("exits")  # force what a consumer forces: decode and vCPU sums

            lib_hot = cpu_timed(full_sample, args.repeat)
            lib_cpu = spaced_cpu(full_sample, args.samples, args.interval)

            # -- encoding: PointBuilder vs influxdb-client Point, same sample, same lines
            sample = collector.sample()
            builder = PointBuilder(AgentConfig(per_vcpu=True), "bench-hv")
            ours_lines = builder.build(sample).lines
            # a VM no source can read (another user's, on a shared machine) has no fields: PointBuilder leaves its
            # line out, Point writes one without fields, which no server takes
            theirs = [text for text in client_lines(sample, "bench-hv") if len(re.split(r"(?<!\\) ", text)) == 3]
            if sorted(map(canon, ours_lines)) != sorted(map(canon, theirs)):
                print("error: PointBuilder and Point lines differ", file=sys.stderr)
                return 1
            enc_ours = cpu_timed(lambda: builder.build(sample), max(5, args.repeat // 2))
            enc_point = cpu_timed(lambda: client_lines(sample, "bench-hv"), max(3, args.repeat // 5))
            nlines = len(ours_lines)
            collector.close()

            # -- inside collectd
            shipping = [("InfluxURL", [sink.url]), ("Database", ["kvm"]),
                        ("SpoolPath", [os.path.join(work, "ship.spool")]), ("BufferLines", [1_000_000])]
            defaults = run_collectd(os.path.join(work, "defaults"), args.interval, render(shipping), args.samples,
                                    sink, settle=args.settle)
            common = [("PerVCPU", [True]), *shipping]
            every_vm = [("DispatchPerVM", [True])] if "dispatchpervm" in OPTION_BY_KEY else []  # older: always
            on = run_collectd(os.path.join(work, "on"), args.interval, render([*common, *every_vm]), args.samples,
                              sink, settle=args.settle)
            off = run_collectd(os.path.join(work, "off"), args.interval,
                               render([*common, ("Dispatch", [False])]), args.samples, sink, settle=args.settle)
            idle = run_collectd(os.path.join(work, "idle"), args.interval, "", args.samples, None,
                                wall=on["wall"])
    finally:
        sink.close()
        shutil.rmtree(work, ignore_errors=True)

    idle_rate = idle["cpu"] / idle["wall"]
    per_on = (on["cpu"] - idle_rate * on["wall"]) / on["n"]
    per_defaults = (defaults["cpu"] - idle_rate * defaults["wall"]) / defaults["n"]
    per_off = (off["cpu"] - idle_rate * off["wall"]) / off["n"]
    ms = 1e3
    print(f"{args.vms} VMs x {args.vcpus} vCPUs; fleet started in {start_s:.0f} s; "
          f"collectd Interval {args.interval:g} s, {args.samples} samples a run; {nlines} lines a sample")
    print(f"{'what':<58} {'CPU ms/sample':>14}")
    rows = [
        ("library: Collector.sample(), mean of samples Interval apart", lib_cpu * ms),
        ("  the same back to back (median; for information)", lib_hot * ms),
        ("collectd + plugin, default options: process CPU - idle", per_defaults * ms),
        (f"  of which the read thread (read_cpu_s; {defaults['dispatched']:.0f} values dispatched)",
         defaults["read_cpu"] * ms),
        ("collectd + plugin, per-vCPU on, every VM dispatched: CPU - idle", per_on * ms),
        (f"  of which the read thread (read_cpu_s; {on['dispatched']:.0f} values dispatched)", on["read_cpu"] * ms),
        ("  Collector.sample() inside collectd (sample_duration_s, wall)", on["sample_s"] * ms),
        ("collectd + plugin, per-vCPU on, Dispatch false: CPU - idle", per_off * ms),
        ("  of which the read thread (read_cpu_s)", off["read_cpu"] * ms),
        ("collectd without the plugin (idle baseline), per interval", idle_rate * args.interval * ms),
        (f"encoding {nlines} lines: kvmfleet PointBuilder", enc_ours * ms),
        (f"encoding {nlines} lines: influxdb-client Point", enc_point * ms),
    ]
    for name, value in rows:
        print(f"{name:<58} {value:>14.1f}")
    print(f"encode throughput: PointBuilder {nlines / enc_ours:,.0f} lines/s, Point {nlines / enc_point:,.0f} lines/s")
    print(f"plugin_overhead_ratio_no_dispatch={per_off / lib_cpu:.2f}")
    print(f"plugin_overhead_ratio_every_vm_dispatched={per_on / lib_cpu:.2f}")
    print(f"plugin_overhead_ratio={per_defaults / lib_cpu:.2f}")
    print(f"encode_speedup={enc_point / enc_ours:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
