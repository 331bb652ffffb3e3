"""Who a VM is: VMM kind, name and UUID, parsed from the VMM's command line."""

from __future__ import annotations

import os


def split_qemu_opts(value: str) -> list[str]:
    """Split a QEMU option string at single commas; ``,,`` stands for a literal comma."""
    parts, current, i = [], [], 0
    while i < len(value):
        char = value[i]
        if char == ",":
            if value[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    parts.append("".join(current))
    return parts


def _option(argv: list[str], *names: str) -> str | None:
    """The value of the last ``-opt VALUE`` or ``--opt=VALUE`` among ``names`` (QEMU: last one wins)."""
    found = None
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                found = argv[i + 1]
            elif arg.startswith(name + "="):
                found = arg[len(name) + 1 :]
    return found


def qemu_name(value: str) -> str | None:
    """``-name guest=NAME,debug-threads=on`` or ``-name NAME[,process=...]``."""
    for index, part in enumerate(split_qemu_opts(value)):
        key, sep, val = part.partition("=")
        if not sep and index == 0:
            return key or None  # the implied first key of -name is guest=
        if key == "guest":
            return val or None
    return None


def vmm_kind(argv: list[str], comm: str) -> str:
    exe = os.path.basename(argv[0]) if argv else ""
    joined = " ".join(argv[:6])  # interpreter, its flags, then -m MODULE
    if "qemu" in exe or comm.startswith("qemu"):
        return "qemu"
    if "firecracker" in exe or comm.startswith("firecracker"):
        return "firecracker"
    if "cloud-hypervisor" in exe or comm.startswith("cloud-hyperviso"):
        return "cloud-hypervisor"
    if "kvmfleet.guestvmm" in joined or "kvmfleet-guestvmm" in joined:
        return "kvmfleet-guestvmm"
    return comm or exe or "unknown"


def parse_identity(argv: list[str], comm: str, pid: int) -> tuple[str, str, str | None]:
    """(vmm kind, name, uuid) of a VMM; the name falls back to ``<comm>-<pid>``."""
    kind = vmm_kind(argv, comm)
    name: str | None = None
    uuid: str | None = None
    if kind in ("qemu", "kvmfleet-guestvmm"):
        raw = _option(argv, "-name", "--name")
        name = qemu_name(raw) if raw is not None else None
        uuid = _option(argv, "-uuid", "--uuid")
    elif kind == "firecracker":
        name = _option(argv, "--id")
    elif kind == "cloud-hypervisor":
        # cloud-hypervisor has no VM name option; its API socket path usually carries one
        socket = _option(argv, "--api-socket")
        if socket:
            path = next((p[5:] for p in socket.split(",") if p.startswith("path=")), socket)
            name = os.path.splitext(os.path.basename(path))[0] or None
    return kind, name or f"{comm or 'vmm'}-{pid}", uuid
