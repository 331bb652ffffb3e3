"""Secrets (tokens, passwords) come from files: read one, never showing it."""

from __future__ import annotations

import logging
import os
import stat

log = logging.getLogger("kvmfleet")


class SecretFileError(ValueError):
    """A secret file cannot be used; the message names the file, never its content."""


def read_secret(path: str, what: str) -> str:
    """The secret alone on one line in ``path`` (surrounding newlines removed).

    Raises :class:`SecretFileError` naming ``what`` and the file; warns when group or others may read it."""
    if not path:
        raise SecretFileError(f"{what}: no file given")
    try:
        st = os.stat(path)
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
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
