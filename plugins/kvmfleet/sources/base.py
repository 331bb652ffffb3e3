"""The one interface every statistics source implements (kvm_stat style: small providers)."""

from __future__ import annotations

import abc
from types import TracebackType
from typing import TypeVar

from ..model import Usability, VMReading

S = TypeVar("S", bound="Source")


class Source(abc.ABC):
    """Reads the VMs it can see. ``read`` is called once per sample and must not raise for
    VMs that vanish, files that turn unreadable or fields it does not know: it skips them, says so
    once (:class:`kvmfleet.logsay.SayOnce`) and reflects lasting trouble in :meth:`usability`."""

    name: str = "?"

    @abc.abstractmethod
    def read(self) -> list[VMReading]:
        """One reading per VM this source can read now."""

    @abc.abstractmethod
    def usability(self) -> Usability:
        """Whether the source can read on this host, as of the last read (or a first probe)."""

    def sources_used(self) -> dict[str, Usability]:
        """Each underlying source and its usability (composite sources report their parts)."""
        return {self.name: self.usability()}

    def close(self) -> None:  # noqa: B027  (sources that hold nothing need not override it)
        """Release every fd and file the source holds."""

    def __enter__(self: S) -> S:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
