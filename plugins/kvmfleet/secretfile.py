"""Secrets (tokens, passwords) come from files: read one, never showing it.

A secret file is a private file (:mod:`kvmfleet.privfile`): no link followed, a regular file of this user or root,
in a directory no other user can write to, read from the one descriptor that was checked."""

from __future__ import annotations

import logging
import stat

from .privfile import read_private

log = logging.getLogger("kvmfleet")

MAX_SECRET_BYTES = 64 << 10  # a password or a token; anything bigger is not one


class SecretFileError(ValueError):
    """A secret file cannot be used; the message names the file, never its content."""


def read_secret(path: str, what: str) -> str:
    """The secret alone on one line in ``path`` (surrounding newlines removed).

    Raises :class:`SecretFileError` naming ``what`` and the file; warns when group or others may read it."""
    if not path:
        raise SecretFileError(f"{what}: no file given")
    try:
        data, st = read_private(path, MAX_SECRET_BYTES)
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        raise SecretFileError(f"{what} {path!r} cannot be read: {reason}") from None
    secret = text.strip("\r\n")
    if not secret.strip():
        raise SecretFileError(f"{what} {path!r} is empty")
    if "\n" in secret:
        raise SecretFileError(f"{what} {path!r} must hold the secret alone on one line")
    if st.st_mode & 0o077:
        log.warning("%s %s is readable by group or others (mode %04o): chmod 600 it", what, path,
                    stat.S_IMODE(st.st_mode))
    return secret
