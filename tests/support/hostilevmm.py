"""A hostile VMM for tests: a real KVM guest whose owner flips one of its fds under the collector.

Run by :func:`start_hostile` as ``qemu-system-x86_64 -S hostilevmm.py -name guest=NAME ...`` (argv[0] names
QEMU, so collectors take its ``-name`` as the VM's name). It runs a real VM (the guest VMM's ``halt``
workload: exact counts), holds its stats fds like any VMM, then dup2()s onto fd ``--flip-fd``, in turn and
many times a second: its real VM stats fd, a memfd with overlapping descriptors, its real vCPU 0 stats fd, a
memfd with u64-max values, a FIFO and a regular file laid out like a stats fd with forged values. It prints
one JSON line on ``--ready-fd`` once the guest ran and fd ``--flip-fd`` holds the real VM stats fd, flips
for ``--seconds``, closes fd ``--flip-fd``, and a second later closes its VM and exits 0 (or at SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from tests.unit.statsbytes import stats_file

from kvmfleet.guestvmm.guests import WORKLOADS
from kvmfleet.guestvmm.launcher import child_env
from kvmfleet.guestvmm.vm import GuestVM, install_kick_handler

FORGED = 987654321987  # the forged file's counters: plausible numbers, but not this VM's
U64_MAX = (1 << 64) - 1
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CUMUL = 0
_COUNTERS = [("halt_exits", _CUMUL, 0, 1, 0), ("exits", _CUMUL, 0, 1, 0), ("mmio_exits", _CUMUL, 0, 1, 0)]


def _memfd(name: str, raw: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, raw)
    return fd


def crafted_fds(workdir: str, stat_id: str) -> dict[str, int]:
    """The files a hostile VMM passes off as its stats fd, by what they are."""
    regular = os.path.join(workdir, "kvm-vm-stats")
    with open(regular, "wb") as handle:
        handle.write(stats_file(_COUNTERS, [FORGED] * 3, stat_id=stat_id))
    fifo = os.path.join(workdir, "fifo")
    os.mkfifo(fifo)
    return {
        "overlap": _memfd("kvm-vm-stats", stats_file(_COUNTERS, [FORGED] * 3, stat_id=stat_id, offsets=[0, 0, 8])),
        "u64max": _memfd("kvm-vm-stats", stats_file(_COUNTERS, [U64_MAX] * 3, stat_id=stat_id)),
        "fifo": os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC),
        "regular": os.open(regular, os.O_RDONLY | os.O_CLOEXEC),
    }


def flip(flip_fd: int, cycle: list[int], seconds: float, pause_s: float, stop: list[int]) -> int:
    """dup2 each fd of ``cycle`` onto ``flip_fd`` in turn until ``seconds`` pass; how many flips."""
    flips, deadline = 0, time.monotonic() + seconds
    while not stop and time.monotonic() < deadline:
        for source in cycle:
            os.dup2(source, flip_fd, inheritable=False)
            flips += 1
            time.sleep(pause_s)
    return flips


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-name", required=True)
    parser.add_argument("--vcpus", type=int, default=2)
    parser.add_argument("--workload", choices=WORKLOADS, default="halt")
    parser.add_argument("--loops", type=int, default=100)
    parser.add_argument("--flip-fd", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--pause", type=float, default=0.0001, help="seconds between two flips")
    parser.add_argument("--ready-fd", type=int, required=True)
    args = parser.parse_args()
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    install_kick_handler()
    vm = GuestVM(vcpus=args.vcpus, workload=args.workload, loops=args.loops)
    vm.setup()
    vm.start()
    while not vm.all_done and vm.error is None:
        time.sleep(0.01)
    if vm.error is not None:
        print(f"hostilevmm: {vm.error}", file=sys.stderr)
        return 2
    real = vm.stats_fds()
    with tempfile.TemporaryDirectory(prefix="kvmfleet-hostile-") as workdir:
        fake = crafted_fds(workdir, f"kvm-{os.getpid()}")
        cycle = [real["vm"], fake["overlap"], real["vcpu0"], fake["u64max"], fake["fifo"], fake["regular"]]
        os.dup2(real["vm"], args.flip_fd, inheritable=False)
        ready = {"pid": os.getpid(), "flip_fd": args.flip_fd, "stats_fds": real}
        os.write(args.ready_fd, (json.dumps(ready) + "\n").encode())
        os.close(args.ready_fd)
        flips = flip(args.flip_fd, cycle, args.seconds, args.pause, stop)
        os.close(args.flip_fd)  # done: a sampler watching fd N stops before the VM goes away
    print(f"hostilevmm: {flips} flips", file=sys.stderr)
    time.sleep(1.0)
    vm.stop()
    vm.close()
    return 0


def start_hostile(name: str, *, vcpus: int, loops: int, seconds: float, flip_fd: int = 200,
                  workload: str = "halt") -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    """Start the hostile VMM; returns the process and its ready line once its guest ran."""
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    env = child_env()
    env["PYTHONPATH"] = ROOT + os.pathsep + env["PYTHONPATH"]
    argv = ["qemu-system-x86_64", "-S", os.path.abspath(__file__), "-name", f"guest={name}", "--vcpus", str(vcpus),
            "--workload", workload, "--loops", str(loops), "--flip-fd", str(flip_fd), "--seconds", str(seconds),
            "--ready-fd", str(wfd)]
    try:
        process = subprocess.Popen(argv, executable=sys.executable, pass_fds=(wfd,), env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    finally:
        os.close(wfd)
    with os.fdopen(rfd, "rb") as ready:
        line = ready.readline()
    if not line:
        process.kill()
        _, err = process.communicate()
        raise RuntimeError(f"hostile VMM did not start: {err.decode(errors='replace')}")
    return process, json.loads(line)


if __name__ == "__main__":
    sys.exit(main())
