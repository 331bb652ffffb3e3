"""Names a guest owner chooses reach the terminal escaped (kvmfleet.textsafe, ``kvmfleet stat``)."""

from __future__ import annotations

import json

import pytest
from tests.unit.agentdata import reading, sample_of

from kvmfleet.model import Usability
from kvmfleet.statview import sample_json, sample_text
from kvmfleet.textsafe import terminal_safe

HOSTILE = "web\x1b[2J\x1b[H\x1b]0;owned\x07\\x1b\r\nok\u202e\x9b31m\x7f"


@pytest.mark.parametrize("text,shown", [
    ("web-01 db_2", "web-01 db_2"),
    ("caf\u00e9 \u6f22\u5b57", "caf\u00e9 \u6f22\u5b57"),  # printable non-ASCII stays as it is
    ("\x1b[2J", "\\x1b[2J"),
    ("a\\x1b", "a\\\\x1b"),  # a literal backslash cannot pass for an escaped ESC
    ("tab\tcr\rnl\n", "tab\\x09cr\\x0dnl\\x0a"),
    ("del\x7f csi\x9b", "del\\x7f csi\\x9b"),
    ("rlo\u202egnp.exe ls\u2028", "rlo\\u202egnp.exe ls\\u2028"),
    ("zwsp\u200b bom\ufeff", "zwsp\\u200b bom\\ufeff"),
    ("tag\U000e0041", "tag\\U000e0041"),
    ("", ""),
])
def test_terminal_safe_escapes_what_a_terminal_would_act_on(text, shown):
    assert terminal_safe(text) == shown


def test_terminal_safe_output_holds_no_control_character_and_cuts_long_names():
    out = terminal_safe(HOSTILE + "A" * 65536, limit=100)
    assert out.isprintable() and "\x1b" not in out
    assert out.endswith(f"...(+{len(HOSTILE) + 65536 - 100} characters)") and len(out) < 200


def test_stat_text_shows_hostile_names_escaped_and_json_stays_json():
    hostile = reading(7, HOSTILE + "A" * 65536, uuid="u\x1b[1A", vmm="qemu\x1b[K")
    sample = sample_of(hostile, reading(8, "honest"))
    sources = {"statsfd": Usability(False, "pid 9 named \x1b]0;x\x07 is odd")}
    text = sample_text(sample, None, sources, per_vm=True, vcpus=True, pattern=None)
    assert not any(ch in text for ch in "\x1b\x07\r\x7f\x9b\u202e")
    assert "VM web\\x1b[2J\\x1b[H\\x1b]0;owned\\x07\\\\x1b\\x0d\\x0aok\\u202e\\x9b31m\\x7fAAA" in text
    assert "uuid u\\x1b[1A" in text and "(qemu\\x1b[K, pid 7" in text and "named \\x1b]0;x\\x07 is odd" in text
    assert max(len(line) for line in text.splitlines()) < 400  # the 64 KiB name is cut
    assert "VM honest (qemu, pid 8" in text
    obj = sample_json(sample, None, sources, vcpus=True, pattern=None)
    printed = json.dumps(obj)
    assert "\x1b" not in printed and json.loads(printed)["vms"][0]["name"] == HOSTILE + "A" * 65536


def test_stat_names_refused_vms_escaped():
    sample = sample_of(reading(8, "honest"))
    sample.refused = [reading(9, "evil\x1b[2K").identity]
    text = sample_text(sample, None, {}, per_vm=False, vcpus=False, pattern=None)
    assert "(refused: VM evil\\x1b[2K, pid 9: implausible or unreadable values" in text
    obj = sample_json(sample, None, {}, vcpus=False, pattern=None)
    assert obj["refused"] == [{"name": "evil\x1b[2K", "pid": 9, "vm_fd": 12}]
