from kvmfleet.collector import Collector, HostTotals, rates, vm_sample
from kvmfleet.model import StatDesc, StatType, Usability, VMIdentity, VMKey, VMReading
from kvmfleet.sources.base import Source

DESCS = {
    "exits": StatDesc("exits"),
    "pages_4k": StatDesc("pages_4k", StatType.INSTANT),
    "max_mmu_rmap_size": StatDesc("max_mmu_rmap_size", StatType.PEAK),
    "hist": StatDesc("hist", StatType.LOG_HIST, size=2),
}


def reading(pid, vm_stats=None, vcpus=None, start=100):
    ident = VMIdentity(VMKey(pid, start, 10), "qemu", f"vm{pid}")
    return VMReading(ident, "test", vm_stats or {}, vcpus or {}, DESCS)


class ListSource(Source):
    name = "list"

    def __init__(self, script):
        self.script = list(script)

    def read(self):
        return self.script.pop(0)

    def usability(self):
        return Usability(True)


def test_vm_stats_sum_vcpus_and_peak_takes_max():
    vm = vm_sample(reading(1, {"pages_4k": 5}, {0: {"exits": 3, "max_mmu_rmap_size": 4, "hist": (1, 2)},
                                                1: {"exits": 4, "max_mmu_rmap_size": 9, "hist": (3, 4)}}))
    assert vm.stats == {"exits": 7, "max_mmu_rmap_size": 9, "hist": (4, 6), "pages_4k": 5}


def test_host_totals_start_from_current_and_never_go_backwards():
    totals = HostTotals()
    a = vm_sample(reading(1, {"exits": 100, "pages_4k": 10, "hist": (1, 1)}))
    b = vm_sample(reading(2, {"exits": 50, "pages_4k": 20, "max_mmu_rmap_size": 7, "hist": (0, 2)}))
    host, retired = totals.update([a, b])
    assert host == {"exits": 150, "pages_4k": 30, "max_mmu_rmap_size": 7, "hist": (1, 3)} and retired == 0
    # b exits: its cumulative values stay, its instant values leave, peaks stay
    a2 = vm_sample(reading(1, {"exits": 110, "pages_4k": 12, "hist": (2, 1)}))
    host, retired = totals.update([a2])
    assert host == {"exits": 160, "pages_4k": 12, "max_mmu_rmap_size": 7, "hist": (2, 3)} and retired == 1
    # a counter read lower than before (someone cleared a debugfs file) never pulls the total down
    a3 = vm_sample(reading(1, {"exits": 90, "pages_4k": 12, "hist": (2, 1)}))
    host, _ = totals.update([a3])
    assert host["exits"] == 160
    a3b = vm_sample(reading(1, {"exits": 115, "pages_4k": 12, "hist": (2, 1)}))
    host, _ = totals.update([a3b])
    assert host["exits"] == 50 + 115
    # a restarted VM (same pid, new start time) is a new VM: the old one retires
    a4 = vm_sample(reading(1, {"exits": 5, "pages_4k": 1, "hist": (0, 0)}, start=999))
    host, retired = totals.update([a4])
    assert host["exits"] == 50 + 115 + 5 and retired == 1


def test_vcpu_that_disappears_keeps_its_counts_in_host_totals():
    totals = HostTotals()
    vm = vm_sample(reading(1, {"pages_4k": 1}, {0: {"exits": 10}, 1: {"exits": 20}, 2: {"exits": 30}}))
    assert vm.stats["exits"] == 60
    host, _ = totals.update([vm])
    assert host["exits"] == 60
    vm = vm_sample(reading(1, {"pages_4k": 1}, {0: {"exits": 11}, 2: {"exits": 33}}))
    host, retired = totals.update([vm])
    assert host["exits"] == 11 + 33 + 20 and retired == 0

def test_rates_skip_new_vms_and_resets():
    src = ListSource([
        [reading(1, {"exits": 100, "pages_4k": 3})],
        [reading(1, {"exits": 300, "pages_4k": 9}), reading(2, {"exits": 7})],
    ])
    clock = iter([0.0, 0.0, 2.0, 2.0])
    collector = Collector(src, wall_clock=lambda: 1, mono_clock=lambda: next(clock))
    first, second = collector.sample(), collector.sample()
    r = rates(first, second)
    assert r.interval_s == 2.0
    assert r.host == {"exits": (307 - 100) / 2}
    assert r.vms == {VMKey(1, 100, 10): {"exits": 100.0}}


def test_a_vm_or_vcpu_back_after_it_was_retired_is_not_counted_twice():
    """Its fds were dropped for a while (an error, or a VMM that closed and reopened them): same key, same counters."""
    totals = HostTotals()

    def both(a_vcpus, b_exits=50):
        return [vm_sample(reading(1, {"pages_4k": 1}, a_vcpus)), vm_sample(reading(2, {"exits": b_exits}))]

    assert totals.update(both({0: {"exits": 10}, 1: {"exits": 20}}))[0]["exits"] == 80
    assert totals.update(both({0: {"exits": 11}}))[0]["exits"] == 81  # vCPU 1 gone: its 20 retired
    assert totals.update(both({0: {"exits": 12}, 1: {"exits": 25}}))[0]["exits"] == 87  # back, grown: 12 + 25 + 50
    host, retired = totals.update([vm_sample(reading(2, {"exits": 60}))])  # VM 1 gone whole
    assert host["exits"] == 97 and retired == 1
    host, _ = totals.update(both({0: {"exits": 13}, 1: {"exits": 30}}, 61))  # back whole, grown
    assert host["exits"] == 13 + 30 + 61
    totals.update([vm_sample(reading(2, {"exits": 62}))])
    host, _ = totals.update(both({0: {"exits": 14}}, 63))  # back without vCPU 1: its 30 stay retired
    assert host["exits"] == 14 + 30 + 63 and host["pages_4k"] == 1
    for _ in range(1001):
        totals.update([])
    assert totals._gone_vms == {} and totals._gone_vcpus == {}  # keys that never come back are forgotten


def test_vcpu_count_is_the_vcpus_read_or_listed_whichever_is_more():
    """debugfs lists every vCPU; the stats fds a VMM holds may be fewer (a vCPU's fd not opened yet)."""
    listed_only = reading(1, {"exits": 3})
    listed_only.vcpus_listed = 3
    fewer_fds = reading(2, {"exits": 3}, {0: {"exits": 1}})
    fewer_fds.vcpus_listed = 2
    read_only = reading(3, {}, {0: {"exits": 1}, 1: {"exits": 1}})
    nothing = reading(4, {"exits": 3})
    assert [vm_sample(r).vcpu_count for r in (listed_only, fewer_fds, read_only, nothing)] == [3, 2, 2, 0]
    sample = Collector(ListSource([[listed_only, fewer_fds, read_only, nothing]])).sample()
    assert sample.vcpu_count == 7
