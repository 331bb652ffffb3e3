"""The TDP verdict: do the VMs of a host run with two-dimensional paging (Intel EPT / AMD NPT) or on shadow page
tables? Judged from the host facts :func:`kvmfleet.facts.gather` read (module parameters first: they are the
configuration truth), and written as ``tdp_state`` in ``kvm_host``, where the audit reads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:
    from .facts import HostFacts

# The verdict's states (kvm_host tdp_state).
TDP_ENABLED = "enabled"
TDP_DISABLED = "disabled"  # the CPU offers EPT/NPT and KVM has it off: a misconfiguration
TDP_UNSUPPORTED = "unsupported"  # neither the CPU nor a parent hypervisor offers it
TDP_UNKNOWN = "unknown"


class TdpVerdict(TypedDict):
    """Do VMs on this host get EPT/NPT? ``state`` is one of enabled/disabled/unsupported/unknown."""

    state: str
    reason: str
    backend: str | None  # the KVM module deemed in use (kvm_intel, kvm_amd, kvm_pvm, ...)
    tdp_mmu: bool | None  # kvm.tdp_mmu: reported, does not decide the state
    nested: bool | None  # <backend>.nested: L2 guests allowed (their page tables are always shadowed)
    is_guest: bool  # cpuinfo has the ``hypervisor`` flag: this host is itself a VM


def _yn(value: bool | None) -> str:
    return TDP_UNKNOWN if value is None else ("Y" if value else "N")


def tdp_verdict(facts: HostFacts) -> TdpVerdict:
    """Decide whether VMs on this host use EPT/NPT, from the facts already gathered.

    The backend module's parameter is the configuration truth. kvm.tdp_mmu only chooses which MMU code
    manages the EPT/NPT tables (the TDP MMU or the legacy one); it does not decide whether TDP is used:
    tdp_mmu=N with ept=Y still means EPT, through the legacy MMU.
    """
    is_guest = bool(facts.cpu_hypervisor)
    state, reason = _decide(facts, is_guest)
    extras: list[str] = []
    if facts.kvm_backend is not None:
        if len(facts.kvm_modules) > 1:
            extras.append(
                f"several KVM backends loaded ({', '.join(facts.kvm_modules)}); judged by {facts.kvm_backend}"
            )
        if not facts.dev_kvm_present:
            # /sys/module is global, /dev is per mount namespace: a container without the device node
            # still sees the host's modules, so the module parameters keep deciding. Say so, though.
            extras.append("/dev/kvm is absent here, so no VM can be created from this mount namespace")
        if facts.tdp_mmu is not None:
            extras.append(f"kvm.tdp_mmu={_yn(facts.tdp_mmu)}")
        if facts.nested:
            extras.append("nested guests allowed: their (L2) page tables are shadowed even with TDP")
    return TdpVerdict(
        state=state,
        reason="; ".join([reason, *extras]),
        backend=facts.kvm_backend,
        tdp_mmu=facts.tdp_mmu,
        nested=facts.nested,
        is_guest=is_guest,
    )


def _decide(facts: HostFacts, is_guest: bool) -> tuple[str, str]:
    backend = facts.kvm_backend
    guest_note = (
        "this host is itself a guest (cpuinfo 'hypervisor' flag): what it offers comes from the parent "
        "hypervisor"
        if is_guest
        else ""
    )

    if backend is None:
        # No backend module: there is no configuration to judge.
        if facts.kvm_loaded:
            why = "kvm is loaded but no backend module (kvm_intel, kvm_amd, kvm_pvm, ...)"
        elif "kvm_modules" in facts.why_unknown:
            why = f"cannot list KVM modules ({facts.why_unknown['kvm_modules']})"
        else:
            why = "no KVM module loaded"
        why += ", /dev/kvm present" if facts.dev_kvm_present else " and no /dev/kvm"
        return TDP_UNKNOWN, _join(why, guest_note)

    if backend == "kvm_intel":
        # kvm_intel clears its "ept" parameter during hardware setup when the CPU (or the parent
        # hypervisor) lacks EPT, so ept=Y can only mean EPT is in use, whatever cpuinfo says.
        # ept=N is then either the admin's choice (CPU has EPT: misconfiguration) or forced by the CPU.
        return _param_verdict(facts.ept_param, facts.cpu_ept, "kvm_intel.ept", "EPT", "ept", guest_note)
    if backend == "kvm_amd":
        # Same for kvm_amd: svm_hardware_setup() turns npt off when the CPU lacks NPT.
        return _param_verdict(facts.npt_param, facts.cpu_npt, "kvm_amd.npt", "NPT", "npt", guest_note)

    # kvm_pvm, or any other backend without an EPT/NPT parameter. PVM runs guests through a software
    # switcher without vmx/svm, so KVM shadows every guest page table. An unknown backend exposes no
    # parameter that could say otherwise, so it is judged the same way (and the reason says it is a guess).
    if backend == "kvm_pvm":
        reason = "KVM backend kvm_pvm (PVM) has no EPT/NPT: every VM runs on shadow paging"
    else:
        reason = (
            f"KVM backend {backend} has no EPT/NPT parameter kvmfleet knows: assuming every VM runs on "
            "shadow paging"
        )
    if facts.cpu_vmx is False and facts.cpu_svm is False:
        reason += "; the CPU offers neither vmx nor svm"
    return TDP_UNSUPPORTED, _join(reason, guest_note)


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _param_verdict(
    param: bool | None, cpu_has: bool | None, param_name: str, label: str, flag: str, guest_note: str
) -> tuple[str, str]:
    if param is None:
        return TDP_UNKNOWN, _join(
            f"{param_name} is unreadable: cannot tell whether VMs use {label}", guest_note
        )
    if param:
        reason = f"{param_name}=Y: VMs use {label}"
        if cpu_has is False:
            reason += (
                f" (cpuinfo does not list '{flag}', but KVM keeps {param_name}=Y only when the CPU "
                "supports it)"
            )
        if guest_note:
            reason += f"; {guest_note}, which provides {label} (nested {label})"
        return TDP_ENABLED, reason
    if cpu_has:
        return TDP_DISABLED, _join(
            f"CPU offers {label} but {param_name}=N: misconfiguration, every VM runs on shadow paging",
            guest_note,
        )
    if cpu_has is False:
        return TDP_UNSUPPORTED, _join(
            f"{param_name}=N and the CPU does not offer {label}: every VM runs on shadow paging "
            "(a hardware or placement matter)",
            guest_note,
        )
    # Shadow paging for sure; whether by choice or by necessity cannot be told without cpuinfo.
    return TDP_DISABLED, _join(
        f"{param_name}=N: every VM runs on shadow paging; cpuinfo unreadable, so whether the CPU offers "
        f"{label} is unknown",
        guest_note,
    )
