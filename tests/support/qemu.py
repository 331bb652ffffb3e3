"""Run Debian 13's QEMU 10 from a debootstrap tree, for tests (stdlib only).

QEMU >= 8.1 keeps one binary stats fd per vCPU (``anon_inode:kvm-vcpu-stats:N`` in
``/proc/<pid>/fd``); the host's Debian 12 QEMU 7.2 keeps none. So the tests run the QEMU of a
trixie tree built by ``scripts/build-rootfs``:

- :func:`ensure_trixie_qemu_tree` builds (once, cached) a trixie tree with ``qemu-system-x86``;
- :func:`start_qemu` starts ``qemu-system-x86_64 -accel kvm`` chrooted into that tree, inside
  its own private mount namespace (``unshare --mount --propagation private``) where ``/proc`` is
  mounted and ``/dev`` is a tmpfs holding bind mounts of ``kvm``, ``null``, ``zero``, ``full``,
  ``random`` and ``urandom`` only. Nothing is mounted in the host's namespace, and the namespace
  dies with QEMU. ``unshare`` execs ``sh``, which execs ``chroot``, which execs QEMU, so the pid
  that the host sees is QEMU's own (checked through ``/proc/<pid>/exe``).

Needs root and ``/dev/kvm``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_ROOTFS = REPO_ROOT / "scripts" / "build-rootfs"
QEMU_IN_TREE = "/usr/bin/qemu-system-x86_64"
TRIXIE_QEMU_PACKAGES = ("qemu-system-x86",)

# Device nodes bind-mounted into the tree's private /dev.
DEV_NODES = ("kvm", "null", "zero", "full", "random", "urandom")

VCPU_STATS_RE = re.compile(r"^anon_inode:kvm-vcpu-stats:(\d+)$")
VM_STATS_LINK = "anon_inode:kvm-vm-stats"

_PR_SET_PDEATHSIG = 1

# Runs as: unshare --mount --propagation private -- sh -c SCRIPT sh TREE QEMU-ARGS...
# Every mount lands in the private namespace; the final exec keeps the pid.
_NAMESPACE_SCRIPT = r"""
set -eu
t=$1
shift
mount -t proc -o nosuid,nodev,noexec proc "$t/proc"
mount -t tmpfs -o mode=0755,size=1m,nosuid,noexec tmpfs "$t/dev"
for n in __DEV_NODES__; do
    [ -e "/dev/$n" ] || continue
    : > "$t/dev/$n"
    mount --bind "/dev/$n" "$t/dev/$n"
done
exec chroot "$t" "$@"
""".replace("__DEV_NODES__", " ".join(DEV_NODES))


class RootfsBuildError(RuntimeError):
    """``scripts/build-rootfs`` failed or returned an unusable tree."""


class QemuStartError(RuntimeError):
    """QEMU exited or did not reach the expected state in time."""


# ---------------------------------------------------------------- rootfs


def build_rootfs(
    suite: str,
    packages: Sequence[str] = (),
    name: str | None = None,
    timeout: float = 1800.0,
) -> Path:
    """Run ``scripts/build-rootfs`` (cached) and return the tree it prints."""
    cmd = [str(BUILD_ROOTFS), suite]
    if packages:
        cmd += ["--packages", " ".join(packages)]
    if name:
        cmd += ["--name", name]
    if os.geteuid() != 0:
        raise RootfsBuildError(f"{shlex.join(cmd)} needs root (debootstrap, chroot, mounts)")
    try:
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise RootfsBuildError(f"{shlex.join(cmd)} did not finish within {timeout:.0f} s") from exc
    except OSError as exc:
        raise RootfsBuildError(f"cannot run {shlex.join(cmd)}: {exc}") from exc
    if proc.returncode != 0:
        raise RootfsBuildError(f"{shlex.join(cmd)} failed with exit code {proc.returncode}:\n{_tail(proc.stderr, 60)}")
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise RootfsBuildError(f"{shlex.join(cmd)} printed no tree path:\n{_tail(proc.stderr, 20)}")
    tree = Path(lines[-1])
    if not tree.is_dir():
        raise RootfsBuildError(f"{shlex.join(cmd)} printed {tree}, which is not a directory")
    return tree


def ensure_trixie_qemu_tree() -> Path:
    """Return a trixie tree with ``qemu-system-x86`` installed, building it when not cached.

    Raises :class:`RootfsBuildError` with the builder's stderr when the tree cannot be built.
    """
    tree = build_rootfs("trixie", TRIXIE_QEMU_PACKAGES)
    qemu = tree / QEMU_IN_TREE.lstrip("/")
    if not os.access(qemu, os.X_OK):
        raise RootfsBuildError(f"{tree} has no executable {QEMU_IN_TREE}")
    return tree


# ---------------------------------------------------------------- /proc helpers


def fd_links(pid: int) -> dict[int, str]:
    """Map fd number -> link target for ``/proc/<pid>/fd`` (fds closing meanwhile are skipped)."""
    out: dict[int, str] = {}
    fd_dir = f"/proc/{pid}/fd"
    for entry in os.listdir(fd_dir):
        with contextlib.suppress(FileNotFoundError):
            out[int(entry)] = os.readlink(f"{fd_dir}/{entry}")
    return out


def vcpu_stats_fds(pid: int) -> dict[int, int]:
    """Map vCPU index -> fd number of the ``anon_inode:kvm-vcpu-stats:N`` fds of ``pid``."""
    out: dict[int, int] = {}
    for fd, link in fd_links(pid).items():
        m = VCPU_STATS_RE.match(link)
        if m:
            out[int(m.group(1))] = fd
    return out


def mounts_under(path: str | os.PathLike[str]) -> list[str]:
    """Mount points at or below ``path`` in the caller's mount namespace (``/proc/self/mounts``)."""
    base = os.path.realpath(path)
    found = []
    with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 2:
                continue
            mnt = _unescape_mount(fields[1])
            if mnt == base or mnt.startswith(base.rstrip("/") + "/"):
                found.append(mnt)
    return found


def process_cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        raw = f.read()
    return [arg.decode(errors="replace") for arg in raw.split(b"\0")[:-1]]


def _unescape_mount(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses.
        rest = stat.rsplit(")", 1)[-1].split()
        if len(rest) >= 2 and int(rest[1]) == pid:
            kids.append(int(entry))
    return kids


def _is_qemu(pid: int) -> bool:
    exe = _exe(pid)
    return exe is not None and os.path.basename(exe.removesuffix(" (deleted)")) == "qemu-system-x86_64"


def _find_qemu_pid(root_pid: int) -> int | None:
    """QEMU's pid: ``root_pid`` itself once the exec chain is done, else a descendant."""
    todo = [root_pid]
    seen: set[int] = set()
    while todo:
        pid = todo.pop(0)
        if pid in seen:
            continue
        seen.add(pid)
        if _is_qemu(pid):
            return pid
        todo.extend(_children(pid))
    return None


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _set_pdeathsig() -> None:
    """In the child: get SIGKILL when the parent (the test process) dies, so no QEMU is orphaned."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


# ---------------------------------------------------------------- QEMU


class QemuProcess:
    """A running QEMU started by :func:`start_qemu`; use :meth:`stop` or a ``with`` block."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        *,
        tree: Path,
        name: str,
        uuid: str,
        vcpus: int,
        mem_mb: int,
        argv: list[str],
        workdir: Path,
    ) -> None:
        self.popen = popen
        self.tree = tree
        self.name = name
        self.uuid = uuid
        self.vcpus = vcpus
        self.mem_mb = mem_mb
        self.argv = argv
        self.workdir = workdir
        self.stderr_path = workdir / "qemu.stderr"
        self.stdout_path = workdir / "qemu.stdout"
        self.pid = popen.pid  # replaced by QEMU's own pid once found
        self._stopped = False

    def __repr__(self) -> str:
        return f"QemuProcess(pid={self.pid}, name={self.name!r}, uuid={self.uuid!r}, vcpus={self.vcpus})"

    # -- state
    def is_running(self) -> bool:
        if self.popen.poll() is not None:
            return False
        return self.pid == self.popen.pid or _is_qemu(self.pid)

    def cmdline(self) -> list[str]:
        """QEMU's argv as the kernel shows it (``/proc/<pid>/cmdline``)."""
        return process_cmdline(self.pid)

    def fd_links(self) -> dict[int, str]:
        return fd_links(self.pid)

    def vcpu_stats_fds(self) -> dict[int, int]:
        return vcpu_stats_fds(self.pid)

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def _command(self) -> str:
        qemu = self.argv[self.argv.index(QEMU_IN_TREE) :]
        return f"chroot {shlex.quote(str(self.tree))} {shlex.join(qemu)}"

    # -- start-up
    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until QEMU holds one ``kvm-vcpu-stats`` fd per vCPU; raise :class:`QemuStartError`."""
        deadline = time.monotonic() + timeout
        qemu_pid: int | None = None
        stats: dict[int, int] = {}
        while True:
            if self.popen.poll() is not None:
                raise QemuStartError(
                    f"QEMU {self.name!r} exited with code {self.popen.returncode} before holding "
                    f"{self.vcpus} kvm-vcpu-stats fds.\ncommand: {self._command()}\n"
                    f"stderr:\n{_tail(self.stderr_text(), 40) or '(empty)'}"
                )
            if qemu_pid is None:
                qemu_pid = _find_qemu_pid(self.popen.pid)
                if qemu_pid is not None:
                    self.pid = qemu_pid
            if qemu_pid is not None:
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    stats = vcpu_stats_fds(qemu_pid)
                if sorted(stats) == list(range(self.vcpus)):
                    return
            if time.monotonic() >= deadline:
                links: dict[int, str] = {}
                if qemu_pid is not None:
                    with contextlib.suppress(OSError):
                        links = fd_links(qemu_pid)
                raise QemuStartError(
                    f"QEMU {self.name!r} (pid {qemu_pid or self.popen.pid}) did not hold {self.vcpus} "
                    f"kvm-vcpu-stats fds within {timeout:.0f} s (found vCPUs {sorted(stats)}).\n"
                    f"fds: {sorted(links.values())}\ncommand: {self._command()}\n"
                    f"stderr:\n{_tail(self.stderr_text(), 40) or '(empty)'}"
                )
            time.sleep(0.05)

    # -- shutdown
    def stop(self, timeout: float = 10.0) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL), reap it and remove its temp files.

        Raises :class:`RuntimeError` if a mount below the tree shows in this namespace afterwards.
        """
        if self._stopped:
            return
        self._stopped = True
        try:
            if self.pid != self.popen.pid and _is_qemu(self.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGTERM)
            if self.popen.poll() is None:
                self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(timeout)
            if self.pid != self.popen.pid:
                deadline = time.monotonic() + timeout
                while _is_qemu(self.pid):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"QEMU {self.name!r} (pid {self.pid}) still runs {timeout:g} s after "
                                           "SIGKILL")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, signal.SIGKILL)
                    time.sleep(0.05)
        finally:
            for path in (self.stderr_path, self.stdout_path):
                with contextlib.suppress(OSError):
                    path.unlink()
            with contextlib.suppress(OSError):
                self.workdir.rmdir()
        leftover = mounts_under(self.tree)
        if leftover:
            raise RuntimeError(f"mounts left below {self.tree} after stopping QEMU: {leftover}")

    def __enter__(self) -> QemuProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def qemu_args(name: str, uuid: str, vcpus: int = 2, mem_mb: int = 64) -> list[str]:
    """The QEMU command line used by :func:`start_qemu` (binary path inside the tree)."""
    return [
        QEMU_IN_TREE,
        "-accel", "kvm",
        "-nographic",
        "-m", str(mem_mb),
        "-smp", str(vcpus),
        "-name", f"guest={name.replace(',', ',,')},debug-threads=on",
        "-uuid", uuid,
        "-nodefaults",
        "-serial", "none",
        "-monitor", "none",
        "-display", "none",
    ]  # fmt: skip


def start_qemu(
    tree: str | os.PathLike[str],
    name: str,
    uuid: str,
    vcpus: int = 2,
    mem_mb: int = 64,
    *,
    timeout: float = 30.0,
) -> QemuProcess:
    """Start QEMU from ``tree`` and wait until it holds one ``kvm-vcpu-stats`` fd per vCPU.

    The returned :class:`QemuProcess` has ``pid`` = QEMU's own pid as the host sees it. Raises
    :class:`QemuStartError` (with QEMU's stderr) if QEMU exits or is not ready within ``timeout``.
    """
    if vcpus < 1:
        raise ValueError("vcpus must be >= 1")
    tree_path = Path(tree).resolve()
    if not os.access(tree_path / QEMU_IN_TREE.lstrip("/"), os.X_OK):
        raise QemuStartError(f"{tree_path} has no executable {QEMU_IN_TREE}")
    for sub in ("proc", "dev"):
        if not (tree_path / sub).is_dir():
            raise QemuStartError(f"{tree_path}/{sub} is missing: not a rootfs tree?")
    if not os.path.exists("/dev/kvm"):
        raise QemuStartError("/dev/kvm is absent")

    argv = [
        "unshare", "--mount", "--propagation", "private", "--",
        "sh", "-c", _NAMESPACE_SCRIPT, "sh", str(tree_path),
        *qemu_args(name, uuid, vcpus, mem_mb),
    ]  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix=f"kvmfleet-qemu-{os.getpid()}-"))
    stderr_path = workdir / "qemu.stderr"
    stdout_path = workdir / "qemu.stdout"
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            close_fds=True,
            preexec_fn=_set_pdeathsig,  # the test process is single-threaded
        )
    proc = QemuProcess(
        popen,
        tree=tree_path,
        name=name,
        uuid=uuid,
        vcpus=vcpus,
        mem_mb=mem_mb,
        argv=argv,
        workdir=workdir,
    )
    try:
        proc.wait_ready(timeout)
    except BaseException:
        with contextlib.suppress(Exception):
            proc.stop()
        raise
    return proc
