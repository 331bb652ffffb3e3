"""Names from outside made harmless before they reach a terminal or a report.

Host names come from the database (any hypervisor can write there), VM names from VMM command lines (a guest
owner chooses them). Printed raw, an escape sequence can move the cursor, clear a line or retitle the terminal:
hide the critical line of a report. Control characters are shown escaped instead (``\\x1b``, ``\\n``), as Python
writes them; a backslash is doubled, so an escaped name cannot pass for another.
"""

from __future__ import annotations

import html

_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def for_terminal(text: object) -> str:
    """``text`` with every character that is not printable (C0/C1 controls, DEL, line and paragraph separators)
    written as an escape, and backslashes doubled."""
    s = str(text)
    if s.isprintable() and "\\" not in s:
        return s
    return "".join(_ESCAPES.get(ch) or (ch if ch.isprintable() else _escape(ch)) for ch in s)


def one_line(text: object) -> str:
    """``text`` with every character that is not printable written as an escape, backslashes kept: for messages
    and other text that is not a name (a server's words, a regex), shown on one line without driving a terminal."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(ch if ch.isprintable() else _ESCAPES.get(ch) or _escape(ch) for ch in s)


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def for_markdown(text: object) -> str:
    """``text`` for a markdown line or table cell: terminal-safe (one line; its doubled backslashes are
    markdown's own escape), HTML shown as text, and markdown's emphasis, code, link and cell marks escaped."""
    s = html.escape(for_terminal(text), quote=False)
    for ch in "`*_[]|#":
        s = s.replace(ch, "\\" + ch)
    return s


def shortened(text: object, limit: int) -> str:
    """``text`` cut after ``limit`` characters, saying how many more there were: a 64 KiB name must not push
    everything else off the screen or out of a log line."""
    s = str(text)
    return s if len(s) <= limit else f"{s[:limit]}...(+{len(s) - limit} characters)"
