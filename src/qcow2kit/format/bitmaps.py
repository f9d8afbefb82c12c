"""Persistent dirty bitmaps on disk: the bitmap directory and bitmap tables, bytes <-> values.

Owns: walking and encoding the directory (each entry: table offset, table size, flags,
type, granularity bits, name, extra data, padded to 8 bytes), QEMU's limits on it (name
length, granularity, table size), the bitmap-table entry codec (0 = all zeros, 1 = all
ones, else a data cluster's offset), and the size arithmetic (bits LSB-first, one bit per
granule). Pure: no I/O, no state, no numpy (info imports it).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from ..errors import FormatError

ENTRY = struct.Struct(">QIIBBHI")
FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
KNOWN_FLAGS = FLAG_IN_USE | FLAG_AUTO
FLAGS_OFFSET = 12  # of the u32 flags inside an entry
TYPE_DIRTY_TRACKING = 1
MAX_NAME_BYTES = 1023
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_TABLE_ENTRIES = 1 << 27  # QEMU's BME_MAX_TABLE_SIZE (entries)
TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLE_RESERVED_MASK = 0xFF000000000001FE
TABLE_ALL_ONES = 1


@dataclass(frozen=True, slots=True)
class BitmapEntry:
    entry_offset: int  # byte offset of this entry inside the directory it was read from
    bitmap_table_offset: int
    bitmap_table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: str
    extra_data: bytes = b""

    @property
    def in_use(self) -> bool:
        return bool(self.flags & FLAG_IN_USE)

    @property
    def enabled(self) -> bool:
        """An `auto` bitmap tracks every guest write."""
        return bool(self.flags & FLAG_AUTO)

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    def with_flags(self, flags: int) -> BitmapEntry:
        return replace(self, flags=flags)


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
        extra_data = data[pos + ENTRY.size : pos + ENTRY.size + extra]
        raw_name = data[pos + ENTRY.size + extra : end]
        out.append(
            BitmapEntry(pos, t_off, t_size, flags, typ, gran,
                        raw_name.decode("utf-8", "replace"), bytes(extra_data))
        )
        pos = end + (-end % 8)
    return out


def validate_entry(entry: BitmapEntry, cluster_size: int, disk_size: int) -> None:
    """QEMU's rules for one directory entry; the error names the bitmap and the field."""
    where = f"bitmap '{entry.name}'"
    if not entry.name:
        raise FormatError("bitmap directory: a bitmap has an empty name")
    if len(entry.name.encode()) > MAX_NAME_BYTES:
        raise FormatError(f"{where}: name longer than {MAX_NAME_BYTES} bytes")
    if entry.type != TYPE_DIRTY_TRACKING:
        raise FormatError(f"{where}: type {entry.type} is not a dirty tracking bitmap")
    if entry.flags & ~KNOWN_FLAGS:
        raise FormatError(f"{where}: reserved flags {entry.flags & ~KNOWN_FLAGS:#x} are set")
    if not MIN_GRANULARITY_BITS <= entry.granularity_bits <= MAX_GRANULARITY_BITS:
        raise FormatError(f"{where}: granularity_bits {entry.granularity_bits} outside 9..31")
    if entry.bitmap_table_offset == 0 or entry.bitmap_table_offset % cluster_size:
        raise FormatError(f"{where}: bitmap_table_offset {entry.bitmap_table_offset:#x} unaligned")
    if entry.bitmap_table_size > MAX_TABLE_ENTRIES:
        raise FormatError(f"{where}: bitmap_table_size {entry.bitmap_table_size} exceeds the limit")
    # an in-use bitmap may predate a resize that crashed before storing it: never loaded
    if not entry.in_use and entry.bitmap_table_size < table_entries(
        disk_size, entry.granularity_bits, cluster_size
    ):
        raise FormatError(
            f"{where}: bitmap_table_size {entry.bitmap_table_size} is too small for the disk size"
        )


def encode_directory(entries: list[BitmapEntry]) -> bytes:
    parts: list[bytes] = []
    for e in entries:
        name = e.name.encode()
        body = ENTRY.pack(e.bitmap_table_offset, e.bitmap_table_size, e.flags, e.type,
                          e.granularity_bits, len(name), len(e.extra_data)) + e.extra_data + name
        parts.append(body + bytes(-len(body) % 8))
    return b"".join(parts)


def with_flags(data: bytes, entries: list[tuple[BitmapEntry, int]]) -> bytes:
    """The directory bytes with each listed entry's flags replaced."""
    out = bytearray(data)
    for entry, flags in entries:
        struct.pack_into(">I", out, entry.entry_offset + FLAGS_OFFSET, flags)
    return bytes(out)


def granules(disk_size: int, granularity_bits: int) -> int:
    return -(-disk_size >> granularity_bits) if disk_size else 0


def table_entries(disk_size: int, granularity_bits: int, cluster_size: int) -> int:
    """Entries of a bitmap table: one per cluster of bitmap data (bits LSB-first)."""
    nbytes = -(-granules(disk_size, granularity_bits) // 8)
    return -(-nbytes // cluster_size)


def default_granularity_bits(cluster_bits: int) -> int:
    """QEMU's default granularity: the cluster size, clamped to 4 KiB..64 KiB."""
    return min(16, max(12, cluster_bits))


__all__ = [
    "BitmapEntry",
    "ENTRY",
    "FLAG_IN_USE",
    "FLAG_AUTO",
    "MAX_NAME_BYTES",
    "TABLE_OFFSET_MASK",
    "TABLE_ALL_ONES",
    "TABLE_RESERVED_MASK",
    "parse_directory",
    "validate_entry",
    "encode_directory",
    "with_flags",
    "granules",
    "table_entries",
    "default_granularity_bits",
]
