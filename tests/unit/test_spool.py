"""The spool file: 0600 in a 0700 directory, written atomically or appended; a torn or damaged record costs only
itself; a file another user could have planted is never read; reading is bounded."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmfleet import privfile
from kvmfleet.ship.journal import Journal
from kvmfleet.ship.spool import (
    HEADER,
    MAX_RECORD_BYTES,
    NotASpool,
    SpoolFile,
    ack_record,
    line_record,
    load_spool,
    read_spool,
    write_spool,
)

LINES = [
    'kvm_vm,host=h1,vm=a exits=1i 1000',
    'kvm_vm,host=h1,vm=b exits=2i,note="multi\nline \\"quoted\\"" 2000',
    "kvm_host,host=h\\ 1 vms=3i 3000",
    "ünïcödé,t=✓ v=1.5 4000",
]


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def journal_file(path: Path, lines: list[str], ack: int | None = None) -> bytes:
    """A spool as the journal writes it: a rewrite of the first line, then an append of the others and an ack."""
    f = SpoolFile(path)
    f.rewrite([(0, lines[:1])])
    f.append(b"".join(line_record(i, t) for i, t in enumerate(lines) if i) + (ack_record(ack) if ack else b""))
    f.close()
    return path.read_bytes()


class ScriptedSource:
    """Lines numbered from 0 as they are submitted, delivered oldest first: what a shipper shows the journal."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.delivered = 0

    def unsent_bounds(self) -> tuple[int, int]:
        return self.delivered, len(self.lines)

    def unsent_since(self, seq: int) -> tuple[int, int, list[tuple[int, list[str]]]]:
        first = max(seq, self.delivered)
        waiting = self.lines[first:]
        return self.delivered, len(self.lines), [(first, waiting)] if waiting else []


def test_round_trip_mode_and_dir(tmp_path: Path) -> None:
    spool = tmp_path / "new" / "sub" / "ship.spool"
    assert write_spool(spool, LINES) == len(LINES)
    assert mode(spool) == 0o600
    assert mode(spool.parent) == 0o700
    assert [p.name for p in spool.parent.iterdir()] == ["ship.spool"]  # no temp file left
    found = read_spool(spool)
    assert found.lines == LINES and found.clean and not found.problems()
    assert load_spool(spool) == LINES and spool.exists()  # reading leaves it: removed once delivered
    assert write_spool(spool, []) == 0 and not spool.exists()
    assert load_spool(spool) == []


def test_mode_0600_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_spool(tmp_path / "s", LINES)
    finally:
        os.umask(old)
    assert mode(tmp_path / "s") == 0o600


def test_bounded_keeps_newest(tmp_path: Path) -> None:
    spool = tmp_path / "s"
    lines = [f"m v={i}i {i}" for i in range(100)]
    assert write_spool(spool, lines, max_lines=30) == 30
    assert load_spool(spool) == lines[70:]
    write_spool(spool, lines)
    found = read_spool(spool, max_lines=10)
    assert found.lines == lines[90:] and found.over == 90 and "90 older line(s)" in found.problems()[0]


def test_acks_leave_only_the_undelivered(tmp_path: Path) -> None:
    lines = [f"m v={i}i {i}" for i in range(10)]
    journal_file(tmp_path / "s", lines, ack=6)
    found = read_spool(tmp_path / "s", max_lines=3)
    assert found.lines == lines[7:] and found.over == 1  # 0-5 were dropped beyond 3 lines but are done; 6 is not
    assert not found.clean  # appended to, never closed by a clean stop


def test_a_torn_last_record_costs_only_itself(tmp_path: Path) -> None:
    data = journal_file(tmp_path / "s", LINES)
    cut = data.index(b"kvm_host")  # in the middle of the third line's record
    (tmp_path / "s").write_bytes(data[:cut])
    found = read_spool(tmp_path / "s")
    assert found.lines == LINES[:2] and found.torn and found.damaged == 0
    assert found.problems() == ["its last record was cut short (a crash while writing) and skipped"]


def test_a_damaged_record_costs_only_itself(tmp_path: Path) -> None:
    data = bytearray(journal_file(tmp_path / "s", LINES))
    at = data.index(b"exits=2i")
    data[at + 6] ^= 0x01  # one bit flipped on disk: still valid JSON, wrong line: the CRC catches it
    at = data.rindex(b"\n", 0, data.index(b"kvm_host")) + 1
    data[at:at] = b"\x00garbage\n"  # a whole line of garbage between two records
    (tmp_path / "s").write_bytes(bytes(data))
    found = read_spool(tmp_path / "s")
    assert found.lines == [LINES[0], *LINES[2:]] and found.damaged == 2 and not found.torn


def test_a_record_longer_than_the_bound_is_damage(tmp_path: Path) -> None:
    path = tmp_path / "s"
    journal_file(path, LINES[:1])
    with open(path, "ab") as f:
        f.write(b"x" * (MAX_RECORD_BYTES + 10) + b"\n" + line_record(5, "m v=5i 5"))
    found = read_spool(path)
    assert found.lines == [LINES[0], "m v=5i 5"] and found.damaged == 1


def test_reading_is_bounded_to_the_newest_bytes(tmp_path: Path) -> None:
    path = tmp_path / "s"
    lines = [f"m,h=x v={i}i {i}" for i in range(20_000)]
    write_spool(path, lines)
    size = path.stat().st_size
    found = read_spool(path, max_lines=5000, max_bytes=size // 4)
    assert found.skipped_bytes == size - size // 4
    assert found.lines == lines[-len(found.lines):] and 4000 < len(found.lines) <= 5000
    assert "beyond the size bound" in "; ".join(found.problems())


def test_a_version_1_spool_still_loads(tmp_path: Path) -> None:
    import json
    body = "".join(json.dumps(t) + "\n" for t in LINES)
    (tmp_path / "s").write_text(f"# kvmfleet-spool v1 lines={len(LINES)}\n{body}# end {len(LINES)}\n")
    found = read_spool(tmp_path / "s")
    assert (found.version, found.lines, found.clean) == (1, LINES, True)


def test_not_a_spool_is_moved_aside_unread(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = tmp_path / "s"
    spool.write_bytes(b"\x00\x01binary")
    with pytest.raises(NotASpool):
        read_spool(spool)
    with caplog.at_level(logging.ERROR):
        assert Journal(str(spool), 100, ScriptedSource()).load() == []
    assert not spool.exists() and [p.read_bytes() for p in tmp_path.glob("s.bad-*")] == [b"\x00\x01binary"]
    assert "is not a kvmfleet spool" in caplog.text


def test_a_planted_symlink_is_not_followed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    target = tmp_path / "elsewhere"
    write_spool(target, ["forged x=1i 1"])
    (tmp_path / "spool").mkdir(mode=0o700)
    spool = tmp_path / "spool" / "ship.spool"
    spool.symlink_to(target)
    with pytest.raises(privfile.PrivateFileError, match="symbolic link"):
        read_spool(spool)
    with caplog.at_level(logging.ERROR):
        assert Journal(str(spool), 100, ScriptedSource()).load() == []
    assert not os.path.lexists(spool) and load_spool(target) == ["forged x=1i 1"]  # the link moved, not followed
    assert [p.is_symlink() for p in spool.parent.glob("ship.spool.bad-*")] == [True]
    assert "cannot be trusted" in caplog.text and "symbolic link" in caplog.text


def test_a_file_of_another_user_is_not_read(tmp_path: Path) -> None:
    spool = tmp_path / "s"
    write_spool(spool, ["forged x=1i 1"])
    os.chown(spool, 4321, 4321)
    with pytest.raises(privfile.PrivateFileError, match="belongs to uid 4321"):
        read_spool(spool)
    assert Journal(str(spool), 100, ScriptedSource()).load() == []
    assert not spool.exists() and len(list(tmp_path.glob("s.bad-*"))) == 1


@pytest.mark.parametrize("change", ["world-writable", "foreign owner"])
def test_a_directory_other_users_can_write_turns_the_spool_off(tmp_path: Path, change: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "spool"
    spool = d / "ship.spool"
    write_spool(spool, ["m x=1i 1"])
    if change == "world-writable":
        d.chmod(0o777)
    else:
        os.chown(d, 4321, 4321)
    with pytest.raises(privfile.PrivateFileError):
        read_spool(spool)
    with pytest.raises(privfile.PrivateFileError):
        SpoolFile(spool).rewrite([(0, ["m x=2i 2"])])
    journal = Journal(str(spool), 100, ScriptedSource())
    with caplog.at_level(logging.ERROR):
        assert journal.load() == []
    assert "the spool is off" in caplog.text and journal.finish([(0, ["m x=3i 3"])], 1) == 0
    assert sorted(p.name for p in d.iterdir()) == ["ship.spool"]  # nothing moved, nothing written there


def test_appending_to_a_replaced_file_is_refused(tmp_path: Path) -> None:
    f = SpoolFile(tmp_path / "s")
    f.rewrite([(0, ["m x=1i 1"])])
    os.unlink(tmp_path / "s")
    write_spool(tmp_path / "s", ["other x=1i 1"])
    with pytest.raises(FileNotFoundError, match="replaced"):
        f.append(line_record(1, "m x=2i 2"))
    assert load_spool(tmp_path / "s") == ["other x=1i 1"]


def test_header_is_the_first_line(tmp_path: Path) -> None:
    write_spool(tmp_path / "s", LINES)
    assert (tmp_path / "s").read_bytes().startswith(HEADER)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=30), cut=st.integers(0, 10_000))
def test_any_truncation_yields_a_prefix(tmp_path: Path, lines: list[str], cut: int) -> None:
    """A crash can cut the file anywhere: what loads is always a prefix of what was written."""
    spool = tmp_path / "h.spool"
    data = journal_file(spool, lines)
    spool.write_bytes(data[: min(cut, len(data))])
    try:
        got = read_spool(spool).lines
    except NotASpool:
        assert cut < len(HEADER)
        return
    assert got == lines[: len(got)]


def test_a_rewrite_cut_by_a_crash_leaves_the_old_file_and_its_leftover_is_removed(tmp_path: Path) -> None:
    spool = tmp_path / "ship.spool"
    write_spool(spool, LINES)
    leftover = tmp_path / ".ship.spool.tmp-123-456"  # a crash between writing the new file and the rename
    leftover.write_bytes(HEADER + line_record(0, "half x=1i 1")[:10])
    other = tmp_path / ".other.tmp-1"
    other.write_bytes(b"not ours to remove")
    assert Journal(str(spool), 100, ScriptedSource()).load() == LINES
    assert not leftover.exists() and other.exists()


def test_a_server_slower_than_a_look_keeps_one_file_until_nothing_has_waited_for_sync_every(tmp_path: Path) -> None:
    """Looks at t = 0, 1, 2, ...; a sample every 3 looks (at 3i + 0.5), delivered 1.8 later (3i + 2.3): each line
    is there at two looks, so each is journaled, by appends to the one file the first one created; the file stays
    across the gaps (two looks with nothing waiting, under ``sync_every`` = 4) and goes at the fourth look after the
    first that found nothing waiting. The same samples answered within a look write nothing."""
    spool = tmp_path / "s"
    source = ScriptedSource()
    journal = Journal(str(spool), 100, source, every=1.0, sync_every=4.0)
    exists, synced = {}, []
    for t in range(3 * 20 + 10):
        syncs = journal.stats["spool_syncs"]
        journal.tick(float(t))
        exists[t] = spool.exists()
        if journal.stats["spool_syncs"] > syncs:
            synced.append(t)
        i, phase = divmod(t, 3)
        if phase == 0 and i < 20:
            source.lines.append(f"m v={i}i {i}")  # at t + 0.5
        elif phase == 2 and i < 20:
            source.delivered = i + 1  # at t + 0.3
    assert journal.stats["journaled"] == 20 and journal.stats["spool_rewrites"] == 1, journal.stats
    # created at the first look that saw a line wait (t = 2); the last line is delivered at 59.3, the looks from
    # t = 60 on see nothing waiting, and the fourth after that first one (t = 64) removes the file
    assert [t for t, there in exists.items() if there] == list(range(2, 64)), exists
    # fsynced 4 looks after the first write that follows the previous fsync (the ack at 3, the line at 8, then
    # the line at 14, 20, ...): never twice within 4 looks, and the last write (the ack at 60) is on disk
    assert synced == [7, 12, *range(18, 61, 6)], synced

    quick = ScriptedSource()
    journal = Journal(str(tmp_path / "q"), 100, quick, every=1.0, sync_every=4.0)
    for t in range(3 * 20):
        journal.tick(float(t))
        i, phase = divmod(t, 3)
        if phase == 0:
            quick.lines.append(f"m v={i}i {i}")  # at t + 0.5, delivered at t + 0.9
            quick.delivered = i + 1
    assert journal.stats == Journal.no_stats() and not (tmp_path / "q").exists()
