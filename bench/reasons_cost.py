#!/usr/bin/env python3
"""What counting exits by reason costs: the guest's exit throughput with each mechanism against none, and a read.

Guest-visible cost: one real guest (1 vCPU, ``halt`` forever: every ``hlt`` returns to the VMM, so each loop is
one ``kvm:kvm_userspace_exit`` hit) runs the whole time; its exit rate (``halt_exits`` from its stats fd, over
a WINDOW-second window, per second of CPU its VMM got: the tracepoint and what hangs on it run in the vCPU
thread, and a shared machine's other load then moves the figure less; per wall second too) is measured with
counting off, with the BPF mechanism (host-wide, and per VM), and with perf-count (kvm_stat's way: one filtered
counting event per reason and CPU), both tracepoints counted as the source counts them.
The modes alternate for ROUNDS rounds in a rotating order (the machine is shared: medians).

Per-hit cost: the guest's exit costs ~10 us here (PVM emulates it), which buries a few hundred ns in the noise
of a shared machine; so the CPU ns of the cheapest call that fires the tracepoint (KVM_RUN with
``immediate_exit`` set, in this process) is measured in each mode too, alternated the same way, and the guest
slowdown it implies printed next to the measured one.

Read cost: VMS guests (one VM per process, 1 vCPU, ``halt`` x 100 loops) are started with each mechanism
counting per VM; one ``read(pids of the VMS guests)`` is timed (median of REPEAT after the first, which opens
perf-count's per-thread events), and a host-wide read.

Collector cost: ``Collector.sample()`` over COLLECTOR_VMS guests of COLLECTOR_VCPUS vCPUs without reasons, with the
default source host-wide and per VM, the three in turn; CPU time of the sampling thread, medians.

Prints tables, then ``reasons_slowdown`` (throughput off / with the default mechanism, bpf host-wide),
``reasons_sample_ms`` (the CPU ms the default source, host-wide, adds to one ``Collector.sample()``),
``reasons_per_vm_sample_ms`` (the same per VM), ``collector_sample_ms`` (the sample without reasons),
and per-mechanism lines (``bpf_slowdown``, ``bpf_per_vm_slowdown``, ``perfcount_slowdown``, ``*_cost_ns_per_exit``
= 1/rate_with - 1/rate_off, ``*_hit_ns`` (ns added per tracepoint hit), ``bpf_program_ns_per_hit`` (the program
alone, timed by the kernel), ``*_read_ms``, ``*_fds``).
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import statistics
import sys
import time
from typing import Callable

from kvmfleet.collector import Collector, vm_sample
from kvmfleet.exitreasons import ExitReasonSource
from kvmfleet.exitreasons.bpf import BpfExitCounter, enable_run_stats, prog_run_stats
from kvmfleet.exitreasons.counter import ExitCounter
from kvmfleet.exitreasons.perfcount import PerfCountCounter
from kvmfleet.exitreasons.source import TRACEPOINTS, counted_reasons, host_isa, read_formats
from kvmfleet.guestvmm import kvmapi, launch
from kvmfleet.sources import StatsfdSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.support

from tests.support.guestfleet import launch_fleet

Factory = Callable[[bool], ExitCounter]  # per_process -> counter


def factories() -> dict[str, Factory]:
    formats = read_formats()
    specs = [formats[path.rsplit("/", 1)[1]].spec(field) for path, field in TRACEPOINTS]
    reasons = counted_reasons(formats, host_isa())
    return {
        "bpf": lambda per_process: BpfExitCounter(specs, per_process=per_process),
        "perf-count": lambda per_process: PerfCountCounter(reasons, per_process=per_process),
    }


def modes() -> dict[str, Callable[[], ExitCounter] | None]:
    """What is compared: nothing counting, bpf host-wide (the default), bpf per VM, perf-count host-wide."""
    made = factories()
    return {
        "off": None,
        "bpf": lambda: made["bpf"](False),
        "bpf per VM": lambda: made["bpf"](True),
        "perf-count": lambda: made["perf-count"](False),
    }


def rotated(names: list[str], r: int) -> list[str]:
    return names[r % len(names):] + names[: r % len(names)]


def hit_costs(rounds: int, calls: int) -> dict[str, list[float]]:
    """Per mode, ``rounds`` samples of the CPU ns of one ``KVM_RUN`` that returns at once (``immediate_exit``:
    the cheapest ioctl that fires ``kvm:kvm_userspace_exit``, reason 0), ``calls`` calls each, in this thread."""
    libc = ctypes.CDLL(None, use_errno=True)
    ioctl, run = libc.ioctl, kvmapi.KVM_RUN
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        vm = kvmapi.ioctl(kvm, kvmapi.KVM_CREATE_VM, step="KVM_CREATE_VM")
        try:
            vcpu = kvmapi.ioctl(vm, kvmapi.KVM_CREATE_VCPU, step="KVM_CREATE_VCPU")
            try:
                size = kvmapi.ioctl(kvm, kvmapi.KVM_GET_VCPU_MMAP_SIZE, step="KVM_GET_VCPU_MMAP_SIZE")
                with mmap.mmap(vcpu, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as kvm_run:
                    kvm_run[kvmapi.KvmRun.immediate_exit.offset] = 1
                    costs: dict[str, list[float]] = {mode: [] for mode in modes()}
                    made = modes()
                    for r in range(rounds):
                        for mode in rotated(list(made), r):
                            factory = made[mode]
                            counter = factory() if factory is not None else None
                            try:
                                start = time.thread_time_ns()
                                for _ in range(calls):
                                    ioctl(vcpu, run, 0)
                                costs[mode].append((time.thread_time_ns() - start) / calls)
                            finally:
                                if counter is not None:
                                    counter.close()
                    return costs
            finally:
                os.close(vcpu)
        finally:
            os.close(vm)
    finally:
        os.close(kvm)


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` (ns on a CPU, from schedstat): the VMM's vCPU thread runs the guest,
    KVM's exit handling, the tracepoint and its BPF program or perf events, and the VMM's own exit handling."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that just exited
    return total


def exit_rates(window: float, rounds: int, settle: float) -> tuple[dict[str, list[float]], dict[str, list[float]],
                                                                   dict[str, int]]:  # fmt: skip
    """Per mode, ``rounds`` samples each of one halt guest's exits per CPU second of its VMM and per wall second;
    and each mode's fds."""
    made = modes()
    rates: dict[str, list[float]] = {mode: [] for mode in made}
    wall_rates: dict[str, list[float]] = {mode: [] for mode in made}
    fds: dict[str, int] = {}
    with launch("reasons-bench", vcpus=1, workload="halt", loops=0) as guest:
        guest.wait_ready(60)
        with StatsfdSource(only_pids={guest.pid}) as source:

            def halts() -> int:
                return int(vm_sample(source.read()[0]).stats["halt_exits"])

            for r in range(rounds):
                for mode in rotated(list(made), r):
                    factory = made[mode]
                    counter = factory() if factory is not None else None
                    try:
                        time.sleep(settle)
                        start_n, start_cpu, start_t = halts(), cpu_ns(guest.pid), time.perf_counter()
                        time.sleep(window)
                        end_n, end_cpu, end_t = halts(), cpu_ns(guest.pid), time.perf_counter()
                        if counter is not None:
                            fds[mode] = counter.fds()
                            host, _ = counter.read()
                            hlt = host.get(("kvm_userspace_exit", 0, 5), 0)
                            if hlt < end_n - start_n:  # the counter must have seen at least the guest's halts
                                raise SystemExit(f"error: {mode} counted {hlt} halts, the guest made more")
                    finally:
                        if counter is not None:
                            counter.close()
                    rates[mode].append((end_n - start_n) / ((end_cpu - start_cpu) / 1e9))
                    wall_rates[mode].append((end_n - start_n) / (end_t - start_t))
    return rates, wall_rates, fds


def bpf_program_ns(window: float) -> tuple[float, int]:
    """(ns per run of the BPF program, runs) measured by the kernel (BPF_ENABLE_STATS) over ``window`` s while
    the halt guest runs: the program alone, without the tracepoint's own cost (a separate phase: the timing
    itself would slow the throughput rounds)."""
    with launch("reasons-bench-prog", vcpus=1, workload="halt", loops=0) as guest:
        guest.wait_ready(60)
        stats_fd = enable_run_stats()
        try:
            formats = read_formats()
            specs = [formats[path.rsplit("/", 1)[1]].spec(field) for path, field in TRACEPOINTS]
            with BpfExitCounter(specs, per_process=False) as counter:
                time.sleep(window)
                runs = ns = 0
                for prog_fd in counter.prog_fds:
                    prog_runs, prog_ns, _ = prog_run_stats(prog_fd)
                    runs, ns = runs + prog_runs, ns + prog_ns
        finally:
            os.close(stats_fd)
    return ns / max(runs, 1), runs


def read_costs(vms: int, repeat: int) -> dict[str, tuple[float, float, float, int]]:
    """Per mechanism: (first per-VM read s, median per-VM read s, median host-wide read s, fds) over ``vms``
    guests that each ran 100 halts on 1 vCPU, counted per VM from before they started."""
    costs = {}
    for mechanism, factory in factories().items():
        counter = factory(True)
        try:
            with launch_fleet(vms, vcpus=1, workload="halt", loops=100, name_prefix="reasons-read") as fleet:
                fleet.wait_ready(300)
                pids = fleet.pids
                start = time.perf_counter()
                _, per_pid = counter.read(pids)
                first = time.perf_counter() - start
                runs = []
                for _ in range(repeat):
                    start = time.perf_counter()
                    _, per_pid = counter.read(pids)
                    runs.append(time.perf_counter() - start)
                fds = counter.fds()
                missing = [pid for pid in pids if per_pid.get(pid, {}).get(("kvm_userspace_exit", 0, 5)) != 100]
                if mechanism == "bpf" and missing:  # perf-count counts from the first ask only
                    raise SystemExit(f"error: {mechanism} did not count 100 halts for pids {missing}")
        finally:
            counter.close()
        host_counter = factory(False)
        try:
            host_counter.read()
            host_runs = []
            for _ in range(repeat):
                start = time.perf_counter()
                host_counter.read()
                host_runs.append(time.perf_counter() - start)
        finally:
            host_counter.close()
        costs[mechanism] = (first, statistics.median(runs), statistics.median(host_runs), fds)
    return costs


def collector_costs(vms: int, vcpus: int, repeat: int) -> dict[str, float]:
    """CPU seconds of one ``Collector.sample()`` (median of ``repeat``) over ``vms`` guests of ``vcpus`` vCPUs, with no
    reasons source, with the default one host-wide and with it per VM; the three collectors sample in turn."""
    with launch_fleet(vms, vcpus=vcpus, workload="halt", loops=100, name_prefix="reasons-coll") as fleet:
        fleet.wait_ready(300)
        only = set(fleet.pids)
        collectors = {
            "off": Collector(StatsfdSource(only_pids=only)),
            "host": Collector(StatsfdSource(only_pids=only), reasons=ExitReasonSource(per_vm=False)),
            "per VM": Collector(StatsfdSource(only_pids=only), reasons=ExitReasonSource(per_vm=True)),
        }
        try:
            for name, collector in collectors.items():
                first = collector.sample()  # opens what the first sample opens
                if name != "off" and first.exit_reasons is None:
                    raise SystemExit(f"error: the exit reasons source does not count here ({name})")
            cpu: dict[str, list[float]] = {name: [] for name in collectors}
            for r in range(repeat):
                for name in rotated(list(collectors), r):
                    start = time.thread_time()
                    collectors[name].sample()
                    cpu[name].append(time.thread_time() - start)
        finally:
            for collector in collectors.values():
                collector.close()
    return {name: statistics.median(values) for name, values in cpu.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--window", type=float, default=0.5, help="seconds per throughput sample")
    parser.add_argument("--settle", type=float, default=0.2, help="seconds after a mode starts before measuring")
    parser.add_argument("--hit-rounds", type=int, default=30)
    parser.add_argument("--hit-calls", type=int, default=20000, help="KVM_RUN calls per per-hit sample")
    parser.add_argument("--vms", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--collector-vms", type=int, default=200, help="guests of the Collector.sample() cost")
    parser.add_argument("--collector-vcpus", type=int, default=4)
    args = parser.parse_args()

    rates, wall_rates, fds = exit_rates(args.window, args.rounds, args.settle)
    hits = hit_costs(args.hit_rounds, args.hit_calls)
    prog_ns, prog_runs = bpf_program_ns(args.window)
    costs = read_costs(args.vms, args.repeat)
    sample_cpu = collector_costs(args.collector_vms, args.collector_vcpus, args.repeat)

    # Paired by round: a mode against the "off" window measured next to it (the shared machine's load drifts
    # over seconds), then the median over rounds.
    slowdown = {mode: statistics.median(o / r for o, r in zip(rates["off"], values)) for mode, values in rates.items()}
    cost_ns = {mode: statistics.median((1 / r - 1 / o) * 1e9 for o, r in zip(rates["off"], values))
               for mode, values in rates.items()}  # fmt: skip
    off = statistics.median(rates["off"])
    print(f"one guest, 1 vCPU, halt forever; {args.rounds} rounds of {args.window:g} s per mode, exits per CPU "
          f"second of the VMM (median, min-max) and per wall second (median); slowdown and ns/exit: median over "
          f"rounds of each mode against the off window of the same round")
    print(f"{'mode':<12} {'exits/cpu-s':>11} {'min-max':>15} {'slowdown':>9} {'ns/exit':>8} {'exits/wall-s':>12} "
          f"{'fds':>5}")
    for mode, values in rates.items():
        spread = f"{min(values):.0f}-{max(values):.0f}"
        print(f"{mode:<12} {statistics.median(values):>11.0f} {spread:>15} {slowdown[mode]:>9.3f} "
              f"{cost_ns[mode]:>8.0f} {statistics.median(wall_rates[mode]):>12.0f} {fds.get(mode, 0):>5}")
    print(f"bpf program alone (kernel run statistics): {prog_ns:.0f} ns per run over {prog_runs} runs")
    hit_ns = {mode: statistics.median(v - o for o, v in zip(hits["off"], values)) for mode, values in hits.items()}
    print(f"\nper hit: CPU ns of one KVM_RUN returning at once (immediate_exit), {args.hit_rounds} rounds of "
          f"{args.hit_calls} calls per mode; added ns: median over rounds against the off sample of the same round")
    print(f"{'mode':<12} {'ns/call':>8} {'min-max':>13} {'added ns':>9} {'modelled guest slowdown':>24}")
    off_ns_per_exit = 1e9 / statistics.median(rates["off"])
    for mode, values in hits.items():
        spread = f"{min(values):.0f}-{max(values):.0f}"
        print(f"{mode:<12} {statistics.median(values):>8.0f} {spread:>13} {hit_ns[mode]:>9.0f} "
              f"{(off_ns_per_exit + hit_ns[mode]) / off_ns_per_exit:>24.4f}")
    print(f"\nread over {args.vms} guests (1 VM per process), median of {args.repeat} (first read apart)")
    print(f"{'mechanism':<12} {'first ms':>9} {'per VM ms':>10} {'host ms':>8} {'fds per VM':>11}")
    for mechanism, (first, per_vm, host, nfds) in costs.items():
        print(f"{mechanism:<12} {first * 1e3:>9.3f} {per_vm * 1e3:>10.3f} {host * 1e3:>8.3f} {nfds:>11}")

    with ExitReasonSource() as default:
        mechanism = default.mechanism_name
    print(f"\nCollector.sample() over {args.collector_vms} VMs x {args.collector_vcpus} vCPUs, CPU ms (median of "
          f"{args.repeat}), the default reasons source ({mechanism})")
    print(f"{'reasons':<8} {'cpu ms':>8} {'added ms':>9}")
    for name, seconds in sample_cpu.items():
        print(f"{name:<8} {seconds * 1e3:>8.3f} {(seconds - sample_cpu['off']) * 1e3:>9.3f}")

    print(f"reasons_slowdown={slowdown['bpf']:.3f}")
    print(f"reasons_sample_ms={(sample_cpu['host'] - sample_cpu['off']) * 1e3:.3f}")
    print(f"reasons_per_vm_sample_ms={(sample_cpu['per VM'] - sample_cpu['off']) * 1e3:.3f}")
    print(f"collector_sample_ms={sample_cpu['off'] * 1e3:.3f}")
    print(f"bpf_slowdown={slowdown['bpf']:.3f}")
    print(f"bpf_per_vm_slowdown={slowdown['bpf per VM']:.3f}")
    print(f"perfcount_slowdown={slowdown['perf-count']:.3f}")
    print(f"bpf_cost_ns_per_exit={cost_ns['bpf']:.0f}")
    print(f"bpf_per_vm_cost_ns_per_exit={cost_ns['bpf per VM']:.0f}")
    print(f"perfcount_cost_ns_per_exit={cost_ns['perf-count']:.0f}")
    print(f"bpf_program_ns_per_hit={prog_ns:.0f}")
    print(f"bpf_hit_ns={hit_ns['bpf']:.0f}")
    print(f"bpf_per_vm_hit_ns={hit_ns['bpf per VM']:.0f}")
    print(f"perfcount_hit_ns={hit_ns['perf-count']:.0f}")
    print(f"off_exits_per_cpu_s={off:.0f}")
    print(f"off_exits_per_wall_s={statistics.median(wall_rates['off']):.0f}")
    print(f"bpf_read_ms={costs['bpf'][1] * 1e3:.3f}")
    print(f"bpf_host_read_ms={costs['bpf'][2] * 1e3:.3f}")
    print(f"perfcount_read_ms={costs['perf-count'][1] * 1e3:.3f}")
    print(f"perfcount_first_read_ms={costs['perf-count'][0] * 1e3:.3f}")
    print(f"perfcount_host_read_ms={costs['perf-count'][2] * 1e3:.3f}")
    print(f"bpf_fds={fds['bpf']}")
    print(f"perfcount_fds={fds['perf-count']}")
    print(f"perfcount_per_vm_fds={costs['perf-count'][3]}  (host-wide + per-thread events of {args.vms} VMs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
