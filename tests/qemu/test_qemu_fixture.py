"""The QEMU 10 test fixture itself: a real QEMU from a trixie tree, with per-vCPU stats fds."""

from __future__ import annotations

import os
import uuid as uuidlib

import pytest
from tests.support.qemu import VCPU_STATS_RE, VM_STATS_LINK, ensure_trixie_qemu_tree, mounts_under, start_qemu

pytestmark = [pytest.mark.qemu, pytest.mark.kvm]


def _mount_table() -> list[str]:
    with open("/proc/self/mounts", encoding="utf-8") as f:
        return sorted(f.read().splitlines())


def _skip_without_kvm() -> None:
    # The only reason to skip: elsewhere a missing tree, missing root or a QEMU that does not
    # start must fail loudly (CI fails when kvm tests skip on a machine with /dev/kvm).
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm is absent")


def test_qemu_holds_one_stats_fd_per_vcpu_and_cleans_up() -> None:
    _skip_without_kvm()
    tree = ensure_trixie_qemu_tree()
    name = f"kvmfleet-fixture-{os.getpid()}"
    uuid = str(uuidlib.uuid4())
    mounts_before = _mount_table()

    with start_qemu(tree, name, uuid, vcpus=2) as qemu:
        pid = qemu.pid
        # The pid is QEMU's own, not a wrapper's.
        assert os.path.basename(os.readlink(f"/proc/{pid}/exe")) == "qemu-system-x86_64"
        cmdline = qemu.cmdline()
        assert f"guest={name},debug-threads=on" in cmdline
        assert cmdline[cmdline.index("-uuid") + 1] == uuid
        assert cmdline[cmdline.index("-smp") + 1] == "2"

        links = list(qemu.fd_links().values())
        stats = sorted(link for link in links if VCPU_STATS_RE.match(link))
        assert stats == ["anon_inode:kvm-vcpu-stats:0", "anon_inode:kvm-vcpu-stats:1"], links
        assert not [link for link in links if VM_STATS_LINK in link], links
        assert qemu.vcpu_stats_fds().keys() == {0, 1}

        # Its /proc and /dev mounts live in QEMU's private namespace only.
        assert mounts_under(tree) == []
        assert _mount_table() == mounts_before

    assert not qemu.is_running()
    assert not os.path.exists(f"/proc/{pid}")
    assert mounts_under(tree) == []
    assert _mount_table() == mounts_before
    assert not qemu.workdir.exists()
