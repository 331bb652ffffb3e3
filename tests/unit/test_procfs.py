import errno
import os

import pytest

from kvmfleet import procfs
from kvmfleet.sources.statsfd import _group_by_vm


def fake_proc(tmp_path, pid, links, comm="qemu-system-x86", argv=(b"qemu-system-x86_64",)):
    p = tmp_path / str(pid)
    (p / "fd").mkdir(parents=True)
    for fd, target in links.items():
        os.symlink(target, p / "fd" / str(fd))
    # comm with spaces and parentheses must not shift the fields after it
    (p / "stat").write_text(f"{pid} ({comm} (x) y) S " + " ".join(["1"] * 18) + " 4242 0 0\n")
    (p / "cmdline").write_bytes(b"\0".join(argv) + b"\0")
    (p / "comm").write_text(comm + "\n")
    return str(tmp_path)


def test_kvm_fds_and_start_time(tmp_path):
    proc = fake_proc(tmp_path, 10, {
        3: "/dev/kvm", 4: "anon_inode:kvm-vm", 5: "anon_inode:kvm-vcpu:0", 6: "anon_inode:kvm-vcpu-stats:0",
        7: "anon_inode:kvm-vm-stats", 8: "anon_inode:[eventfd]", 12: "anon_inode:kvm-vcpu-stats:1",
        9: "socket:[123]",
    })
    assert procfs.kvm_fds(10, proc) == [
        procfs.KvmFd(4, "vm"), procfs.KvmFd(5, "vcpu", 0), procfs.KvmFd(6, "vcpu-stats", 0),
        procfs.KvmFd(7, "vm-stats"), procfs.KvmFd(12, "vcpu-stats", 1),
    ]
    assert procfs.start_time(10, proc) == 4242
    assert procfs.cmdline(10, proc) == ["qemu-system-x86_64"]
    assert procfs.comm(10, proc) == "qemu-system-x86"


def test_vanished_process(tmp_path):
    assert procfs.kvm_fds(99, str(tmp_path)) == []
    assert procfs.start_time(99, str(tmp_path)) is None
    assert procfs.cmdline(99, str(tmp_path)) == []


def test_stats_fds_group_under_the_nearest_vm_fd_below_them():
    fds = [procfs.KvmFd(4, "vm"), procfs.KvmFd(6, "vcpu-stats", 0), procfs.KvmFd(7, "vm-stats"),
           procfs.KvmFd(9, "vm"), procfs.KvmFd(11, "vcpu-stats", 0), procfs.KvmFd(12, "vm-stats")]
    vm_fds, owner = _group_by_vm(fds)
    assert vm_fds == [4, 9]
    assert owner == {6: 4, 7: 4, 11: 9, 12: 9}
    # a VMM that closed its VM fd but kept the stats fds: one VM, fd unknown (-1)
    assert _group_by_vm([procfs.KvmFd(5, "vcpu-stats", 0)]) == ([], {5: -1})


def test_status_fields_nspid_and_seccomp():
    fields = procfs.status_fields("Name:\tpython3\nNSpid:\t31227\t1\nSeccomp:\t2\nSeccomp_filters:\t3\nSeccomp:\t0\n"
                                  "no colon here\n")
    assert fields["Name"] == "python3" and fields["Seccomp"] == "2"  # the first of a repeated key wins
    assert procfs.parse_nspid(fields["NSpid"]) == (31227, 1)
    assert procfs.parse_nspid("") == () and procfs.parse_nspid("12 x") == ()
    assert procfs.parse_seccomp(fields) == (2, 3)
    assert procfs.parse_seccomp({"Seccomp": "0"}) == (0, None)  # Seccomp_filters came with Linux 5.9
    assert procfs.parse_seccomp({"Seccomp": "two"}) == (None, None)


def test_pid_namespace_by_its_inode_first_then_nspid(tmp_path):
    host, own, nested = procfs.PROC_PID_INIT_INO, 4026532180, (31227, 1)
    assert procfs.PidNamespace((4242,), host).host is True
    # a container with its own /proc: NSpid has one entry, only the inode tells
    assert procfs.PidNamespace((1,), own).host is False
    assert procfs.PidNamespace(nested, own).host is False
    assert procfs.PidNamespace(nested, None).host is False
    assert procfs.PidNamespace((1,), None).host is None and procfs.PidNamespace((), None).host is None
    assert procfs.PidNamespace((1,), own).describe() == ("NSpid 1 in /proc/self/status, /proc/self/ns/pid is "
                                                         "pid:[4026532180], the host's is pid:[4026531836]")
    (tmp_path / "self" / "ns").mkdir(parents=True)
    (tmp_path / "self" / "status").write_text("NSpid:\t7\n")
    os.symlink("pid:[4026532180]", tmp_path / "self" / "ns" / "pid")
    assert procfs.pid_namespace(str(tmp_path)) == procfs.PidNamespace((7,), own)
    assert procfs.pid_namespace(str(tmp_path / "none")) == procfs.PidNamespace((), None)


def test_this_process_pid_namespace_is_read():
    ns = procfs.pid_namespace()
    assert ns.nspid and ns.nspid[-1] == os.getpid() and ns.inode == os.stat("/proc/self/ns/pid").st_ino


def test_kvm_fds_lets_a_refused_link_through(tmp_path, monkeypatch):
    """Without ptrace read access the fd directory lists but its links do not read: that is no empty fd table."""
    proc = fake_proc(tmp_path, 10, {4: "anon_inode:kvm-vm"})

    def refused(path):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(os, "readlink", refused)
    with pytest.raises(PermissionError):
        procfs.kvm_fds(10, proc)
