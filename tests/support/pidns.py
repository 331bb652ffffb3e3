"""Run as PID 1 of a PID namespace of its own (``unshare --pid --fork --mount-proc``), the way a collector runs in a
container::

    python -m tests.support.pidns OUTSIDE_PID OUTSIDE_VM_FD LOOPS

OUTSIDE_PID is the host pid of a guest running outside, whose VM debugfs lists as ``OUTSIDE_PID-OUTSIDE_VM_FD``.
The inside guest is given that very pid number in this namespace (``ns_last_pid``), so a debugfs source that
matched host pids against this /proc would name the outside VM after the inside guest. Prints one JSON object:
the inside guest's pid, ``kvmfleet stat --json`` and ``kvmfleet facts --json`` run here, and what the debugfs and
auto sources give when asked directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from kvmfleet.guestvmm import launch
from kvmfleet.sources import AutoSource, DebugfsSource
from kvmfleet.sources.debugfs import DEFAULT_ROOT, VM_DIR

VCPUS = 2


def _cli(*args: str) -> object:
    run = subprocess.run([sys.executable, "-m", "kvmfleet.cli", *args], capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        raise SystemExit(f"kvmfleet {' '.join(args)} exited {run.returncode}: {run.stderr}")
    return json.loads(run.stdout)


def _sources_here(outside_pid: int, outside_vm_fd: int) -> dict[str, object]:
    with DebugfsSource() as debugfs:
        read = debugfs.read()
        found = {"debugfs_read": len(read), "debugfs_listed": debugfs.listed_vms(),
                 "debugfs_identity_of_outside": repr(debugfs.identity(outside_pid, outside_vm_fd))}
    with AutoSource() as auto:
        found["auto"] = [[r.identity.key.pid, r.identity.key.vm_fd, r.identity.name, r.source] for r in auto.read()]
    return found


def main(argv: list[str]) -> int:
    outside_pid, outside_vm_fd, loops = (int(arg) for arg in argv)
    with open("/proc/sys/kernel/ns_last_pid", "w") as handle:  # the next pid here is the outside guest's number
        handle.write(str(outside_pid - 1))
    with launch("t-inside", vcpus=VCPUS, workload="halt", loops=loops) as guest:
        guest.wait_ready(30)
        try:
            dirs = sorted(name for name in os.listdir(DEFAULT_ROOT) if VM_DIR.match(name))
        except OSError:
            dirs = []
        out = {"inside_pid": guest.pid, "ns_inode": os.stat("/proc/self/ns/pid").st_ino, "debugfs_dirs": dirs,
               "stat": _cli("stat", "--json", "-n", "1", "--vm", "--vcpu", "-f", "^halt_exits$"),
               "facts": _cli("facts", "--json"), **_sources_here(outside_pid, outside_vm_fd)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
