"""Compare what ``kvmfleet stat`` reads of one libvirt domain with what ``virsh domstats`` says, the domain paused.

Copied into a hypervisor by molecule's systemd scenario and run there with the deployed venv's Python (standard
library only). The domain is suspended, so that KVM's counters stand still; then, in this order, ``virsh domstats
--vm --vcpu``, ``kvmfleet stat --json --vm --vcpu -n 1`` and ``virsh domstats`` again are read (the two virsh
readings must be equal: nothing moved), and the domain is resumed. Prints one JSON object:

- ``appearances``: how many VMs of that name ``kvmfleet stat`` lists (1: the VM is counted once);
- ``source``: the source that read it (``libvirt+statsfd`` where QEMU holds its vCPU stats fds);
- ``uuid``: the UUID kvmfleet gives it, ``virsh_uuid`` libvirt's;
- ``vm_compared``/``vcpu_compared``: how many VM-level and per-vCPU values were compared;
- ``mismatches``: every value that differs (``[key, virsh, kvmfleet]``); ``moved``: keys that changed between the
  two virsh readings.

Exit status 0 when the domain appears once, every compared value is equal and something was compared, else 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

# KVM statistics end in these; libvirt's own vCPU fields (vcpu.N.state, .time, ...) have no suffix
SUFFIXES = frozenset({"sum", "cur", "max"})


def run(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout


def virsh_stats(uri: str, domain: str) -> tuple[dict[str, int], dict[int, dict[str, int]]]:
    """(VM-level, per-vCPU) KVM statistics of ``virsh domstats --vm --vcpu``, booleans as 0/1."""
    vm: dict[str, int] = {}
    vcpus: dict[int, dict[str, int]] = {}
    for line in run(["virsh", "-c", uri, "domstats", "--vm", "--vcpu", domain]).splitlines():
        key, sep, text = line.strip().partition("=")
        if not sep:
            continue
        value = {"yes": 1, "no": 0}.get(text)
        if value is None:
            try:
                value = int(text)
            except ValueError:
                continue
        parts = key.split(".")
        if parts[0] == "vm" and len(parts) == 3 and parts[2] in SUFFIXES:
            vm[parts[1]] = value
        elif parts[0] == "vcpu" and len(parts) == 4 and parts[1].isdigit() and parts[3] in SUFFIXES:
            vcpus.setdefault(int(parts[1]), {})[parts[2]] = value
    return vm, vcpus


def domain_state(uri: str, domain: str) -> str:
    return run(["virsh", "-c", uri, "domstate", domain]).strip()


def set_paused(uri: str, domain: str, paused: bool, timeout: float = 30.0) -> None:
    want = "paused" if paused else "running"
    if domain_state(uri, domain) != want:
        run(["virsh", "-c", uri, "suspend" if paused else "resume", domain])
    deadline = time.monotonic() + timeout
    while domain_state(uri, domain) != want:
        if time.monotonic() > deadline:
            raise SystemExit(f"mergecheck: {domain} not {want} after {timeout:.0f} s")
        time.sleep(0.1)


def compare(domain: str, uri: str, kvmfleet: str) -> dict[str, Any]:
    virsh_uuid = run(["virsh", "-c", uri, "domuuid", domain]).strip()
    set_paused(uri, domain, True)
    try:
        before = virsh_stats(uri, domain)
        sample = json.loads(run([kvmfleet, "stat", "--json", "--vm", "--vcpu", "-n", "1"]).splitlines()[-1])
        after = virsh_stats(uri, domain)
    finally:
        set_paused(uri, domain, False)
    found = [vm for vm in sample["vms"] if vm["name"] == domain]
    result: dict[str, Any] = {"domain": domain, "appearances": len(found), "virsh_uuid": virsh_uuid,
                              "vm_compared": 0, "vcpu_compared": 0, "mismatches": [],
                              "moved": sorted(_moved(before, after))}
    if len(found) != 1:
        result["vms"] = [(vm["name"], vm["source"]) for vm in sample["vms"]]
        return result
    ours = found[0]
    result.update(source=ours["source"], uuid=ours["uuid"])
    vm_stats, vcpu_stats = before
    for name, value in sorted(vm_stats.items()):
        result["vm_compared"] += 1
        if ours["stats"].get(name) != value:
            result["mismatches"].append([f"vm.{name}", value, ours["stats"].get(name)])
    our_vcpus = {vcpu["id"]: vcpu["stats"] for vcpu in ours.get("vcpus", [])}
    if sorted(our_vcpus) != sorted(vcpu_stats):
        result["mismatches"].append(["vcpus", sorted(vcpu_stats), sorted(our_vcpus)])
    for vcpu, stats in sorted(vcpu_stats.items()):
        for name, value in sorted(stats.items()):
            result["vcpu_compared"] += 1
            got = our_vcpus.get(vcpu, {}).get(name)
            if got != value:
                result["mismatches"].append([f"vcpu.{vcpu}.{name}", value, got])
    return result


def _moved(before: tuple[dict[str, int], dict[int, dict[str, int]]],
           after: tuple[dict[str, int], dict[int, dict[str, int]]]) -> set[str]:
    moved = {f"vm.{k}" for k in before[0].keys() | after[0].keys() if before[0].get(k) != after[0].get(k)}
    for vcpu in before[1].keys() | after[1].keys():
        b, a = before[1].get(vcpu, {}), after[1].get(vcpu, {})
        moved |= {f"vcpu.{vcpu}.{k}" for k in b.keys() | a.keys() if b.get(k) != a.get(k)}
    return moved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("domain")
    parser.add_argument("--uri", default="qemu:///system")
    parser.add_argument("--kvmfleet", default="/opt/kvmfleet/venv/bin/kvmfleet")
    args = parser.parse_args(argv)
    result = compare(args.domain, args.uri, args.kvmfleet)
    print(json.dumps(result, sort_keys=True))
    ok = (result["appearances"] == 1 and not result["mismatches"] and not result["moved"]
          and result["vm_compared"] > 0 and result["vcpu_compared"] > 0 and result.get("uuid") == result["virsh_uuid"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
