"""kvmfleet.privfile: secret and spool files another user could plant are refused, checked on the fd opened."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvmfleet.privfile import PrivateFileError, check_directory, open_private, read_private
from kvmfleet.secretfile import SecretFileError, read_secret

NOBODY = 65534


def private_dir(tmp_path: Path) -> Path:
    d = tmp_path / "private"
    d.mkdir(mode=0o700)
    return d


def test_reads_a_private_file(tmp_path: Path) -> None:
    f = private_dir(tmp_path) / "secret"
    f.write_text("s3cret\n")
    data, st = read_private(str(f), 100)
    assert data == b"s3cret\n" and st.st_size == 7


@pytest.mark.parametrize("make", ["symlink", "fifo", "directory", "too big", "relative"])
def test_refuses_what_is_not_a_private_regular_file(tmp_path: Path, make: str) -> None:
    d = private_dir(tmp_path)
    target = d / "secret"
    (d / "real").write_text("x")
    if make == "symlink":
        target.symlink_to(d / "real")
    elif make == "fifo":
        os.mkfifo(target)
    elif make == "directory":
        target.mkdir()
    elif make == "too big":
        target.write_bytes(b"x" * 101)
    path = "secret" if make == "relative" else str(target)
    with pytest.raises(PrivateFileError) as info:
        read_private(path, 100)
    assert {"symlink": "symbolic link", "fifo": "not a regular file", "directory": "not a regular file",
            "too big": "more than 100", "relative": "not an absolute path"}[make] in info.value.strerror


def test_refuses_a_world_writable_directory_even_with_the_sticky_bit(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o1777)
    (d / "secret").write_text("x")
    with pytest.raises(PrivateFileError, match="world-writable"):
        read_private(str(d / "secret"), 100)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_refuses_files_and_directories_of_another_user(tmp_path: Path) -> None:
    d = private_dir(tmp_path)
    f = d / "secret"
    f.write_text("x")
    os.chown(f, NOBODY, NOBODY)
    with pytest.raises(PrivateFileError, match=f"belongs to uid {NOBODY}"):
        read_private(str(f), 100)
    os.chown(f, 0, 0)
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(PrivateFileError, match=f"directory .* belongs to uid {NOBODY}"):
        check_directory(str(d))


def test_open_private_creates_0600_without_following_a_planted_link(tmp_path: Path) -> None:
    d = private_dir(tmp_path)
    fd = open_private(str(d / "spool"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    os.close(fd)
    assert (d / "spool").stat().st_mode & 0o777 == 0o600
    (d / "planted").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PrivateFileError, match="symbolic link"):
        open_private(str(d / "planted"), os.O_WRONLY | os.O_CREAT)
    assert not (tmp_path / "elsewhere").exists()


def test_a_secret_file_planted_as_a_link_is_refused_without_reading_its_target(tmp_path: Path) -> None:
    d = private_dir(tmp_path)
    (d / "token").symlink_to("/etc/hostname")
    with pytest.raises(SecretFileError, match="symbolic link") as info:
        read_secret(str(d / "token"), "TokenFile")
    assert Path("/etc/hostname").read_text().strip() not in str(info.value)
