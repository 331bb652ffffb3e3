"""Stat blocks, readings, sources and config lines shared by the agent, options and points tests."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Any

import pytest

from kvmfleet.collector import Collector
from kvmfleet.model import StatDesc, StatType, Usability, VMIdentity, VMKey, VMReading
from kvmfleet.options import ConfigEntry, ConfigError, parse_config
from kvmfleet.sources.base import Source
from kvmfleet.statblock import Shape, StatBlock

SECRET = "Tok3n-s3cr3t-value-42"

# -- stat blocks shaped like a kernel's vCPU and VM stats fds ---------------------------------------------------
VCPU_DESCS = [StatDesc("exits"), StatDesc("halt_exits"), StatDesc("guest_mode", StatType.INSTANT),
              StatDesc("halt_wait_hist", StatType.LOG_HIST, size=4), StatDesc("mmio_exits")]
VM_DESCS = [StatDesc("pages_4k", StatType.INSTANT), StatDesc("max_mmu_rmap_size", StatType.PEAK),
            StatDesc("mmu_pte_write")]


def _shape(descs: list[StatDesc]) -> Shape:
    placed, at = [], 0
    for d in descs:
        placed.append((d, at))
        at += d.size
    return Shape.of(placed)


VCPU_SHAPE = _shape(VCPU_DESCS)
VM_SHAPE = _shape(VM_DESCS)
ALL_DESCS = {d.name: d for d in VCPU_DESCS + VM_DESCS}


def vcpu_block(exits: int, halts: int, hist: tuple[int, int, int, int] = (0, 0, 0, 0), mmio: int = 0) -> StatBlock:
    words = [exits, halts, 0, *hist, mmio]
    return StatBlock.from_data(VCPU_SHAPE, struct.pack(f"={len(words)}Q", *words))


def vm_block(pages: int, peak: int, ptes: int) -> StatBlock:
    return StatBlock.from_data(VM_SHAPE, struct.pack("=3Q", pages, peak, ptes))


def reading(pid: int, name: str, uuid: str | None = "u-1", vcpus: int = 2, halts: int = 10,
            hist: tuple[int, int, int, int] = (0, 3, 0, 1), start: int = 100, vmm: str = "qemu") -> VMReading:
    ident = VMIdentity(VMKey(pid, start, 12), vmm, name, uuid)
    return VMReading(ident, "statsfd", vm_block(100 + pid, 7, 2 * pid),
                     {i: vcpu_block(halts + 5 + i, halts, hist) for i in range(vcpus)}, dict(ALL_DESCS))


def dict_reading(pid: int, name: str) -> VMReading:
    """The same VM as a debugfs-style dict (no stat blocks)."""
    r = reading(pid, name)
    stats: dict[str, Any] = dict(r.vm_stats)
    for block in r.vcpus.values():
        for k, v in block.items():
            stats[k] = tuple(a + b for a, b in zip(stats[k], v)) if isinstance(v, tuple) and k in stats \
                else (stats.get(k, 0) + v if isinstance(v, int) else v)
    return VMReading(r.identity, "debugfs", stats, {}, dict(ALL_DESCS), vm_stats_include_vcpus=True)


class ListSource(Source):
    name = "list"

    def __init__(self, readings: list[VMReading]) -> None:
        self.readings = readings
        self.closed = False

    def read(self) -> list[VMReading]:
        return list(self.readings)

    def usability(self) -> Usability:
        return Usability(True)

    def close(self) -> None:
        self.closed = True


def sample_of(*readings: VMReading, ts: int = 1_700_000_000_123_456_789) -> Any:
    return Collector(ListSource(list(readings)), wall_clock=lambda: ts).sample()


def entries(*lines: tuple[Any, ...]) -> list[ConfigEntry]:
    return [ConfigEntry(key, tuple(values)) for key, *values in lines]


def problems(*lines: tuple[Any, ...]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(entries(*lines))
    return info.value.problems


def secret(tmp_path: Path, name: str = "token", text: str = SECRET, mode: int = 0o600) -> str:
    path = tmp_path / name
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return str(path)


def parse_line(text: str) -> tuple[str, dict[str, str], dict[str, str], int]:
    """Split one line of our own output (no escaped spaces or commas in fields) into its parts."""
    head, fields, ts = re.split(r"(?<!\\) ", text)
    parts = re.split(r"(?<!\\),", head)
    tags = dict(p.split("=", 1) for p in parts[1:])
    return parts[0], tags, dict(f.split("=", 1) for f in fields.split(",")), int(ts)
