"""guestvmm: a small VMM that runs real KVM guests whose effect on the KVM counters is known.

One VM per process, like QEMU (``python -m kvmfleet.guestvmm vm ...``; ``kvmfleet selftest`` runs one).
Fleets of them for tests and benchmarks are in ``tests/support/guestfleet.py``. Modules:

* :mod:`.kvmapi` -- ioctl numbers, ctypes structures and the kvm_run layout;
* :mod:`.guests` -- the hand-assembled guest programs and :func:`expected_counts`, the exact counters
  each workload moves;
* :mod:`.vm` -- :class:`~.vm.GuestVM`, one VM with a thread per vCPU;
* :mod:`.launcher` -- :func:`launch`, start a VM process from Python;
* :mod:`.__main__` -- the command line.

The launcher names are loaded lazily: a VM child process imports this package and must stay light.
"""

from __future__ import annotations

from .guests import WORKLOADS, detect_backend, expected_counts, expected_vm_counts, minimum_counts

# typing.TYPE_CHECKING without importing typing (mypy honours any constant of this name).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from .launcher import GuestProcess, GuestVMMError, guest_uuid, launch

__all__ = [
    "WORKLOADS",
    "GuestProcess",
    "GuestVMMError",
    "detect_backend",
    "expected_counts",
    "expected_vm_counts",
    "guest_uuid",
    "launch",
    "minimum_counts",
]

_LAUNCHER_NAMES = ("GuestProcess", "GuestVMMError", "guest_uuid", "launch")


def __getattr__(name: str) -> object:
    if name in _LAUNCHER_NAMES:
        from . import launcher

        return getattr(launcher, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
