"""The guest VMM on real KVM: exact counters, fds it holds, lifecycle, fleet, errors.

Stats are read the way a collector reads them: the VMM process holds its stats fds; the test borrows
them with pidfd_open + pidfd_getfd (root) and parses them with kvmfleet.binstats.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.support.guestfleet import launch_fleet
from tests.support.waiting import wait_for

from kvmfleet import binstats
from kvmfleet.guestvmm import (
    GuestVMMError,
    detect_backend,
    expected_counts,
    expected_vm_counts,
    guest_uuid,
    guests,
    launch,
    minimum_counts,
)
from kvmfleet.guestvmm.__main__ import UsageError, _json_str, parse_args
from kvmfleet.guestvmm.launcher import child_env, vm_command
from kvmfleet.guestvmm.vm import GuestVM, install_kick_handler

pytestmark = pytest.mark.kvm

# run as a script, as the demo and molecule run it inside a simulated hypervisor
GUESTFLEET = str(Path(__file__).resolve().parents[1] / "support" / "guestfleet.py")

_libc = ctypes.CDLL(None, use_errno=True)
SYS_PIDFD_GETFD = 438


def borrow(pid: int, fd: int) -> int:
    """A copy of fd ``fd`` of process ``pid`` (pidfd_getfd: root / ptrace rights)."""
    pidfd = os.pidfd_open(pid)
    try:
        got = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd({pid}, {fd}): {os.strerror(err)}")
        return int(got)
    finally:
        os.close(pidfd)


def read_stats(pid: int, info: dict) -> dict[str, dict]:
    """{"vm": stats, "vcpu0": stats, ...} of a ready guest, through the stats fds it holds."""
    out = {}
    for label, fd in info["stats_fds"].items():
        mine = borrow(pid, fd)
        try:
            layout = binstats.read_layout(mine)
            expect_id = f"kvm-{pid}" if label == "vm" else f"kvm-{pid}/vcpu-{int(label[4:])}"
            assert layout.id == expect_id
            out[label] = layout.read(mine)
        finally:
            os.close(mine)
    return out


def fd_links(pid: int) -> list[str]:
    links = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            links.append(os.readlink(f"/proc/{pid}/fd/{name}"))
    return links


def wait_gone(path: str, timeout: float = 2.0) -> None:
    wait_for(f"{path} to be gone", lambda: not os.path.exists(path), timeout, every=0.01)


def kvm_debugfs_dirs(pid: int) -> list[str]:
    """The VM directories KVM lists for ``pid`` (listing works even under lockdown)."""
    try:
        return [d for d in os.listdir("/sys/kernel/debug/kvm") if d.startswith(f"{pid}-")]
    except OSError:
        return []


# --- exact counts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vcpus", [1, 4])
@pytest.mark.parametrize("loops", [1, 1000])
@pytest.mark.parametrize("workload", ["halt", "mmio"])
def test_exact_counts_per_vcpu(workload: str, loops: int, vcpus: int) -> None:
    with launch(f"t-exact-{workload}-{loops}-{vcpus}", vcpus, workload, loops) as guest:
        info = guest.wait_ready(30)
        assert info["state"] == "done" and info["pid"] == guest.pid
        stats = read_stats(guest.pid, info)
        time.sleep(0.05)
        again = read_stats(guest.pid, info)
    want = expected_counts(workload, loops)
    assert want[f"{workload}_exits"] == loops
    floor = minimum_counts(workload, loops)
    assert sorted(stats) == sorted(["vm"] + [f"vcpu{i}" for i in range(vcpus)])
    for i in range(vcpus):
        vcpu = stats[f"vcpu{i}"]
        assert {k: vcpu[k] for k in want} == want, f"vcpu{i}"
        assert vcpu["exits"] >= floor["exits"]
        # done: the VMM no longer enters KVM_RUN, so the exact counters stay put
        assert {k: again[f"vcpu{i}"][k] for k in want} == want
    vm_want = expected_vm_counts(workload, loops, vcpus)
    assert {k: stats["vm"][k] for k in vm_want} == vm_want


def test_pio_exits_to_userspace_but_io_exits_as_measured() -> None:
    loops = 500
    with launch("t-pio", 2, "pio", loops) as guest:
        info = guest.wait_ready(30)
        stats = read_stats(guest.pid, info)
    want = expected_counts("pio", loops)
    for i in range(2):
        vcpu = stats[f"vcpu{i}"]
        assert {k: vcpu[k] for k in want} == want
        assert vcpu["exits"] >= loops + 1  # the N outs and the done out each exit to userspace
    if detect_backend() == "pvm":
        assert all(stats[f"vcpu{i}"]["io_exits"] == 0 for i in range(2))  # emulator path: not counted


def test_paging_moves_shadow_paging_counters() -> None:
    loops, vcpus = 20000, 2
    with launch("t-paging", vcpus, "paging", loops) as guest:
        info = guest.wait_ready(60)
        stats = read_stats(guest.pid, info)
    assert stats["vm"]["mmu_pte_write"] >= loops * vcpus
    for i in range(vcpus):
        assert stats[f"vcpu{i}"]["invlpg"] >= loops
        want = expected_counts("paging", loops)
        assert {k: stats[f"vcpu{i}"][k] for k in want} == want
    vm_want = expected_vm_counts("paging", loops, vcpus)
    assert {k: stats["vm"][k] for k in vm_want} == vm_want


def test_idle_vm_holds_fds_and_moves_nothing() -> None:
    with launch("t-idle", 3, "idle", 1) as guest:
        info = guest.wait_ready(30)
        assert info["state"] == "idle"
        stats = read_stats(guest.pid, info)
    want = expected_counts("idle", 1)
    for i in range(3):
        assert {k: stats[f"vcpu{i}"][k] for k in want} == want


@pytest.mark.parametrize("workload", ["halt", "paging"])
def test_loops_zero_runs_until_sigterm(workload: str) -> None:
    guest = launch(f"t-forever-{workload}", 2, workload, 0)
    try:
        info = guest.wait_ready(30)
        assert info["state"] == "running" and info["loops"] == 0
        counter = "halt_exits" if workload == "halt" else "invlpg"

        def count() -> int:
            return int(read_stats(guest.pid, info)["vcpu0"][counter])

        first = wait_for(f"vCPU 0's {counter} to count", count, 10, every=0.02)
        second = wait_for(f"vCPU 0's {counter} to count on past {first}", count, 10, every=0.02,
                          until=lambda n: n > first)
        assert second > first > 0
        start = time.monotonic()
        guest.terminate()
        rc = guest.popen.wait(5)
        assert time.monotonic() - start < 1.0
        assert rc == 0
    finally:
        guest.kill()


# --- fds -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["all", "vcpu", "none"])
def test_proc_fd_links_follow_stats_fds_mode(mode: str) -> None:
    with launch(f"t-fds-{mode}", 3, "halt", 5, stats_fds=mode) as guest:
        info = guest.wait_ready(30)
        links = fd_links(guest.pid)
    vm_stats = [x for x in links if x == "anon_inode:kvm-vm-stats"]
    vcpu_stats = sorted(x for x in links if x.startswith("anon_inode:kvm-vcpu-stats:"))
    # exactly one fd per vCPU, like QEMU (the kvm_run page is mapped without keeping a dup of the fd)
    assert sorted(x for x in links if x.startswith("anon_inode:kvm-vcpu:")) == [
        f"anon_inode:kvm-vcpu:{i}" for i in range(3)
    ]
    assert links.count("anon_inode:kvm-vm") == 1 and links.count("/dev/kvm") == 1
    if mode == "all":
        assert len(vm_stats) == 1
        assert vcpu_stats == [f"anon_inode:kvm-vcpu-stats:{i}" for i in range(3)]
        assert sorted(info["stats_fds"]) == ["vcpu0", "vcpu1", "vcpu2", "vm"]
    elif mode == "vcpu":
        assert vm_stats == []
        assert vcpu_stats == [f"anon_inode:kvm-vcpu-stats:{i}" for i in range(3)]
        assert sorted(info["stats_fds"]) == ["vcpu0", "vcpu1", "vcpu2"]
    else:
        assert vm_stats == [] and vcpu_stats == [] and info["stats_fds"] == {}


def test_command_line_carries_qemu_style_identity() -> None:
    with launch("t-ident", 1, "idle", 1, uuid="0c6a8a7e-1f2b-4c3d-8e9f-a0b1c2d3e4f5") as guest:
        guest.wait_ready(30)
        with open(f"/proc/{guest.pid}/cmdline", "rb") as fp:
            argv = fp.read().split(b"\0")
    i = argv.index(b"-name")
    assert argv[i + 1] == b"guest=t-ident"
    j = argv.index(b"-uuid")
    assert argv[j + 1] == b"0c6a8a7e-1f2b-4c3d-8e9f-a0b1c2d3e4f5"
    assert b"kvmfleet.guestvmm" in argv


# --- lifecycle -------------------------------------------------------------------------------------------


def test_sigkill_leaves_nothing_behind() -> None:
    guest = launch("t-sigkill", 4, "halt", 0)
    info = guest.wait_ready(30)
    pid = guest.pid
    assert kvm_debugfs_dirs(pid) or not os.path.isdir("/sys/kernel/debug/kvm")
    fd = borrow(pid, info["stats_fds"]["vcpu0"])
    os.close(fd)  # a borrowed fd would pin the VM: close it
    guest.kill()
    assert guest.returncode == -signal.SIGKILL
    wait_gone(f"/proc/{pid}")
    # the VM itself is gone from the kernel
    wait_for(f"KVM to drop the debugfs directories of pid {pid}", lambda: kvm_debugfs_dirs(pid), 2, every=0.01,
             until=lambda dirs: dirs == [])


def test_sigterm_exits_within_a_second_holding_done_vm() -> None:
    guest = launch("t-sigterm", 4, "mmio", 100)
    try:
        guest.wait_ready(30)
        start = time.monotonic()
        rc = guest.stop(timeout=5)
        assert time.monotonic() - start < 1.0
        assert rc == 0
    finally:
        guest.kill()


def test_sigint_exits_cleanly() -> None:
    guest = launch("t-sigint", 2, "halt", 0)
    try:
        guest.wait_ready(30)
        guest.popen.send_signal(signal.SIGINT)
        assert guest.popen.wait(1.0) == 0
    finally:
        guest.kill()


def test_exit_after_done() -> None:
    guest = launch("t-exit", 2, "halt", 10, exit_after_done=True)
    try:
        assert guest.wait_ready(30)["state"] == "done"
        assert guest.popen.wait(5) == 0
    finally:
        guest.kill()


def test_fleet_of_20_starts_and_stops() -> None:
    with launch_fleet(20, 2, "halt", 100, name_prefix="t-fleet") as fleet:
        infos = fleet.wait_ready(120)
        assert [i["name"] for i in infos] == [f"t-fleet-{n:03d}" for n in range(20)]
        assert [i["uuid"] for i in infos] == [guest_uuid(f"t-fleet-{n:03d}") for n in range(20)]
        assert [i["pid"] for i in infos] == fleet.pids
        assert {i["state"] for i in infos} == {"done"}
        pids = fleet.pids
    assert all(m.returncode == 0 for m in fleet.members)
    assert all(not os.path.exists(f"/proc/{pid}") for pid in pids)


def test_fleet_command_line() -> None:
    env = child_env()
    proc = subprocess.Popen(
        [sys.executable, GUESTFLEET, "--vms", "3", "--vcpus", "2", "--workload", "mmio", "--loops", "50",
         "--name-prefix", "t-cli-fleet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = json.loads(proc.stdout.readline())
        assert line["vms"] == 3 and line["names"] == [f"t-cli-fleet-{n:03d}" for n in range(3)]
        for pid in line["pids"]:
            with open(f"/proc/{pid}/cmdline", "rb") as fp:
                assert b"guest=t-cli-fleet-" in fp.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        for pid in line["pids"]:
            wait_gone(f"/proc/{pid}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ready_file_and_stdout(tmp_path) -> None:
    path = tmp_path / "ready.json"
    argv = vm_command("t-file", uuid="u-1", vcpus=1, workload="halt", loops=3, exit_after_done=True)
    rc = subprocess.run([*argv, "--ready-file", str(path)], env=child_env(), timeout=30).returncode
    assert rc == 0
    info = json.loads(path.read_text())
    assert (info["name"], info["uuid"], info["loops"], info["state"]) == ("t-file", "u-1", 3, "done")
    assert list(tmp_path.iterdir()) == [path]  # no temp file left
    out = subprocess.run(argv, env=child_env(), timeout=30, capture_output=True, text=True)
    assert out.returncode == 0
    assert json.loads(out.stdout)["vcpus"] == 1


# --- errors ----------------------------------------------------------------------------------------------


def run_vm_cli(*extra: str, **kwargs) -> subprocess.CompletedProcess[str]:
    argv = vm_command("t-err", uuid="u", vcpus=1, workload="halt", loops=1, exit_after_done=True)
    return subprocess.run([*argv, *extra], env=child_env(), timeout=30, capture_output=True, text=True, **kwargs)


def test_missing_kvm_device_is_one_line_exit_2() -> None:
    res = run_vm_cli("--kvm-device", "/nonexistent/kvm")
    assert res.returncode == 2
    assert res.stderr == "kvmfleet-guestvmm: open /nonexistent/kvm: No such file or directory (ENOENT)\n"


def test_not_a_kvm_device_names_the_ioctl() -> None:
    res = run_vm_cli("--kvm-device", "/dev/null")
    assert res.returncode == 2
    assert res.stderr.startswith("kvmfleet-guestvmm: KVM_GET_API_VERSION: ")
    assert res.stderr.count("\n") == 1


def test_eacces_is_one_line_exit_2(tmp_path) -> None:
    """A device the VMM may not open (here a root-only file, run as nobody): EACCES, named step."""
    device = tmp_path / "kvm"
    device.write_bytes(b"")
    device.chmod(0o600)
    res = run_vm_cli("--kvm-device", str(device), user=65534)
    assert res.returncode == 2
    assert res.stderr == f"kvmfleet-guestvmm: open {device}: Permission denied (EACCES)\n"


def test_too_many_vcpus_is_refused_by_a_named_step() -> None:
    res = run_vm_cli("--vcpus", "100000")
    assert res.returncode == 2
    assert res.stderr.startswith("kvmfleet-guestvmm: KVM_CHECK_EXTENSION: 100000 vCPUs requested")


def test_launch_failure_raises_with_exit_status() -> None:
    broken = launch("t-fail", 1, "halt", 1, python="/bin/false")  # exits at once, no ready line
    try:
        with pytest.raises(GuestVMMError, match=r"t-fail .*exited before it was ready \(exit status 1\)"):
            broken.wait_ready(10)
    finally:
        broken.stop()


def test_fleet_wait_ready_fails_fast_when_a_member_dies() -> None:
    fleet = launch_fleet(3, 1, "halt", 1, name_prefix="t-fleetfail")
    try:
        fleet.members[1].kill()
        start = time.monotonic()
        with pytest.raises(GuestVMMError):
            fleet.wait_ready(30)
        assert time.monotonic() - start < 10
    finally:
        fleet.stop()


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (b"\xe4\x10", "KVM_RUN vcpu 0: unexpected port I/O: in port 0x10 size 1"),  # in al, 0x10
        (b"\xf4", "KVM_RUN vcpu 0: unexpected exit HLT (5)"),  # hlt, in the mmio workload
    ],
)
def test_vcpu_failure_is_reported(monkeypatch, code: bytes, message: str) -> None:
    """A guest doing what its workload does not: the VMM names the step and the exit (in-process VM)."""
    monkeypatch.setattr(guests, "guest_code", lambda workload: code)
    install_kick_handler()
    vm = GuestVM(vcpus=1, workload="mmio", loops=1)
    try:
        vm.setup()
        vm.start()
        wait_for("the vCPU's error", lambda: vm.error, 10, every=0.01)
        assert vm.error == message
    finally:
        vm.stop()
        vm.close()


def test_in_process_vm_reads_its_own_stats() -> None:
    """The VMM itself may read its stats fds (it owns the VM)."""
    install_kick_handler()
    vm = GuestVM(vcpus=2, workload="mmio", loops=300)
    try:
        vm.setup()
        vm.start()
        wait_for("every vCPU done (or an error)", lambda: vm.all_done or vm.error is not None, 10, every=0.01)
        assert vm.all_done and vm.error is None, vm.error
        for runner in vm.vcpu_runners:
            assert runner.exit_counts == {"MMIO": 300, "IO": 1}  # as seen by userspace
            assert runner.stats_fd is not None
            stats = binstats.read_layout(runner.stats_fd).read(runner.stats_fd)
            assert stats["mmio_exits"] == 300
    finally:
        assert vm.stop()
        vm.close()


# --- pure parts ------------------------------------------------------------------------------------------


def test_cli_parsing() -> None:
    opts = parse_args(["vm", "-name", "guest=a,debug-threads=on", "-uuid", "u", "--vcpus=3", "--loops", "0"])
    assert (opts.name, opts.uuid, opts.vcpus, opts.loops, opts.workload) == ("a", "u", 3, 0, "halt")
    for bad in (
        [],
        ["vm", "-name", "guest=a"],
        ["vm", "-name", "guest=a", "-uuid", "u", "--vcpus", "0"],
        ["vm", "-name", "guest=a", "-uuid", "u", "--workload", "nope"],
        ["vm", "-name", "guest=a", "-uuid", "u", "--ready-fd", "3", "--ready-file", "x"],
        ["vm", "-name", "guest=a", "-uuid", "u", "--vms", "3"],
        ["vm", "-name", "guest=a", "-uuid", "u", "--loops", "0", "--exit-after-done"],
        ["vm", "-name", "guest=", "-uuid", "u"],
        ["fleet", "--vcpus", "2"],
    ):
        with pytest.raises(UsageError):
            parse_args(bad)


@pytest.mark.parametrize("text", ["plain", 'q"uote\\back', "tab\tnl\n", "é☃", "\U0001f600", "\x7f\x00"])
def test_json_str_is_json(text: str) -> None:
    assert json.loads(_json_str(text)) == text


def test_guest_code_jumps_back_to_the_loop_start() -> None:
    for workload in ("halt", "mmio", "pio", "paging"):
        code = guests.guest_code(workload)
        assert code.endswith(b"\xe6" + bytes([guests.DONE_PORT]) + b"\xeb\xfc")
        # both short jnz's land on offset 0
        positions = [i for i in range(len(code) - 1) if code[i] == 0x75]
        for pos in positions[-2:]:
            assert pos + 2 + int.from_bytes(code[pos + 1 : pos + 2], "little", signed=True) == 0
    assert guests.guest_code("idle") == b""


def test_expected_counts_table() -> None:
    pvm = {
        "halt": {"halt_exits": 7, "mmio_exits": 0, "io_exits": 0, "insn_emulation": 36, "fpu_reload": 8,
                 "invlpg": 0},
        "mmio": {"halt_exits": 0, "mmio_exits": 7, "io_exits": 0, "insn_emulation": 36, "fpu_reload": 8,
                 "invlpg": 0},
        "pio": {"halt_exits": 0, "mmio_exits": 0, "io_exits": 0, "insn_emulation": 36, "fpu_reload": 8,
                "invlpg": 0},
        "paging": {"halt_exits": 0, "mmio_exits": 0, "io_exits": 0, "insn_emulation": 57, "fpu_reload": 1,
                   "invlpg": 7},
    }  # fmt: skip
    for workload, want in pvm.items():
        assert expected_counts(workload, 7, backend="pvm") == want
    assert expected_counts("halt", 7, backend="vmx") == {"halt_exits": 7, "mmio_exits": 0}
    assert expected_counts("paging", 7, backend="svm") == {}
    assert expected_vm_counts("paging", 7, 3, backend="pvm") == {"mmu_pte_write": 42}
    assert minimum_counts("halt", 7) == {"exits": 8}
    with pytest.raises(ValueError):
        expected_counts("halt", 0)
    with pytest.raises(ValueError):
        expected_counts("nope", 1)
