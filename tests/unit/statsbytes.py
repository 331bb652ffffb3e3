"""Build KVM binary stats files as bytes, the way the kernel lays them out (for parser tests)."""

from __future__ import annotations

import struct

NAME_SIZE = 48


def stats_file(descs: list[tuple[str, int, int, int, int]], values: list[int], *, stat_id: str = "kvm-1",
               name_size: int = NAME_SIZE, offsets: list[int] | None = None, **header: int) -> bytes:
    """``descs`` = (name, flags, exponent, size, bucket_size); byte offsets follow in order unless ``offsets``
    names them; ``header`` overrides fields of the header (``num_desc=...``, ``data_offset=...``)."""
    header_size = 24
    id_offset = header_size
    desc_offset = id_offset + name_size
    desc_block = b""
    offset = 0
    for index, (name, flags, exponent, size, bucket) in enumerate(descs):
        at = offset if offsets is None else offsets[index]
        desc_block += struct.pack("=IhHII", flags, exponent, size, at, bucket)
        desc_block += name.encode().ljust(name_size, b"\0")
        offset += size * 8
    fields = {"flags": 0, "name_size": name_size, "num_desc": len(descs), "id_offset": id_offset,
              "desc_offset": desc_offset, "data_offset": desc_offset + len(desc_block), **header}
    return (struct.pack("=6I", *fields.values()) + stat_id.encode().ljust(name_size, b"\0") + desc_block
            + struct.pack(f"={len(values)}Q", *values))
