"""Exits by reason from the ``kvm:kvm_exit`` and ``kvm:kvm_userspace_exit`` tracepoints (issue 15)."""
