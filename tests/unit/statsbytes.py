"""Build KVM binary stats files as bytes, the way the kernel lays them out (for parser tests)."""

from __future__ import annotations

import struct

NAME_SIZE = 48


def stats_file(descs: list[tuple[str, int, int, int, int]], values: list[int], *, stat_id: str = "kvm-1",
               name_size: int = NAME_SIZE) -> bytes:
    """``descs`` = (name, flags, exponent, size, bucket_size); offsets follow in order."""
    header_size = 24
    id_offset = header_size
    desc_offset = id_offset + name_size
    desc_block = b""
    offset = 0
    for name, flags, exponent, size, bucket in descs:
        desc_block += struct.pack("=IhHII", flags, exponent, size, offset, bucket)
        desc_block += name.encode().ljust(name_size, b"\0")
        offset += size * 8
    data_offset = desc_offset + len(desc_block)
    header = struct.pack("=6I", 0, name_size, len(descs), id_offset, desc_offset, data_offset)
    return (header + stat_id.encode().ljust(name_size, b"\0") + desc_block
            + struct.pack(f"={len(values)}Q", *values))
