"""kvmfleet.replacefile: a report written whole, beside its target and renamed over it, never through a link."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmfleet import replacefile
from kvmfleet.replacefile import replace_file


@pytest.fixture
def umask022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_writes_a_new_file_and_replaces_an_old_one(tmp_path: Path, umask022: None) -> None:
    target = tmp_path / "report.html"
    replace_file(str(target), b"first")
    os.chmod(target, 0o600)
    replace_file(str(target), b"second")
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # a new file each time: 0644 less the umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temp file left


def test_the_umask_says_the_rest(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        replace_file(str(tmp_path / "r"), b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r").stat().st_mode) == 0o600


def test_a_link_at_the_target_is_replaced_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    target = tmp_path / "report.json"
    target.symlink_to(victim)
    replace_file(str(target), b"{}")
    assert victim.read_text() == "keep me\n"
    assert not target.is_symlink() and target.read_bytes() == b"{}"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere" / "file")
    replace_file(str(dangling), b"x")
    assert not dangling.is_symlink() and not (tmp_path / "nowhere").exists()


def test_a_link_planted_at_the_temporary_name_is_never_followed(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    monkeypatch.setattr(replacefile.secrets, "token_hex", lambda n: "guessed")
    (tmp_path / ".report.md.guessed.tmp").symlink_to(victim)
    with pytest.raises(FileExistsError):
        replace_file(str(tmp_path / "report.md"), b"x")
    assert victim.read_text() == "keep me\n" and not (tmp_path / "report.md").exists()


def test_a_failure_leaves_no_temporary_file(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    with pytest.raises(IsADirectoryError):
        replace_file(str(tmp_path / "dir"), b"x")
    with pytest.raises(IsADirectoryError):
        replace_file(str(tmp_path) + "/", b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]
