"""Unit tests run without the machine's kernel: the agent's exit reasons source (on by default) counts nothing here."""

from __future__ import annotations

from typing import Any

import pytest

from kvmfleet.model import ExitReasonReading, Usability


class NoReasons:
    """Stands in for ExitReasonSource in unit tests: usable, never a count (the real one loads BPF programs)."""

    mechanism_name = "none (unit tests)"

    def __init__(self, **kw: Any) -> None:
        pass

    def usability(self) -> Usability:
        return Usability(True)

    def fds(self) -> int:
        return 0

    def read(self, vms: Any) -> ExitReasonReading:
        return ExitReasonReading()

    def close(self) -> None:
        pass


@pytest.fixture(autouse=True)
def _no_exit_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kvmfleet.agent.ExitReasonSource", NoReasons)
