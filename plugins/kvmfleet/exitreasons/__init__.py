"""Exits by reason from the ``kvm:kvm_exit`` and ``kvm:kvm_userspace_exit`` tracepoints (issue 15)."""

from .source import ExitReasonSource, facts_group, probe

__all__ = ["ExitReasonSource", "facts_group", "probe"]
