"""One simulated hypervisor for the acceptance test: run as PID 1 of its own PID namespace
(``unshare --pid --fork --mount-proc --kill-child=SIGTERM python nshost.py ...``), it starts real KVM guests
(kvmfleet-guestvmm) and then Debian's collectd with the kvmfleet plugin, so that this collectd's /proc shows only
this "host's" guests. It prints one line ``ready <json>`` once everything runs, and on SIGTERM stops collectd
(which flushes to InfluxDB), then the guests.

Usage: nshost.py COLLECTD_CONF NAME:VCPUS:WORKLOAD [...]
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time


def main() -> int:
    conf, specs = sys.argv[1], sys.argv[2:]
    stopping = []
    # PID 1 of a namespace gets only the signals it has a handler for
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    from kvmfleet.guestvmm import launch

    guests = []
    collectd = None
    try:
        # (no die_with_parent: our parent is PID 1 here, which its check takes for "parent gone"; when this
        # process exits, the kernel kills every process of the namespace anyway)
        for spec in specs:
            name, vcpus, workload = spec.split(":")
            guests.append(launch(name, vcpus=int(vcpus), workload=workload, loops=0))
        infos = [g.wait_ready(60) for g in guests]
        exe = shutil.which("collectd") or "/usr/sbin/collectd"
        log = open(os.path.join(os.path.dirname(conf), "collectd.stdout"), "ab")  # noqa: SIM115
        collectd = subprocess.Popen([exe, "-f", "-C", conf], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=os.path.dirname(conf))
        log.close()
        print("ready " + json.dumps({"pid_in_namespace": os.getpid(), "collectd": collectd.pid,
                                     "guests": [{"name": g.name, "pid": i.get("pid")} for g, i in
                                                zip(guests, infos)]}), flush=True)
        while not stopping:
            if collectd.poll() is not None:
                print(f"collectd exited with {collectd.returncode}", file=sys.stderr, flush=True)
                return 1
            try:
                os.waitpid(-1, os.WNOHANG)  # PID 1 reaps orphans
            except ChildProcessError:
                pass
            time.sleep(0.2)
        return 0
    finally:
        if collectd is not None and collectd.poll() is None:
            collectd.send_signal(signal.SIGTERM)
            try:
                collectd.wait(40)
            except subprocess.TimeoutExpired:
                collectd.kill()
                collectd.wait()
        for g in guests:
            g.stop()


if __name__ == "__main__":
    sys.exit(main())
