"""A collector confined the way containers and hardened units confine it, on the real kernel (issue 13).

- A seccomp filter that refuses ``pidfd_getfd`` (systemd-nspawn's default): the reason names the filter, not
  CAP_SYS_PTRACE (tests/support/seccomp.py installs a real filter, then execs kvmfleet).
- CAP_SYS_PTRACE dropped (``setpriv``): the reason names the capability, not seccomp.
- A PID namespace of its own with its own /proc (``unshare --pid --fork --mount-proc``): debugfs, which names
  VMs by host pids, says it is unusable and why, never names a VM after the wrong process, and the selftest passes
  on statsfd. The inside guest gets the outside guest's pid number (tests/support/pidns.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from kvmfleet import procfs
from kvmfleet.facts import lockdown_mode
from kvmfleet.guestvmm import launch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECCOMP_REASON = ("pidfd_getfd is refused by a seccomp filter ({errno}; Seccomp: 2 in /proc/self/status, 1 filter): "
                  "allow it in the container/unit (systemd-nspawn --system-call-filter=pidfd_getfd, "
                  "SystemCallFilter=, podman --security-opt seccomp=...)")
CLI = [sys.executable, "-m", "kvmfleet.cli"]


def run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def under_filter(errno_name: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "tests.support.seccomp", "--errno", errno_name, "--", *argv])


def lockdown_tail(root: str = "/sys/kernel/debug/kvm") -> str:
    """What the debugfs reason adds after the PID-namespace reason on this machine."""
    mode = lockdown_mode()
    return f"; kernel lockdown ({mode}) also denies reading {root}" if mode in ("integrity", "confidentiality") else ""


@pytest.fixture(scope="module")
def outside_guest():
    """A VM to borrow from, started by this (unconfined) process."""
    with launch("t-confined-outside", vcpus=1, workload="halt", loops=5) as guest:
        guest.wait_ready(30)
        yield guest


# -- seccomp ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("errno_name", ["EPERM", "ENOSYS"])
def test_facts_under_a_seccomp_filter_name_the_filter_not_the_capability(outside_guest, errno_name):
    facts_run = under_filter(errno_name, [*CLI, "facts", "--json"])
    assert facts_run.returncode == 0, facts_run.stderr
    facts = json.loads(facts_run.stdout)
    reason = SECCOMP_REASON.format(errno=errno_name)
    assert (facts["seccomp"], facts["seccomp_filters"]) == ("filter", 1)
    assert (facts["pidfd_getfd_allowed"], facts["pidfd_getfd_reason"]) == (False, reason)
    assert facts["cap_sys_ptrace"] is True  # the capability is there: blaming it would send the operator astray
    assert facts["sources"]["statsfd"] == {"usable": False, "reason": reason}
    assert "CAP_SYS_PTRACE" not in reason and "Yama" not in reason


def test_selftest_under_a_seccomp_filter_says_why_statsfd_cannot_read():
    selftest = under_filter("EPERM", [*CLI, "selftest", "--json", "--loops", "50"])
    result = json.loads(selftest.stdout)
    checks = {check["source"]: check for check in result["checks"]}
    assert checks["statsfd"] == {"source": "statsfd", "status": "unusable", "detail": SECCOMP_REASON.format(
        errno="EPERM")}
    assert checks["release"]["status"] == "unusable"
    # debugfs is then the only way: it reads where there is no lockdown, and the selftest passes only then
    assert checks["debugfs"]["status"] in ("ok", "unusable")
    assert selftest.returncode == (0 if checks["debugfs"]["status"] == "ok" else 1), selftest.stdout
    if lockdown_mode() in ("integrity", "confidentiality"):
        assert checks["debugfs"]["status"] == "unusable" and not result["ok"]


def test_without_the_filter_borrowing_works(outside_guest):
    facts = json.loads(run([*CLI, "facts", "--json"]).stdout)
    assert (facts["seccomp"], facts["pidfd_getfd_allowed"], facts["pidfd_getfd_reason"]) == ("disabled", True, "")
    assert facts["sources"]["statsfd"]["usable"] is True
    assert re.fullmatch(r"\d+ VMs with stats fds", facts["sources"]["statsfd"]["reason"])


# -- CAP_SYS_PTRACE --------------------------------------------------------------------------------------------

DROP_PTRACE = ["setpriv", "--inh-caps=-sys_ptrace", "--bounding-set=-sys_ptrace", "--"]
READ_ONE = """
import json, sys
from kvmfleet.sources import StatsfdSource
with StatsfdSource(only_pids={int(sys.argv[1])}) as source:
    print(json.dumps([len(source.read()), source.usability().usable, source.usability().reason]))
"""


def cap_reason(pid: int, cap_eff: str) -> str:
    """Reading a VMM's /proc/<pid>/fd links needs ptrace read access, checked before pidfd_getfd: without
    CAP_SYS_PTRACE that is where it stops (Yama does not restrict reading)."""
    return (f"cannot read the fd links of pid {pid} (/proc/{pid}/fd): this process lacks CAP_SYS_PTRACE (CapEff "
            f"{cap_eff} in /proc/self/status), needed to reach a process with capabilities it lacks: give it back "
            "(podman --cap-add SYS_PTRACE, a unit's CapabilityBoundingSet=)")


def test_without_cap_sys_ptrace_the_capability_is_named_not_seccomp(outside_guest):
    facts_run = run([*DROP_PTRACE, *CLI, "facts", "--json"])
    assert facts_run.returncode == 0, facts_run.stderr
    facts = json.loads(facts_run.stdout)
    assert facts["cap_sys_ptrace"] is False and int(facts["cap_eff"], 16) >> 19 & 1 == 0
    assert (facts["seccomp"], facts["pidfd_getfd_allowed"]) == ("disabled", True)  # the syscall itself is allowed
    statsfd = facts["sources"]["statsfd"]
    assert statsfd["usable"] is False and "seccomp" not in statsfd["reason"]
    # facts looks at every VMM of the machine: the reason names whichever it tried last
    pid = int(re.match(r"cannot read the fd links of pid (\d+) ", statsfd["reason"]).group(1))
    assert statsfd["reason"] == cap_reason(pid, facts["cap_eff"])

    one = run([*DROP_PTRACE, sys.executable, "-c", READ_ONE, str(outside_guest.pid)])
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout) == [0, False, cap_reason(outside_guest.pid, facts["cap_eff"])]


# -- PID namespace ---------------------------------------------------------------------------------------------

NS_REASON = (r"this process runs in a PID namespace of its own \(NSpid \d+ in /proc/self/status, /proc/self/ns/pid "
             r"is pid:\[{inode}\], the host's is pid:\[4026531836\]\): debugfs names VMs by the host's pids, which "
             r"match no process here, or the wrong one \(run the collector in the host's PID namespace, e\.g\. "
             r"podman --pid=host; statsfd reads the VMMs of this namespace\)")
UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]


def test_own_pid_namespace_debugfs_names_no_host_vm_and_statsfd_reads_the_inside_one(outside_guest):
    loops = 300
    vm_fd = next(kfd.fd for kfd in procfs.kvm_fds(outside_guest.pid) if kfd.kind == "vm")
    inside = run([*UNSHARE, sys.executable, "-m", "tests.support.pidns", str(outside_guest.pid), str(vm_fd),
                  str(loops)], timeout=240)
    assert inside.returncode == 0, inside.stderr
    out = json.loads(inside.stdout)
    # the inside guest has the outside guest's pid number: a host pid matched here would find it
    assert out["inside_pid"] == outside_guest.pid
    reason = re.compile(NS_REASON.format(inode=out["ns_inode"]) + re.escape(lockdown_tail()))
    if os.path.isdir("/sys/kernel/debug/kvm"):  # debugfs shows the outside VM inside too, by its host pid
        assert f"{outside_guest.pid}-{vm_fd}" in out["debugfs_dirs"]
    assert (out["debugfs_read"], out["debugfs_listed"], out["debugfs_identity_of_outside"]) == (0, [], "None")

    stat, facts = out["stat"], out["facts"]
    for sources in (stat["sources"], facts["sources"]):
        assert sources["debugfs"]["usable"] is False and reason.fullmatch(sources["debugfs"]["reason"])
        assert sources["statsfd"] == {"usable": True, "reason": "1 VMs with stats fds"}
    assert (facts["pid_ns_host"], len(facts["nspid"])) == (False, 1)  # one NSpid entry: own /proc
    assert stat["refused"] == [] and stat["vm_count"] == 1
    vm = stat["vms"][0]
    assert (vm["pid"], vm["name"], vm["source"], vm["stats"]) == (outside_guest.pid, "t-inside", "statsfd",
                                                                  {"halt_exits": 2 * loops})
    assert [(v["id"], v["stats"]) for v in vm["vcpus"]] == [(0, {"halt_exits": loops}), (1, {"halt_exits": loops})]
    assert out["auto"] == [[outside_guest.pid, vm["vm_fd"], "t-inside", "statsfd"]]  # no ghost named "none"


def test_selftest_passes_in_a_pid_namespace_of_its_own_with_debugfs_unusable():
    selftest = run([*UNSHARE, *CLI, "selftest", "--json"], timeout=240)
    result = json.loads(selftest.stdout)
    assert selftest.returncode == 0 and result["ok"], selftest.stdout + selftest.stderr
    checks = {check["source"]: check for check in result["checks"]}
    assert checks["debugfs"]["status"] == "unusable"
    assert re.fullmatch(NS_REASON.format(inode=r"\d+") + re.escape(lockdown_tail()), checks["debugfs"]["detail"])
    assert [checks[name]["status"] for name in ("statsfd", "auto", "release")] == ["ok", "ok", "ok"]
    assert checks["statsfd"]["detail"] == "halt_exits 2000 = 2 vCPUs x 1000, per vCPU exact (via statsfd)"
