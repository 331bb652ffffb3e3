"""Stats as read from a binary stats fd, without turning every sample into dicts.

A collector reads hundreds of fds per sample, all of a handful of layouts (one for VM stats fds,
one for vCPU stats fds, per kernel). A :class:`Shape` is such a layout, shared by every fd that has
it; a :class:`StatBlock` is one set of values in a shape: a read-only mapping (``block["exits"]``)
whose scalars are one tuple. Summing blocks of one shape (a VM's vCPUs, a host's VMs) is then a
column-wise sum of tuples, and histogram buckets are only added up when someone asks for them.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Union

from .model import StatDesc, StatType, Value

Words = tuple[int, ...]
_SHAPES: dict[tuple[tuple[str, int, int, int], ...], Shape] = {}


class Shape:
    """Where each stat lives in a data block of u64 words; one object per distinct layout."""

    def __init__(self, placed: Sequence[tuple[StatDesc, int]]) -> None:
        """``placed`` pairs descriptors with their word index in the data block."""
        placed = sorted(placed, key=lambda pair: pair[1])
        self.descs = {desc.name: desc for desc, _ in placed}
        self.nwords = max((index + desc.size for desc, index in placed), default=0)
        scalars = [(desc, index) for desc, index in placed if not desc.type.is_histogram]
        self.scalar_names = tuple(desc.name for desc, _ in scalars)
        self.scalar_words = tuple(index for _, index in scalars)  # where each scalar is in the data block
        self.scalar_index = {name: i for i, name in enumerate(self.scalar_names)}
        self.peaks = tuple(i for i, (desc, _) in enumerate(scalars) if desc.type is StatType.PEAK)
        # one struct call unpacks the scalars and skips histogram buckets (and unknown stats) as padding
        fmt, at = "=", 0
        for _, index in scalars:
            if index > at:
                fmt += f"{(index - at) * 8}x"
            fmt += "Q"
            at = index + 1
        self.unpack_scalars = struct.Struct(fmt).unpack_from
        self.hists = {desc.name: (index, desc.size) for desc, index in placed if desc.type.is_histogram}
        # each histogram's (first byte, end byte, unpacker, its buckets when all are zero) in the data block
        self.hist_at = {name: (start * 8, (start + size) * 8, struct.Struct(f"={size}Q").unpack_from, (0,) * size)
                        for name, (start, size) in self.hists.items()}
        # the words from the first histogram to the end of the last (KVM places them side by side): a sum of blocks
        # adds this span up once for all its histograms; (first byte, end byte, unpacker, zeros) and where each
        # histogram is in it
        low = min((start for start, _ in self.hists.values()), default=0)
        high = max((start + size for start, size in self.hists.values()), default=0)
        self.hist_span = (low * 8, high * 8, struct.Struct(f"={high - low}Q").unpack_from, (0,) * (high - low))
        self.hist_in_span = {name: (start - low, start - low + size) for name, (start, size) in self.hists.items()}
        self.names = self.scalar_names + tuple(self.hists)

    @classmethod
    def of(cls, placed: Sequence[tuple[StatDesc, int]]) -> Shape:
        """The shared shape for this layout (fds with the same descriptors share one object)."""
        key = tuple((desc.name, int(desc.type), desc.size, index) for desc, index in placed)
        shape = _SHAPES.get(key)
        if shape is None:
            shape = _SHAPES[key] = cls(placed)
        return shape


HistSource = Union[bytes, Sequence["StatBlock"]]


class StatBlock(Mapping[str, Value]):
    """Values in a :class:`Shape`: scalars as one tuple, histograms from the raw data block or, for a
    sum of blocks, added up on first access. A block read from an fd keeps the raw bytes and
    unpacks them when first looked at: reading stays one pread per fd."""

    __slots__ = ("_hist_from", "_scalars", "_span_cache", "shape")

    def __init__(self, shape: Shape, scalars: Words | None, hist_from: HistSource = b"") -> None:
        self.shape = shape
        self._scalars = scalars
        self._hist_from = hist_from
        self._span_cache: tuple[int, ...] | None = None

    @classmethod
    def from_data(cls, shape: Shape, data: bytes) -> StatBlock:
        """Values from a data block as pread from a stats fd (at least ``shape.nwords`` words)."""
        return cls(shape, None, data)

    @property
    def data(self) -> bytes | None:
        """The data block as read from the fd (None for a sum of blocks)."""
        source = self._hist_from
        return source if isinstance(source, bytes) else None

    def same_data_as(self, other: Mapping[str, Value]) -> bool:
        """True if ``other`` was read from the same bytes in the same shape; it then lends its unpacked values:
        an fd whose stats did not change since the last sample is not unpacked again."""
        data = self._hist_from
        if not isinstance(data, bytes) or not isinstance(other, StatBlock) or other.shape is not self.shape \
                or other._hist_from != data:
            return False
        if self._scalars is None:
            self._scalars = other._scalars
        return True

    @property
    def scalars(self) -> Words:
        scalars = self._scalars
        if scalars is None:
            scalars = self._scalars = self.shape.unpack_scalars(self._hist_from)  # type: ignore[arg-type]
        return scalars

    def _hist(self, name: str) -> tuple[int, ...]:
        source = self._hist_from
        if isinstance(source, bytes):
            start, end, unpack, zeros = self.shape.hist_at[name]
            # most histograms of most vCPUs are all zero (halt polling off, an idle guest): no ints made for them
            return zeros if source.count(0, start, end) == end - start else unpack(source, start)
        first, end = self.shape.hist_in_span[name]
        return self._span()[first:end]

    def _span(self) -> tuple[int, ...]:
        """The histogram span (:attr:`Shape.hist_span`): unpacked from the data block, or the parts' spans added up
        (once, on first access), the parts whose span is all zero left out."""
        source = self._hist_from
        start, end, unpack, zeros = self.shape.hist_span
        if isinstance(source, bytes):
            return zeros if source.count(0, start, end) == end - start else unpack(source, start)
        span = self._span_cache
        if span is None:
            nonzero = [part for part in map(StatBlock._span, source) if part is not zeros] or [zeros]
            span = self._span_cache = tuple(map(sum, zip(*nonzero))) if len(nonzero) > 1 else nonzero[0]
        return span

    hist = _hist  # a histogram's buckets by name (a KeyError if the shape has no such histogram)

    def __getitem__(self, name: str) -> Value:
        index = self.shape.scalar_index.get(name)
        if index is not None:
            return self.scalars[index]
        if name in self.shape.hists:
            return self._hist(name)
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return name in self.shape.scalar_index or name in self.shape.hists

    def __iter__(self) -> Iterator[str]:
        return iter(self.shape.names)

    def __len__(self) -> int:
        return len(self.shape.names)

    def __repr__(self) -> str:
        return f"StatBlock({dict(self)!r})"


def sum_blocks(blocks: Sequence[StatBlock]) -> StatBlock:
    """Blocks of one shape as one: column-wise sums, maxima for peak stats, histograms on demand."""
    shape = blocks[0].shape
    if len(blocks) == 1:
        return blocks[0]
    sums = list(map(sum, zip(*(block.scalars for block in blocks))))
    for i in shape.peaks:
        sums[i] = max(block.scalars[i] for block in blocks)
    return StatBlock(shape, tuple(sums), blocks)


def same_shape(parts: Sequence[Mapping[str, Value]]) -> bool:
    if not parts or not isinstance(parts[0], StatBlock):
        return False
    shape = parts[0].shape
    return all(isinstance(part, StatBlock) and part.shape is shape for part in parts)


def add_values(a: Value | None, b: Value) -> Value:
    """``a + b`` for counters, bucket by bucket for histograms (``b`` alone if ``a`` is None)."""
    if a is None:
        return b
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        return tuple(x + y for x, y in zip(a, b))
    return b  # a histogram that changed shape (a new kernel): take the newer one


def sub_values(a: Value, b: Value) -> Value:
    """``a - b``, the inverse of :func:`add_values` (``a`` if their shapes differ)."""
    if isinstance(a, int) and isinstance(b, int):
        return a - b
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        return tuple(x - y for x, y in zip(a, b))
    return a


def combine(parts: Sequence[Mapping[str, Value]], descs: Mapping[str, StatDesc]) -> Mapping[str, Value]:
    """Stats of several vCPUs (or VMs) as one: counters, instant values and histogram buckets add
    up; peak values take the maximum (the peak of a whole is the largest peak of its parts)."""
    if same_shape(parts):
        return sum_blocks(parts)  # type: ignore[arg-type]
    total: dict[str, Value] = {}
    for stats in parts:
        for name, value in stats.items():
            prev = total.get(name)
            desc = descs.get(name)
            if prev is not None and desc is not None and desc.type is StatType.PEAK:
                total[name] = max(prev, value)
            else:
                total[name] = add_values(prev, value)
    return total


def scalar_items(stats: Mapping[str, Value]) -> Iterator[tuple[str, int]]:
    """(name, value) of the scalar stats only, without computing any histogram."""
    if isinstance(stats, StatBlock):
        return zip(stats.shape.scalar_names, stats.scalars)
    if isinstance(stats, MergedStats):
        return (item for part in stats.parts for item in scalar_items(part))
    return ((name, value) for name, value in stats.items() if isinstance(value, int))


class MergedStats(Mapping[str, Value]):
    """Several mappings with distinct names seen as one (a VM's own stats and its vCPUs' sum); the
    first part wins where a name appears twice."""

    __slots__ = ("parts",)

    def __init__(self, *parts: Mapping[str, Value]) -> None:
        self.parts = parts

    def __getitem__(self, name: str) -> Value:
        for part in self.parts:
            if name in part:
                return part[name]
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return any(name in part for part in self.parts)

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for part in self.parts:
            for name in part:
                if name not in seen:
                    seen.add(name)
                    yield name

    def __len__(self) -> int:
        return sum(1 for _ in self)
