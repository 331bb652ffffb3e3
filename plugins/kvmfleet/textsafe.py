"""Text from other people's processes made safe to print on a terminal.

VM names, UUIDs and VMM kinds come from VMM command lines and ``comm``, which a guest owner may
choose: an escape sequence in one could clear the screen or rewrite a line an operator relies on.
"""

from __future__ import annotations


def _escaped(char: str) -> str:
    if char == "\\":
        return "\\\\"
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def terminal_safe(text: str, limit: int | None = None) -> str:
    """``text`` with every character a terminal could act on (control characters, ESC, DEL, C1 controls,
    bidi overrides, line separators: whatever ``str.isprintable`` refuses) shown as ``\\xNN``/``\\uNNNN``,
    and backslashes doubled so that an escaped character cannot be forged. Past ``limit`` characters the
    rest is cut and counted, so a 64 KiB name cannot push everything else off the screen."""
    cut = 0
    if limit is not None and len(text) > limit:
        cut, text = len(text) - limit, text[:limit]
    if not text.isprintable() or "\\" in text:
        text = "".join(char if char.isprintable() and char != "\\" else _escaped(char) for char in text)
    return f"{text}...(+{cut} characters)" if cut else text
