"""Start a guest VMM process from Python (:func:`launch`; fleets of them: ``tests/support/guestfleet.py``).

Each VM is a child process ``sys.executable -m kvmfleet.guestvmm vm -name guest=NAME -uuid UUID ...``
that reports readiness on a private pipe. Typical use::

    with launch("t1", vcpus=4, workload="halt", loops=1000) as guest:
        info = guest.wait_ready(timeout=10)   # {"pid": ..., "state": "done", "stats_fds": {...}, ...}
        ...                                   # read its stats
    # leaving the block sends SIGTERM and reaps the process (SIGKILL after a grace period)
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import stat
import subprocess
import sys
import time
import uuid as uuidlib
from types import TracebackType
from typing import Any

from . import guests
from .vm import STATS_FDS_CHOICES

# UUIDs of launched VMs are uuid5(GUEST_UUID_NAMESPACE, name): the same name always gets the same UUID.
GUEST_UUID_NAMESPACE = uuidlib.UUID("6d1f3f0e-4b7a-5c2e-9a43-6b766d666c74")


class GuestVMMError(RuntimeError):
    """A guest VMM process failed to start or to become ready (the message carries its stderr)."""


def guest_uuid(name: str) -> str:
    """The deterministic UUID :func:`launch` gives a VM called ``name``."""
    return str(uuidlib.uuid5(GUEST_UUID_NAMESPACE, name))


def vm_command(
    name: str,
    *,
    uuid: str,
    vcpus: int,
    workload: str,
    loops: int,
    stats_fds: str = "all",
    ready_fd: int | None = None,
    exit_after_done: bool = False,
    die_with_parent: bool = False,
    python: str | None = None,
) -> list[str]:
    """The argv of one VM child process (QEMU-style ``-name guest=NAME -uuid UUID`` included)."""
    argv = [
        python or sys.executable,
        "-S",  # no site: the VMM is stdlib-only and found through PYTHONPATH (see child_env)
        "-m",
        "kvmfleet.guestvmm",
        "vm",
        "-name",
        f"guest={name}",
        "-uuid",
        uuid,
        "--vcpus",
        str(vcpus),
        "--workload",
        workload,
        "--loops",
        str(loops),
        "--stats-fds",
        stats_fds,
    ]
    if ready_fd is not None:
        argv += ["--ready-fd", str(ready_fd)]
    if exit_after_done:
        argv.append("--exit-after-done")
    if die_with_parent:
        argv.append("--die-with-parent")
    return argv


# The directory that holds the kvmfleet package (``plugins/`` in the source tree, or site-packages).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a VM child: ``base`` (default os.environ) with PACKAGE_ROOT first in PYTHONPATH.

    Children run ``python -S`` (no ``site``: about 6 ms less per VM, which counts when a fleet starts
    hundreds of them); the VMM needs only the stdlib and this package, which PYTHONPATH provides.
    Compiling the VMM's modules costs a child about 25 ms more than loading them: when ``base`` sets
    PYTHONDONTWRITEBYTECODE (to keep the source tree clean), children get a private
    PYTHONPYCACHEPREFIX instead, so the tree stays clean and the bytecode is still cached.
    """
    env = dict(os.environ if base is None else base)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = PACKAGE_ROOT + (os.pathsep + old if old else "")
    if env.get("PYTHONDONTWRITEBYTECODE") and not env.get("PYTHONPYCACHEPREFIX"):
        cache = _private_pycache_dir()
        if cache is not None:
            del env["PYTHONDONTWRITEBYTECODE"]
            env["PYTHONPYCACHEPREFIX"] = cache
    return env


def _private_pycache_dir() -> str | None:
    """A bytecode cache directory only this user can write (None if it cannot be had safely)."""
    path = os.path.join(os.environ.get("TMPDIR") or "/tmp", f"kvmfleet-guestvmm-pycache-{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        return None  # someone else's, a symlink, or writable by others: do not load bytecode from it
    return path


def check_args(vcpus: int, workload: str, loops: int, stats_fds: str) -> None:
    if workload not in guests.WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(guests.WORKLOADS)}")
    if stats_fds not in STATS_FDS_CHOICES:
        raise ValueError(f"stats_fds must be one of {', '.join(STATS_FDS_CHOICES)}, not {stats_fds!r}")
    if vcpus < 1 or loops < 0:
        raise ValueError("vcpus must be >= 1 and loops >= 0")


class GuestProcess:
    """One running guest VMM process. Use :meth:`wait_ready`, then :meth:`stop` (or a ``with`` block)."""

    def __init__(self, popen: subprocess.Popen[bytes], ready_rfd: int, name: str, uuid: str) -> None:
        self.popen = popen
        self.name = name
        self.uuid = uuid
        self.info: dict[str, Any] | None = None
        self._ready_rfd: int | None = ready_rfd
        self._buf = b""
        self._terminated = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def fileno(self) -> int:
        """The ready pipe (for selectors); -1 once the ready line has been read."""
        return -1 if self._ready_rfd is None else self._ready_rfd

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for the ready line and return it parsed; GuestVMMError if the VMM fails or times out."""
        deadline = time.monotonic() + timeout
        while self.info is None:
            if self._ready_rfd is None:
                raise GuestVMMError(self._failure("was stopped before it was ready"))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestVMMError(f"guest {self.name} (pid {self.pid}) not ready after {timeout:g} s")
            with selectors.DefaultSelector() as sel:
                sel.register(self.fileno(), selectors.EVENT_READ)
                if sel.select(remaining):
                    self._read_ready()
        info: dict[str, Any] = self.info
        return info

    def _read_ready(self) -> None:
        """Read what the ready pipe has; parse the line when complete. Raises on EOF without a line."""
        assert self._ready_rfd is not None
        chunk = os.read(self._ready_rfd, 65536)
        self._buf += chunk
        if b"\n" in self._buf:
            line = self._buf.split(b"\n", 1)[0]
            self._close_ready()
            try:
                self.info = json.loads(line)
            except ValueError:
                raise GuestVMMError(f"guest {self.name}: bad ready line {line!r}") from None
        elif not chunk:
            self._close_ready()
            raise GuestVMMError(self._failure("exited before it was ready"))

    def _failure(self, what: str) -> str:
        try:
            _, err = self.popen.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            _, err = self.popen.communicate()
        detail = (err or b"").decode(errors="replace").strip()
        rc = self.popen.returncode
        return f"guest {self.name} (pid {self.pid}) {what} (exit status {rc})" + (f": {detail}" if detail else "")

    def _close_ready(self) -> None:
        if self._ready_rfd is not None:
            os.close(self._ready_rfd)
            self._ready_rfd = None

    def terminate(self) -> None:
        """Send SIGTERM once (no wait); later calls do nothing."""
        if not self._terminated and self.popen.poll() is None:
            self._terminated = True
            self.popen.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        self._cleanup()

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, wait up to ``timeout`` s (then SIGKILL); returns the exit status."""
        self.terminate()
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            rc = self.popen.wait()
        self._cleanup()
        return rc

    def _cleanup(self) -> None:
        self._close_ready()
        if self.popen.stderr is not None:
            self.popen.stderr.close()

    def __enter__(self) -> GuestProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<GuestProcess {self.name} pid={self.pid} rc={self.popen.poll()}>"


def launch(
    name: str,
    vcpus: int = 1,
    workload: str = "halt",
    loops: int = 1,
    stats_fds: str = "all",
    *,
    uuid: str | None = None,
    exit_after_done: bool = False,
    die_with_parent: bool = False,
    python: str | None = None,
    env: dict[str, str] | None = None,
) -> GuestProcess:
    """Start one VM process and return at once; call :meth:`GuestProcess.wait_ready` next.

    ``env`` is the child's environment (default: this process's), passed through :func:`child_env`.
    ``uuid`` defaults to :func:`guest_uuid` of ``name``. ``die_with_parent`` makes the kernel send
    SIGTERM to the VM when the *thread* that launched it exits (PR_SET_PDEATHSIG).
    """
    check_args(vcpus, workload, loops, stats_fds)
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    try:
        argv = vm_command(
            name,
            uuid=uuid or guest_uuid(name),
            vcpus=vcpus,
            workload=workload,
            loops=loops,
            stats_fds=stats_fds,
            ready_fd=wfd,
            exit_after_done=exit_after_done,
            die_with_parent=die_with_parent,
            python=python,
        )
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=(wfd,),
            env=child_env(env),
        )
    except BaseException:
        os.close(rfd)
        raise
    finally:
        os.close(wfd)
    return GuestProcess(popen, rfd, name, uuid or guest_uuid(name))
