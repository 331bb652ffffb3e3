"""kvmfleet.textsafe: names from outside cannot drive a terminal or inject markup."""

from __future__ import annotations

import pytest

from kvmfleet.textsafe import for_markdown, for_terminal, one_line


@pytest.mark.parametrize(("name", "shown"), [
    ("web-01", "web-01"),
    ("évian ☃", "évian ☃"),
    ("a\x1b[2K\x1b[1Ahidden", "a\\x1b[2K\\x1b[1Ahidden"),
    ("two\nlines\r", "two\\nlines\\r"),
    ("back\\slash", "back\\\\slash"),
    ("bell\x07del\x7fnul\x00", "bell\\x07del\\x7fnul\\x00"),
    ("c1\x9bJ", "c1\\x9bJ"),
    ("sep\u2028x", "sep\\u2028x"),
])
def test_for_terminal(name: str, shown: str) -> None:
    assert for_terminal(name) == shown
    assert for_terminal(name).isprintable()


def test_escaped_names_stay_distinct() -> None:
    assert for_terminal("a\\x1b") != for_terminal("a\x1b")


def test_for_markdown() -> None:
    assert for_markdown("<img src=x onerror=alert(1)>") == "&lt;img src=x onerror=alert(1)&gt;"
    assert for_markdown("a|b*c_d`e[f](g)#") == "a\\|b\\*c\\_d\\`e\\[f\\](g)\\#"
    assert for_markdown("x\ny\x1b") == "x\\ny\\x1b"


def test_one_line_escapes_controls_and_keeps_backslashes() -> None:
    assert one_line("plain ^hv\\d+ text") == "plain ^hv\\d+ text"  # a regex in a message stays as typed
    assert one_line("error:\n\x1b[2Kgone\r") == "error:\\n\\x1b[2Kgone\\r"
    assert one_line("sep\u2028x\x9b").isprintable()
