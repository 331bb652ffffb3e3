"""What ``kvmfleet stat``'s live view shows, as data: the rows, their order, the filter, the VM picked.

The model of kvm_stat's full-screen view (its ``Tui``), kept apart from curses (:mod:`kvmfleet.livescreen` draws
it) so that every rule is tested without a terminal:

* rows are counters of the current scope (the host, or one VM picked by name or pid) with their total, their
  current rate and their share of the scope's event rate; histograms are never rows (their buckets are no
  single number: ``--json`` has them); exits by reason (``--reasons``) are rows too, named like ``kvm_stat -t``
  names them: ``kvm_exit(HLT)``, ``kvm_userspace_exit(KVM_EXIT_IO)``;
* sorted by the current rate, then the total (or by the total first); idle rows (no rate, or 0) hidden unless
  asked for; a regex filter keeps the rows whose name it finds;
* drill down: under each counter, its share per VM (host scope) or per vCPU (VM scope);
* the VM list: every VM by its exit rate;
* reset: totals count from the sample taken at the reset (rates are unchanged).

Names from outside (VM names from VMM command lines, counter and reason names) are escaped for the terminal.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from .collector import Rates, Sample, VMSample, rates
from .model import ReasonCounts, StatDesc, Stats, StatType, StatUnit, Usability, VMKey
from .statview import reason_rates
from .textsafe import for_terminal, one_line, shortened

NAME_CHARS = 60  # a VM name is cut after this many characters in the view (a guest owner chooses it)
EXITS = "exits"  # the counter the VM list sorts by


@dataclass(frozen=True)
class Row:
    """One line of the view. ``percent``: of the scope's summed event rate (a counter), of its tracepoint's rate
    (a reason), of its parent row's rate (a child: a VM's or vCPU's share)."""

    name: str  # terminal-safe
    total: int
    rate: float | None  # per second; None: no rate (an instant value, or no previous sample yet)
    percent: float | None = None
    child: bool = False  # a per-VM or per-vCPU row under the counter above it


@dataclass(frozen=True)
class VMRow:
    """One VM of the VM list."""

    name: str  # terminal-safe
    pid: int
    vcpus: int
    exits: int
    rate: float | None
    percent: float | None


@dataclass
class _Scope:
    """The numbers of one scope (the host, a VM, a vCPU) the rows are made of."""

    stats: Stats
    descs: Mapping[str, StatDesc]
    rates: Mapping[str, float]
    base: Stats  # the same scope at the reset (empty: count from 0)
    reasons: ReasonCounts | None = None
    reason_rates: dict[str, dict[str, float]] = field(default_factory=dict)
    reason_base: ReasonCounts | None = None
    has_rates: bool = False  # a previous sample of this scope exists: a missing rate means none, not "not yet"


def _is_event(desc: StatDesc | None) -> bool:
    """A counter of events (exits, halts), not of time, bytes or cycles: those add up to an event rate."""
    return desc is None or (desc.type is StatType.CUMULATIVE and desc.unit is StatUnit.NONE)


def _since(value: int, base: object, desc: StatDesc | None) -> int:
    """A cumulative total counted from the reset; other values as they are."""
    if not isinstance(base, int) or (desc is not None and desc.type is not StatType.CUMULATIVE):
        return value
    return max(0, value - base)


def _sort_key(row: Row | VMRow, by_total: bool) -> tuple[float, float, str]:
    rate = row.rate if row.rate is not None else -1.0
    total = float(row.exits if isinstance(row, VMRow) else row.total)
    first, second = (total, rate) if by_total else (rate, total)
    return (-first, -second, row.name)


class LiveModel:
    """State of the live view (filter, scope, toggles) and the rows it shows for the last two samples."""

    def __init__(self, *, interval: float, pattern: re.Pattern[str] | None = None,
                 hostname: str | None = None) -> None:
        self.interval = interval
        self.pattern = pattern
        self.vm: VMKey | None = None  # the VM picked; None: the host
        self.drill = False  # per-VM (host) or per-vCPU (VM) rows under each counter
        self.show_idle = False
        self.by_total = False  # sort by total first instead of rate
        self.vm_list = False  # the VM list instead of counters
        self.message = ""  # one line for the operator: what a key did or why it did nothing
        self.reasons_state: Usability | None = None  # the exit reasons source's, when one is on
        self.sources: dict[str, Usability] = {}
        self.hostname = hostname or socket.gethostname()
        self.prev: Sample | None = None
        self.cur: Sample | None = None
        self.rates: Rates | None = None
        self._base: Sample | None = None  # the sample at the last reset
        self._reset_at: float | None = None  # wall clock of the reset, for the header

    # -- samples --------------------------------------------------------------------------------------------
    def update(self, sample: Sample) -> None:
        self.prev, self.cur = self.cur, sample
        self.rates = rates(self.prev, sample) if self.prev is not None else None
        if self.vm is not None and self._vm(self.vm) is None:
            self.message = "the VM picked is gone: back to the host"
            self.vm = None

    # -- keys -----------------------------------------------------------------------------------------------
    def set_filter(self, text: str) -> None:
        """Filter rows by the regex ``text`` (empty: no filter); an invalid one keeps the filter there was."""
        if not text:
            self.clear_filter()
            return
        try:
            self.pattern = re.compile(text)
        except re.error as err:
            self.message = f"invalid regex {one_line(text)!r}: {err}; filter unchanged"
            return
        self.message = f"filter {one_line(text)}"

    def clear_filter(self) -> None:
        self.pattern = None
        self.message = "filter cleared"

    def pick(self, text: str) -> None:
        """Show the VM named ``text`` (or with that pid); empty: back to the host."""
        text = text.strip()
        if not text:
            self.host()
            return
        vms = self.cur.vms if self.cur is not None else []
        found = [vm for vm in vms if vm.identity.name == text]
        if not found and text.isdigit():
            found = [vm for vm in vms if vm.identity.key.pid == int(text)]
        named = for_terminal(shortened(text, NAME_CHARS))
        if len(found) > 1:
            self.message = f"{len(found)} VMs named {named}: pick one by pid (l lists them)"
            return
        if not found:
            self.message = f"no VM named {named} (nor with that pid): l lists them"
            return
        self.vm, self.vm_list = found[0].identity.key, False
        self.message = ""

    def host(self) -> None:
        self.vm, self.vm_list, self.message = None, False, ""

    def toggle_drill(self) -> None:
        self.drill = not self.drill
        self.vm_list = False

    def toggle_idle(self) -> None:
        self.show_idle = not self.show_idle

    def toggle_sort(self) -> None:
        self.by_total = not self.by_total

    def toggle_vm_list(self) -> None:
        self.vm_list = not self.vm_list

    def reset(self) -> None:
        """Totals count from now (kvm_stat's ``r``)."""
        self._base = self.cur
        self._reset_at = time.time()
        self.message = "totals reset"

    def set_interval(self, text: str) -> None:
        try:
            seconds = float(text)
        except ValueError:
            seconds = 0.0
        if not 0.1 <= seconds <= 3600:  # nan fails too
            self.message = f"interval {one_line(text)!r}: expected seconds from 0.1 to 3600; unchanged"
            return
        self.interval = seconds
        self.message = f"every {seconds:g} s"

    # -- what is shown --------------------------------------------------------------------------------------
    def _vm(self, key: VMKey, sample: Sample | None = None) -> VMSample | None:
        sample = sample or self.cur
        return next((vm for vm in sample.vms if vm.identity.key == key), None) if sample is not None else None

    def _reason_rates(self, cur: ReasonCounts | None, prev: ReasonCounts | None) -> dict[str, dict[str, float]]:
        if self.rates is None or prev is None:
            return {}
        return reason_rates(prev, cur, self.rates.interval_s)

    def _host_scope(self) -> _Scope:
        assert self.cur is not None
        base = self._base
        return _Scope(self.cur.host, self.cur.host_descs, self.rates.host if self.rates else {},
                      base.host if base else {}, self.cur.exit_reasons,
                      self._reason_rates(self.cur.exit_reasons, self.prev.exit_reasons if self.prev else None),
                      base.exit_reasons if base else None, self.rates is not None)

    def _vm_scope(self, vm: VMSample) -> _Scope:
        key = vm.identity.key
        base = self._vm(key, self._base) if self._base is not None else None
        before = self._vm(key, self.prev) if self.prev is not None else None
        return _Scope(vm.stats, vm.descs, self.rates.vms.get(key, {}) if self.rates else {},
                      base.stats if base else {}, vm.exit_reasons,
                      self._reason_rates(vm.exit_reasons, before.exit_reasons if before else None),
                      base.exit_reasons if base else None, self.rates is not None and key in self.rates.vms)

    def _vcpu_scopes(self, vm: VMSample) -> list[tuple[str, _Scope]]:
        key = vm.identity.key
        base = self._vm(key, self._base) if self._base is not None else None
        return [(f"vcpu {vcpu}", _Scope(stats, vm.descs, self.rates.vcpus.get((key, vcpu), {}) if self.rates else {},
                                        base.vcpus.get(vcpu, {}) if base else {},
                                        has_rates=self.rates is not None and (key, vcpu) in self.rates.vcpus))
                for vcpu, stats in sorted(vm.vcpus.items())]

    def _idle(self, row: Row, scope: _Scope) -> bool:
        if not scope.has_rates:  # no rate yet (the first sample, a new VM): what never counted is idle
            return row.total == 0
        return not row.rate

    def rows(self) -> list[Row]:
        """The rows of the counters view, in display order (children right under their counter)."""
        if self.cur is None:
            return []
        if self.vm is not None and (vm := self._vm(self.vm)) is not None:
            scope = self._vm_scope(vm)
            children = self._vcpu_scopes(vm) if self.drill else []
        else:
            scope = self._host_scope()
            children = [(for_terminal(shortened(vm.identity.name, NAME_CHARS)), self._vm_scope(vm))
                        for vm in self.cur.vms] if self.drill else []
        # each child's rows once, by name: a drill-down over many VMs stays linear in VMs x counters
        child_rows = [(label, child, {row.name: row for row in self._counter_rows(child) + self._reason_rows(child)})
                      for label, child in children]
        out: list[Row] = []
        for row in self._sorted(self._counter_rows(scope) + self._reason_rows(scope), scope):
            out.append(row)
            kids = [(self._child(label, mine[row.name], row), child) for label, child, mine in child_rows
                    if row.name in mine]
            out += sorted((kid for kid, child in kids if self.show_idle or not self._idle(kid, child)),
                          key=lambda kid: _sort_key(kid, self.by_total))
        return out

    def _sorted(self, rows: list[Row], scope: _Scope) -> list[Row]:
        return sorted((row for row in rows if self.show_idle or not self._idle(row, scope)),
                      key=lambda row: _sort_key(row, self.by_total))

    def _shown(self, name: str) -> bool:
        return self.pattern is None or self.pattern.search(name) is not None

    def _counter_rows(self, scope: _Scope) -> list[Row]:
        event_rate = sum(rate for name, rate in scope.rates.items() if _is_event(scope.descs.get(name)))
        rows = []
        for name, value in scope.stats.items():
            if not isinstance(value, int) or not self._shown(name):
                continue  # histograms are no rows
            desc = scope.descs.get(name)
            rate = scope.rates.get(name)
            percent = 100.0 * rate / event_rate if rate is not None and event_rate and _is_event(desc) else None
            rows.append(Row(for_terminal(name), _since(value, scope.base.get(name), desc), rate, percent))
        return rows

    def _reason_rows(self, scope: _Scope) -> list[Row]:
        rows = []
        for tracepoint, counts in sorted((scope.reasons or {}).items()):
            tp_rates = scope.reason_rates.get(tracepoint, {})
            tp_rate = sum(tp_rates.values())
            base = (scope.reason_base or {}).get(tracepoint, {})
            for reason, count in counts.items():
                name = f"{tracepoint}({reason})"
                if not self._shown(name):
                    continue
                rate = tp_rates.get(reason)
                percent = 100.0 * rate / tp_rate if rate is not None and tp_rate else None
                rows.append(Row(for_terminal(name), max(0, count - base.get(reason, 0)), rate, percent))
        return rows

    @staticmethod
    def _child(label: str, mine: Row, parent: Row) -> Row:
        """A VM's or vCPU's ``mine`` row of ``parent``'s counter, as a share of the parent's rate."""
        percent = 100.0 * mine.rate / parent.rate if mine.rate is not None and parent.rate else None
        return Row(label, mine.total, mine.rate, percent, child=True)

    def vm_rows(self) -> list[VMRow]:
        """The VM list: every VM with its exits, busiest first (or by total)."""
        if self.cur is None:
            return []
        host_rate = self.rates.host.get(EXITS) if self.rates else None
        rows = []
        for vm in self.cur.vms:
            scope = self._vm_scope(vm)
            value = vm.stats.get(EXITS)
            exits = _since(value, scope.base.get(EXITS), vm.descs.get(EXITS)) if isinstance(value, int) else 0
            rate = scope.rates.get(EXITS)
            percent = 100.0 * rate / host_rate if rate is not None and host_rate else None
            rows.append(VMRow(for_terminal(shortened(vm.identity.name, NAME_CHARS)), vm.identity.key.pid,
                              vm.vcpu_count, exits, rate, percent))
        return sorted(rows, key=lambda row: _sort_key(row, self.by_total))

    def header(self) -> list[str]:
        """The header lines: where the numbers come from, what the view shows and how."""
        sample = self.cur
        if sample is None:
            return [f"kvmfleet stat  host {for_terminal(self.hostname)}  waiting for the first sample"]
        if self.vm_list:
            scope = "VM list (by exit rate)" if not self.by_total else "VM list (by exits)"
        elif self.vm is not None and (vm := self._vm(self.vm)) is not None:
            scope = (f"VM {for_terminal(shortened(vm.identity.name, NAME_CHARS))} (pid {vm.identity.key.pid}, "
                     f"{vm.vcpu_count} vCPUs{', per vCPU' if self.drill else ''})")
        else:
            scope = "host" + (" (per VM)" if self.drill else "")
        lines = [f"kvmfleet stat - {scope}  host {for_terminal(self.hostname)}  source {for_terminal(sample.source)}"
                 f"  {len(sample.vms)} VMs  {sample.vcpu_count} vCPUs  every {self.interval:g} s"]
        since = time.strftime("%H:%M:%S", time.localtime(self._reset_at)) if self._reset_at else "start"
        filt = f"filter /{one_line(self.pattern.pattern)}/" if self.pattern is not None else "no filter"
        lines.append(f"{filt}  sorted by {'total' if self.by_total else 'rate'}  idle "
                     f"{'shown' if self.show_idle else 'hidden'}  totals since {since}"
                     + (f"  {len(sample.refused)} VMs refused (implausible values)" if sample.refused else ""))
        if self.reasons_state is not None and not self.reasons_state.usable:
            lines.append(f"exit reasons unavailable: {one_line(self.reasons_state.reason)}")
        unusable = [f"{name}: {one_line(state.reason)}" for name, state in self.sources.items() if not state]
        if unusable and not sample.vms:
            lines.append("unusable sources: " + "; ".join(unusable))
        return lines
