"""Command line of the guest VMM: ``vm`` runs one VM in this process (fleets of them for tests:
``tests/support/guestfleet.py``; inside a simulated hypervisor: ``scripts/guests-in-host``).

``python -m kvmfleet.guestvmm vm -name guest=NAME -uuid UUID --vcpus M --workload W --loops N``
runs one VM (like a QEMU process: one VM per process, ``-name guest=`` and ``-uuid`` on the command
line so that collectors find its identity where they find QEMU's). Once every vCPU has run its N loops
it reports one JSON line (``"state": "done"``; ``"running"`` for ``--loops 0`` once every vCPU runs,
``"idle"`` for the idle workload) and stays alive, holding its fds, until SIGTERM/SIGINT (exit 0).

Exit codes: 0 after a signal or ``--exit-after-done``; 2 when a KVM step fails (one line on stderr naming
the step) or on a usage error.

This module is what every VM child process imports: keep its imports light (no subprocess, no json
decoder, no typing) so that hundreds of VMs start quickly.
"""

from __future__ import annotations

import os
import signal
import sys

from . import guests
from .kvmapi import KvmError
from .vm import STATS_FDS_CHOICES, GuestVM, install_kick_handler

PROG = "kvmfleet-guestvmm"

USAGE = f"""\
usage: {PROG} vm -name guest=NAME -uuid UUID [--vcpus M] [--workload W] [--loops N]
                 [--stats-fds {{all,vcpu,none}}] [--ready-fd FD | --ready-file PATH]
                 [--exit-after-done] [--die-with-parent] [--kvm-device PATH]

A small VMM that runs real KVM guests with known effects on the KVM counters.

vm      run one VM in this process (like QEMU: -name guest=NAME and -uuid UUID identify it). Once every
        vCPU ran its loops, write one JSON line (to --ready-fd, --ready-file or stdout) and stay alive,
        holding every fd, until SIGTERM/SIGINT (exit 0), or exit with --exit-after-done.

options:
  --vcpus M            vCPUs per VM (default 1)
  --workload W         {"|".join(guests.WORKLOADS)} (default halt)
  --loops N            workload iterations per vCPU; 0 = until stopped (default 1)
  --stats-fds MODE     stats fds held for the life of the VM: all = VM + every vCPU (default),
                       vcpu = every vCPU (like QEMU 8.1+), none (like QEMU 7.2)
  --ready-fd FD        write the ready line to this inherited fd, then close it
  --ready-file PATH    write the ready line to this file (atomically, by rename)
  --exit-after-done    exit once the ready line is written (not for --loops 0)
  --die-with-parent    get SIGTERM when the parent process exits
  --kvm-device PATH    the KVM device (default /dev/kvm)
"""


class UsageError(Exception):
    """A bad command line; the message is printed after the usage."""


class Options:
    """The parsed command line."""

    def __init__(self) -> None:
        self.command = ""
        self.name = ""
        self.uuid = ""
        self.vcpus = 1
        self.workload = "halt"
        self.loops = 1
        self.stats_fds = "all"
        self.ready_fd: int | None = None
        self.ready_file: str | None = None
        self.exit_after_done = False
        self.die_with_parent = False
        self.kvm_device = "/dev/kvm"


# option -> (attribute, kind, commands). Kinds: "str", "int" (>= 0), "pos" (>= 1), "float", "flag",
# or a tuple of choices. A hand-written parser because argparse (with re and gettext) costs more at
# start-up than the whole VM setup, and a test fleet starts hundreds of these processes.
_OPTIONS: dict[str, tuple[str, object, tuple[str, ...]]] = {
    "-name": ("name", "str", ("vm",)),
    "-uuid": ("uuid", "str", ("vm",)),
    "--vcpus": ("vcpus", "pos", ("vm",)),
    "--workload": ("workload", guests.WORKLOADS, ("vm",)),
    "--loops": ("loops", "int", ("vm",)),
    "--stats-fds": ("stats_fds", STATS_FDS_CHOICES, ("vm",)),
    "--ready-fd": ("ready_fd", "int", ("vm",)),
    "--ready-file": ("ready_file", "str", ("vm",)),
    "--exit-after-done": ("exit_after_done", "flag", ("vm",)),
    "--die-with-parent": ("die_with_parent", "flag", ("vm",)),
    "--kvm-device": ("kvm_device", "str", ("vm",)),
}


def _convert(option: str, kind: object, text: str) -> object:
    if isinstance(kind, tuple):
        if text not in kind:
            raise UsageError(f"{option}: invalid choice {text!r} (choose from {', '.join(kind)})")
        return text
    if kind == "str":
        if not text:
            raise UsageError(f"{option} needs a non-empty value")
        return text
    if kind == "float":
        try:
            value = float(text)
        except ValueError:
            raise UsageError(f"{option}: not a number: {text!r}") from None
        if not value > 0:
            raise UsageError(f"{option}: must be > 0")
        return value
    try:
        number = int(text)
    except ValueError:
        raise UsageError(f"{option}: not an integer: {text!r}") from None
    if number < (1 if kind == "pos" else 0):
        raise UsageError(f"{option}: must be >= {1 if kind == 'pos' else 0}")
    return number


def _identity(value: str, key: str) -> str:
    """``guest=NAME[,more]`` (QEMU's -name syntax) or a bare value -> NAME."""
    first = value.split(",", 1)[0]
    if first.startswith(key + "="):
        first = first[len(key) + 1 :]
    return first


def parse_args(argv: list[str]) -> Options:
    """Parse a command line (without the program name). Raises UsageError."""
    opts = Options()
    if not argv or argv[0] != "vm":
        raise UsageError("the first argument must be the command: vm")
    opts.command = argv[0]
    seen: set[str] = set()
    i = 1
    while i < len(argv):
        arg = argv[i]
        option, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        spec = _OPTIONS.get(option)
        if spec is None or opts.command not in spec[2]:
            raise UsageError(f"unrecognized argument for {opts.command}: {arg}")
        attr, kind, _ = spec
        seen.add(option)  # given twice: the last one wins, as with argparse
        if kind == "flag":
            if eq:
                raise UsageError(f"{option} takes no value")
            setattr(opts, attr, True)
            i += 1
            continue
        if eq:
            text = inline
            i += 1
        elif i + 1 < len(argv):
            text = argv[i + 1]
            i += 2
        else:
            raise UsageError(f"{option} needs a value")
        setattr(opts, attr, _convert(option, kind, text))
    for option in ("-name", "-uuid"):
        if option not in seen:
            raise UsageError(f"vm needs {option}")
    opts.name = _identity(opts.name, "guest")
    opts.uuid = _identity(opts.uuid, "uuid")
    if not opts.name or not opts.uuid:
        raise UsageError("-name guest=NAME and -uuid UUID need non-empty values")
    if "--ready-fd" in seen and "--ready-file" in seen:
        raise UsageError("--ready-fd and --ready-file exclude each other")
    if opts.workload == "paging" and opts.vcpus > guests.PAGING_MAX_VCPUS:
        raise UsageError(f"the paging workload supports at most {guests.PAGING_MAX_VCPUS} vCPUs")
    if opts.exit_after_done and opts.loops == 0 and opts.workload != "idle":
        raise UsageError("--exit-after-done needs --loops >= 1")
    return opts


class _Wakeup:
    """A self-pipe that the main thread sleeps on: signals (set_wakeup_fd) and vCPU threads write to it."""

    def __init__(self) -> None:
        self.rfd, self.wfd = os.pipe()
        for fd in (self.rfd, self.wfd):
            os.set_inheritable(fd, False)
        os.set_blocking(self.wfd, False)

    def notify(self) -> None:
        try:
            os.write(self.wfd, b"\0")
        except BlockingIOError:  # full: a wakeup is pending anyway
            pass

    def wait(self) -> None:
        os.read(self.rfd, 4096)

    def close(self) -> None:
        os.close(self.rfd)
        os.close(self.wfd)


def _json_str(text: str) -> str:
    """A JSON string literal (the json module would pull in ``re``; the VM child avoids it)."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif code < 0x20 or code >= 0x7F:
            if code > 0xFFFF:  # outside the BMP: a surrogate pair
                code -= 0x10000
                out.append(f"\\u{0xD800 | (code >> 10):04x}\\u{0xDC00 | (code & 0x3FF):04x}")
            else:
                out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def ready_line(
    *, name: str, uuid: str, vcpus: int, workload: str, loops: int, state: str, stats_fds: dict[str, int]
) -> str:
    """The JSON ready line (without the newline)."""
    fds = ", ".join(f"{_json_str(k)}: {v}" for k, v in stats_fds.items())
    return (
        f'{{"pid": {os.getpid()}, "name": {_json_str(name)}, "uuid": {_json_str(uuid)}, "vcpus": {vcpus}, '
        f'"workload": {_json_str(workload)}, "loops": {loops}, "state": {_json_str(state)}, '
        f'"stats_fds": {{{fds}}}}}'
    )


def _report(args: Options, line: str) -> None:
    data = (line + "\n").encode()
    if args.ready_fd is not None:
        try:
            os.write(args.ready_fd, data)
        finally:
            os.close(args.ready_fd)
    elif args.ready_file is not None:
        tmp = f"{args.ready_file}.{os.getpid()}.tmp"
        with open(tmp, "wb") as fp:
            fp.write(data)
        os.replace(tmp, args.ready_file)
    else:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _die_with_parent() -> None:
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
        raise KvmError.from_errno("prctl(PR_SET_PDEATHSIG)", ctypes.get_errno())
    if os.getppid() == 1:  # the parent died before prctl
        raise KvmError("prctl(PR_SET_PDEATHSIG)", "parent already exited")


def _ready_state(args: Options, vm: GuestVM) -> str | None:
    """The state to report once the VM is ready: idle, done (every vCPU ran its loops), running (--loops 0)."""
    if args.workload == "idle":
        return "idle"
    if args.loops > 0 and vm.all_done:
        return "done"
    if args.loops == 0 and vm.all_started:
        return "running"
    return None


def run_vm(args: Options) -> int:
    """The ``vm`` command: run one VM until signalled (or done, with --exit-after-done)."""
    signalled: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        signalled.append(signum)

    wake = _Wakeup()
    signal.set_wakeup_fd(wake.wfd, warn_on_full_buffer=False)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    install_kick_handler()

    vm = GuestVM(
        vcpus=args.vcpus,
        workload=args.workload,
        loops=args.loops,
        stats_fds=args.stats_fds,
        notify=wake.notify,
        kvm_path=args.kvm_device,
    )
    status = 0
    try:
        if args.die_with_parent:
            _die_with_parent()
        vm.setup()
        vm.start()
        reported = False
        while not signalled:
            if vm.error is not None:
                print(f"{PROG}: {vm.error}", file=sys.stderr)
                status = 2
                break
            state = None if reported else _ready_state(args, vm)
            if state is not None:
                reported = True
                _report(args, ready_line(name=args.name, uuid=args.uuid, vcpus=args.vcpus, workload=args.workload,
                                         loops=args.loops, state=state, stats_fds=vm.stats_fds()))
                if args.exit_after_done and state != "running":
                    break
            wake.wait()
    except KvmError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        status = 2
    except OSError as exc:  # the ready fd / file
        print(f"{PROG}: reporting readiness: {exc}", file=sys.stderr)
        status = 2
    # Leaving: a second SIGTERM (sent by impatient supervisors) must not turn a clean exit into a death
    # by signal while the interpreter shuts down (it restores default handlers on the way out).
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    if not vm.stop(timeout=0.5):
        # A vCPU thread did not leave KVM_RUN: exit without waiting for it (the kernel frees the VM).
        sys.stdout.flush()
        os._exit(status)
    vm.close()
    signal.set_wakeup_fd(-1)
    wake.close()
    return status


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        sys.stdout.write(USAGE)
        return 0
    try:
        opts = parse_args(args)
    except UsageError as exc:
        sys.stderr.write(USAGE.split("\n\n", 1)[0] + f"\n{PROG}: error: {exc}\n")
        return 2
    return run_vm(opts)


if __name__ == "__main__":
    sys.exit(main())
