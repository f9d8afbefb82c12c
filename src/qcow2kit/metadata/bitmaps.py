"""Persistent dirty bitmaps of one open image: load, track guest writes, store crash-safely.

Owns the bitmaps extension's life while an image is open, following QEMU's protocol:
- read-only: the directory is read and validated (a hostile directory raises FormatError
  naming the bitmap and field); nothing is written;
- read-write open (`start_writing`): every consistent bitmap is loaded into memory, then
  marked in use on disk before any guest write (autoclear bit 0 cleared and durable, the
  directory rewritten in place with in_use, bit 0 set again): a crash from here on leaves
  the bitmaps "in use", which every reader treats as inconsistent, never as clean;
- every guest write, zero write and discard sets the covered granules of each enabled
  bitmap (`mark`);
- close (`store`): the loaded bitmaps go to new data clusters, new tables and a new
  directory with in_use clear; refcounts and all of it flushed; one 24-byte write of the
  extension switches the header to the new directory; flushed; only then are the old
  tables, data clusters and directory freed. A crash before the switch leaves the old
  (in-use) bitmaps and leaked new clusters; after it, the new ones and leaked old clusters.
Bitmaps found in use at open stay untouched and inconsistent (they can only be removed).
Never imports qcow2kit.image.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from ..errors import FormatError, ImageStateError, InvalidArgumentError, UnsupportedFeatureError
from ..format import bitmaps as fmt
from ..format.extensions import MAX_BITMAPS, BitmapsExtension
from ..format.features import Autoclear
from . import overlap
from .bitmap_io import cluster_span, set_bits, switch_header, write_autoclear, write_bitmap
from .meta import Metadata

U8 = npt.NDArray[np.uint8]
U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
_EXT_HEADER_BYTES = 8


@dataclass(frozen=True, slots=True)
class BitmapInfo:
    """One persistent dirty bitmap as `img.bitmaps` lists it."""

    name: str
    granularity: int
    enabled: bool
    in_use: bool
    persistent: bool = True


class Bitmaps:
    """`img.bitmaps`: iterate for BitmapInfo; add / remove / clear / enable / disable /
    merge change them (stored when the image is closed); dirty_runs reads one."""

    def __init__(self, meta: Metadata) -> None:
        self.meta = meta
        self.entries: list[fmt.BitmapEntry] = []  # the directory, in order
        self.bits: dict[str, U8] = {}  # loaded bitmaps (packed, LSB first)
        self.changed = False  # the set on disk no longer matches memory
        self.writing = False
        self._read_only_cache: dict[str, U8] = {}
        self.extension_valid = False
        self._read()

    # ---- reading ----------------------------------------------------------------------
    def _read(self) -> None:
        h = self.meta.header
        ext = h.bitmaps
        if h.version < 3 or ext is None or not h.autoclear_features & Autoclear.BITMAPS:
            return
        ext.validate(self.meta.geom.cluster_size)
        size = self.meta.storage.size()
        if ext.directory_offset + ext.directory_size > size:
            raise FormatError(
                f"bitmaps extension: directory at {ext.directory_offset:#x} "
                f"({ext.directory_size} bytes) lies outside the file"
            )
        data = self.meta.storage.pread(ext.directory_offset, ext.directory_size)
        entries = fmt.parse_directory(data, ext.nb_bitmaps)
        names: set[str] = set()
        cs = self.meta.geom.cluster_size
        for e in entries:
            fmt.validate_entry(e, cs, h.size)
            if e.name in names:
                raise FormatError(f"bitmap directory: the name '{e.name}' appears twice")
            names.add(e.name)
            if e.bitmap_table_offset + e.bitmap_table_size * 8 > size:
                raise FormatError(f"bitmap '{e.name}': bitmap table lies outside the file")
        self.entries = entries
        self.extension_valid = True

    def _table(self, e: fmt.BitmapEntry) -> U64:
        raw = self.meta.storage.pread(e.bitmap_table_offset, e.bitmap_table_size * 8)
        table = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        bad = (table & np.uint64(fmt.TABLE_RESERVED_MASK)) != 0
        offsets = table & np.uint64(fmt.TABLE_OFFSET_MASK)
        bad |= (offsets != 0) & ((table & np.uint64(fmt.TABLE_ALL_ONES)) != 0)
        bad |= offsets >= np.uint64(self.meta.storage.size())
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise FormatError(f"bitmap '{e.name}': table entry {i} is invalid ({int(table[i]):#x})")
        return table

    def _load(self, e: fmt.BitmapEntry) -> U8:
        cs = self.meta.geom.cluster_size
        nbytes = -(-fmt.granules(self.meta.header.size, e.granularity_bits) // 8)
        needed = -(-nbytes // cs)  # a longer table (hostile or stale) is not read past this
        out = np.zeros(needed * cs, dtype=np.uint8)
        table = self._table(e)[:needed]
        owned = self._clusters_of(e)
        hit = overlap.first_overlap(self.meta, owned)
        if hit is not None:
            raise FormatError(
                f"bitmap '{e.name}': its table or data at {hit[1] * cs:#x} overlaps {hit[0]}"
            )
        for i, entry in enumerate(table.tolist()):
            off = entry & fmt.TABLE_OFFSET_MASK
            if off:
                out[i * cs : (i + 1) * cs] = np.frombuffer(self.meta.storage.pread(off, cs), np.uint8)
            elif entry & fmt.TABLE_ALL_ONES:
                out[i * cs : (i + 1) * cs] = 0xFF
        return out[:nbytes].copy()

    def __iter__(self) -> Iterator[BitmapInfo]:
        for e in self.entries:
            # a bitmap we hold in memory is marked in use on disk only while we write
            in_use = e.in_use and e.name not in self.bits
            yield BitmapInfo(e.name, e.granularity, e.enabled, in_use)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return any(e.name == name for e in self.entries)

    def find(self, name: str) -> fmt.BitmapEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise InvalidArgumentError(f"Dirty bitmap '{name}' not found")

    def dirty_runs(self, name: str, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, dirty) runs of the guest range, granule-aligned at the inside."""
        bits, g = self.loaded_bits(name)
        out: list[tuple[int, int, bool]] = []
        if length <= 0:
            return out
        first, last = offset >> g, (offset + length - 1) >> g
        # unpack only the bytes that hold the range (an NBD client asks many small ranges)
        window = np.unpackbits(bits[first >> 3 : (last >> 3) + 1], bitorder="little")
        flags = window[first & 7 : (first & 7) + last - first + 1].astype(bool)
        if not len(flags):
            return out
        edges = np.flatnonzero(np.diff(flags.astype(np.int8))) + 1
        starts = np.concatenate(([0], edges))
        ends = np.concatenate((edges, [len(flags)]))
        for s, t in zip(starts.tolist(), ends.tolist(), strict=True):
            a = max(offset, (first + s) << g)
            b = min(offset + length, (first + t) << g)
            out.append((a, b - a, bool(flags[s])))
        return out

    # ---- writing ----------------------------------------------------------------------
    def start_writing(self) -> None:
        """Load every consistent bitmap and mark it in use before the first write; clear
        every autoclear bit this writer does not maintain."""
        meta = self.meta
        h = meta.header
        self.writing = True
        if h.version < 3:
            return
        for e in self.entries:
            if not e.in_use:
                self.bits[e.name] = self._load(e)
        keep = h.autoclear_features & Autoclear.DATA_FILE_RAW
        restored = keep | (Autoclear.BITMAPS if self.extension_valid else 0)
        if h.autoclear_features == restored and not self.bits:
            return
        meta.storage.flush()
        write_autoclear(self.meta, keep)
        if not self.extension_valid:
            return
        if self.bits:
            ext = meta.header.bitmaps
            assert ext is not None
            self.entries = [e.with_flags(e.flags | fmt.FLAG_IN_USE) if e.name in self.bits else e
                            for e in self.entries]
            meta.storage.event("bitmap_directory_update")
            meta.storage.pwrite(ext.directory_offset, fmt.encode_directory(self.entries))
            meta.storage.flush()
        write_autoclear(self.meta, restored)

    def mark(self, offset: int, length: int) -> None:
        """Set the granules of [offset, offset+length) in every enabled loaded bitmap."""
        if length <= 0:
            return
        for e in self.entries:
            if e.enabled and e.name in self.bits:
                set_bits(self.bits[e.name], offset >> e.granularity_bits,
                          (offset + length - 1) >> e.granularity_bits)

    # ---- the bitmap command -----------------------------------------------------------
    def _usable(self, name: str) -> fmt.BitmapEntry:
        self.meta.check_writable()
        e = self.find(name)
        if name not in self.bits:
            raise ImageStateError(f"Bitmap '{name}' is inconsistent and cannot be used")
        return e

    def add(self, name: str, granularity: int | None = None, *, enabled: bool = True) -> None:
        meta = self.meta
        meta.check_writable()
        if meta.header.version < 3:
            raise UnsupportedFeatureError("Cannot store dirty bitmaps in qcow2 v2 files")
        if not name:
            raise InvalidArgumentError("Bitmap name cannot be empty")
        if len(name.encode()) > fmt.MAX_NAME_BYTES:
            raise InvalidArgumentError(
                f"Name length exceeds maximum ({fmt.MAX_NAME_BYTES} characters)"
            )
        if any(e.name == name for e in self.entries):
            raise InvalidArgumentError(f"Bitmap already exists: {name}")
        if len(self.entries) >= MAX_BITMAPS:
            raise InvalidArgumentError(f"Too many bitmaps (at most {MAX_BITMAPS})")
        gbits = (fmt.default_granularity_bits(meta.geom.cluster_bits) if granularity is None
                 else granularity.bit_length() - 1)
        if granularity is not None and (granularity & (granularity - 1) or granularity < 512
                                        or granularity > 1 << 31):
            raise InvalidArgumentError("Granularity must be power of 2 and at least 512")
        size = meta.header.size
        entry = fmt.BitmapEntry(0, 0, fmt.table_entries(size, gbits, meta.geom.cluster_size),
                                fmt.FLAG_IN_USE | (fmt.FLAG_AUTO if enabled else 0),
                                fmt.TYPE_DIRTY_TRACKING, gbits, name)
        self.entries.append(entry)
        self.bits[name] = np.zeros(-(-fmt.granules(size, gbits) // 8), dtype=np.uint8)
        self.changed = True

    def remove(self, name: str) -> None:
        self.meta.check_writable()
        self.find(name)
        self.entries = [e for e in self.entries if e.name != name]
        self.bits.pop(name, None)
        self.changed = True

    def clear(self, name: str) -> None:
        self._usable(name)
        self.bits[name][:] = 0
        self.changed = True

    def enable(self, name: str) -> None:
        self._set_enabled(name, True)

    def disable(self, name: str) -> None:
        self._set_enabled(name, False)

    def _set_enabled(self, name: str, enabled: bool) -> None:
        e = self._usable(name)
        flags = (e.flags | fmt.FLAG_AUTO) if enabled else (e.flags & ~fmt.FLAG_AUTO)
        self.entries = [x.with_flags(flags) if x.name == name else x for x in self.entries]
        self.changed = True

    def merge(self, name: str, source: str, source_image: Bitmaps | None = None) -> None:
        """OR bitmap `source` (of this image, or of source_image's bitmaps) into `name`;
        granularities may differ."""
        bits, gbits = (source_image or self).loaded_bits(source)
        self._merge_bits(name, bits, gbits)

    def _merge_bits(self, name: str, source_bits: U8, source_granularity_bits: int) -> None:
        e = self._usable(name)
        target = self.bits[name]
        size = self.meta.header.size
        tg, sg = e.granularity_bits, source_granularity_bits
        src = np.flatnonzero(
            np.unpackbits(source_bits, bitorder="little")[: fmt.granules(size, sg)]
        ).astype(np.int64)
        if sg <= tg:
            hit = np.unique(src >> (tg - sg))
        else:
            per = 1 << (sg - tg)
            hit = (np.repeat(src << (sg - tg), per) + np.tile(np.arange(per), len(src)))
        want = np.zeros(len(target) * 8, dtype=np.uint8)
        want[hit[hit < fmt.granules(size, tg)]] = 1
        target |= np.packbits(want, bitorder="little")
        self.changed = True

    def loaded_bits(self, name: str) -> tuple[U8, int]:
        """The packed bits of a consistent bitmap and its granularity bits. A read-only
        image keeps what it loaded: nothing can change it under a read-only open."""
        e = self.find(name)
        bits = self.bits.get(name, self._read_only_cache.get(name))
        if bits is None:
            if e.in_use:
                raise ImageStateError(f"Bitmap '{name}' is inconsistent and cannot be used")
            bits = self._load(e)
            if not self.writing:
                self._read_only_cache[name] = bits
        return bits, e.granularity_bits

    # ---- whole-image operations ---------------------------------------------------------
    def check_consistent(self) -> None:
        """Resize, shrink and compact need every bitmap in memory, as QEMU does."""
        for e in self.entries:
            if e.name not in self.bits and e.in_use:
                raise ImageStateError(
                    f"Bitmap '{e.name}' is inconsistent and cannot be used\n"
                    "Try block-dirty-bitmap-remove to delete this bitmap from disk"
                )

    def resize(self, new_size: int) -> None:
        """Bits past a shrink are dropped; grown space is clean."""
        for e in self.entries:
            bits = self.bits.get(e.name)
            if bits is None:
                continue
            count = fmt.granules(new_size, e.granularity_bits)
            out = np.zeros(-(-count // 8), dtype=np.uint8)
            keep = min(len(out), len(bits))
            out[:keep] = bits[:keep]
            if count % 8 and len(out):
                out[-1] &= np.uint8((1 << (count % 8)) - 1)
            self.bits[e.name] = out
        if self.entries:
            self.changed = True

    def detach(self) -> None:
        """Drop the on-disk copies of the bitmaps held in memory before a shrink or compact
        moves clusters (they are stored anew on close). They are marked in use on disk, so
        a crash from here on loses nothing a reader could still trust: it finds no bitmaps
        instead of inconsistent ones."""
        self.check_consistent()
        if not self.extension_valid:
            return
        meta = self.meta
        cs = meta.geom.cluster_size
        ext = meta.header.bitmaps
        assert ext is not None
        freed = [self._clusters_of(e) for e in self._on_disk_entries()]
        freed.append(cluster_span(ext.directory_offset, ext.directory_size, cs))
        meta.flush()
        switch_header(self.meta, None)  # unreference before free
        meta.storage.flush()
        self.extension_valid = False
        self.entries = [replace(e, bitmap_table_offset=0) for e in self.entries]
        self.changed = True
        meta.defer_free(np.concatenate(freed))
        meta.release_pending()

    # ---- storing ----------------------------------------------------------------------
    def store(self) -> None:
        """Write the loaded bitmaps beside the old ones and switch with one header write."""
        if not self.writing or (not self.bits and not self.changed):
            return
        meta = self.meta
        cs = meta.geom.cluster_size
        old_ext = meta.header.bitmaps if self.extension_valid else None
        # what goes once the switch is durable: every on-disk bitmap we rewrite or removed
        untouched = {e.name for e in self.entries if e.name not in self.bits}
        freed = [self._clusters_of(e) for e in self._on_disk_entries() if e.name not in untouched]
        if old_ext is not None:
            freed.append(cluster_span(old_ext.directory_offset, old_ext.directory_size, cs))
        new_entries = [write_bitmap(meta, e, self.bits[e.name]) if e.name in self.bits else e
                       for e in self.entries]
        directory = fmt.encode_directory(new_entries)
        new_ext: BitmapsExtension | None = None
        if new_entries:
            nclusters = -(-len(directory) // cs)
            dir_at = meta.refcounts.allocate(nclusters) * cs
            meta.storage.event("bitmap_directory_write")
            meta.storage.pwrite(dir_at, directory + bytes(nclusters * cs - len(directory)))
            new_ext = BitmapsExtension(len(new_entries), len(directory), dir_at)
        # allocate before reference: the refcounts and every new cluster are durable before
        # the header points at them
        meta.refcounts.sync()
        meta.storage.flush()
        switch_header(self.meta, new_ext)
        meta.storage.flush()
        self.entries = fmt.parse_directory(directory, len(new_entries)) if new_entries else []
        self.extension_valid = new_ext is not None
        self.bits = {}
        self.changed = False
        if freed:
            meta.defer_free(np.concatenate(freed))
            meta.release_pending()

    def _on_disk_entries(self) -> list[fmt.BitmapEntry]:
        if not self.extension_valid:
            return []
        ext = self.meta.header.bitmaps
        assert ext is not None
        data = self.meta.storage.pread(ext.directory_offset, ext.directory_size)
        return fmt.parse_directory(data, ext.nb_bitmaps)

    def _clusters_of(self, e: fmt.BitmapEntry) -> I64:
        cs = self.meta.geom.cluster_size
        if not e.bitmap_table_offset:
            return np.zeros(0, dtype=np.int64)
        table = self._table(e)
        offsets = (table & np.uint64(fmt.TABLE_OFFSET_MASK)).astype(np.int64)
        data = offsets[offsets != 0] // cs
        return np.concatenate((data, cluster_span(e.bitmap_table_offset, e.bitmap_table_size * 8, cs)))

__all__ = ["Bitmaps", "BitmapInfo"]
