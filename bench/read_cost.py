#!/usr/bin/env python3
"""What one full sample costs, against the floor of the syscalls it cannot avoid.

Starts VMS real guests with VCPUS vCPUs each (kvmfleet-guestvmm, stats fds held like QEMU >= 8.1),
then measures, in the same run and over the same VMs:

* statsfd read: one full sample through the statsfd source (pidfd liveness poll of every VMM, /proc
  discovery, one pread per borrowed fd, a reading per VM), once the guests are SETTLE seconds old (the steady
  state: processes younger than a minute have their fds looked at every sample);
* floor: a bare ``os.pread`` of the data block of every fd the source borrowed, nothing else;
* debugfs-style: the debugfs source (open-read-close per file) over a tmpfs tree of the same shape
  (one directory per VM, one file per stat, real values), since lockdown keeps the real one unreadable;
* collector sample: the statsfd read plus what every consumer gets on top (values decoded, each VM's
  vCPUs summed, monotonic host totals): ``Collector.sample()`` with ``stats`` touched for every VM.

The floor, the statsfd read and the collector sample are timed in rounds (one of each per round) and their medians
compared (each call then meets caches as a sample an interval after the last does); back to back, as measured
before, too (``read_cost_ratio_hot``, for comparison). Prints a table, then ``read_cost_ratio`` (statsfd read /
floor, target <= 3), ``debugfs_style_ratio`` (debugfs-style / statsfd read) and ``sample_cost_ratio``
(collector sample / floor).

``--libvirt N`` (opt-in: needs libvirtd, QEMU and ``scripts/install-deps``; about a second per domain to
start) then starts N real QEMU domains under libvirtd (64 MiB, 2 vCPUs, no disk, SeaBIOS) after the
guests above are gone, and times one libvirt sample (``getAllDomainStats`` with the VM and vCPU groups,
parsed into readings): ``libvirt_sample_ms``, per domain, and ``libvirt_per_vm_ratio`` against the statsfd
read per VM of the same run. If fewer than N domains start, it measures those and says so.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable

from kvmfleet.collector import Collector
from kvmfleet.model import StatType
from kvmfleet.sources import DebugfsSource, LibvirtSource, StatsfdSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.support

from tests.support.guestfleet import launch_fleet


def timed(func: Callable[[], object], repeat: int) -> float:
    """Median wall seconds of ``repeat`` calls (after one warm-up)."""
    func()
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def interleaved(funcs: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median wall seconds of each of ``funcs`` over ``repeat`` rounds, each round calling every one once (after
    one warm-up round): measured side by side, so that a change of the machine's speed during the run (a shared
    host's neighbours, frequency) weighs on all of them alike."""
    for func in funcs.values():
        func()
    runs: dict[str, list[float]] = {name: [] for name in funcs}
    for _ in range(repeat):
        for name, func in funcs.items():
            start = time.perf_counter()
            func()
            runs[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in runs.items()}


def debugfs_tree(root: str, source: StatsfdSource, sample_vms: list) -> None:  # type: ignore[type-arg]
    """A debugfs-shaped tree: ``<pid>-<vmfd>/<stat>`` with each VM's values (vCPU stats summed)."""
    for vm in sample_vms:
        key = vm.identity.key
        vm_dir = os.path.join(root, f"{key.pid}-{key.vm_fd}")
        os.makedirs(vm_dir)
        for name, value in vm.stats.items():
            if isinstance(value, tuple):
                continue  # debugfs shows histograms as their first bucket; the source skips them
            path = os.path.join(vm_dir, name)
            with open(path, "w") as handle:
                handle.write(f"{value}\n")
            desc = vm.descs.get(name)
            os.chmod(path, 0o444 if desc is not None and desc.type is StatType.INSTANT else 0o644)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vms", type=int, default=200)
    parser.add_argument("--vcpus", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--settle", type=float, default=65.0,
                        help="measure once the VMMs are this old (seconds): the statsfd source looks at the fds of "
                             "processes younger than 60 s at every sample (a VMM makes its VM just after it starts), "
                             "older ones every 30 s; a host's VMs are mostly older, so the steady state is measured")
    parser.add_argument("--libvirt", type=int, default=0, metavar="N",
                        help="also time the libvirt source over N running domains (default 0: skipped)")
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.vms * (args.vcpus + 4) + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))

    started = time.perf_counter()
    with launch_fleet(args.vms, vcpus=args.vcpus, workload="halt", loops=100, name_prefix="bench") as fleet:
        fleet.wait_ready(300)
        start_s = time.perf_counter() - started
        time.sleep(max(0.0, args.settle - start_s))
        source = StatsfdSource()
        collector = Collector(source)
        first = collector.sample()
        ours = [vm for vm in first.vms if vm.identity.key.pid in set(fleet.pids)]
        if len(ours) != args.vms or any(len(vm.vcpus) != args.vcpus for vm in ours):
            print(f"error: saw {len(ours)} of {args.vms} VMs with all vCPUs", file=sys.stderr)
            return 1
        fds = [(held.fd, held.layout.data_size, held.layout.data_offset)
               for vmm in source._vmms.values() for held in vmm.borrowed.values()]

        def floor() -> None:
            for fd, size, offset in fds:
                os.pread(fd, size, offset)

        def full_sample() -> None:
            for vm in collector.sample().vms:
                vm.stats.get("exits")  # force what a consumer forces: decode and vCPU sums

        medians = interleaved({"floor": floor, "statsfd": source.read, "sample": full_sample}, args.repeat)
        floor_s, statsfd_s, sample_s = medians["floor"], medians["statsfd"], medians["sample"]
        # the same back to back (the earlier method): each call finds the kernel's and the process's caches as the
        # previous call of the same kind left them, which favours the floor (the same 1 KiB buffer a thousand times)
        hot_floor_s, hot_statsfd_s = timed(floor, args.repeat), timed(source.read, args.repeat)
        tree = tempfile.mkdtemp(prefix="kvmfleet-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        try:
            debugfs_tree(tree, source, ours)
            debugfs_s = timed(DebugfsSource(root=tree).read, max(5, args.repeat // 3))
            files = sum(len(os.listdir(os.path.join(tree, d))) for d in os.listdir(tree))
        finally:
            shutil.rmtree(tree)
        collector.close()

    per_fd = 1e6 / len(fds)
    print(f"{args.vms} VMs x {args.vcpus} vCPUs ({len(fds)} stats fds, {files} debugfs-style files); "
          f"fleet started in {start_s:.1f} s; median of {args.repeat} samples")
    print(f"{'path':<32} {'ms/sample':>10} {'us/fd':>8} {'x floor':>8}")
    for name, seconds in (("pread floor", floor_s), ("statsfd read", statsfd_s),
                          ("debugfs-style read (tmpfs)", debugfs_s), ("collector sample (statsfd)", sample_s)):
        print(f"{name:<32} {seconds * 1e3:>10.2f} {seconds * per_fd:>8.2f} {seconds / floor_s:>8.2f}")
    print(f"back to back (hot caches): pread floor {hot_floor_s * 1e3:.2f} ms, "
          f"statsfd read {hot_statsfd_s * 1e3:.2f} ms")
    print(f"read_cost_ratio_hot={hot_statsfd_s / hot_floor_s:.2f}")
    print(f"read_cost_ratio={statsfd_s / floor_s:.2f}")
    print(f"debugfs_style_ratio={debugfs_s / statsfd_s:.2f}")
    print(f"sample_cost_ratio={sample_s / floor_s:.2f}")
    if args.libvirt > 0:
        return libvirt_bench(args.libvirt, args.repeat, statsfd_s / args.vms)
    return 0


def libvirt_bench(wanted: int, repeat: int, statsfd_per_vm_s: float) -> int:
    from tests.support.libvirtd import Libvirtd

    started = time.perf_counter()
    with Libvirtd() as libvirtd:
        for i in range(wanted):
            try:
                libvirtd.domain(f"kfbench{os.getpid()}-{i:03d}", vcpus=2)
            except RuntimeError as err:
                print(f"libvirt: domain {i + 1} of {wanted} did not start ({err}); measuring {i}", file=sys.stderr)
                break
        count = len(libvirtd.domains)
        start_s = time.perf_counter() - started
        with LibvirtSource(only_pids={dom.pid for dom in libvirtd.domains}) as split, LibvirtSource() as whole:
            if len(whole.read()) < count:
                print(f"error: libvirt read fewer than {count} domains: {whole.usability().reason}", file=sys.stderr)
                return 1
            whole_s = timed(whole.read, max(5, repeat // 3))
            split_s = timed(split.read, max(5, repeat // 3))
    if count == 0:
        print("libvirt: no domain started", file=sys.stderr)
        return 1
    note = "" if count == wanted else f" (only {count} of {wanted} started)"
    print(f"libvirt: {count} domains x 2 vCPUs{note}, started in {start_s:.1f} s; median of {max(5, repeat // 3)}")
    print(f"libvirt_sample_ms={whole_s * 1e3:.2f}")
    print(f"libvirt_ms_per_domain={whole_s * 1e3 / count:.3f}")
    print(f"libvirt_listed_sample_ms={split_s * 1e3:.2f}  (listAllDomains + domainListGetStats, as with only_pids)")
    print(f"libvirt_per_vm_ratio={whole_s / count / statsfd_per_vm_s:.1f}  (libvirt ms per domain / statsfd ms "
          f"per VM; the statsfd VMs have --vcpus vCPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
