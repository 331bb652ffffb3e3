"""StatBlock histograms: read from the raw data block, summed over blocks of one shape, zero buckets shortcut."""

from __future__ import annotations

import struct

from kvmfleet.model import StatDesc, StatType
from kvmfleet.statblock import Shape, StatBlock, sum_blocks

HIST = StatDesc("halt_wait_hist", StatType.LOG_HIST, size=4)
SHAPE = Shape.of([(StatDesc("exits"), 0), (HIST, 1), (StatDesc("halt_exits"), 5)])


def block(exits: int, buckets: tuple[int, int, int, int], halts: int) -> StatBlock:
    return StatBlock.from_data(SHAPE, struct.pack("=6Q", exits, *buckets, halts))


def test_histogram_from_the_data_block() -> None:
    assert block(1, (0, 5, 0, 2**63 - 1), 3)["halt_wait_hist"] == (0, 5, 0, 2**63 - 1)
    assert block(1, (0, 0, 0, 0), 3)["halt_wait_hist"] == (0, 0, 0, 0)
    assert dict(block(7, (1, 0, 0, 0), 9)) == {"exits": 7, "halt_exits": 9, "halt_wait_hist": (1, 0, 0, 0)}


def test_summed_histograms_whatever_parts_are_zero() -> None:
    zero, a, b = block(1, (0, 0, 0, 0), 1), block(2, (1, 2, 3, 4), 2), block(3, (10, 0, 0, 1), 3)
    assert sum_blocks([zero, zero, zero])["halt_wait_hist"] == (0, 0, 0, 0)
    assert sum_blocks([zero, a, zero])["halt_wait_hist"] == (1, 2, 3, 4)
    assert sum_blocks([a, zero, b])["halt_wait_hist"] == (11, 2, 3, 5)
    total = sum_blocks([sum_blocks([a, zero]), sum_blocks([b, b])])  # a host total over VM sums
    assert total["halt_wait_hist"] == (21, 2, 3, 6)
    assert total["exits"] == 9 and total["halt_exits"] == 9
