"""Which cause refuses pidfd_getfd: the pure logic (the real kernel paths are in tests/kvm/test_confinement.py)."""

import errno

import pytest

from kvmfleet import borrowrights, procfs

FULL = "000001ffffffffff"
NO_PTRACE = f"{0x1FFFFFFFFFF & ~(1 << 19):016x}"
SECCOMP_2 = {"Seccomp": "2", "Seccomp_filters": "1"}


def test_kernel_versions():
    assert borrowrights.kernel_at_least((5, 6), "5.6.0") and borrowrights.kernel_at_least((5, 6), "6.1.0-18-amd64")
    assert not borrowrights.kernel_at_least((5, 6), "5.4.0-150-generic")
    assert not borrowrights.kernel_at_least((5, 6), "garbage")


def test_seccomp_seen():
    assert borrowrights.seccomp_seen(SECCOMP_2) == "Seccomp: 2 in /proc/self/status, 1 filter"
    assert borrowrights.seccomp_seen({"Seccomp": "2", "Seccomp_filters": "3"}).endswith(", 3 filters")
    assert borrowrights.seccomp_seen({}) == "Seccomp: unknown in /proc/self/status"


@pytest.mark.parametrize("code", [errno.EPERM, errno.ENOSYS])
def test_own_fd_refused_under_a_filter_names_seccomp(code):
    reason = borrowrights._refused_self(OSError(code, "x"), SECCOMP_2)
    assert reason == (f"pidfd_getfd is refused by a seccomp filter ({errno.errorcode[code]}; Seccomp: 2 in "
                      "/proc/self/status, 1 filter): allow it in the container/unit (systemd-nspawn "
                      "--system-call-filter=pidfd_getfd, SystemCallFilter=, podman --security-opt seccomp=...)")


def test_own_fd_refused_without_a_filter_blames_a_security_module():
    reason = borrowrights._refused_self(OSError(errno.EPERM, "x"), {"Seccomp": "0"})
    assert "no seccomp filter (Seccomp: 0" in reason and "security module" in reason


def test_enosys_on_an_old_kernel_is_no_filter(monkeypatch):
    monkeypatch.setattr(borrowrights, "kernel_at_least", lambda version, release=None: False)
    assert borrowrights._refused_self(OSError(errno.ENOSYS, "x"), SECCOMP_2).startswith(
        "pidfd_getfd is not available (Linux ")


def test_missing_capability_is_named_with_capeff():
    cause = borrowrights.denied_cause({"CapEff": NO_PTRACE}, None)
    assert cause.startswith(f"this process lacks CAP_SYS_PTRACE (CapEff {NO_PTRACE} in /proc/self/status)")
    assert "Yama" not in cause and "seccomp" not in cause
    assert "asks for it as well" not in cause
    assert borrowrights.denied_cause({"CapEff": NO_PTRACE}, 2).endswith("; Yama ptrace_scope 2 asks for it as well")


def test_yama_scope_3_is_named_alone_when_the_capability_is_there():
    cause = borrowrights.denied_cause({"CapEff": FULL}, 3)
    assert cause.startswith("Yama ptrace_scope is 3 (/proc/sys/kernel/yama/ptrace_scope)")
    assert "CAP_SYS_PTRACE" not in cause
    both = borrowrights.denied_cause({"CapEff": NO_PTRACE}, 3)
    assert both.startswith("Yama ptrace_scope is 3") and "; and this process lacks CAP_SYS_PTRACE" in both


@pytest.mark.parametrize("scope, yama", [(None, "no Yama"), (1, "Yama ptrace_scope 1"), (2, "Yama ptrace_scope 2")])
def test_capability_and_yama_fine_says_so(scope, yama):
    assert borrowrights.denied_cause({"CapEff": FULL}, scope) == (
        f"neither capabilities nor Yama explain it (CAP_SYS_PTRACE (CapEff {FULL}), {yama}): a security module "
        "(AppArmor, SELinux) refuses it, or this process runs in a user namespace other than the VMM's")
    assert "an unreadable CapEff" in borrowrights.denied_cause({}, scope)


def test_yama_scope_file(tmp_path):
    (tmp_path / "scope").write_text("3\n")
    assert borrowrights.yama_scope(str(tmp_path / "scope")) == 3
    assert borrowrights.yama_scope(str(tmp_path / "absent")) is None


def test_this_process_may_borrow_its_own_fds_without_a_filter():
    """tests/kvm/test_confinement.py installs a real filter in a child."""
    mode, _ = procfs.parse_seccomp(procfs.self_status())
    probe = borrowrights.probe_self()
    assert probe == borrowrights.SelfProbe(True, "") if mode == 0 else probe.allowed is not None


def test_reading_fd_links_leaves_yama_out():
    """Yama restricts attaching only; /proc/<pid>/fd links need ptrace *read* access."""
    assert borrowrights.denied_cause({"CapEff": NO_PTRACE}, 3, attach=False).startswith(
        f"this process lacks CAP_SYS_PTRACE (CapEff {NO_PTRACE} in /proc/self/status)")
    assert "Yama" not in borrowrights.denied_cause({"CapEff": NO_PTRACE}, 2, attach=False)
    assert borrowrights.denied_cause({"CapEff": FULL}, 3, attach=False) == (
        f"neither capabilities nor Yama explain it (CAP_SYS_PTRACE (CapEff {FULL}), Yama does not restrict "
        "reading): a security module (AppArmor, SELinux) refuses it, or this process runs in a user namespace "
        "other than the VMM's")
