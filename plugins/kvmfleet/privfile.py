"""Files only this user may plant or change: the secret files and the spool.

The collector runs as root. A file another user can put in place (a symlink to /etc/shadow, a spool full of
forged lines, a "password" file) must not be trusted: such files are opened without following links, checked on
the descriptor actually opened (a regular file, owned by this user or root, of bounded size), and only in a
directory no other user can write to (one that is world-writable, or owned by another user, lets that user
swap the file between a check and the open).
"""

from __future__ import annotations

import errno
import os
import stat

TRUSTED_OWNERS = frozenset({0, os.geteuid()})


class PrivateFileError(OSError):
    """A file, or its directory, that another user could have planted or changed; ``strerror`` says why."""


def check_directory(path: str) -> None:
    """Refuse a directory another user can write to, or that another user owns."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise PrivateFileError(err.errno, f"directory {path}: {err.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise PrivateFileError(errno.ENOTDIR, f"{path} is not a directory")
    if st.st_uid not in TRUSTED_OWNERS:
        raise PrivateFileError(errno.EPERM, f"directory {path} belongs to uid {st.st_uid}, not to this user or root")
    if st.st_mode & stat.S_IWOTH:
        raise PrivateFileError(errno.EPERM, f"directory {path} is world-writable (mode {stat.S_IMODE(st.st_mode):04o})")


def open_private(path: str, flags: int = os.O_RDONLY, mode: int = 0o600, max_bytes: int | None = None) -> int:
    """An fd of ``path`` (``flags`` as for :func:`os.open`, links never followed), checked on the fd itself:
    a regular file owned by this user or root, at most ``max_bytes`` long; its directory as
    :func:`check_directory`. :class:`PrivateFileError` (an OSError) otherwise."""
    if not os.path.isabs(path):
        raise PrivateFileError(errno.EINVAL, f"{path} is not an absolute path")
    check_directory(os.path.dirname(path) or "/")
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY, mode)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise PrivateFileError(errno.ELOOP, f"{path} is a symbolic link") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PrivateFileError(errno.EINVAL, f"{path} is not a regular file")
        if st.st_uid not in TRUSTED_OWNERS:
            raise PrivateFileError(errno.EPERM, f"{path} belongs to uid {st.st_uid}, not to this user or root")
        if max_bytes is not None and st.st_size > max_bytes:
            raise PrivateFileError(errno.EFBIG, f"{path} holds {st.st_size} bytes, more than {max_bytes}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_private(path: str, max_bytes: int) -> tuple[bytes, os.stat_result]:
    """The whole content of a private file (see :func:`open_private`) and its stat, read from one fd."""
    fd = open_private(path, max_bytes=max_bytes)
    try:
        st = os.fstat(fd)
        chunks = []
        total = 0
        while total <= max_bytes:
            chunk = os.read(fd, max_bytes + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    if total > max_bytes:  # it grew after the fstat
        raise PrivateFileError(errno.EFBIG, f"{path} holds more than {max_bytes} bytes")
    return b"".join(chunks), st
