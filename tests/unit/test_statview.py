"""``kvmfleet stat`` output: names a guest owner chooses reach the terminal escaped (kvmfleet.textsafe)."""

from __future__ import annotations

import json

from tests.unit.agentdata import reading, sample_of

from kvmfleet.model import Usability
from kvmfleet.statview import sample_json, sample_text
from kvmfleet.textsafe import shortened

HOSTILE = "web\x1b[2J\x1b[H\x1b]0;owned\x07\\x1b\r\nok\u202e\x9b31m\x7f"


def test_stat_text_shows_hostile_names_escaped_and_json_stays_json():
    hostile = reading(7, HOSTILE + "A" * 65536, uuid="u\x1b[1A", vmm="qemu\x1b[K")
    sample = sample_of(hostile, reading(8, "honest"))
    sources = {"statsfd": Usability(False, "pid 9 named \x1b]0;x\x07 is odd")}
    text = sample_text(sample, None, sources, per_vm=True, vcpus=True, pattern=None)
    assert not any(ch in text for ch in "\x1b\x07\r\x7f\x9b\u202e")
    assert "VM web\\x1b[2J\\x1b[H\\x1b]0;owned\\x07\\\\x1b\\r\\nok\\u202e\\x9b31m\\x7fAAA" in text
    assert "uuid u\\x1b[1A" in text and "(qemu\\x1b[K, pid 7" in text and "named \\x1b]0;x\\x07 is odd" in text
    assert max(len(line) for line in text.splitlines()) < 400  # the 64 KiB name is cut
    assert f"...(+{len(HOSTILE) + 65536 - 200} characters) (qemu" in text
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


def test_shortened_cuts_and_counts():
    assert shortened("abc", 3) == "abc"
    assert shortened("A" * 65536, 10) == "AAAAAAAAAA...(+65526 characters)"
