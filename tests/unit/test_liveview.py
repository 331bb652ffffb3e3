"""The live view's model (kvmfleet.liveview) and its key map (kvmfleet.livescreen.handle_key), without a terminal;
exits by reason in ``kvmfleet stat --json`` and the text tables, from a fake reasons source."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from tests.unit.agentdata import ListSource, reading

from kvmfleet.collector import Collector, Sample
from kvmfleet.livescreen import handle_key, row_line
from kvmfleet.liveview import LiveModel, Row
from kvmfleet.model import ExitReasonReading, ReasonCounts, Usability, VMKey, VMReading
from kvmfleet.statview import reason_rates, sample_json, sample_text


class FakeReasons:
    """A reasons source whose counts the test sets before each sample."""

    def __init__(self) -> None:
        self.host: ReasonCounts = {}
        self.vms: dict[VMKey, ReasonCounts] = {}
        self.closed = False

    def read(self, vms: Sequence[VMKey]) -> ExitReasonReading:
        return ExitReasonReading({tp: dict(c) for tp, c in self.host.items()},
                                 {key: counts for key, counts in self.vms.items() if key in vms},
                                 {"HLT": "vmx", "KVM_EXIT_HLT": "userspace", "KVM_EXIT_IO": "userspace"})

    def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def two_samples(first: list[VMReading], second: list[VMReading], seconds: float = 2.0,
                reasons: FakeReasons | None = None,
                reasons_then: tuple[ReasonCounts, dict[VMKey, ReasonCounts]] | None = None) -> LiveModel:
    """A model that saw ``first`` then, ``seconds`` later, ``second``."""
    source, clock = ListSource(first), Clock()
    collector = Collector(source, mono_clock=clock, reasons=reasons)
    model = LiveModel(interval=1.0, hostname="hv1")
    model.update(collector.sample())
    source.readings, clock.now = second, clock.now + seconds
    if reasons is not None and reasons_then is not None:
        reasons.host, reasons.vms = reasons_then
    model.update(collector.sample())
    return model


# VM 7 "web": 2 vCPUs; vCPU i has exits = halts + 5 + i. Between the samples web halts 20 more per vCPU (2 s: 10/s
# per vCPU), db 4 more on its one vCPU; guest_mode (instant) and the histogram never have a rate.
def web(halts: int) -> VMReading:
    return reading(7, "web", halts=halts)


def db(halts: int) -> VMReading:
    return reading(8, "db", vcpus=1, halts=halts)


def fleet() -> LiveModel:
    return two_samples([web(10), db(10)], [web(30), db(14)])


def names(rows: list[Row]) -> list[str]:
    return [row.name for row in rows]


def test_rows_sorted_by_rate_idle_hidden_histograms_never_rows():
    model = fleet()
    rows = model.rows()
    # exits: web 2 x 20 + db 4 = 44 in 2 s; halt_exits the same; mmu_pte_write, mmio_exits do not move
    assert [(r.name, r.total, r.rate) for r in rows] == [
        ("exits", (30 + 5) + (30 + 6) + (14 + 5), 22.0),
        ("halt_exits", 30 + 30 + 14, 22.0),
    ]
    # each a share of the summed event rate (exits + halt_exits + the idle event counters at 0)
    assert [r.percent for r in rows] == [50.0, 50.0]
    model.toggle_idle()
    shown = names(model.rows())
    assert shown[:2] == ["exits", "halt_exits"]  # equal rates: the larger total first
    assert {"guest_mode", "mmio_exits", "mmu_pte_write", "pages_4k", "max_mmu_rmap_size"} <= set(shown[2:])
    assert "halt_wait_hist" not in shown
    assert next(r for r in model.rows() if r.name == "pages_4k").rate is None  # an instant value has no rate


def test_first_sample_has_no_rates_and_shows_what_counted():
    model = LiveModel(interval=1.0, hostname="hv1")
    model.update(Collector(ListSource([web(10)])).sample())
    rows = {r.name: r for r in model.rows()}
    assert rows["halt_exits"].total == 20 and rows["halt_exits"].rate is None
    assert "mmio_exits" not in rows  # 0: idle


def test_sort_by_total():
    model = two_samples([web(10), db(10)], [web(11), db(100)])
    model.toggle_idle()
    model.toggle_sort()
    totals = [r.total for r in model.rows()]
    assert totals == sorted(totals, reverse=True)
    assert "sorted by total" in model.header()[1]


def test_filter_keeps_matching_rows_invalid_regex_keeps_the_filter():
    model = fleet()
    model.set_filter("^halt")
    assert names(model.rows()) == ["halt_exits"]
    model.set_filter("(")
    assert model.message.startswith("invalid regex '(':") and model.message.endswith("filter unchanged")
    assert names(model.rows()) == ["halt_exits"] and model.pattern == re.compile("^halt")
    assert "filter /^halt/" in model.header()[1]
    model.clear_filter()
    assert names(model.rows()) == ["exits", "halt_exits"]


def test_pick_a_vm_by_name_or_pid_and_drill_down_to_vcpus():
    model = fleet()
    model.pick("web")
    assert model.header()[0].startswith("kvmfleet stat - VM web (pid 7, 2 vCPUs)")
    assert [(r.name, r.total, r.rate) for r in model.rows()] == [("exits", 35 + 36, 20.0), ("halt_exits", 60, 20.0)]
    model.toggle_drill()
    assert [(r.name, r.total, r.rate, r.percent, r.child) for r in model.rows()] == [
        ("exits", 71, 20.0, 50.0, False),
        ("vcpu 1", 36, 10.0, 50.0, True),  # equal rates: the larger total first
        ("vcpu 0", 35, 10.0, 50.0, True),
        ("halt_exits", 60, 20.0, 50.0, False),
        ("vcpu 0", 30, 10.0, 50.0, True),
        ("vcpu 1", 30, 10.0, 50.0, True),
    ]
    model.pick("8")
    assert model.vm == VMKey(8, 100, 12) and model.rows()[0] == Row("exits", 19, 2.0, 50.0)
    model.pick("")
    assert model.vm is None and model.header()[0].startswith("kvmfleet stat - host (per VM)")


def test_host_drill_down_shows_each_vm_busiest_first():
    model = fleet()
    model.toggle_drill()
    rows = model.rows()
    assert [(r.name, r.rate, r.child) for r in rows[:3]] == [("exits", 22.0, False), ("web", 20.0, True),
                                                             ("db", 2.0, True)]
    assert round(rows[1].percent or 0, 3) == round(100 * 20 / 22, 3)


def test_pick_unknown_or_ambiguous_names_keeps_the_view():
    model = two_samples([web(10), reading(9, "web", halts=1)], [web(30), reading(9, "web", halts=2)])
    model.pick("web")
    assert model.vm is None and model.message == "2 VMs named web: pick one by pid (l lists them)"
    model.pick("nosuch\x1b[2J")
    assert model.vm is None and model.message == "no VM named nosuch\\x1b[2J (nor with that pid): l lists them"
    model.pick("9")
    assert model.vm == VMKey(9, 100, 12)


def test_a_picked_vm_that_goes_is_left_for_the_host():
    source = ListSource([web(10), db(10)])
    collector = Collector(source)
    model = LiveModel(interval=1.0, hostname="hv1")
    model.update(collector.sample())
    model.pick("db")
    source.readings = [web(11)]
    model.update(collector.sample())
    assert model.vm is None and model.message == "the VM picked is gone: back to the host"


def test_reset_counts_totals_from_the_reset():
    source, clock = ListSource([web(10), db(10)]), Clock()
    collector = Collector(source, mono_clock=clock)
    model = LiveModel(interval=1.0, hostname="hv1")
    model.update(collector.sample())
    model.reset()
    source.readings, clock.now = [web(30), db(14)], clock.now + 2
    model.update(collector.sample())
    assert [(r.name, r.total, r.rate) for r in model.rows()] == [("exits", 44, 22.0), ("halt_exits", 44, 22.0)]
    model.pick("web")
    model.toggle_drill()
    assert [(r.name, r.total) for r in model.rows()][:3] == [("exits", 40), ("vcpu 0", 20), ("vcpu 1", 20)]
    model.toggle_idle()
    assert next(r for r in model.rows() if r.name == "pages_4k").total == 107  # an instant value is not reset


def test_vm_list_by_exit_rate():
    model = two_samples([web(10), db(10)], [web(11), db(100)])
    model.toggle_vm_list()
    assert [(r.name, r.pid, r.vcpus, r.exits, r.rate) for r in model.vm_rows()] == [
        ("db", 8, 1, 105, 45.0), ("web", 7, 2, 16 + 17, 1.0)]
    assert model.header()[0].startswith("kvmfleet stat - VM list (by exit rate)")


def test_interval_key_checks_the_number():
    model = fleet()
    model.set_interval("0.5")
    assert model.interval == 0.5
    for bad in ("0", "x", "nan", "1e9"):
        model.set_interval(bad)
        assert model.interval == 0.5 and model.message.endswith("unchanged")


def test_hostile_names_reach_the_view_escaped():
    evil = "web\x1b[2J\x1b]0;owned\x07"
    model = two_samples([reading(7, evil)], [reading(7, evil, halts=20)])
    model.toggle_drill()
    assert "web\\x1b[2J\\x1b]0;owned\\x07" in names(model.rows())
    model.pick(evil)
    assert "VM web\\x1b[2J\\x1b]0;owned\\x07 (pid 7" in model.header()[0]
    assert not any("\x1b" in line for line in model.header())


def test_reason_rows_like_kvm_stat_t_with_rates_from_two_samples():
    reasons = FakeReasons()
    key_web = web(0).identity.key
    reasons.host = {"kvm_userspace_exit": {"KVM_EXIT_HLT": 100, "KVM_EXIT_IO": 10}}
    reasons.vms = {key_web: {"kvm_userspace_exit": {"KVM_EXIT_HLT": 100}}}
    model = two_samples([web(10), db(10)], [web(30), db(14)], reasons=reasons, reasons_then=(
        {"kvm_userspace_exit": {"KVM_EXIT_HLT": 140, "KVM_EXIT_IO": 50}, "kvm_exit": {"HLT": 8}},
        {key_web: {"kvm_userspace_exit": {"KVM_EXIT_HLT": 140}}}))
    model.set_filter(r"\(")
    assert [(r.name, r.total, r.rate, r.percent) for r in model.rows()] == [
        ("kvm_userspace_exit(KVM_EXIT_HLT)", 140, 20.0, 50.0),
        ("kvm_userspace_exit(KVM_EXIT_IO)", 50, 20.0, 50.0),
        ("kvm_exit(HLT)", 8, 4.0, 100.0),  # not seen before: counted from 0
    ]
    model.pick("web")
    assert [(r.name, r.total, r.rate) for r in model.rows()] == [("kvm_userspace_exit(KVM_EXIT_HLT)", 140, 20.0)]
    model.reasons_state = Usability(False, "kernel lockdown (confidentiality)\nforbids tracepoints")
    assert model.header()[-1] == "exit reasons unavailable: kernel lockdown (confidentiality)\\nforbids tracepoints"


def test_reason_rates():
    assert reason_rates({"t": {"A": 10}}, {"t": {"A": 30, "B": 4}}, 2.0) == {"t": {"A": 10.0, "B": 2.0}}
    assert reason_rates({"t": {"A": 10}}, {"t": {"A": 3}}, 2.0) == {"t": {}}  # counting restarted: no rate
    assert reason_rates(None, {"t": {"A": 3}}, 2.0) == {}


def _reasons_sample() -> tuple[Sample, Sample, FakeReasons]:
    reasons = FakeReasons()
    key = web(0).identity.key
    reasons.host = {"kvm_userspace_exit": {"KVM_EXIT_IO": 1, "KVM_EXIT_HLT": 1000}}
    reasons.vms = {key: {"kvm_userspace_exit": {"KVM_EXIT_HLT": 1000}}}
    source, clock = ListSource([web(10), db(10)]), Clock()
    collector = Collector(source, mono_clock=clock, reasons=reasons)
    first = collector.sample()
    clock.now += 2
    reasons.host = {"kvm_userspace_exit": {"KVM_EXIT_IO": 1, "KVM_EXIT_HLT": 1400}}
    reasons.vms = {key: {"kvm_userspace_exit": {"KVM_EXIT_HLT": 1400}}}
    second = collector.sample()
    collector.close()
    assert reasons.closed
    return first, second, reasons


def test_json_carries_exit_reasons_in_the_host_and_per_vm_objects():
    _, second, _ = _reasons_sample()
    obj = json.loads(json.dumps(sample_json(second, None, {}, vcpus=False, pattern=re.compile("^halt"),
                                            reasons_state=Usability(True, "bpf"))))
    assert obj["exit_reasons"] == {"kvm_userspace_exit": {"KVM_EXIT_HLT": 1400, "KVM_EXIT_IO": 1}}
    assert obj["exit_reasons_source"] == {"usable": True, "reason": "bpf"}
    web_obj, db_obj = obj["vms"]
    assert web_obj["exit_reasons"] == {"kvm_userspace_exit": {"KVM_EXIT_HLT": 1400}}
    assert "exit_reasons" not in db_obj  # not attributed by the source
    assert web_obj["stats"] == {"halt_exits": 20, "halt_wait_hist": [0, 6, 0, 2]}  # -f filters counters only
    plain = sample_json(second, None, {}, vcpus=False, pattern=None)
    assert "exit_reasons_source" not in plain and plain["exit_reasons"] == obj["exit_reasons"]


def test_json_without_reasons_keeps_its_keys():
    source = ListSource([web(10)])
    obj = sample_json(Collector(source).sample(), None, {}, vcpus=True, pattern=None)
    assert list(obj) == ["time_ns", "hostname", "source", "sources", "vm_count", "vcpu_count", "host", "rates",
                         "vms", "refused"]
    assert "exit_reasons" not in obj["vms"][0]


def test_text_has_an_exits_by_reason_table_with_rates():
    first, second, _ = _reasons_sample()
    from kvmfleet.collector import rates
    text = sample_text(second, rates(first, second), {}, per_vm=True, vcpus=False, pattern=None, prev=first,
                       reasons_state=Usability(False, "no tracefs"))
    lines = text.splitlines()
    assert "  (unusable: exit reasons: no tracefs)" in lines
    at = lines.index("exits by reason")
    assert [line.split() for line in lines[at + 1:at + 3]] == [["kvm_userspace_exit(KVM_EXIT_HLT)", "1400", "200"],
                                                               ["kvm_userspace_exit(KVM_EXIT_IO)", "1", "0"]]
    assert " exits by reason" in lines  # the VM's own


def test_keys_drive_the_model():
    model = fleet()
    answers = iter(["^halt", "web", "2"])
    keep = [handle_key(model, ord(k), lambda question: next(answers)) for k in "fgvios"]
    assert keep == [True] * 6
    assert model.pattern == re.compile("^halt") and model.vm == VMKey(7, 100, 12)
    assert model.drill and model.show_idle and model.by_total and model.interval == 2.0
    assert handle_key(model, 27, lambda q: None) and model.vm is None  # Esc: the host
    assert handle_key(model, ord("f"), lambda q: None) and model.pattern == re.compile("^halt")  # cancelled
    assert handle_key(model, ord("c"), lambda q: None) and model.pattern is None
    assert handle_key(model, ord("l"), lambda q: None) and model.vm_list
    assert handle_key(model, ord("q"), lambda q: None) is False


def test_row_lines_fit_columns():
    assert row_line(Row("exits", 71, 20.0, 50.0), 80) == f"{'exits':<44} {71:>14} {'20':>10} {'50.0':>7}"
    assert row_line(Row("vcpu 0", 3, 0.25, None, child=True), 80).startswith("  vcpu 0 ")


def test_a_new_vm_shows_what_it_counted_before_it_has_a_rate():
    model = two_samples([web(10)], [web(30), db(14)])
    model.set_filter("exits$")
    model.pick("db")
    assert [(r.name, r.total, r.rate) for r in model.rows()] == [("exits", 19, None), ("halt_exits", 14, None)]
    # mmio_exits counted nothing: idle
    model.host()
    model.toggle_drill()
    # the host's rate counts db's history as it joins the totals (kvmfleet.collector): (90 - 31) / 2 s
    assert [(r.name, r.total, r.rate) for r in model.rows()][:3] == [("exits", 35 + 36 + 19, 29.5),
                                                                     ("web", 71, 20.0), ("db", 19, None)]


def test_log_lines_go_to_the_message_line_while_the_view_runs(monkeypatch, caplog):
    """A warning written to stderr under curses would scribble over the screen: it is the message line instead,
    and reaches the log's handlers once the terminal is back."""
    import curses
    import logging

    from kvmfleet import livescreen

    model = fleet()
    seen = []

    def wrapper(func, *args):
        logging.getLogger("kvmfleet").warning("statsfd: pid 9 \x1b[2J skipped")
        seen.append((model.message, [r.getMessage() for r in caplog.records]))
        return 0

    monkeypatch.setattr(curses, "wrapper", wrapper)
    with caplog.at_level(logging.WARNING):
        assert livescreen.run(model, lambda: Sample(0, 0.0, "x", {}, {}, [])) == 0
    assert seen == [("statsfd: pid 9 \\x1b[2J skipped", [])]  # on the screen, not (yet) in the log
    assert [r.getMessage() for r in caplog.records] == ["statsfd: pid 9 \x1b[2J skipped"]
