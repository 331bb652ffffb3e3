"""A real libvirtd (and virtlogd) for tests, and small real KVM domains under it (stdlib only).

:class:`Libvirtd` starts ``virtlogd -d`` and ``libvirtd -d`` unless they already run, and stops only
the daemons it started (by the pid in their pid file). libvirtd without systemd needs the setup that
``scripts/install-deps`` makes (users, dirs, ``/etc/libvirt/qemu.conf``). :meth:`Libvirtd.domain`
defines and starts a ``<domain type='kvm'>`` with 64 MiB, N vCPUs, no disk and SeaBIOS, and every
domain it made is destroyed and undefined at :meth:`Libvirtd.close`, whatever happened.

Needs root and ``/dev/kvm``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid as uuidlib
from dataclasses import dataclass
from types import TracebackType

URI = "qemu:///system"
DAEMONS = {"virtlogd": "/run/virtlogd.pid", "libvirtd": "/run/libvirtd.pid"}
SOCKET = "/run/libvirt/libvirt-sock"

DOMAIN_XML = """<domain type='kvm'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>{vcpus}</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <on_poweroff>destroy</on_poweroff>
  <on_crash>destroy</on_crash>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>
"""


def virsh(*args: str, check: bool = True, timeout: float = 60) -> str:
    done = subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"virsh {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _running_pid(name: str) -> int | None:
    """The pid in the daemon's pid file, if that process is alive and is the daemon."""
    try:
        with open(DAEMONS[name]) as handle:
            pid = int(handle.read().strip())
        with open(f"/proc/{pid}/comm") as handle:
            return pid if handle.read().strip() == name else None
    except (OSError, ValueError):
        return None


def domstats(name: str, *groups: str) -> dict[str, int]:
    """``virsh domstats --<group>... NAME`` as {key: int}; booleans (yes/no) as 1/0, other text left out."""
    out: dict[str, int] = {}
    for line in virsh("domstats", *(f"--{g}" for g in groups), name).splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep:
            continue
        if value in ("yes", "no"):
            out[key] = int(value == "yes")
        elif value.lstrip("-").isdigit():
            out[key] = int(value)
    return out


@dataclass
class Domain:
    name: str
    uuid: str
    vcpus: int

    @property
    def pid(self) -> int:
        with open(f"/run/libvirt/qemu/{self.name}.pid") as handle:
            return int(handle.read().strip())

    def suspend(self) -> None:
        virsh("suspend", self.name)

    def resume(self) -> None:
        virsh("resume", self.name)


class Libvirtd:
    def __init__(self) -> None:
        for tool in ("libvirtd", "virtlogd", "virsh"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} not found: run scripts/install-deps (Debian's libvirt-daemon, "
                                   f"libvirt-daemon-driver-qemu, libvirt-clients)")
        self.started: dict[str, int] = {}  # daemon -> pid, only those this object started
        self.domains: list[Domain] = []

    @property
    def owned(self) -> bool:
        """Whether this object started libvirtd (only then may a test stop it)."""
        return "libvirtd" in self.started

    def start(self, timeout: float = 30) -> None:
        for name in DAEMONS:
            if _running_pid(name) is None:
                subprocess.run([name, "-d"], check=True, timeout=timeout)
                deadline = time.monotonic() + timeout
                while (pid := _running_pid(name)) is None:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name} -d did not start (see /var/log/libvirt/{name}.log)")
                    time.sleep(0.05)
                self.started[name] = pid
        deadline = time.monotonic() + timeout
        while subprocess.run(["virsh", "-c", URI, "version"], capture_output=True, timeout=timeout).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError("libvirtd does not answer on qemu:///system (see /var/log/libvirt/libvirtd.log)")
            time.sleep(0.1)

    def stop_libvirtd(self, timeout: float = 30) -> None:
        """Stop the libvirtd this object started (its domains keep running, as with any libvirtd restart)."""
        pid = self.started.pop("libvirtd")
        self._stop(pid, timeout)

    def _stop(self, pid: int, timeout: float) -> None:
        """SIGTERM, SIGKILL after ``timeout``; returns once the process is gone (RuntimeError if it stays)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + timeout
            while os.path.exists(f"/proc/{pid}"):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            else:
                return
        raise RuntimeError(f"pid {pid} still runs {timeout:g} s after SIGKILL")

    def domain(self, name: str, vcpus: int = 1) -> Domain:
        dom = Domain(name, str(uuidlib.uuid4()), vcpus)
        xml = DOMAIN_XML.format(name=name, uuid=dom.uuid, vcpus=vcpus)
        path = f"/tmp/{name}.xml"
        with open(path, "w") as handle:
            handle.write(xml)
        try:
            virsh("define", path)
        finally:
            os.unlink(path)
        self.domains.append(dom)
        virsh("start", name)
        return dom

    def remove(self, dom: Domain) -> None:
        if _running_pid("libvirtd") is None:
            self.start()  # a test stopped it: domains are only removed through it
        virsh("destroy", dom.name, check=False)
        virsh("undefine", dom.name, check=False)
        if dom in self.domains:
            self.domains.remove(dom)

    def close(self) -> None:
        for dom in list(self.domains):
            self.remove(dom)
        for name in reversed(list(self.started)):
            self._stop(self.started.pop(name), 30)

    def __enter__(self) -> Libvirtd:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
