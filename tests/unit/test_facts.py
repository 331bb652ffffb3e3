"""Tests for kvmfleet.facts: host facts from fake /proc and /sys trees, and the TDP verdict."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from kvmfleet import facts as F

INTEL_FLAGS = "fpu vme de pse tsc msr pae vmx smx est tm2 ssse3 fma cx16 xtpr pdcm pcid x2apic"
AMD_FLAGS = "fpu vme de pse tsc msr pae svm extapic cr8_legacy abm sse4a npt lbrv nrip_save"
# This machine: AMD EPYC guest of Firecracker, no svm, hypervisor flag.
PVM_FLAGS = "fpu vme de pse tsc msr pae mce cx8 apic sep hypervisor lahf_lm cmp_legacy vmmcall fsrm"

MOUNTS_FULL = (
    "sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0\n"
    "proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0\n"
    "none /sys/kernel/security securityfs rw,relatime 0 0\n"
    "none /sys/kernel/debug debugfs rw,relatime 0 0\n"
)
MOUNTS_BARE = "sysfs /sys sysfs rw 0 0\nproc /proc proc rw 0 0\n"

STATUS_ROOT = "Name:\tpython\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nCapEff:\t000001ffffffffff\n"
STATUS_USER = "Name:\tpython\nUid:\t1000\t1000\t1000\t1000\nCapEff:\t0000000000000000\n"


def cpuinfo(vendor: str, model: str, flags: str, vmx_flags: str | None = None, ncpu: int = 2) -> str:
    blocks = []
    for n in range(ncpu):
        lines = [
            f"processor\t: {n}",
            f"vendor_id\t: {vendor}",
            "cpu family\t: 6",
            f"model name\t: {model}",
            f"flags\t\t: {flags}",
        ]
        if vmx_flags is not None:
            lines.append(f"vmx flags\t: {vmx_flags}")
        lines.append("bugs\t\t: spectre_v1")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks) + "\n"


def write(root: Path, rel: str, content: str | bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def make_tree(
    root: Path,
    *,
    cpu: str | None = None,
    modules: dict[str, dict[str, str]] | None = None,
    dev_kvm: bool = True,
    lockdown: str | None = "[none] integrity confidentiality\n",
    mounts: str | None = MOUNTS_FULL,
    osrelease: str | None = "6.1.0-18-amd64\n",
    status: str | None = STATUS_ROOT,
    yama: str | None = "1\n",
) -> Path:
    """A fake root. ``modules`` maps module name -> {param: value}."""
    if cpu is not None:
        write(root, "proc/cpuinfo", cpu)
    (root / "sys/module").mkdir(parents=True, exist_ok=True)
    (root / "sys/module/vfat").mkdir()  # an unrelated module
    for name, params in (modules or {}).items():
        mod = root / "sys/module" / name
        (mod / "parameters").mkdir(parents=True)
        write(mod, "initstate", "live\n")
        for param, value in params.items():
            write(mod, f"parameters/{param}", value + "\n")
    if dev_kvm:
        write(root, "dev/kvm", "")
    (root / "sys/kernel/security").mkdir(parents=True, exist_ok=True)
    if lockdown is not None:
        write(root, "sys/kernel/security/lockdown", lockdown)
    if mounts is not None:
        write(root, "proc/mounts", mounts)
    (root / "proc/sys/kernel").mkdir(parents=True, exist_ok=True)
    if osrelease is not None:
        write(root, "proc/sys/kernel/osrelease", osrelease)
    if status is not None:
        write(root, "proc/self/status", status)
    if yama is not None:
        write(root, "proc/sys/kernel/yama/ptrace_scope", yama)
    return root


def intel(tmp_path: Path, ept: str, *, flag: bool = True, tdp_mmu: str = "Y", **kw: Any) -> F.HostFacts:
    flags = INTEL_FLAGS + (" ept vpid" if flag else " vpid")
    make_tree(
        tmp_path,
        cpu=cpuinfo("GenuineIntel", "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz", flags),
        modules={"kvm": {"tdp_mmu": tdp_mmu}, "kvm_intel": {"ept": ept, "nested": "Y"}},
        **kw,
    )
    return F.gather(str(tmp_path))


def amd(tmp_path: Path, npt: str, *, flag: bool = True) -> F.HostFacts:
    flags = AMD_FLAGS if flag else AMD_FLAGS.replace(" npt", "")
    make_tree(
        tmp_path,
        cpu=cpuinfo("AuthenticAMD", "AMD EPYC 7543 32-Core Processor", flags),
        modules={"kvm": {"tdp_mmu": "Y"}, "kvm_amd": {"npt": npt, "nested": "1"}},
    )
    return F.gather(str(tmp_path))


def pvm_guest(tmp_path: Path) -> F.HostFacts:
    make_tree(
        tmp_path,
        cpu=cpuinfo("AuthenticAMD", "AMD EPYC", PVM_FLAGS),
        modules={"kvm": {"tdp_mmu": "N", "halt_poll_ns": "200000"}, "kvm_pvm": {"pvm_native": "Y"}},
        lockdown="none [integrity] confidentiality\n",
        osrelease="6.18.44-fc-v782\n",
        yama=None,
    )
    return F.gather(str(tmp_path))


# --- Intel ---------------------------------------------------------------------------------------


def test_intel_ept_on(tmp_path: Path) -> None:
    f = intel(tmp_path, "Y")
    assert f.cpu_vendor == "GenuineIntel"
    assert f.cpu_model.startswith("Intel(R) Xeon(R)")
    assert (f.cpu_vmx, f.cpu_svm, f.cpu_ept, f.cpu_npt, f.cpu_hypervisor) == (True, False, True, False, False)
    assert f.kvm_loaded is True
    assert f.kvm_modules == ["kvm_intel"]
    assert f.kvm_backend == "kvm_intel"
    assert f.ept_param is True and f.npt_param is None
    assert f.tdp_mmu is True and f.nested is True
    assert f.module_params["kvm_intel.ept"] == "Y"
    assert f.tdp["state"] == "enabled"
    assert "kvm_intel.ept=Y" in f.tdp["reason"]
    assert f.tdp["backend"] == "kvm_intel"
    assert f.tdp["nested"] is True and f.tdp["is_guest"] is False
    assert "nested" in f.tdp["reason"]


def test_intel_ept_off_with_flag_is_misconfiguration(tmp_path: Path) -> None:
    f = intel(tmp_path, "N")
    assert f.tdp["state"] == "disabled"
    assert "CPU offers EPT but kvm_intel.ept=N: misconfiguration" in f.tdp["reason"]


def test_intel_no_ept_flag_and_ept_off_is_unsupported(tmp_path: Path) -> None:
    f = intel(tmp_path, "N", flag=False)
    assert f.cpu_ept is False
    assert f.tdp["state"] == "unsupported"
    assert "does not offer EPT" in f.tdp["reason"]


def test_intel_param_wins_over_missing_flag(tmp_path: Path) -> None:
    # KVM clears kvm_intel.ept when the CPU lacks EPT, so Y means EPT even if cpuinfo omits the flag.
    f = intel(tmp_path, "Y", flag=False)
    assert f.tdp["state"] == "enabled"
    assert "cpuinfo does not list 'ept'" in f.tdp["reason"]


def test_tdp_mmu_off_does_not_decide(tmp_path: Path) -> None:
    f = intel(tmp_path, "Y", tdp_mmu="N")
    assert f.tdp_mmu is False
    assert f.tdp["state"] == "enabled"
    assert f.tdp["tdp_mmu"] is False
    assert "kvm.tdp_mmu=N" in f.tdp["reason"]


def test_intel_ept_param_garbled_is_unknown(tmp_path: Path) -> None:
    f = intel(tmp_path, "maybe")
    assert f.ept_param is None
    assert "kvm_intel.ept" in f.why_unknown
    assert f.tdp["state"] == "unknown"


def test_vmx_flags_line(tmp_path: Path) -> None:
    vmx = "vnmi preemption_timer invvpid ept_x_only ept_ad ept_1gb flexpriority tsc_offset ept vpid"
    text = cpuinfo("GenuineIntel", "Intel(R) Core(TM) i7", INTEL_FLAGS, vmx_flags=vmx)
    info = F.parse_cpuinfo(text)
    assert info["vmx flags"].split()[:3] == ["vnmi", "preemption_timer", "invvpid"]
    make_tree(tmp_path, cpu=text, modules={"kvm": {"tdp_mmu": "Y"}, "kvm_intel": {"ept": "N"}})
    f = F.gather(str(tmp_path))
    # "ept" only on the vmx flags line still counts as the CPU offering EPT.
    assert f.cpu_ept is True
    assert "ept_ad" in f.cpu_vmx_flags and "ept_x_only" in f.cpu_vmx_flags
    assert f.tdp["state"] == "disabled"


def test_vmx_flags_without_plain_ept(tmp_path: Path) -> None:
    text = cpuinfo("GenuineIntel", "x", INTEL_FLAGS, vmx_flags="ept_x_only ept_ad vpid")
    make_tree(tmp_path, cpu=text, modules={"kvm_intel": {"ept": "N"}})
    f = F.gather(str(tmp_path))
    assert f.cpu_ept is False  # ept_ad alone is not "ept"
    assert f.tdp["state"] == "unsupported"


def test_parse_cpuinfo_prefers_block_with_flags() -> None:
    text = "processor : 0\nfoo : bar\n\nprocessor : 1\nvendor_id : HygonGenuine\nflags : svm npt\n"
    info = F.parse_cpuinfo(text)
    assert info["vendor_id"] == "HygonGenuine"
    assert F.parse_cpuinfo("") == {}
    assert F.parse_cpuinfo("no colons here\n\n\n") == {}


# --- AMD -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("npt", "flag", "state"),
    [
        ("1", True, "enabled"),
        ("Y", True, "enabled"),
        ("0", True, "disabled"),
        ("N", True, "disabled"),
        ("0", False, "unsupported"),
    ],
)
def test_amd_npt(tmp_path: Path, npt: str, flag: bool, state: str) -> None:
    f = amd(tmp_path, npt, flag=flag)
    assert f.kvm_backend == "kvm_amd"
    assert f.cpu_svm is True and f.cpu_npt is flag
    assert f.nested is True  # kvm_amd.nested=1
    assert f.tdp["state"] == state
    assert "kvm_amd.npt" in f.tdp["reason"]
    if state == "disabled":
        assert "misconfiguration" in f.tdp["reason"]


def test_hygon_vendor(tmp_path: Path) -> None:
    make_tree(
        tmp_path,
        cpu=cpuinfo("HygonGenuine", "Hygon C86 7185", AMD_FLAGS),
        modules={"kvm_amd": {"npt": "Y"}},
    )
    f = F.gather(str(tmp_path))
    assert f.cpu_vendor == "HygonGenuine"
    assert f.tdp["state"] == "enabled"


# --- PVM guest (this machine's kind) -------------------------------------------------------------


def test_pvm_guest(tmp_path: Path) -> None:
    f = pvm_guest(tmp_path)
    assert f.kvm_modules == ["kvm_pvm"]
    assert f.kvm_backend == "kvm_pvm"
    assert (f.cpu_vmx, f.cpu_svm, f.cpu_hypervisor) == (False, False, True)
    assert f.tdp_mmu is False
    assert f.tdp["state"] == "unsupported"
    reason = f.tdp["reason"]
    assert "kvm_pvm" in reason and "shadow paging" in reason
    assert "itself a guest" in reason
    assert "neither vmx nor svm" in reason
    assert f.tdp["is_guest"] is True
    assert f.tdp["nested"] is None
    assert f.lockdown == "integrity"
    assert f.yama_present is False and f.yama_ptrace_scope is None


def test_unknown_backend_is_unsupported_with_guess(tmp_path: Path) -> None:
    make_tree(tmp_path, cpu=cpuinfo("GenuineIntel", "x", INTEL_FLAGS), modules={"kvm": {}, "kvm_foo": {}})
    f = F.gather(str(tmp_path))
    assert f.kvm_backend == "kvm_foo"
    assert f.tdp["state"] == "unsupported"
    assert "assuming" in f.tdp["reason"]


def test_several_backends_pick_by_cpu(tmp_path: Path) -> None:
    make_tree(
        tmp_path,
        cpu=cpuinfo("GenuineIntel", "x", INTEL_FLAGS + " ept"),
        modules={"kvm": {"tdp_mmu": "Y"}, "kvm_intel": {"ept": "Y"}, "kvm_pvm": {}},
    )
    f = F.gather(str(tmp_path))
    assert f.kvm_modules == ["kvm_intel", "kvm_pvm"]
    assert f.kvm_backend == "kvm_intel"
    assert f.tdp["state"] == "enabled"
    assert "several KVM backends" in f.tdp["reason"]


def test_module_not_live_is_ignored(tmp_path: Path) -> None:
    make_tree(tmp_path, cpu=cpuinfo("GenuineIntel", "x", INTEL_FLAGS), modules={"kvm_intel": {"ept": "Y"}})
    write(tmp_path, "sys/module/kvm_intel/initstate", "going\n")
    f = F.gather(str(tmp_path))
    assert f.kvm_modules == []
    assert f.tdp["state"] == "unknown"


# --- no KVM --------------------------------------------------------------------------------------


def test_no_kvm(tmp_path: Path) -> None:
    make_tree(tmp_path, cpu=cpuinfo("GenuineIntel", "x", INTEL_FLAGS + " ept"), dev_kvm=False)
    f = F.gather(str(tmp_path))
    assert f.kvm_loaded is False and f.kvm_modules == [] and f.kvm_backend is None
    assert f.dev_kvm_present is False and f.dev_kvm_accessible is False
    assert f.tdp["state"] == "unknown"
    assert "no KVM module" in f.tdp["reason"] and "no /dev/kvm" in f.tdp["reason"]


def test_kvm_core_without_backend(tmp_path: Path) -> None:
    make_tree(tmp_path, cpu=cpuinfo("GenuineIntel", "x", INTEL_FLAGS), modules={"kvm": {"tdp_mmu": "Y"}})
    f = F.gather(str(tmp_path))
    assert f.kvm_loaded is True and f.kvm_backend is None
    assert f.tdp["state"] == "unknown"
    assert "no backend module" in f.tdp["reason"]


def test_backend_without_dev_kvm_still_judged(tmp_path: Path) -> None:
    # /sys/module is global; a container without /dev/kvm still sees the host's configuration.
    f = intel(tmp_path, "Y", dev_kvm=False)
    assert f.tdp["state"] == "enabled"
    assert "/dev/kvm is absent" in f.tdp["reason"]


def test_empty_root(tmp_path: Path) -> None:
    f = F.gather(str(tmp_path))
    assert f.cpu_vendor == "unknown" and "cpu_vendor" in f.why_unknown
    assert f.kernel_release == "unknown"
    assert f.tdp["state"] == "unknown"
    assert "sysfs" in f.why_unknown["kvm_modules"]
    assert f.lockdown == "unknown"
    json.dumps(f.to_dict())


# --- garbled / unreadable ------------------------------------------------------------------------


def test_directory_where_file_expected(tmp_path: Path) -> None:
    make_tree(tmp_path, cpu=None, modules={"kvm": {}, "kvm_intel": {}}, lockdown=None, osrelease=None)
    (tmp_path / "proc/cpuinfo").mkdir()
    (tmp_path / "sys/module/kvm_intel/parameters/ept").mkdir()
    (tmp_path / "sys/module/kvm/parameters/tdp_mmu").mkdir()
    (tmp_path / "sys/kernel/security/lockdown").mkdir()
    (tmp_path / "proc/sys/kernel/osrelease").mkdir()
    f = F.gather(str(tmp_path))
    assert f.cpu_vendor == "unknown"
    assert "directory" in f.why_unknown["cpu_vendor"]
    assert f.ept_param is None and "directory" in f.why_unknown["kvm_intel.ept"]
    assert f.tdp_mmu is None
    assert f.tdp["state"] == "unknown"
    assert f.lockdown == "unknown" and "directory" in f.why_unknown["lockdown"]
    assert f.kernel_release == "unknown"


def test_binary_junk(tmp_path: Path) -> None:
    junk = bytes(range(256)) * 4
    make_tree(tmp_path, modules={"kvm": {}, "kvm_amd": {}}, status=None)
    write(tmp_path, "proc/cpuinfo", junk)
    write(tmp_path, "sys/module/kvm_amd/parameters/npt", junk)
    write(tmp_path, "sys/kernel/security/lockdown", junk)
    write(tmp_path, "proc/sys/kernel/osrelease", junk)
    write(tmp_path, "proc/mounts", junk)
    write(tmp_path, "proc/self/status", junk)
    write(tmp_path, "proc/sys/kernel/yama/ptrace_scope", junk)
    f = F.gather(str(tmp_path))
    assert f.cpu_vendor == "unknown"
    assert f.npt_param is None and "kvm_amd.npt" in f.why_unknown
    assert f.tdp["state"] == "unknown"
    assert f.lockdown == "unknown"
    assert f.kernel_release == "unknown"
    assert f.is_root is None and f.cap_sys_ptrace is None
    assert f.yama_present is True and f.yama_ptrace_scope is None
    json.dumps(f.to_dict())
    F.format_text(f)


def test_empty_files(tmp_path: Path) -> None:
    make_tree(
        tmp_path,
        cpu="",
        modules={"kvm": {"tdp_mmu": ""}, "kvm_intel": {"ept": "", "nested": ""}},
        lockdown="",
        mounts="",
        osrelease="",
        status="",
        yama="",
    )
    f = F.gather(str(tmp_path))
    assert f.cpu_vendor == "unknown" and f.cpu_vmx is None
    assert f.ept_param is None and f.tdp_mmu is None and f.nested is None
    assert f.tdp["state"] == "unknown"
    assert f.lockdown == "unknown"
    assert f.debugfs_mounted is False and f.securityfs_mounted is False
    assert f.kernel_release == "unknown"
    assert f.yama_ptrace_scope is None


def test_fifo_does_not_hang(tmp_path: Path) -> None:
    make_tree(tmp_path, cpu=None)
    os.mkfifo(tmp_path / "proc/cpuinfo")
    f = F.gather(str(tmp_path))
    assert "not a regular file" in f.why_unknown["cpu_vendor"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    f0 = intel(tmp_path, "Y")
    assert f0.tdp["state"] == "enabled"
    ept = tmp_path / "sys/module/kvm_intel/parameters/ept"
    ept.chmod(0)
    try:
        f = F.gather(str(tmp_path))
    finally:
        ept.chmod(0o644)
    assert "permission denied" in f.why_unknown["kvm_intel.ept"]
    assert f.tdp["state"] == "unknown"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("Y", True),
        ("y\n", True),
        ("1", True),
        ("2", True),
        ("yes", True),
        ("N", False),
        ("0", False),
        (" n ", False),
        ("off", False),
        ("", None),
        ("maybe", None),
        (None, None),
    ],
)
def test_parse_bool(text: str | None, value: bool | None) -> None:
    assert F.parse_bool(text) is value


# --- lockdown, mounts, privileges ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "mode"),
    [
        ("[none] integrity confidentiality\n", "none"),
        ("none [integrity] confidentiality\n", "integrity"),
        ("none integrity [confidentiality]\n", "confidentiality"),
    ],
)
def test_lockdown_modes(tmp_path: Path, content: str, mode: str) -> None:
    make_tree(tmp_path, lockdown=content)
    f = F.gather(str(tmp_path))
    assert f.lockdown == mode
    assert "lockdown" not in f.why_unknown


def test_lockdown_without_brackets(tmp_path: Path) -> None:
    make_tree(tmp_path, lockdown="none integrity confidentiality\n")
    f = F.gather(str(tmp_path))
    assert f.lockdown == "unknown"
    assert "bracketed" in f.why_unknown["lockdown"]


def test_lockdown_securityfs_not_mounted(tmp_path: Path) -> None:
    make_tree(tmp_path, lockdown=None, mounts=MOUNTS_BARE)
    f = F.gather(str(tmp_path))
    assert f.securityfs_mounted is False and f.debugfs_mounted is False
    assert f.lockdown == "unknown"
    assert "securityfs is not mounted" in f.why_unknown["lockdown"]
    assert "securityfs is not mounted" in F.format_text(f)


def test_lockdown_securityfs_mounted_no_lsm(tmp_path: Path) -> None:
    make_tree(tmp_path, lockdown=None)
    write(tmp_path, "sys/kernel/security/apparmor/profiles", "")
    f = F.gather(str(tmp_path))
    assert f.securityfs_mounted is True
    assert f.lockdown == "unknown"
    assert "lockdown LSM" in f.why_unknown["lockdown"]


def test_lockdown_mounts_unreadable_and_empty_securityfs(tmp_path: Path) -> None:
    make_tree(tmp_path, lockdown=None, mounts=None)
    f = F.gather(str(tmp_path))
    assert f.securityfs_mounted is None and f.debugfs_mounted is None
    assert "securityfs is not mounted" in f.why_unknown["lockdown"]


def test_debugfs_elsewhere_is_not_mounted(tmp_path: Path) -> None:
    make_tree(tmp_path, mounts=MOUNTS_BARE + "debugfs /mnt/my\\040debug debugfs rw 0 0\n")
    f = F.gather(str(tmp_path))
    assert f.debugfs_mounted is False


def test_unprivileged_user(tmp_path: Path) -> None:
    make_tree(tmp_path, status=STATUS_USER, yama="2\n")
    f = F.gather(str(tmp_path))
    assert f.is_root is False
    assert f.cap_sys_ptrace is False and f.cap_eff == "0000000000000000"
    assert f.yama_present is True and f.yama_ptrace_scope == 2


def test_cap_sys_ptrace_bit_19(tmp_path: Path) -> None:
    make_tree(tmp_path, status=f"Uid:\t1000\t1000\t1000\t1000\nCapEff:\t{1 << 19:016x}\n")
    f = F.gather(str(tmp_path))
    assert f.cap_sys_ptrace is True and f.is_root is False
    make_tree(tmp_path / "b", status=f"Uid:\t0\t0\t0\t0\nCapEff:\t{((1 << 41) - 1) & ~(1 << 19):016x}\n")
    g = F.gather(str(tmp_path / "b"))
    assert g.cap_sys_ptrace is False and g.is_root is True


def test_yama_absent_vs_proc_missing(tmp_path: Path) -> None:
    make_tree(tmp_path, yama=None)
    assert F.gather(str(tmp_path)).yama_present is False
    g = F.gather(str(tmp_path / "nothing"))
    assert g.yama_present is None and "yama_ptrace_scope" in g.why_unknown


# --- output --------------------------------------------------------------------------------------


def test_to_dict_and_text(tmp_path: Path) -> None:
    f = pvm_guest(tmp_path)
    f.sources["debugfs"] = {"ok": False, "why": "lockdown integrity blocks reads"}
    d = f.to_dict()
    json.loads(json.dumps(d))
    for key in (
        "cpu_vendor",
        "cpu_model",
        "cpu_vmx",
        "cpu_svm",
        "cpu_ept",
        "cpu_npt",
        "cpu_hypervisor",
        "cpu_vmx_flags",
        "kvm_loaded",
        "kvm_modules",
        "kvm_backend",
        "module_params",
        "ept_param",
        "npt_param",
        "tdp_mmu",
        "nested",
        "dev_kvm_present",
        "dev_kvm_accessible",
        "kernel_release",
        "lockdown",
        "securityfs_mounted",
        "debugfs_mounted",
        "is_root",
        "yama_present",
        "yama_ptrace_scope",
        "cap_eff",
        "cap_sys_ptrace",
        "tdp",
        "sources",
        "why_unknown",
    ):
        assert key in d, key
    assert set(d["tdp"]) == {"state", "reason", "backend", "tdp_mmu", "nested", "is_guest"}
    assert d["sources"]["debugfs"]["ok"] is False

    text = F.format_text(f)
    lines = text.splitlines()
    assert lines[0].startswith("TDP (EPT/NPT):") and lines[0].endswith("UNSUPPORTED")
    assert lines[1].startswith("TDP reason:") and "kvm_pvm" in lines[1]
    # Values start in the same column on every key line.
    cols = {line.index(":") for line in lines if line and not line.startswith(" ")}
    assert cols  # at least one key
    starts = {
        len(line) - len(line[line.index(":") + 1 :].lstrip())
        for line in lines
        if line and not line.startswith(" ")
    }
    assert len(starts) == 1
    assert "source debugfs:" in text
    assert "6.18.44-fc-v782" in text


def test_default_sources_empty() -> None:
    assert F.HostFacts().sources == {}
    assert F.HostFacts().tdp["state"] == "unknown"


# --- the real machine ----------------------------------------------------------------------------


def test_real_machine() -> None:
    f = F.gather("/")
    d = f.to_dict()
    json.dumps(d)
    assert f.tdp["state"] in ("enabled", "disabled", "unsupported", "unknown")
    assert F.format_text(f)
    if os.path.isdir("/sys/module/kvm_pvm"):
        # This machine kind (KERNEL-NOTES "What this machine kind is"): PVM, shadow paging only.
        assert f.tdp["state"] == "unsupported"
        assert "pvm" in f.tdp["reason"].lower()
        assert f.kvm_backend == "kvm_pvm"
        assert f.tdp["is_guest"] is True
        assert f.tdp_mmu is False


# --- confinement: seccomp, pidfd_getfd, PID namespace --------------------------------------------


def test_seccomp_and_pid_namespace_from_the_tree(tmp_path: Path) -> None:
    make_tree(tmp_path, status=STATUS_ROOT + "NSpid:\t1\nSeccomp:\t2\nSeccomp_filters:\t4\n")
    (tmp_path / "proc/self/ns").mkdir()
    os.symlink("pid:[4026532180]", tmp_path / "proc/self/ns/pid")
    f = F.gather(str(tmp_path))
    assert (f.seccomp, f.seccomp_filters) == ("filter", 4)
    assert f.nspid == [1] and f.pid_ns_host is False  # one NSpid entry, yet not the host's namespace
    assert f.pidfd_getfd_allowed is None and "pidfd_getfd_allowed" in f.why_unknown  # probed live only
    text = F.format_text(f)
    assert "seccomp:" in text and "filter (4 filters)" in text and "no (NSpid 1)" in text


def test_old_kernel_status_without_seccomp_or_nspid(tmp_path: Path) -> None:
    make_tree(tmp_path)
    f = F.gather(str(tmp_path))
    assert f.seccomp == "unknown" and f.seccomp_filters is None and "seccomp" in f.why_unknown
    assert f.nspid == [] and f.pid_ns_host is None and "pid_ns_host" in f.why_unknown


def test_confinement_of_this_process() -> None:
    f = F.gather("/")
    assert f.nspid and f.nspid[-1] == os.getpid()
    assert f.pid_ns_host is (os.stat("/proc/self/ns/pid").st_ino == 0xEFFFFFFC)
    if f.seccomp == "disabled":
        assert f.pidfd_getfd_allowed is True and f.pidfd_getfd_reason == ""
    d = f.to_dict()
    assert {"seccomp", "seccomp_filters", "pidfd_getfd_allowed", "pidfd_getfd_reason", "nspid",
            "pid_ns_host"} <= set(d)


# --- capacity: CPUs online, memory, halt polling, nx_huge_pages -------------------------------------------------


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("0\n", 1),
        ("0-3,8-11\n", 8),
        ("0-1\n", 2),
        ("0,2,4-5\n", 4),
        ("5\n", 1),
        ("0-8191\n", 8192),
        ("", None),
        ("\n", None),
        ("garbage\n", None),
        ("0-3,\n", None),
        ("3-1\n", None),  # a range backwards
        ("0-3,2-5\n", None),  # overlapping: the kernel never prints that
        ("4,0\n", None),  # not ascending
        ("0 -3\n", None),
        ("-1\n", None),
        ("0-99999999999999999999\n", None),  # past any kernel's CPU ids
        ("0:1\n", None),
    ],
)
def test_parse_cpulist(text: str, count: int | None) -> None:
    assert F.parse_cpulist(text) == count


@pytest.mark.parametrize(
    ("text", "total"),
    [
        ("MemTotal:       24731184 kB\nMemFree:         1000 kB\n", 24731184 * 1024),
        ("MemFree:         1000 kB\nMemTotal:  8 kB\n", 8192),
        ("MemFree:         1000 kB\n", None),
        ("MemTotal:       lots kB\n", None),
        ("MemTotal:       24731184\n", None),  # no unit: not the kernel's format
        ("MemTotal:       24731184 MB\n", None),
        (f"MemTotal: {2**60} kB\n", None),  # past int64 in bytes
        ("", None),
    ],
)
def test_parse_meminfo_total(text: str, total: int | None) -> None:
    assert F.parse_meminfo_total(text) == total


@pytest.mark.parametrize(
    ("text", "value"),
    [("200000\n", 200000), ("0\n", 0), ("4294967295\n", 2**32 - 1), ("4294967296\n", None), ("-1\n", None),
     ("", None), ("1_000\n", None), ("+5\n", None), ("ten\n", None), ("2.5\n", None)],
)
def test_parse_uint_param(text: str, value: int | None) -> None:
    assert F.parse_uint_param(text) == value


@pytest.mark.parametrize(
    ("text", "value"),
    [("Y\n", True), ("N\n", False), ("never\n", False), ("force\n", True), ("off\n", False), ("auto\n", None),
     ("", None), ("maybe\n", None)],
)
def test_parse_nx_huge_pages(text: str, value: bool | None) -> None:
    assert F.parse_nx_huge_pages(text) is value


HALT_POLL = {"halt_poll_ns": "200000", "halt_poll_ns_grow": "2", "halt_poll_ns_grow_start": "10000",
             "halt_poll_ns_shrink": "0"}


def capacity_tree(root: Path, kvm: dict[str, str] | None, online: str | None = "0-3,8-11\n",
                  meminfo: str | None = "MemTotal:       16384 kB\nMemFree:  12 kB\n") -> F.HostFacts:
    make_tree(root, cpu=cpuinfo("GenuineIntel", "x", INTEL_FLAGS + " ept"),
              modules={"kvm": kvm, "kvm_intel": {"ept": "Y"}} if kvm is not None else {})
    if online is not None:
        write(root, F.CPUS_ONLINE_FILE, online)
    if meminfo is not None:
        write(root, F.MEMINFO_FILE, meminfo)
    return F.gather(str(root))


def test_capacity_facts(tmp_path: Path) -> None:
    f = capacity_tree(tmp_path, {**HALT_POLL, "nx_huge_pages": "never"})
    assert (f.cpus_online, f.mem_total_bytes) == (8, 16384 * 1024)
    assert (f.halt_poll_ns, f.halt_poll_ns_grow, f.halt_poll_ns_grow_start, f.halt_poll_ns_shrink) == (
        200000, 2, 10000, 0)
    assert f.nx_huge_pages is False and f.module_params["kvm.nx_huge_pages"] == "never"
    assert f.kernel_release == "6.1.0-18-amd64"
    assert not {"cpus_online", "mem_total_bytes", "kvm.halt_poll_ns", "kvm.nx_huge_pages"} & set(f.why_unknown)
    d = json.loads(json.dumps(f.to_dict()))
    assert (d["cpus_online"], d["mem_total_bytes"], d["halt_poll_ns_shrink"], d["nx_huge_pages"]) == (
        8, 16777216, 0, False)
    text = F.format_text(f)
    for row in ("cpus online:", "memory total:", "kvm.halt_poll_ns:", "kvm.halt_poll_ns_grow_start:",
                "kvm.nx_huge_pages:"):
        assert row in text
    assert "16777216 bytes (0.0 GiB)" in text


def test_capacity_facts_absent_or_garbled(tmp_path: Path) -> None:
    f = capacity_tree(tmp_path, {"halt_poll_ns": "lots", "halt_poll_ns_grow": "-2", "nx_huge_pages": "auto"},
                      online="garbage\n", meminfo="MemFree: 12 kB\n")
    assert f.cpus_online is None and "cannot parse 'garbage'" in f.why_unknown["cpus_online"]
    assert f.mem_total_bytes is None and "no MemTotal" in f.why_unknown["mem_total_bytes"]
    assert f.halt_poll_ns is None and "cannot parse 'lots'" in f.why_unknown["kvm.halt_poll_ns"]
    assert f.halt_poll_ns_grow is None and "'-2'" in f.why_unknown["kvm.halt_poll_ns_grow"]
    # an older kernel without the parameter (halt_poll_ns_grow_start came in 5.2)
    assert f.halt_poll_ns_grow_start is None and "does not exist" in f.why_unknown["kvm.halt_poll_ns_grow_start"]
    assert f.nx_huge_pages is None and "auto" in f.why_unknown["kvm.nx_huge_pages"]
    text = F.format_text(f)
    assert "cpus online:" in text and "unknown cpus_online:" in text


def test_capacity_facts_without_files_or_kvm(tmp_path: Path) -> None:
    f = capacity_tree(tmp_path, None, online=None, meminfo=None)
    assert f.kvm_loaded is False
    assert f.cpus_online is None and "does not exist" in f.why_unknown["cpus_online"]
    assert f.mem_total_bytes is None and "does not exist" in f.why_unknown["mem_total_bytes"]
    # KVM not loaded: its parameters are not facts of this host (kvm_loaded says so), not errors
    assert (f.halt_poll_ns, f.halt_poll_ns_grow, f.halt_poll_ns_grow_start, f.halt_poll_ns_shrink,
            f.nx_huge_pages) == (None,) * 5
    assert not [key for key in f.why_unknown if key.startswith("kvm.")]
    json.dumps(f.to_dict())
    assert "cpus online:" in F.format_text(f)


def test_capacity_files_that_are_directories_or_junk(tmp_path: Path) -> None:
    make_tree(tmp_path, modules={"kvm": {}})
    (tmp_path / F.CPUS_ONLINE_FILE).mkdir(parents=True)
    write(tmp_path, F.MEMINFO_FILE, bytes(range(256)) * 4)
    (tmp_path / "sys/module/kvm/parameters/halt_poll_ns").mkdir()
    write(tmp_path, "sys/module/kvm/parameters/nx_huge_pages", b"\xff\x00Y")
    f = F.gather(str(tmp_path))
    assert f.cpus_online is None and "directory" in f.why_unknown["cpus_online"]
    assert f.mem_total_bytes is None and "mem_total_bytes" in f.why_unknown
    assert f.halt_poll_ns is None and "directory" in f.why_unknown["kvm.halt_poll_ns"]
    assert f.nx_huge_pages is None and "kvm.nx_huge_pages" in f.why_unknown
    F.format_text(f)


def _online_cpus_in_proc_stat() -> int:
    """The per-CPU lines of /proc/stat: the kernel prints one for each online CPU."""
    with open("/proc/stat") as stat_file:
        return sum(1 for line in stat_file if re.match(r"cpu[0-9]+ ", line))


def test_capacity_facts_of_the_real_machine() -> None:
    """Each capacity fact equals the same figure read another way on this machine."""
    f = F.gather("/")
    assert f.cpus_online == os.sysconf("SC_NPROCESSORS_ONLN") == _online_cpus_in_proc_stat()
    # glibc's _SC_PHYS_PAGES is sysinfo()'s totalram, which /proc/meminfo prints as MemTotal
    assert f.mem_total_bytes == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert f.kernel_release == os.uname().release
    params = Path("/sys/module/kvm/parameters")
    for name in F.HALT_POLL_PARAMS:
        path = params / name
        assert getattr(f, name) == (int(path.read_text()) if path.exists() else None), name
    nx_path = params / "nx_huge_pages"
    expected = {"Y": True, "N": False, "never": False}[nx_path.read_text().strip()] if nx_path.exists() else None
    assert f.nx_huge_pages is expected


# --- exit reasons (kvmfleet.exitreasons.facts_group) ----------------------------------------------

TRACEFMT = Path(__file__).resolve().parent.parent / "data" / "tracefmt"


def tracing_tree(root: Path, *, tracepoints: tuple[str, ...] = ("kvm_exit", "kvm_userspace_exit"),
                 paranoid: str = "2\n", status: str = STATUS_ROOT, lockdown: str | None = None) -> str:
    for name in tracepoints:
        write(root, f"sys/kernel/tracing/events/kvm/{name}/format", (TRACEFMT / f"{name}.format").read_text())
    os.makedirs(root / "sys/kernel/tracing/events", exist_ok=True)
    write(root, "proc/sys/kernel/perf_event_paranoid", paranoid)
    write(root, "proc/self/status", status)
    if lockdown is not None:
        write(root, "sys/kernel/security/lockdown", lockdown)
    return str(root)


def test_exit_reasons_usable_in_a_fake_tree_is_not_tried(tmp_path: Path) -> None:
    group = F.gather(tracing_tree(tmp_path)).exit_reasons
    # Root (CAP_SYS_ADMIN) with paranoid 2: fine; nothing is opened in a fake tree, so no mechanism is named.
    assert group == {"usable": True, "reason": "", "mechanism": None,
                     "tracepoints": ["kvm:kvm_exit", "kvm:kvm_userspace_exit"]}


def test_exit_reasons_without_tracefs(tmp_path: Path) -> None:
    group = F.gather(str(tmp_path)).exit_reasons
    assert group["usable"] is False and group["tracepoints"] == []
    assert group["reason"].startswith("no tracefs: mount it (mount -t tracefs nodev /sys/kernel/tracing)")


def test_exit_reasons_lockdown_confidentiality(tmp_path: Path) -> None:
    group = F.gather(tracing_tree(tmp_path, lockdown="none integrity [confidentiality]\n")).exit_reasons
    assert group["usable"] is False and group["reason"].startswith("kernel lockdown is 'confidentiality'")


def test_exit_reasons_kvm_not_loaded(tmp_path: Path) -> None:
    group = F.gather(tracing_tree(tmp_path, tracepoints=())).exit_reasons
    assert group["usable"] is False and group["tracepoints"] == []
    assert "the kvm tracepoints are missing" in group["reason"] and "kvm module loaded?" in group["reason"]


def test_exit_reasons_paranoid_without_capability(tmp_path: Path) -> None:
    group = F.gather(tracing_tree(tmp_path, status=STATUS_USER)).exit_reasons
    assert group["usable"] is False
    assert group["reason"].startswith("perf_event_paranoid is 2 (> 0: CPU-wide perf events need CAP_PERFMON")
    assert "CapEff 0000000000000000" in group["reason"]
    allowed = F.gather(tracing_tree(tmp_path / "p0", status=STATUS_USER, paranoid="0\n")).exit_reasons
    assert allowed["usable"] is True


def test_exit_reasons_garbled_format(tmp_path: Path) -> None:
    root = tracing_tree(tmp_path)
    write(tmp_path, "sys/kernel/tracing/events/kvm/kvm_exit/format", "name: kvm_exit\nID: 1\n")
    group = F.gather(root).exit_reasons
    assert group["usable"] is False and "kvm_exit/format: format of kvm_exit has no field" in group["reason"]


def test_exit_reasons_in_text_and_json(tmp_path: Path) -> None:
    f = F.gather(str(tmp_path))
    assert json.loads(json.dumps(f.to_dict()))["exit_reasons"]["usable"] is False
    assert re.search(r"^exit reasons: +usable=no mechanism=- tracepoints=-: no tracefs", F.format_text(f), re.M)


@pytest.mark.skipif(not os.path.exists("/sys/kernel/debug/tracing/events/kvm/kvm_exit/format")
                    or os.geteuid() != 0, reason="needs root and the kvm tracepoints")
def test_exit_reasons_of_the_real_machine() -> None:
    group = F.gather("/").exit_reasons
    assert group["usable"] is True, group["reason"]
    assert group["mechanism"] in ("bpf", "perf-count")
    assert group["tracepoints"] == ["kvm:kvm_exit", "kvm:kvm_userspace_exit"]
