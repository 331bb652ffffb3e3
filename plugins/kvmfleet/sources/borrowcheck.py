"""What a stats fd borrowed from a VMM must be before the collector reads it.

The VMM's fd table is read (``/proc/<pid>/fd``) before ``pidfd_getfd`` duplicates fd N, so a process
that swaps fd N in between hands the root collector whatever it likes: a FIFO, a file crafted to
crash the parser or to forge counters. So the fd actually held is checked, once, when borrowed: its
own link in ``/proc/self/fd`` must be the KVM stats anon inode the VMM's link named (no process can
give a file that name), its layout one the kernel makes (:mod:`kvmfleet.binstats`), and its id must
name a VM, or the vCPU the link named.
"""

from __future__ import annotations

import os
import re

from ..binstats import StatsFormatError, StatsLayout, read_layout
from ..procfs import KvmFd
from ..textsafe import for_terminal, shortened

_STATS_ID = re.compile(r"kvm-\d+(?:/vcpu-(\d+))?\Z")  # kvm-<pid>, kvm-<pid>/vcpu-<id> (virt/kvm/kvm_main.c)


class BorrowRejected(Exception):
    """The borrowed fd is not the stats fd it was listed as; ``kind`` (link, layout, id) groups reasons."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


def expected_link(kfd: KvmFd) -> str:
    """What readlink must show for a VM or vCPU stats fd (the kernel names them; nobody else can)."""
    return "anon_inode:kvm-vm-stats" if kfd.kind == "vm-stats" else f"anon_inode:kvm-vcpu-stats:{kfd.index}"


def verify_stats_fd(fd: int, kfd: KvmFd) -> StatsLayout:
    """The layout of ``fd`` (ours, borrowed as ``kfd``) if it is that stats fd; BorrowRejected otherwise."""
    want = expected_link(kfd)
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as err:
        raise BorrowRejected("link", f"its link is unreadable ({err})") from None
    if link != want:
        raise BorrowRejected("link", f"it is {for_terminal(shortened(link, 120))}, not {want}")
    try:
        layout = read_layout(fd)
    except (OSError, StatsFormatError) as err:
        raise BorrowRejected("layout", str(err)) from None
    match = _STATS_ID.match(layout.id)
    vcpu = None if match is None or match.group(1) is None else int(match.group(1))
    if match is None or vcpu != (kfd.index if kfd.kind == "vcpu-stats" else None):
        raise BorrowRejected("id", f"its stats id '{for_terminal(shortened(layout.id, 80))}' does not fit {want}")
    return layout
