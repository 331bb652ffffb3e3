"""Spool file: 0600, atomic, bounded; damaged files keep what parses and are moved aside."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmfleet.ship.spool import load_spool, write_spool

LINES = [
    'kvm_vm,host=h1,vm=a exits=1i 1000',
    'kvm_vm,host=h1,vm=b exits=2i,note="multi\nline \\"quoted\\"" 2000',
    "kvm_host,host=h\\ 1 vms=3i 3000",
    "ünïcödé,t=✓ v=1.5 4000",
]


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_round_trip_mode_and_dir(tmp_path: Path) -> None:
    spool = tmp_path / "new" / "sub" / "ship.spool"
    assert write_spool(spool, LINES) == len(LINES)
    assert mode(spool) == 0o600
    assert mode(spool.parent) == 0o700
    assert [p.name for p in spool.parent.iterdir()] == ["ship.spool"]  # no temp file left
    assert load_spool(spool) == LINES
    assert not spool.exists()  # loaded = deleted
    assert load_spool(spool) == []


def test_mode_0600_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_spool(tmp_path / "s", LINES)
    finally:
        os.umask(old)
    assert mode(tmp_path / "s") == 0o600


def test_existing_dir_untouched_and_overwrite(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    spool = tmp_path / "s"
    write_spool(spool, ["a x=1i"])
    write_spool(spool, LINES)
    assert mode(tmp_path) == 0o755
    assert load_spool(spool) == LINES


def test_bounded_keeps_newest(tmp_path: Path) -> None:
    spool = tmp_path / "s"
    lines = [f"m v={i}i {i}" for i in range(100)]
    assert write_spool(spool, lines, max_lines=30) == 30
    assert load_spool(spool) == lines[70:]
    write_spool(spool, lines)
    assert load_spool(spool, max_lines=10) == lines[90:]


def test_nothing_to_spool_removes_old_file(tmp_path: Path) -> None:
    spool = tmp_path / "s"
    write_spool(spool, LINES)
    assert write_spool(spool, []) == 0
    assert not spool.exists()


def test_truncated_file_keeps_what_parses(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = tmp_path / "s"
    write_spool(spool, LINES)
    data = spool.read_bytes()
    cut = data.index(b"kvm_host")  # in the middle of record 3
    spool.write_bytes(data[:cut])
    with caplog.at_level(logging.ERROR, logger="kvmfleet.ship.spool"):
        assert load_spool(spool) == LINES[:2]
    assert not spool.exists()
    aside = list(tmp_path.glob("s.bad-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == data[:cut]
    assert "damaged" in caplog.text and "moved the file" in caplog.text


def test_garbage_in_the_middle(tmp_path: Path) -> None:
    spool = tmp_path / "s"
    write_spool(spool, LINES)
    parts = spool.read_bytes().split(b"\n")
    parts.insert(2, b"\xff\xfe not json")
    parts.insert(3, b"12")  # JSON, but not a line
    spool.write_bytes(b"\n".join(parts))
    assert load_spool(spool) == LINES
    assert list(tmp_path.glob("s.bad-*"))


def test_not_a_spool(tmp_path: Path) -> None:
    spool = tmp_path / "s"
    spool.write_bytes(b"\x00\x01binary")
    assert load_spool(spool) == []
    assert not spool.exists() and list(tmp_path.glob("s.bad-*"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.text(min_size=1, max_size=40), max_size=30), cut=st.integers(0, 10_000))
def test_any_truncation_yields_a_prefix(tmp_path: Path, lines: list[str], cut: int) -> None:
    spool = tmp_path / "h.spool"
    write_spool(spool, lines)
    if not lines:
        assert not spool.exists()
        return
    data = spool.read_bytes()
    spool.write_bytes(data[: min(cut, len(data))])
    got = load_spool(spool)
    assert got == lines[: len(got)]
    for p in tmp_path.glob("h.spool.bad-*"):
        p.unlink()
