"""The internal snapshot table: variable-length entries padded to 8 bytes.

Owns the entry layout: `parse_snapshots` (a whole table in a buffer, strict, for opening an
image) and `iter_snapshot_entries` (entry by entry from storage, keeping what a check must
judge, e.g. ids and names as stored bytes). Must never read or write a file itself: callers
pass the bytes or a read function.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

from ..errors import FormatError
from . import constants as C


@dataclass(frozen=True, slots=True)
class Snapshot:
    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    extra_data: bytes

    FIXED: ClassVar[struct.Struct] = struct.Struct(">QIHHIIQII")

    # ---- the Python API's names (img.snapshots) ----
    @property
    def id(self) -> str:  # QEMU's name for the field
        return self.id_str

    @property
    def date(self) -> float:
        """When the snapshot was taken, as a POSIX timestamp."""
        return self.date_sec + self.date_nsec / 1e9

    @property
    def vm_clock(self) -> float:
        """The guest clock at the snapshot, in seconds."""
        return self.vm_clock_nsec / 1e9

    @property
    def disk_size(self) -> int | None:
        if len(self.extra_data) >= 16:
            return int.from_bytes(self.extra_data[8:16], "big")
        return None

    @property
    def vm_state_size_large(self) -> int:
        if len(self.extra_data) >= 8:
            return int.from_bytes(self.extra_data[0:8], "big")
        return self.vm_state_size

    @property
    def icount(self) -> int | None:
        if len(self.extra_data) >= 24:
            return int.from_bytes(self.extra_data[16:24], "big")
        return None

    def to_bytes(self) -> bytes:
        # surrogate escapes give back exactly the bytes that were read
        ident = self.id_str.encode("utf-8", "surrogateescape")
        name = self.name.encode("utf-8", "surrogateescape")
        out = self.FIXED.pack(
            self.l1_table_offset, self.l1_size, len(ident), len(name), self.date_sec,
            self.date_nsec, self.vm_clock_nsec, self.vm_state_size, len(self.extra_data),
        ) + self.extra_data + ident + name
        return out + b"\0" * (-len(out) % 8)


def parse_snapshots(buf: bytes, count: int, cluster_size: int) -> list[Snapshot]:
    snaps: list[Snapshot] = []
    pos = 0
    fixed = Snapshot.FIXED
    for i in range(count):
        if pos + fixed.size > len(buf):
            raise FormatError(f"snapshot table entry {i} runs past the end of the table")
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclock, vmsize,
         extra_len) = fixed.unpack_from(buf, pos)
        if extra_len > C.MAX_SNAPSHOT_EXTRA_BYTES:
            raise FormatError(
                f"snapshot {i}: extra_data_size {extra_len} exceeds {C.MAX_SNAPSHOT_EXTRA_BYTES}"
            )
        pos += fixed.size
        end = pos + extra_len + id_len + name_len
        if end > len(buf):
            if len(buf) >= C.MAX_SNAPSHOT_TABLE_BYTES:
                raise FormatError(
                    f"snapshot table too big: entry {i} ends past the limit of "
                    f"{C.MAX_SNAPSHOT_TABLE_BYTES} bytes"
                )
            raise FormatError(f"snapshot table entry {i} runs past the end of the table")
        extra = bytes(buf[pos : pos + extra_len])
        pos += extra_len
        ident = bytes(buf[pos : pos + id_len]).decode("utf-8", "surrogateescape")
        pos += id_len
        name = bytes(buf[pos : pos + name_len]).decode("utf-8", "surrogateescape")
        pos += name_len
        pos += -pos % 8
        if l1_off % cluster_size:
            raise FormatError(f"snapshot {i}: l1_table_offset {l1_off:#x} is not aligned")
        if l1_off >= C.MAX_HOST_OFFSET:
            raise FormatError(
                f"snapshot {i}: l1_table_offset {l1_off:#x} is beyond the 2^56 host offset limit"
            )
        if l1_size * 8 > C.MAX_L1_BYTES:
            raise FormatError(f"snapshot {i}: l1_size {l1_size} exceeds the L1 limit")
        snaps.append(Snapshot(l1_off, l1_size, ident, name, dsec, dnsec, vmclock, vmsize, extra))
    return snaps


def snapshot_table_bytes(snaps: list[Snapshot]) -> bytes:
    return b"".join(s.to_bytes() for s in snaps)


class SnapshotExtraTooLargeError(FormatError):
    """A snapshot table entry declares more extra data than MAX_SNAPSHOT_EXTRA_BYTES."""

    def __init__(self, index: int, size: int) -> None:
        super().__init__(
            f"snapshot table entry {index}: extra_data_size {size} exceeds "
            f"{C.MAX_SNAPSHOT_EXTRA_BYTES}"
        )
        self.index = index
        self.size = size


@dataclass(frozen=True, slots=True)
class RawSnapshotEntry:
    """One snapshot table entry as stored: id and name as bytes, `extra_data_size` as
    declared (`extra_data` holds at most MAX_SNAPSHOT_EXTRA_BYTES of it), `end` the file
    offset just past the name (before the padding to 8 bytes)."""

    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    extra_data_size: int
    extra_data: bytes
    raw_id: bytes
    raw_name: bytes
    end: int

    @property
    def id_str(self) -> str:
        return self.raw_id.decode("utf-8", "replace")

    @property
    def name(self) -> str:
        return self.raw_name.decode("utf-8", "replace")

    def to_bytes(self) -> bytes:
        """The entry with `extra_data` as its whole extra data, padded to 8 bytes."""
        out = Snapshot.FIXED.pack(
            self.l1_table_offset, self.l1_size, len(self.raw_id), len(self.raw_name),
            self.date_sec, self.date_nsec, self.vm_clock_nsec, self.vm_state_size,
            len(self.extra_data),
        ) + self.extra_data + self.raw_id + self.raw_name
        return out + b"\0" * (-len(out) % 8)


def iter_snapshot_entries(
    read: Callable[[int, int], bytes], offset: int, count: int, *, trim_extra: bool
) -> Iterator[RawSnapshotEntry]:
    """Decode `count` entries starting at file offset `offset`, one at a time, with
    `read(offset, length)`. An entry whose extra data exceeds MAX_SNAPSHOT_EXTRA_BYTES
    raises SnapshotExtraTooLargeError before its names are read, unless `trim_extra`
    (then only the first MAX_SNAPSHOT_EXTRA_BYTES are kept). No other limit is applied:
    the caller stops iterating once an entry's `end` passes the table-size limit."""
    fixed = Snapshot.FIXED
    pos = offset
    for i in range(count):
        pos = (pos + 7) & ~7
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclock, vmsize,
         extra_len) = fixed.unpack(read(pos, fixed.size))
        pos += fixed.size
        if extra_len > C.MAX_SNAPSHOT_EXTRA_BYTES and not trim_extra:
            raise SnapshotExtraTooLargeError(i, extra_len)
        extra_pos = pos
        pos += extra_len
        names = read(pos, id_len + name_len)
        pos += id_len + name_len
        extra = read(extra_pos, min(extra_len, C.MAX_SNAPSHOT_EXTRA_BYTES))
        yield RawSnapshotEntry(
            l1_off, l1_size, dsec, dnsec, vmclock, vmsize, extra_len, extra,
            names[:id_len], names[id_len:], pos,
        )
