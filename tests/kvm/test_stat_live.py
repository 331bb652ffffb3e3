"""``kvmfleet stat``'s live view on a real terminal (tmux), driven by keys, with two busy real guests.

Each step types keys and then polls the screen for the exact state it asserts (a deadline, no sleeps). The
guests run forever (``--loops 0``): one halts (2 vCPUs), one writes to an I/O port (1 vCPU), so their counters
move at every refresh; other VMs on the host may show in the host view, never in a picked VM's.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.support.waiting import wait_for

from kvmfleet.exitreasons import probe
from kvmfleet.guestvmm import launch

WIDTH, HEIGHT = 132, 50
PLUGINS = str(Path(__file__).resolve().parents[2] / "plugins")
DEADLINE = 30.0


@dataclass(frozen=True)
class Line:
    name: str  # "  vcpu 0" keeps its indent: a child row
    total: int
    rate: float | None
    percent: float | None


@dataclass(frozen=True)
class Screen:
    lines: list[str]

    @property
    def header(self) -> str:
        return self.lines[0]

    def rows(self) -> list[Line]:
        """The counter rows, read by the columns of the ``Counter Total Rate/s %Rate`` line."""
        at = next((i for i, line in enumerate(self.lines) if line.startswith("Counter ")), None)
        if at is None:
            return []
        head = self.lines[at]
        total_end, rate_end, pct_end = head.index("Total") + 5, head.index("Rate/s") + 6, head.index("%Rate") + 5
        out = []
        for line in self.lines[at + 1:-1]:
            if not line.strip():
                break
            total, rate, pct = line[total_end - 14:total_end], line[total_end:rate_end], line[rate_end:pct_end]
            out.append(Line(line[:total_end - 14].rstrip(), int(total),
                            float(rate) if rate.strip() else None, float(pct) if pct.strip() else None))
        return out

    def names(self) -> list[str]:
        return [row.name for row in self.rows()]

    def row(self, name: str) -> Line | None:
        return next((row for row in self.rows() if row.name == name), None)


class Tmux:
    """A tmux server of our own (its own socket) with one pane running an interactive shell."""

    def __init__(self, socket: str, workdir: Path) -> None:
        self.socket = socket
        self.workdir = workdir

    def tmux(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, f"tmux {' '.join(args[:3])} failed: {done.stderr.strip()}"
        return done.stdout

    def start(self) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.workdir), "PS1": "$ ",
               "LANG": "C.UTF-8", "TERM": "screen"}
        shell = "env -i " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " bash --norc --noprofile -i"
        self.tmux("-f", "/dev/null", "new-session", "-d", "-s", "live", "-x", str(WIDTH), "-y", str(HEIGHT), shell)

    def keys(self, *keys: str, literal: bool = False) -> None:
        self.tmux("send-keys", "-t", "live", *(["-l"] if literal else []), *keys)

    def type_line(self, text: str) -> None:
        self.keys(text, literal=True)
        self.keys("Enter")

    def screen(self) -> Screen:
        return Screen(self.tmux("capture-pane", "-p", "-t", "live").splitlines())

    def pane(self, fmt: str) -> str:
        return self.tmux("display-message", "-p", "-t", "live", fmt).strip()

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)


@pytest.fixture()
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    term = Tmux(f"kvmfleet-live-{os.getpid()}-{tmp_path.name}", tmp_path)  # a server of each test's own
    term.start()
    try:
        yield term
    finally:
        term.kill()


@pytest.fixture()
def guests() -> Iterator[tuple[str, str]]:
    """Two busy guests: (the halting one's name, the port-writing one's name)."""
    halt_name, pio_name = f"live-halt-{os.getpid()}", f"live-pio-{os.getpid()}"
    with launch(halt_name, vcpus=2, workload="halt", loops=0) as halter, \
            launch(pio_name, vcpus=1, workload="pio", loops=0) as writer:
        halter.wait_ready(30)
        writer.wait_ready(30)
        yield halt_name, pio_name


def start_stat(term: Tmux, tmp_path: Path, *options: str) -> None:
    """Run kvmfleet stat in the pane; its exit status and the terminal settings after it land in files."""
    command = " ".join([f"PYTHONPATH={shlex.quote(PLUGINS)}", shlex.quote(sys.executable), "-m", "kvmfleet.cli",
                        "stat", "--source", "statsfd", *options])
    term.type_line(f"stty -g > {tmp_path}/stty.before; clear; {command}; echo $? > {tmp_path}/status; "
                   f"stty -g > {tmp_path}/stty.after")


def until(term: Tmux, what: str, ok) -> Screen:  # type: ignore[no-untyped-def]
    return wait_for(what, term.screen, DEADLINE, every=0.1, until=ok)


def moving(screen: Screen) -> bool:
    """A refreshed host view with rates: rows there, each moving."""
    rows = screen.rows()
    return screen.header.startswith("kvmfleet stat - host") and bool(rows) and all(r.rate for r in rows)


def quit_and_check_restored(term: Tmux, tmp_path: Path, key: str = "q") -> None:
    term.keys(key)
    status = wait_for("kvmfleet stat's exit status", lambda: (tmp_path / "status").is_file()
                      and (tmp_path / "stty.after").is_file() and (tmp_path / "stty.after").read_text(), DEADLINE)
    assert status and (tmp_path / "status").read_text() == "0\n"
    assert (tmp_path / "stty.after").read_text() == (tmp_path / "stty.before").read_text()  # modes restored
    assert term.pane("#{alternate_on}") == "0"  # the shell's screen is back
    assert not any(line.startswith("kvmfleet stat - ") for line in term.screen().lines)


def test_live_view_sorted_filtered_per_vm_per_vcpu_idle_and_quit(tmux: Tmux, guests, tmp_path: Path):
    halt_name, pio_name = guests
    start_stat(tmux, tmp_path)
    screen = until(tmux, "the host view with moving counters, halt_exits among them",
                   lambda s: moving(s) and {"exits", "halt_exits"} <= set(s.names()))
    # full screen, in place: the header at the top of the alternate screen, nothing scrolled into history
    assert tmux.pane("#{alternate_on}") == "1"
    history = tmux.pane("#{history_size}")  # the shell's lines before; the view adds none
    assert re.match(r"kvmfleet stat - host  host \S+  source statsfd  \d+ VMs  \d+ vCPUs  every 1 s$", screen.header)
    rates = [row.rate or 0.0 for row in screen.rows()]
    assert rates == sorted(rates, reverse=True)  # the busiest first; idle (rate 0) rows hidden
    assert screen.lines[-1].startswith("q quit  f filter")
    # refreshed: a later frame shows larger totals
    first_exits = screen.row("exits").total  # type: ignore[union-attr]
    until(tmux, "a later frame", lambda s: (s.row("exits") or Line("", 0, 0, 0)).total > first_exits)
    assert tmux.pane("#{history_size}") == history

    # f: a filter keeps the rows it matches; an invalid regex keeps it
    tmux.keys("f")
    until(tmux, "the filter prompt", lambda s: s.lines[2].startswith("filter (regex):"))
    tmux.type_line("^halt")
    screen = until(tmux, "only ^halt rows", lambda s: "filter /^halt/" in s.lines[1] and s.names() == ["halt_exits"])
    tmux.keys("f")
    until(tmux, "the filter prompt", lambda s: s.lines[2].startswith("filter (regex):"))
    tmux.type_line("(")
    screen = until(tmux, "the invalid regex said", lambda s: s.lines[2].startswith("invalid regex '(':"))
    assert "filter /^halt/" in screen.lines[1] and screen.names() == ["halt_exits"]
    tmux.keys("c")
    until(tmux, "no filter", lambda s: s.lines[1].startswith("no filter") and "exits" in s.names())

    # g: one VM by name; the port writer halts never: no halt_exits row
    tmux.keys("g")
    until(tmux, "the VM prompt", lambda s: s.lines[2].startswith("VM name or pid"))
    tmux.type_line(pio_name)
    screen = until(tmux, f"VM {pio_name} shown, moving",
                   lambda s: s.header.startswith(f"kvmfleet stat - VM {pio_name} (pid ") and "exits" in s.names())
    assert "halt_exits" not in screen.names()
    assert all(row.rate for row in screen.rows())

    tmux.keys("g")
    until(tmux, "the VM prompt", lambda s: s.lines[2].startswith("VM name or pid"))
    tmux.type_line(halt_name)
    until(tmux, f"VM {halt_name} shown with its halts",
          lambda s: s.header.startswith(f"kvmfleet stat - VM {halt_name} (pid ") and "halt_exits" in s.names())

    # v: drill down, each counter per vCPU; the vCPUs add up to the VM's count in the same frame
    tmux.keys("v")
    screen = until(tmux, "vCPU rows under the counters",
                   lambda s: ", per vCPU)" in s.header and {"  vcpu 0", "  vcpu 1"} <= set(s.names()))
    names = screen.names()
    at = names.index("halt_exits")
    kids = screen.rows()[at + 1:at + 3]
    assert sorted(kid.name for kid in kids) == ["  vcpu 0", "  vcpu 1"]
    assert sum(kid.total for kid in kids) == screen.rows()[at].total

    # i: idle counters too (this guest's mmio_exits stay 0)
    tmux.keys("v")
    until(tmux, "no vCPU rows", lambda s: ", per vCPU)" not in s.header and "  vcpu 0" not in s.names())
    tmux.keys("i")
    screen = until(tmux, "idle counters shown", lambda s: "idle shown" in s.lines[1] and "mmio_exits" in s.names())
    assert screen.row("mmio_exits") == Line("mmio_exits", 0, 0.0, 0.0)

    # l: the VMs by exit rate; Esc: back to the host
    tmux.keys("l")
    screen = until(tmux, "the VM list", lambda s: s.header.startswith("kvmfleet stat - VM list")
                   and any(line.startswith(halt_name + " ") for line in s.lines)
                   and any(line.startswith(pio_name + " ") for line in s.lines))
    tmux.keys("Escape")
    until(tmux, "the host view again", lambda s: s.header.startswith("kvmfleet stat - host  "))
    assert tmux.pane("#{history_size}") == history

    # resized: laid out again at the new size; a terminal too small for a row does not end the view
    tmux.tmux("resize-window", "-t", "live", "-x", "60", "-y", "12")
    screen = until(tmux, "the view at 60x12", lambda s: len(s.lines) == 12 and s.header.startswith("kvmfleet stat")
                   and "exits" in s.names())
    assert all(len(line) < 60 for line in screen.lines)
    tmux.tmux("resize-window", "-t", "live", "-x", "12", "-y", "2")
    until(tmux, "the view at 12x2", lambda s: s.lines[0] == "kvmfleet st")
    tmux.tmux("resize-window", "-t", "live", "-x", str(WIDTH), "-y", str(HEIGHT))
    until(tmux, "the view at full size", lambda s: len(s.lines) == HEIGHT and "exits" in s.names())
    quit_and_check_restored(tmux, tmp_path)


def test_live_view_with_reasons(tmux: Tmux, guests, tmp_path: Path):
    halt_name, pio_name = guests
    state = probe()
    start_stat(tmux, tmp_path, "--reasons")
    if not state.usable:  # this host cannot count them: the header says why, the counters still show
        screen = until(tmux, "the reason the exit reasons are missing", lambda s: moving(s)
                       and any(line.startswith("exit reasons unavailable: ") for line in s.lines[:4]))
        assert "halt_exits" in screen.names()
        quit_and_check_restored(tmux, tmp_path)
        return
    hlt, io = "kvm_userspace_exit(KVM_EXIT_HLT)", "kvm_userspace_exit(KVM_EXIT_IO)"
    screen = until(tmux, "the guests' exit reasons, moving", lambda s: moving(s) and {hlt, io} <= set(s.names()))
    assert not any(line.startswith("exit reasons unavailable") for line in screen.lines)
    tmux.keys("g")
    until(tmux, "the VM prompt", lambda s: s.lines[2].startswith("VM name or pid"))
    tmux.type_line(halt_name)
    screen = until(tmux, f"VM {halt_name}'s own reasons", lambda s: s.header.startswith(f"kvmfleet stat - VM "
                                                                                        f"{halt_name} ")
                   and hlt in s.names())
    assert io not in screen.names()  # the other guest's port writes are not this VM's
    assert screen.row(hlt).percent == 100.0  # type: ignore[union-attr]
    tmux.keys("g")
    until(tmux, "the VM prompt", lambda s: s.lines[2].startswith("VM name or pid"))
    tmux.type_line(pio_name)
    screen = until(tmux, f"VM {pio_name}'s own reasons", lambda s: s.header.startswith(f"kvmfleet stat - VM "
                                                                                      f"{pio_name} ")
                   and io in s.names())
    assert hlt not in screen.names()
    tmux.keys("f")
    until(tmux, "the filter prompt", lambda s: s.lines[2].startswith("filter (regex):"))
    tmux.type_line(r"\(")
    until(tmux, "only reason rows", lambda s: s.names() == [io])
    quit_and_check_restored(tmux, tmp_path, "C-c")  # Ctrl-C ends it as cleanly as q


def test_stat_json_reasons_in_host_and_vm_objects(guests):
    """`stat --json --reasons --vm`: each VM object carries its own exits by reason; the host object all of them.
    (Exact counts of bounded guests: tests/kvm/test_exit_reasons.py, through the source itself.)"""
    halt_name, pio_name = guests
    state = probe()
    out = subprocess.run([sys.executable, "-m", "kvmfleet.cli", "stat", "--json", "--reasons", "--vm", "-n", "2",
                          "-i", "0.5", "--source", "statsfd", "-f", "^halt_exits$"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    first, second = (json.loads(line) for line in out.splitlines())
    assert second["exit_reasons_source"] == {"usable": state.usable, "reason": state.reason}
    if not state.usable:
        assert second["exit_reasons"] == {} and second["host"]["halt_exits"] > 0
        return
    vms = {vm["name"]: vm for vm in second["vms"]}
    halts = vms[halt_name]["exit_reasons"]["kvm_userspace_exit"]
    ports = vms[pio_name]["exit_reasons"]["kvm_userspace_exit"]
    assert list(halts) == ["KVM_EXIT_HLT"] and list(ports) == ["KVM_EXIT_IO"]  # forever: never the done `out`
    before = {vm["name"]: vm for vm in first["vms"]}
    counted_first = before[halt_name]["exit_reasons"].get("kvm_userspace_exit", {}).get("KVM_EXIT_HLT", 0)
    assert halts["KVM_EXIT_HLT"] > counted_first  # (per VM from the first sample on or earlier: by mechanism)
    host = second["exit_reasons"]["kvm_userspace_exit"]
    assert host["KVM_EXIT_HLT"] >= halts["KVM_EXIT_HLT"] and host["KVM_EXIT_IO"] >= ports["KVM_EXIT_IO"]
    assert vms[halt_name]["stats"] == {"halt_exits": vms[halt_name]["stats"]["halt_exits"]}  # -f: counters only
