"""LineBuffer: bounded FIFO, oldest dropped first, take/requeue without reordering."""

from __future__ import annotations

import sys
import threading
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmfleet.ship.buffer import DEFAULT_CAPACITY, LineBuffer
from kvmfleet.ship.lineproto import encode_int_fields, line, series_prefix


def test_fifo_and_overflow_drops_oldest() -> None:
    b = LineBuffer(5)
    assert b.extend(["a", "b", "c"]) == 0
    assert b.extend(["d", "e", "f", "g"]) == 2
    assert b.take(10) == ["c", "d", "e", "f", "g"]
    assert b.stats() == {"capacity": 5, "buffered": 0, "added": 7, "dropped": 2, "taken": 5, "requeued": 0}


def test_batch_larger_than_capacity_keeps_newest() -> None:
    b = LineBuffer(3)
    b.extend(["x"])
    assert b.extend([str(i) for i in range(10)]) == 8
    assert b.take(5) == ["7", "8", "9"]
    assert b.dropped == 8


def test_requeue_front_keeps_order_and_drops_oldest_of_requeued() -> None:
    b = LineBuffer(6)
    b.extend(["1", "2", "3", "4"])
    batch = b.take(3)
    assert batch == ["1", "2", "3"]
    b.extend(["5", "6", "7", "8"])  # 4..8 = 5 lines
    assert b.requeue_front(batch) == 2  # room for 1: "1" and "2" (the oldest) go
    assert b.take(100) == ["3", "4", "5", "6", "7", "8"]
    assert b.dropped == 2


def test_requeue_new_counts_added() -> None:
    b = LineBuffer(4)
    b.extend(["c"])
    assert b.requeue_front(["a", "b"], new=True) == 0
    assert b.take(9) == ["a", "b", "c"]
    assert b.stats()["added"] == 3 and b.stats()["requeued"] == 0


def test_capacity_validation() -> None:
    with pytest.raises(ValueError):
        LineBuffer(0)
    assert LineBuffer().capacity == DEFAULT_CAPACITY == 100_000


@settings(max_examples=300, deadline=None)
@given(
    cap=st.integers(1, 20),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(0, 30)),
            st.tuples(st.just("take"), st.integers(0, 25)),
            st.tuples(st.just("fail"), st.integers(0, 25)),
        ),
        max_size=40,
    ),
)
def test_model(cap: int, ops: list[tuple[str, int]]) -> None:
    """Against a list model: order is kept, size bounded, every line accounted for exactly once."""
    b = LineBuffer(cap)
    model: list[int] = []
    next_id = 0
    sent: list[int] = []
    dropped = 0
    for op, n in ops:
        if op == "add":
            new = list(range(next_id, next_id + n))
            next_id += n
            model.extend(new)
            over = max(0, len(model) - cap)
            dropped += over
            model = model[over:]
            assert b.extend([str(i) for i in new]) == over
        elif op == "take":
            got = [int(x) for x in b.take(n)]
            assert got == model[:n]
            model = model[n:]
            sent.extend(got)
        else:  # take, then the send fails and the batch comes back
            got = b.take(n)
            assert [int(x) for x in got] == model[: len(got)]
            assert b.requeue_front(got) == 0
        assert len(b) == len(model) <= cap
        assert b.stats()["dropped"] == dropped
    assert [int(x) for x in b.take(10**6)] == model
    assert sorted(sent + model) == sent + model  # never reordered
    assert b.stats()["added"] == next_id == len(sent) + len(model) + dropped


def test_threads() -> None:
    b = LineBuffer(1000)
    got: list[str] = []
    done = threading.Event()

    def consumer() -> None:
        while not done.is_set() or len(b):
            got.extend(b.take(50))

    t = threading.Thread(target=consumer)
    t.start()
    for i in range(200):
        b.extend([f"{i}-{j}" for j in range(10)])
    done.set()
    t.join(10)
    assert not t.is_alive(), "the consumer did not drain the buffer within 10 s"
    assert len(got) + b.dropped == 2000
    assert got == sorted(got, key=lambda s: tuple(int(x) for x in s.split("-")))


def realistic_line(vm: int) -> str:
    """A per-VM point of 40 integer KVM counters, as the collector emits it."""
    names = [
        "exits", "halt_exits", "irq_exits", "io_exits", "mmio_exits", "signal_exits", "request_irq_exits",
        "irq_window_exits", "nmi_window_exits", "l1d_flush", "halt_wakeup", "halt_successful_poll",
        "halt_attempted_poll", "halt_poll_invalid", "halt_poll_success_ns", "halt_poll_fail_ns",
        "halt_wait_ns", "pf_taken", "pf_fixed", "pf_emulate", "pf_spurious", "pf_fast", "pf_mmio_spte_created",
        "pf_guest", "tlb_flush", "invlpg", "insn_emulation", "insn_emulation_fail", "hypercalls",
        "irq_injections", "nmi_injections", "req_event", "preemption_reported", "preemption_other",
        "guest_mode", "notify_window_exits", "directed_yield_attempted", "directed_yield_successful",
        "host_state_reload", "fpu_reload",
    ]
    prefix = series_prefix("kvm_vm", {"host": "hv01.dc1.example.net", "vm": f"instance-{vm:08x}",
                                      "uuid": "4b7e1f9c-2d3a-4e5f-8a6b-7c8d9e0f1a2b"})
    return line(prefix, encode_int_fields({n: 123_456_789 + 31 * i + vm for i, n in enumerate(names)}),
                1_795_000_000_123_456_789)


def test_memory_per_line() -> None:
    """Measure what a realistic 40-field line costs in the buffer (documented in buffer.py)."""
    n = 4_000
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    b = LineBuffer(n)
    b.extend([realistic_line(i) for i in range(n)])
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per_line = (after - before) / n
    sample = realistic_line(0)
    full_mb = per_line * DEFAULT_CAPACITY / 1e6
    print(f"\nline length {len(sample)} chars, str {sys.getsizeof(sample)} B, buffer {per_line:.0f} B/line, "
          f"default capacity {DEFAULT_CAPACITY} lines ~ {full_mb:.0f} MB")
    assert 900 <= len(sample) <= 1300
    assert per_line < len(sample) + 120  # str header + deque slot, nothing more
