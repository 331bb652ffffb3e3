"""The BPF exit-reason counter on real guests: exact counts by reason host-wide and per VMM, dead VMMs folded.

``kvm:kvm_userspace_exit`` fires once per return of KVM_RUN to the VMM: N loops on M vCPUs give exactly N*M of
the workload's reason (``hlt`` KVM_EXIT_HLT 5, MMIO store KVM_EXIT_MMIO 6, ``out`` KVM_EXIT_IO 2) plus M
KVM_EXIT_IO for the done ``out``, and no KVM_EXIT_INTR when the VMM stops (guests.expected_userspace_exits).

Other processes on the host (other tests' guests) hit the same tracepoint. Per-process counts are exact
whatever they do. Host-wide counts are checked against a per-process *witness* counter opened before the
counter under test: both programs run on every hit, so in a window where the witness did not move, the counter
holds exactly what the witness counted since the counter opened (our guests' exact counts + the others').
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Collection
from typing import TypeVar

import pytest

from kvmfleet import cpulist
from kvmfleet.exitreasons import bpf, tracefmt
from kvmfleet.exitreasons.bpf import BpfExitCounter
from kvmfleet.exitreasons.counter import Counts, ExitCounter, TracepointSpec
from kvmfleet.exitreasons.perfcount import PerfCountCounter, reasons_to_count
from kvmfleet.guestvmm import detect_backend, launch
from kvmfleet.guestvmm.guests import expected_userspace_exits
from kvmfleet.logsay import SayOnce

KVM_EXIT_IO = 2
BPF_MAP_UPDATE_ELEM = 2
TP = "kvm_userspace_exit"
T = TypeVar("T")
C = TypeVar("C", bound=ExitCounter)


def userspace_exit_spec() -> TracepointSpec:
    return tracefmt.read_format("kvm/kvm_userspace_exit").spec("reason")


def kvm_exit_spec() -> TracepointSpec:
    return tracefmt.read_format("kvm/kvm_exit").spec("exit_reason")


def expected(workload: str, loops: int, vcpus: int) -> Counts:
    """The exact userspace exits of a guestvmm run (guests.expected_userspace_exits), coded by the format file."""
    codes = {name: code for code, name in tracefmt.read_format("kvm/kvm_userspace_exit").tables[None].items()}
    return {(TP, 0, codes[name]): n for name, n in expected_userspace_exits(workload, loops, vcpus).items()}


def add(*counts: Counts) -> Counts:
    total: Counter[tuple[str, int, int]] = Counter()
    for c in counts:
        total.update(c)
    return {k: v for k, v in total.items() if v}


def minus(a: Counts, b: Counts) -> Counts:
    return {k: v for k in a.keys() | b.keys() if (v := a.get(k, 0) - b.get(k, 0))}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def open_after_quiet(witness: BpfExitCounter, factory: Callable[[], C]) -> tuple[C, Counts]:
    """Open a counter while the witness does not move; returns it and the witness's counts at that moment."""
    deadline = time.monotonic() + 30
    while True:
        before = witness.read()[0]
        counter = factory()
        if witness.read()[0] == before:
            return counter, before
        counter.close()
        assert time.monotonic() < deadline, "other processes kept exiting to userspace: no quiet moment to open"
        time.sleep(0.05)


def read_bracketed(witness: BpfExitCounter, read: Callable[[], T],
                   pids: Collection[int] = ()) -> tuple[tuple[Counts, dict[int, Counts]], T]:  # fmt: skip
    """(witness.read(pids), read()) from a window in which the witness did not move."""
    deadline = time.monotonic() + 30
    while True:
        first = witness.read(pids)
        got = read()
        if witness.read(pids)[0] == first[0]:
            return first, got
        assert time.monotonic() < deadline, f"other processes kept exiting to userspace (witness: {first[0]})"
        time.sleep(0.05)


@pytest.fixture
def witness():
    with BpfExitCounter([userspace_exit_spec()], per_process=True) as counter:
        yield counter


def test_per_process_counts_are_exact_for_each_guest():
    runs = {"halt": (2, 1000), "mmio": (1, 700), "pio": (2, 300)}
    with BpfExitCounter([userspace_exit_spec()], per_process=True) as counter:
        guests = {w: launch(f"bpf-{w}", vcpus=v, workload=w, loops=n) for w, (v, n) in runs.items()}
        try:
            for guest in guests.values():
                guest.wait_ready(60)
            pids = [g.pid for g in guests.values()]
            host, per_pid = counter.read([*pids, 999_999_999])  # a pid that cannot exist gets nothing
            # the done out is the last exit of each vCPU and the ready line comes after it: nothing moves now
            assert counter.read(pids)[1] == {p: per_pid[p] for p in pids}
        finally:
            for guest in guests.values():
                guest.stop()
    assert per_pid[999_999_999] == {}
    for workload, (vcpus, loops) in runs.items():
        assert per_pid[guests[workload].pid] == expected(workload, loops, vcpus), workload
    assert per_pid[guests["pio"].pid] == {(TP, 0, KVM_EXIT_IO): 301 * 2}
    for key, count in add(*(per_pid[p] for p in pids)).items():
        assert host[key] >= count  # host-wide: ours and whatever else ran


def test_host_wide_counts_are_exact(witness):
    specs = [userspace_exit_spec(), kvm_exit_spec()]
    counter, base = open_after_quiet(witness, lambda: BpfExitCounter(specs, per_process=False))
    with counter:
        with launch("bpf-hw-halt", vcpus=2, workload="halt", loops=1500) as halt, \
                launch("bpf-hw-mmio", vcpus=1, workload="mmio", loops=400) as mmio:  # fmt: skip
            halt.wait_ready(60)
            mmio.wait_ready(60)
            (w_host, w_pid), (host, per_pid) = read_bracketed(witness, counter.read, [halt.pid, mmio.pid])
        ours = add(expected("halt", 1500, 2), expected("mmio", 400, 1))
        assert w_pid == {halt.pid: expected("halt", 1500, 2), mmio.pid: expected("mmio", 400, 1)}
        others = minus(minus(w_host, base), ours)  # other processes' exits since the counter opened
        assert host == add(ours, others)
        assert per_pid == {}
        if detect_backend() == "pvm":  # the emulated guests never make kvm_exit fire on PVM
            assert not any(key[0] == "kvm_exit" for key in host)
        assert counter.lost() == {}
        # host-wide: one key per reason, whatever the number of processes
        assert sorted(bpf.KEY.unpack(raw) for raw, _ in counter._entries()) == sorted(
            (0, k[1], k[2], [s.name for s in specs].index(k[0])) for k in host)
        with pytest.raises(ValueError, match="per_process=True"):
            counter.read([halt.pid])


def test_hits_on_another_cpu_than_the_perf_event_are_counted():
    # One perf event, opened on the first online CPU, runs the program on every CPU: pin the guest elsewhere.
    online = cpulist.read("/sys/devices/system/cpu/online")
    other = max(online)
    assert other != bpf.first_online_cpu(), "needs two online CPUs"
    saved = os.sched_getaffinity(0)
    with BpfExitCounter([userspace_exit_spec()], per_process=True) as counter:
        os.sched_setaffinity(0, {other})
        try:
            guest = launch("bpf-cpu", vcpus=2, workload="halt", loops=800)
        finally:
            os.sched_setaffinity(0, saved)
        with guest:
            guest.wait_ready(60)
            assert os.sched_getaffinity(guest.pid) == {other}
            assert counter.read([guest.pid])[1] == {guest.pid: expected("halt", 800, 2)}


def test_dead_processes_are_folded_into_host_counts_and_deleted_from_the_map(witness):
    counter, base = open_after_quiet(witness, lambda: BpfExitCounter([userspace_exit_spec()], per_process=True))
    with counter:
        live = launch("bpf-live", vcpus=1, workload="mmio", loops=200)
        with live:
            live.wait_ready(60)
            gone = launch("bpf-gone", vcpus=2, workload="halt", loops=600, exit_after_done=True)
            gone.wait_ready(60)
            assert gone.popen.wait(30) == 0
            gone.stop()
            tgids = {bpf.KEY.unpack(raw)[0] for raw, _ in counter._entries()}
            assert {gone.pid, live.pid} <= tgids  # the dead one is still in the map until a read

            (w_host, _), (host, per_pid) = read_bracketed(witness, counter.read)
            assert host == minus(w_host, base)  # nothing lost, nothing counted twice by the fold
            assert per_pid == {}
            tgids = {bpf.KEY.unpack(raw)[0] for raw, _ in counter._entries()}
            assert gone.pid not in tgids and live.pid in tgids  # dead deleted, live (not asked about) kept
            for key, count in expected("halt", 600, 2).items():
                assert counter._retired[key] >= count
            # the retired sum stays in later reads, and the live one's counts are still exact
            (w_host, _), (host, per_pid) = read_bracketed(witness, lambda: counter.read([live.pid]))
            assert host == minus(w_host, base)
            assert per_pid == {live.pid: expected("mmio", 200, 1)}


def test_a_full_map_loses_hits_visibly(witness, caplog):
    say = SayOnce(logging.getLogger("test-bpf-full"))
    factory = lambda: BpfExitCounter([userspace_exit_spec()], per_process=True, max_entries=1, say=say)  # noqa: E731
    counter, base = open_after_quiet(witness, factory)
    with counter:
        # 2 keys (HLT, then the done IO) for a map of 1: at least the IO is lost
        with launch("bpf-full", vcpus=1, workload="halt", loops=300) as guest:
            guest.wait_ready(60)
            (w_host, w_pid), ((host, _), lost) = read_bracketed(
                witness, lambda: (counter.read(), counter.lost()), [guest.pid])
        assert w_pid[guest.pid] == expected("halt", 300, 1)
        assert len(counter._entries()) == 1
        assert set(lost) == {TP} and lost[TP] >= 1
        # every hit is either counted or lost, exactly
        assert sum(host.values()) + lost[TP] == sum(minus(w_host, base).values())
        said = [r.getMessage() for r in caplog.records if r.name == "test-bpf-full"]
        assert len(said) == 1 and "the BPF map is full (1 (process, reason) keys)" in said[0]


def test_fds_back_to_baseline_after_close_and_after_a_failed_open():
    baseline = open_fds()
    specs = [userspace_exit_spec(), kvm_exit_spec()]
    counter = BpfExitCounter(specs, per_process=True)
    assert counter.fds() == 2 + 2 * len(specs)  # 2 maps, a program and a perf event per tracepoint
    assert open_fds() == baseline + counter.fds()
    counter.read()
    counter.lost()
    counter.close()
    assert counter.fds() == 0 and open_fds() == baseline
    counter.close()  # twice is harmless
    with pytest.raises(ValueError, match="closed"):
        counter.read()

    good = userspace_exit_spec()
    stale = TracepointSpec("gone", 0x7FFFFFF0, good.reason_field, good.reason_offset, good.reason_size)
    with pytest.raises(OSError, match=r"perf_event_open\(tracepoint gone id 2147483632"):
        BpfExitCounter([good, stale], per_process=True)
    assert open_fds() == baseline


def test_the_verifier_log_is_in_the_error():
    good = userspace_exit_spec()
    misaligned = TracepointSpec(good.name, good.event_id, good.reason_field, good.reason_offset + 1, 4)
    baseline = open_fds()
    with pytest.raises(OSError, match=r"(?s)BPF_PROG_LOAD.*verifier log:.*invalid bpf_context access"):
        BpfExitCounter([misaligned], per_process=False)
    beyond = TracepointSpec(good.name, good.event_id, good.reason_field, 4000, 4)  # past the record
    with pytest.raises(OSError, match=r"PERF_EVENT_IOC_SET_BPF.*wrong field offset"):
        BpfExitCounter([beyond], per_process=False)
    assert open_fds() == baseline


def test_map_lookup_one_by_one_gives_the_same_entries_as_batch():
    with BpfExitCounter([userspace_exit_spec()], per_process=True) as counter, \
            launch("bpf-walk", vcpus=1, workload="pio", loops=50) as guest:  # fmt: skip
        guest.wait_ready(60)
        counter.read()
        assert counter._batch is True  # this kernel has BPF_MAP_LOOKUP_BATCH
        mine = lambda entries: sorted(e for e in entries if bpf.KEY.unpack(e[0])[0] == guest.pid)  # noqa: E731
        assert mine(counter._entries_one_by_one()) == mine(counter._entries_batch()) == [
            (bpf.KEY.pack(guest.pid, 0, KVM_EXIT_IO, 0), 51)]



def test_many_keys_read_in_several_batches_and_per_cpu_slots_summed():
    # 600 keys (more than one batch of 256) written from user space under this process's tgid, with a
    # different value in each CPU's slot: the read must sum the slots and return every key.
    me = os.getpid()
    with BpfExitCounter([userspace_exit_spec()], per_process=True) as counter:
        slots = list(range(1, counter.ncpus + 1))
        values = ctypes.create_string_buffer(struct.pack(f"<{counter.ncpus}Q", *slots))
        for reason in range(1000, 1600):
            key = ctypes.create_string_buffer(bpf.KEY.pack(me, 0, reason, 0), bpf.KEY.size)
            attr = bpf._attr(32, (0, "I", counter.counts_fd), (8, "Q", ctypes.addressof(key)),
                             (16, "Q", ctypes.addressof(values)))  # fmt: skip
            bpf.bpf(BPF_MAP_UPDATE_ELEM, attr, "test update")
        _, per_pid = counter.read([me])
        assert per_pid == {me: {(TP, 0, reason): sum(slots) for reason in range(1000, 1600)}}
        mine = lambda entries: sorted(e for e in entries if bpf.KEY.unpack(e[0])[0] == me)  # noqa: E731
        assert len(mine(counter._entries_batch())) == 600
        assert mine(counter._entries_batch()) == mine(counter._entries_one_by_one())


def test_every_program_run_is_counted_and_none_missed(witness):
    # With the kernel's run statistics on, the program's run count is every hit since it was attached: in a
    # window where nothing moves it equals the sum of the counts exactly.
    stats_fd = bpf.enable_run_stats()
    try:
        counter, _ = open_after_quiet(witness, lambda: BpfExitCounter([userspace_exit_spec()], per_process=False))
        with counter, launch("bpf-runs", vcpus=2, workload="pio", loops=400) as guest:
            guest.wait_ready(60)
            _, ((host, _), (runs, run_ns, missed)) = read_bracketed(
                witness, lambda: (counter.read(), bpf.prog_run_stats(counter.prog_fds[0])))
            assert sum(host.values()) == runs >= 401 * 2
            assert run_ns > 0 and missed == 0
            assert counter.missed() == {}
    finally:
        os.close(stats_fd)



def test_other_perf_users_of_the_tracepoint_still_see_every_hit(witness):
    # kvm_stat's way (a filtered counting event per reason and CPU) keeps counting while BPF counters (the
    # witness) are attached: the program returns 1 (0 would hide each hit from every perf event of the
    # tracepoint). In a window where the witness did not move, both counted exactly the same hits.
    keys = [(TP, 0, KVM_EXIT_IO), (TP, 0, 5)]
    reasons = reasons_to_count(userspace_exit_spec(), [(isa, code) for _, isa, code in keys], False)
    perf, base = open_after_quiet(witness, lambda: PerfCountCounter(reasons))
    try:
        with launch("bpf-coexist", vcpus=2, workload="halt", loops=250) as guest:
            guest.wait_ready(60)
            (w_host, w_pid), (perf_host, _) = read_bracketed(witness, perf.read, [guest.pid])
        assert w_pid[guest.pid] == expected("halt", 250, 2)
        since = minus(w_host, base)
        assert perf_host == {k: since[k] for k in keys if since.get(k)}
        assert perf_host[(TP, 0, 5)] >= 500
    finally:
        perf.close()


def test_in_a_pid_namespace_of_its_own_processes_are_numbered_as_its_proc_shows():
    # The collector in a container: the inside guest gets the pid number of a busy outside guest. Counted per
    # process with bpf_get_ns_current_pid_tgid, the inside pid holds exactly the inside guest's exits, the
    # outside guest's are host-wide only (tgid 0).
    unshare = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with launch("bpf-outside", vcpus=1, workload="halt", loops=0) as outside:
        outside.wait_ready(60)
        inside = subprocess.run([*unshare, sys.executable, "-m", "tests.support.bpf_pidns", str(outside.pid), "300"],
                                capture_output=True, text=True, timeout=120, cwd=root)  # fmt: skip
    assert inside.returncode == 0, inside.stderr
    out = json.loads(inside.stdout)
    assert out["inside_pid"] == outside.pid
    assert out["pid_ns"][1] != bpf.PROC_PID_INIT_INO  # numbered in the inside namespace
    assert {tuple(k): v for k, v in out["inside"]} == expected("halt", 300, 2)
    assert set(out["tgids"]) == {0, out["inside_pid"]}  # the outside guest (still halting): under 0
    host = {tuple(k): v for k, v in out["host"]}
    assert host[(TP, 0, 5)] > 600  # the outside guest's halts counted host-wide


def test_without_the_capabilities_the_error_names_the_syscall_and_what_it_needs():
    spec = userspace_exit_spec()
    fields = (spec.name, spec.event_id, spec.reason_field, spec.reason_offset, spec.reason_size)
    script = ("from kvmfleet.exitreasons.bpf import BpfExitCounter\n"
              "from kvmfleet.exitreasons.counter import TracepointSpec\n"
              f"BpfExitCounter([TracepointSpec(*{fields!r})], per_process=True)\n")  # fmt: skip
    run = subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--", sys.executable, "-c", script],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 1
    assert ("PermissionError: [Errno 1] bpf(BPF_MAP_CREATE, type 5, 16384 entries): Operation not permitted (needs "
            "CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN)") in run.stderr
