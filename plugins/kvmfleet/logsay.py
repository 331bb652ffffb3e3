"""Say a thing once: kernel files and fds fail the same way every sample, operators want one line."""

from __future__ import annotations

import logging

log = logging.getLogger("kvmfleet")


class SayOnce:
    """Log each distinct (key, message) once; say again only when the message for a key changes."""

    def __init__(self, logger: logging.Logger = log, quiet: bool = False) -> None:
        """``quiet``: log at DEBUG only (for commands that print the same facts themselves)."""
        self._logger = logger
        self._quiet = quiet
        self._said: dict[str, str] = {}

    def __call__(self, key: str, message: str, level: int = logging.WARNING) -> bool:
        if self._said.get(key) == message:
            return False
        self._said[key] = message
        self._logger.log(logging.DEBUG if self._quiet else level, "%s", message)
        return True

    def first(self, key: str, message: str, level: int = logging.WARNING) -> bool:
        """Say only the first message for ``key``: for reasons whose details (values, file names) a hostile
        process could vary at every sample to flood the log."""
        if key in self._said:
            return False
        return self(key, message, level)

    def forget(self, key: str) -> None:
        """The condition behind ``key`` is over: say it again if it comes back."""
        self._said.pop(key, None)
