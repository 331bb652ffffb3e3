"""Words that mean true or false, said once for every reader of settings: the plugin's options, the shipping
settings and the kernel's module parameters (``Y``/``N``)."""

from __future__ import annotations

TRUE_WORDS = frozenset({"y", "yes", "true", "on", "1"})
FALSE_WORDS = frozenset({"n", "no", "false", "off", "0"})


def parse_bool(text: str | None) -> bool | None:
    """``True``/``False`` for a word of :data:`TRUE_WORDS`/:data:`FALSE_WORDS` (any case, surrounding space
    ignored), ``None`` for anything else."""
    if text is None:
        return None
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    return None
