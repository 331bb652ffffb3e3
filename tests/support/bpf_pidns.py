"""Run as PID 1 of a PID namespace of its own (``unshare --pid --fork --mount-proc``), the way a collector runs in a
container, counting exits by reason per process with the BPF counter::

    python -m tests.support.bpf_pidns OUTSIDE_PID LOOPS

The inside guest (halt, 2 vCPUs, LOOPS loops) is given the outside guest's pid number in this namespace
(``ns_last_pid``), so a counter keyed by host pids would put the outside guest's exits under the inside guest's
pid. Prints one JSON object: the inside guest's pid, the namespace the counter numbered processes in, its counts
for the inside pid, and the tgids of every key in its map.
"""

from __future__ import annotations

import json
import sys

from kvmfleet.exitreasons import bpf, tracefmt
from kvmfleet.guestvmm import launch


def main(argv: list[str]) -> int:
    outside_pid, loops = (int(arg) for arg in argv)
    spec = tracefmt.read_format("kvm/kvm_userspace_exit").spec("reason")
    with bpf.BpfExitCounter([spec], per_process=True) as counter:
        with open("/proc/sys/kernel/ns_last_pid", "w") as handle:  # the next pid here is the outside guest's number
            handle.write(str(outside_pid - 1))
        with launch("t-bpf-inside", vcpus=2, workload="halt", loops=loops) as guest:
            guest.wait_ready(30)
            host, per_pid = counter.read([guest.pid])
            tgids = sorted({bpf.KEY.unpack(raw)[0] for raw, _ in counter._entries()})
        out = {"inside_pid": guest.pid, "pid_ns": counter.pid_ns, "inside": sorted(per_pid[guest.pid].items()),
               "host": sorted(host.items()), "tgids": tgids}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
