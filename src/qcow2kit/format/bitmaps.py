"""The bitmap directory of the bitmaps extension: entries and their flags, as bytes <-> values.

Owns: walking the directory (each entry: table offset, table size, flags, type, granularity
bits, name, extra data, padded to 8 bytes) and rewriting an entry's flags. Pure: no I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import FormatError

ENTRY = struct.Struct(">QIIBBHI")
FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
FLAGS_OFFSET = 12  # of the u32 flags inside an entry


@dataclass(frozen=True, slots=True)
class BitmapEntry:
    entry_offset: int  # byte offset of this entry inside the directory
    bitmap_table_offset: int
    bitmap_table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: str

    @property
    def in_use(self) -> bool:
        return bool(self.flags & FLAG_IN_USE)

    @property
    def enabled(self) -> bool:
        """An `auto` bitmap tracks every guest write."""
        return bool(self.flags & FLAG_AUTO)


def parse_directory(data: bytes, nb_bitmaps: int) -> list[BitmapEntry]:
    out: list[BitmapEntry] = []
    pos = 0
    for i in range(nb_bitmaps):
        if pos + ENTRY.size > len(data):
            raise FormatError(f"bitmap directory entry {i} runs past the directory's end")
        t_off, t_size, flags, typ, gran, name_size, extra = ENTRY.unpack_from(data, pos)
        end = pos + ENTRY.size + extra + name_size
        if end > len(data):
            raise FormatError(f"bitmap directory entry {i} runs past the directory's end")
        raw_name = data[pos + ENTRY.size + extra : end]
        out.append(
            BitmapEntry(pos, t_off, t_size, flags, typ, gran, raw_name.decode("utf-8", "replace"))
        )
        pos = end + (-end % 8)
    return out


def with_flags(data: bytes, entries: list[tuple[BitmapEntry, int]]) -> bytes:
    """The directory bytes with each listed entry's flags replaced."""
    out = bytearray(data)
    for entry, flags in entries:
        struct.pack_into(">I", out, entry.entry_offset + FLAGS_OFFSET, flags)
    return bytes(out)


__all__ = ["BitmapEntry", "parse_directory", "with_flags", "FLAG_IN_USE", "FLAG_AUTO", "ENTRY"]
