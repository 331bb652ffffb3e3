"""A file written whole or not at all, without following a link: reports that an operator names on a command line.

The data goes to a new file beside the target, created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` under a random
name (a link planted there makes the open fail instead of redirecting the write), fsynced, then renamed over the
target: a link at the target itself is replaced, never followed, and a reader sees the old file or the new one,
never half of one.
"""

from __future__ import annotations

import contextlib
import os
import secrets

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_TRIES = 16  # random names taken by someone else before giving up


def replace_file(path: str, data: bytes, mode: int = 0o644) -> None:
    """``data`` as the file at ``path`` (``mode``, less what the umask takes); ``OSError`` naming the path."""
    directory = os.path.dirname(path) or "."
    base = os.path.basename(path)
    if not base:
        raise IsADirectoryError(21, "is a directory", path)
    fd, tmp = _new_file(directory, base[:200], mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    sync_directory(directory)


def _new_file(directory: str, base: str, mode: int) -> tuple[int, str]:
    """A file of our own, new, beside the target: (fd, path)."""
    for _ in range(_TRIES):
        tmp = os.path.join(directory, f".{base}.{secrets.token_hex(8)}.tmp")
        try:
            return os.open(tmp, _FLAGS, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(17, f"no free temporary name after {_TRIES} tries", directory)


def sync_directory(directory: str) -> None:
    """The rename made durable (best effort: some file systems cannot fsync a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
