"""The KVM binary statistics format (``KVM_GET_STATS_FD``, Linux 5.14+).

Layout (include/uapi/linux/kvm.h, Documentation/virt/kvm/api.rst), native endian::

    struct kvm_stats_header { u32 flags, name_size, num_desc, id_offset, desc_offset, data_offset; };
    struct kvm_stats_desc   { u32 flags; s16 exponent; u16 size; u32 offset; u32 bucket_size;
                              char name[name_size]; };

Header, id and descriptors never change for an fd, so :func:`read_layout` parses them once and
:meth:`StatsLayout.decode` turns each later ``pread`` of the data block into values. Descriptors of
a type or unit this code does not know (a newer kernel) are skipped and listed in ``skipped``.

The bytes may come from a process that wants to hurt the collector (docs/statistics.md, "Hostile VMMs"):
a layout the kernel would never make (regions or descriptors that overlap, offsets or sizes out of
range, a data block shorter than its descriptors say) is refused as a whole with
:class:`StatsFormatError`, so that every later sample is one plain ``pread`` and one ``unpack``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from .model import StatDesc, StatType, StatUnit
from .statblock import Shape, StatBlock

HEADER = struct.Struct("=6I")
DESC_HEAD = struct.Struct("=IhHII")
U64 = 8

# Sanity bounds, far above what a kernel makes (6.18: name_size 48, at most 47 descriptors, header, id
# and descriptors in about 3 KiB, a data block of 1120 bytes): anything larger is a corrupt or hostile
# file, refused rather than allocated for and read every sample.
MAX_NAME_SIZE = 256
MAX_DESCS = 2048
MAX_OFFSET = 1 << 20
MAX_DATA = 256 << 10

TYPE_MASK, UNIT_MASK, UNIT_SHIFT, BASE_MASK = 0xF, 0xF0, 4, 0xF00
BASES = {0x000: 10, 0x100: 2}


class StatsFormatError(ValueError):
    """The bytes are not a KVM stats file this code can read."""


@dataclass(frozen=True)
class Header:
    flags: int
    name_size: int
    num_desc: int
    id_offset: int
    desc_offset: int
    data_offset: int


def parse_header(raw: bytes) -> Header:
    if len(raw) < HEADER.size:
        raise StatsFormatError(f"stats header truncated: {len(raw)} of {HEADER.size} bytes")
    header = Header(*HEADER.unpack_from(raw))
    if not 0 < header.name_size <= MAX_NAME_SIZE:
        raise StatsFormatError(f"stats header name_size {header.name_size} out of range")
    if header.num_desc > MAX_DESCS:
        raise StatsFormatError(f"stats header num_desc {header.num_desc} out of range")
    for what in ("id_offset", "desc_offset", "data_offset"):
        if not HEADER.size <= getattr(header, what) <= MAX_OFFSET:
            raise StatsFormatError(f"stats header {what} {getattr(header, what)} out of range")
    return header


def _check_regions(header: Header, data_size: int) -> None:
    """Id, descriptors and data must not overlap (the kernel lays them out one after the other, past the header:
    :func:`parse_header` checked that)."""
    desc_size = (DESC_HEAD.size + header.name_size) * header.num_desc
    regions = sorted((start, start + size, what) for start, size, what in (
        (header.id_offset, header.name_size, "id"), (header.desc_offset, desc_size, "descriptors"),
        (header.data_offset, data_size, "data")) if size)
    for (_, end, what), (start, _, other) in zip(regions, regions[1:]):
        if start < end:
            raise StatsFormatError(f"stats {what} and {other} overlap (at byte {start})")


def _cstring(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


class StatsLayout:
    """Everything about one stats fd except its values: id, descriptors, where the data block is."""

    def __init__(self, stat_id: str, placed: list[tuple[StatDesc, int]], data_offset: int,
                 skipped: list[str]) -> None:
        """``placed`` pairs each known descriptor with its byte offset in the data block."""
        self.id = stat_id
        self.data_offset = data_offset
        self.skipped = skipped
        self.descs = tuple(desc for desc, _ in placed)
        self.shape = Shape.of([(desc, off // U64) for desc, off in placed])
        self.data_size = self.shape.nwords * U64

    def decode(self, data: bytes) -> StatBlock:
        if len(data) < self.data_size:
            raise StatsFormatError(f"stats data truncated: {len(data)} of {self.data_size} bytes")
        return StatBlock.from_data(self.shape, data)

    def read(self, fd: int) -> StatBlock:
        """One ``pread`` of the data block. OSError propagates (the fd's VM may be gone)."""
        return self.decode(os.pread(fd, self.data_size, self.data_offset))


def _parse_desc(raw: bytes, pos: int, name_size: int, skipped: list[str]) -> tuple[StatDesc, int] | None:
    flags, exponent, size, offset, bucket_size = DESC_HEAD.unpack_from(raw, pos)
    name = _cstring(raw[pos + DESC_HEAD.size : pos + DESC_HEAD.size + name_size])
    if not name:
        skipped.append(f"descriptor at {pos}: empty name")
        return None
    if not (name.isascii() and name.isidentifier()):  # the kernel's are C identifiers; these reach terminals
        raise StatsFormatError(f"stats descriptor name {name!r} is not an identifier")
    try:
        stat_type = StatType(flags & TYPE_MASK)
        unit = StatUnit((flags & UNIT_MASK) >> UNIT_SHIFT)
    except ValueError:
        skipped.append(f"{name}: unknown type/unit in flags {flags:#x}")
        return None
    base = BASES.get(flags & BASE_MASK)
    if base is None or flags & ~(TYPE_MASK | UNIT_MASK | BASE_MASK):
        skipped.append(f"{name}: unknown base or flags {flags:#x}")
        return None
    if size == 0 or (not stat_type.is_histogram and size != 1):
        skipped.append(f"{name}: size {size} does not fit type {stat_type.name}")
        return None
    if offset % U64 or offset + size * U64 > MAX_DATA:
        raise StatsFormatError(f"stats descriptor {name}: offset {offset} or size {size} out of range")
    desc = StatDesc(name, stat_type, unit, base, exponent, size, bucket_size)
    return desc, offset


def parse_layout(header: Header, id_raw: bytes, desc_raw: bytes) -> StatsLayout:
    """Build a layout from the header, the id bytes and the descriptor block (pure: testable on bytes)."""
    step = DESC_HEAD.size + header.name_size
    if len(desc_raw) < step * header.num_desc:
        raise StatsFormatError(
            f"stats descriptors truncated: {len(desc_raw)} of {step * header.num_desc} bytes"
        )
    _check_regions(header, 0)
    skipped: list[str] = []
    placed: list[tuple[StatDesc, int]] = []
    seen: set[str] = set()
    for index in range(header.num_desc):
        parsed = _parse_desc(desc_raw, index * step, header.name_size, skipped)
        if parsed is None:
            continue
        if parsed[0].name in seen:
            skipped.append(f"{parsed[0].name}: duplicate descriptor")
            continue
        seen.add(parsed[0].name)
        placed.append(parsed)
    _check_overlaps(placed)
    layout = StatsLayout(_cstring(id_raw), placed, header.data_offset, skipped)
    _check_regions(header, layout.data_size)
    return layout


def _check_overlaps(placed: list[tuple[StatDesc, int]]) -> None:
    """Two descriptors on the same words would make the values lie (and the unpack fail)."""
    by_offset = sorted(placed, key=lambda pair: pair[1])
    for (desc, offset), (other, other_offset) in zip(by_offset, by_offset[1:]):
        if other_offset < offset + desc.size * U64:
            raise StatsFormatError(f"stats descriptors {desc.name} and {other.name} overlap (at byte {other_offset} "
                                   "of the data)")


def _pread_exact(fd: int, size: int, offset: int, what: str) -> bytes:
    raw = os.pread(fd, size, offset)
    if len(raw) < size:
        raise StatsFormatError(f"stats {what} truncated: {len(raw)} of {size} bytes at {offset}")
    return raw


def read_layout(fd: int) -> StatsLayout:
    """Parse header, id and descriptors of a stats fd and check its data block is whole: once per fd."""
    header = parse_header(_pread_exact(fd, HEADER.size, 0, "header"))
    id_raw = _pread_exact(fd, header.name_size, header.id_offset, "id")
    desc_size = (DESC_HEAD.size + header.name_size) * header.num_desc
    desc_raw = _pread_exact(fd, desc_size, header.desc_offset, "descriptors")
    layout = parse_layout(header, id_raw, desc_raw)
    _pread_exact(fd, layout.data_size, layout.data_offset, "data")  # every descriptor's words are there
    return layout
