"""Fleets of guest VMM processes for tests and benchmarks (not shipped with kvmfleet: hypervisors need only the
one VM that ``kvmfleet selftest`` runs, :func:`kvmfleet.guestvmm.launch`).

    with launch_fleet(200, vcpus=4, workload="halt", loops=1000) as fleet:
        infos = fleet.wait_ready(timeout=120)   # one ready line per VM, in order
"""

from __future__ import annotations

import selectors
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from kvmfleet.guestvmm.launcher import GuestProcess, GuestVMMError, check_args, launch


class Fleet:
    """Many guest VMM processes, started by :func:`launch_fleet`."""

    def __init__(self, members: Sequence[GuestProcess]) -> None:
        self.members = list(members)

    @property
    def pids(self) -> list[int]:
        return [m.pid for m in self.members]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def wait_ready(self, timeout: float = 120.0, abort: Callable[[], bool] | None = None) -> list[dict[str, Any]]:
        """Wait until every member is ready; returns their ready lines in member order.

        Raises GuestVMMError as soon as one member fails, or at the timeout. ``abort`` is polled a few
        times a second; when it returns True the wait ends early (the result then lacks some members).
        """
        deadline = time.monotonic() + timeout
        for m in self.members:
            if m.info is None and m.fileno() < 0:
                raise GuestVMMError(m._failure("was stopped before it was ready"))
        pending = {m.fileno(): m for m in self.members if m.info is None}
        with selectors.DefaultSelector() as sel:
            for fd in pending:
                sel.register(fd, selectors.EVENT_READ)
            while pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = ", ".join(sorted(m.name for m in pending.values())[:5])
                    raise GuestVMMError(f"{len(pending)} guests not ready after {timeout:g} s ({names} ...)")
                if abort is not None and abort():
                    break
                for key, _ in sel.select(min(remaining, 0.2)):
                    member = pending[key.fd]
                    member._read_ready()
                    if member.info is not None:
                        sel.unregister(key.fd)
                        del pending[key.fd]
        return [m.info for m in self.members if m.info is not None]

    def stop(self, timeout: float = 10.0) -> list[int]:
        """SIGTERM every member, wait (SIGKILL after ``timeout``); returns their exit statuses."""
        for m in self.members:
            m.terminate()
        deadline = time.monotonic() + timeout
        statuses = []
        for m in self.members:
            statuses.append(m.stop(max(0.0, deadline - time.monotonic())))
        return statuses

    def __enter__(self) -> Fleet:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __len__(self) -> int:
        return len(self.members)


def fleet_names(count: int, name_prefix: str = "kvmfleet-guest") -> list[str]:
    """The names :func:`launch_fleet` gives: ``PREFIX-000``, ``PREFIX-001``, ..."""
    width = max(3, len(str(count - 1)))
    return [f"{name_prefix}-{i:0{width}d}" for i in range(count)]


def launch_fleet(
    count: int,
    vcpus: int = 1,
    workload: str = "halt",
    loops: int = 1,
    stats_fds: str = "all",
    *,
    name_prefix: str = "kvmfleet-guest",
    exit_after_done: bool = False,
    die_with_parent: bool = False,
    python: str | None = None,
) -> Fleet:
    """Start ``count`` VM processes (names from :func:`fleet_names`); call :meth:`Fleet.wait_ready` next.

    Each member holds two pipes in this process until it is ready (one after): keep RLIMIT_NOFILE above
    ``2 * count`` plus what the caller uses. On a failure to start one, the ones started are stopped.
    """
    check_args(vcpus, workload, loops, stats_fds)
    members: list[GuestProcess] = []
    try:
        for name in fleet_names(count, name_prefix):
            members.append(
                launch(
                    name,
                    vcpus,
                    workload,
                    loops,
                    stats_fds,
                    exit_after_done=exit_after_done,
                    die_with_parent=die_with_parent,
                    python=python,
                )
            )
    except BaseException:
        Fleet(members).stop()
        raise
    return Fleet(members)


def main(argv: Sequence[str] | None = None) -> int:
    """``python guestfleet.py --vms N ...``: launch the VMs, print one JSON line once all are ready, stop them all
    on SIGTERM/SIGINT. Runs with nothing but kvmfleet installed (the demo and molecule copy this file into a
    simulated hypervisor and run it with the deployed venv's Python)."""
    import argparse
    import json
    import resource
    import signal
    import sys

    from kvmfleet.guestvmm import guests
    from kvmfleet.guestvmm.vm import STATS_FDS_CHOICES

    p = argparse.ArgumentParser(prog="guestfleet", description="start N guest VMs, stop them on SIGTERM")
    p.add_argument("--vms", type=int, required=True)
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--workload", choices=guests.WORKLOADS, default="halt")
    p.add_argument("--loops", type=int, default=1, help="workload iterations per vCPU; 0 = until stopped")
    p.add_argument("--name-prefix", default="kvmfleet-guest")
    p.add_argument("--stats-fds", choices=STATS_FDS_CHOICES, default="all")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for every VM to be ready")
    args = p.parse_args(argv)
    signalled: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: signalled.append(signum))
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # two pipes per VM until it is ready
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        fleet = launch_fleet(args.vms, vcpus=args.vcpus, workload=args.workload, loops=args.loops,
                             name_prefix=args.name_prefix, stats_fds=args.stats_fds, die_with_parent=True)
    except (OSError, GuestVMMError) as exc:
        print(f"guestfleet: {exc}", file=sys.stderr)
        return 2
    with fleet:
        try:
            fleet.wait_ready(timeout=args.timeout, abort=lambda: bool(signalled))
        except GuestVMMError as exc:
            print(f"guestfleet: {exc}", file=sys.stderr)
            return 2
        if not signalled:
            print(json.dumps({"pids": fleet.pids, "names": fleet.names, "vms": len(fleet.pids)}), flush=True)
        reported: set[int] = set()
        while not signalled:
            time.sleep(0.2)
            for m in fleet.members:
                rc = m.popen.poll()
                if rc is not None and m.pid not in reported:
                    reported.add(m.pid)
                    print(f"guestfleet: {m.name} (pid {m.pid}) exited with status {rc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
