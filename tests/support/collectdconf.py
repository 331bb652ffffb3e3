"""Read the ``<Module>`` block of a collectd config fragment the way collectd hands it to a Python plugin.

collectd's config parser gives each line's key and its values: quoted strings (``\\\\`` and ``\\"`` escaped) as
``str``, bare numbers as ``float``, bare ``true``/``false`` as ``bool``. Enough for the fragments kvmfleet writes
(the role's template, ``kvmfleet collectd-config``); the real collectd checks them in the collectd and molecule
tests.
"""

from __future__ import annotations

import re

from kvmfleet.options import ConfigEntry, ConfigValue

_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|(\S+)')


def _value(quoted: str | None, bare: str) -> ConfigValue:
    if quoted is not None:
        return re.sub(r"\\(.)", r"\1", quoted)
    if bare in ("true", "false"):
        return bare == "true"
    try:
        return float(bare)
    except ValueError:
        return bare


def module_entries(text: str, module: str = "kvmfleet.collectd_plugin") -> list[ConfigEntry]:
    """The lines of ``<Module "MODULE"> ... </Module>`` as :class:`ConfigEntry` (comments and blanks skipped)."""
    entries: list[ConfigEntry] = []
    inside = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line == f'<Module "{module}">':
            inside = True
        elif line == "</Module>":
            inside = False
        elif inside:
            key, _, rest = line.partition(" ")
            entries.append(ConfigEntry(key, tuple(_value(m.group(1), m.group(2)) for m in _TOKEN.finditer(rest))))
    return entries
