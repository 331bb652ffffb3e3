"""exit-load: hosts whose exit rate (per vCPU, or per host where vCPUs are unknown) lies far above the fleet's own
distribution, judged over the whole fleet; and the top list of hosts by exit rate."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..model import Finding, FleetOutcome, HostData, VMData, rounded
from .base import FleetRule, fmt, known, vm_rows

BASES = (("per vCPU", "per_vcpu"), ("per host", "per_host"))  # (words, key) of the two groups judged apart


def mad_z(values: Sequence[float]) -> tuple[float, float]:
    """(median, robust spread): 1.4826 * MAD, or 1.2533 * mean absolute deviation when the MAD is 0."""
    med = statistics.median(values)
    mad = statistics.median([abs(v - med) for v in values])
    if mad > 0:
        return med, 1.4826 * mad
    meanad = sum(abs(v - med) for v in values) / len(values)
    return med, 1.2533 * meanad


def _vm_exits(span: float | None) -> Callable[[VMData], float | None]:
    return lambda vm: vm.rate("exits", span)


class ExitLoad(FleetRule):
    id = "exit-load"
    vm_columns = ("exits",)
    names_exit_reasons = True

    def evaluate_fleet(self, hosts: Mapping[str, HostData]) -> FleetOutcome:
        th = self.rule.thresholds
        known_rates = {name: r for name, h in hosts.items() if (r := h.rate("exits")) is not None}
        top = []
        for name, r in sorted(known_rates.items(), key=lambda kv: (-kv[1], kv[0]))[:max(0, int(th["top_n"]))]:
            h = hosts[name]
            top.append({"host": name, "exits_per_s": rounded(r), "exits_per_vcpu_s": rounded(h.per_vcpu(r)),
                        "vcpus": h.vcpus})
        out = FleetOutcome([], top, {"hosts_with_exits": len(known_rates)})
        groups: dict[str, dict[str, float | None]] = {
            "per_vcpu": {n: hosts[n].per_vcpu(r) for n, r in known_rates.items() if hosts[n].vcpus is not None},
            "per_host": {n: r for n, r in known_rates.items() if hosts[n].vcpus is None},
        }
        for basis, key in BASES:
            values = {n: v for n, v in groups[key].items() if v is not None}
            if len(values) >= max(3, int(th["min_hosts"])):
                out.findings += self._outliers(hosts, known_rates, values, basis, key, out.fleet)
        return out

    def _outliers(self, hosts: Mapping[str, HostData], rates: Mapping[str, float], values: Mapping[str, float],
                  basis: str, key: str, fleet: dict[str, Any]) -> list[Finding]:
        """The hosts of one group far above its median; the group's median and spread go into ``fleet``."""
        th = self.rule.thresholds
        med, spread = mad_z(list(values.values()))
        fleet[f"median_exits_{key}_s"] = rounded(med)
        fleet[f"robust_spread_{key}_s"] = rounded(spread)
        fleet[f"hosts_judged_{key}"] = len(values)
        if spread <= 0 or med < 0:
            return []
        findings = []
        for name, v in sorted(values.items()):
            z = 0.6745 * (v - med) / (spread / 1.4826)
            times = v / med if med > 0 else None
            if v < th["min_per_vcpu_s"] or z < th["z_warning"] or (
                    times is not None and times < th["warning_ratio_to_median"]):
                continue
            critical = times is None or times >= th["critical_ratio_to_median"]
            h = hosts[name]
            evidence = known({"exits_per_s": rates[name], f"exits_{key}_s": v, f"fleet_median_{key}_s": med,
                              "times_median": times, "modified_z": z, "vcpus": h.vcpus})
            findings.append(self.finding(
                name, "critical" if critical else "warning", f"{fmt(v)} exits/s {basis}, {fmt(times)}x the fleet "
                f"median ({fmt(med)}), modified z-score {fmt(z)}", evidence,
                vm_rows(h, _vm_exits(h.span_s), self.vm_columns)))
        return findings
