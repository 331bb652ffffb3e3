"""Waiting for a state in tests: poll for exactly what is asserted next, with a deadline that fails loudly.

    names = wait_for("the domain read through libvirt again", lambda: sources_by_name(collector.sample()), 30,
                     until=lambda names: names == want)

At the deadline the wait fails with an AssertionError naming what was awaited and the last value seen.
"""

from __future__ import annotations

import time
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T], timeout: float, every: float = 0.25,
             until: Callable[[T], Any] = bool) -> T:
    """Poll ``check`` until ``until(value)`` holds (by default: until the value is truthy) and return the value;
    AssertionError naming ``what`` and the last value at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if until(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {value!r})")
        time.sleep(every)
