"""Write planning: make a guest range writable, or clear it, and say where its bytes go.

Owns the L2-entry side of every guest write, zero write, discard and preallocation, one L2
table (one L1 entry's span) at a time:
- `plan_write` looks at the current entries and decides, per cluster, whether the write can
  go in place or needs a new cluster, which host bytes will be written (a partial write to
  a new cluster also writes the old bytes around it: the "fill"), and with extended L2 which
  subclusters become allocated;
- `allocate_write` takes an L2 table we alone own (copy-on-write), allocates the new
  clusters and queues the refcount drops of what they replace;
- `commit_write` points the L2 entries at the new clusters once the caller has written the
  data.
The caller (Image) reads the fills and writes the data between those steps, so this module
never reads guest data and never calls up into the image.

Ordering rules applied here (DESIGN.md section 3): data is written before the L2 entries that
point at it are (note_data_written, then Metadata._before_l2_write flushes); the references a
write replaces are dropped only through Metadata.defer_free, after the new entries are durable.
Must not import qcow2kit.image.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..errors import CorruptionError
from ..format import constants as C
from ..format.entries import decode_l2, referenced_clusters
from ..format.geometry import Geometry
from ..io.storage import Storage
from . import overlap
from .meta import Metadata

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]

MODES = ("zero", "zero_unmap", "discard")


def l2_chunks(geom: Geometry, offset: int, length: int) -> Iterator[tuple[int, int]]:
    """Split a guest range at L2-table boundaries: (start, end) pieces."""
    span = geom.l2_span_bytes
    pos, end = offset, offset + length
    while pos < end:
        piece_end = min(end, (pos // span + 1) * span)
        yield pos, piece_end
        pos = piece_end


def check_in_place(meta: Metadata, host_offsets: I64, what: str) -> None:
    """A cluster about to be rewritten in place must lie inside the image file and must not
    be metadata: hostile entries aimed past the end would make the file huge, and entries
    aimed at the L1 or refcount table would let a guest write rewrite them."""
    if not len(host_offsets):
        return
    limit = meta.refcounts.end_cluster * meta.geom.cluster_size
    if int(host_offsets.max()) >= limit:
        bad = int(host_offsets[host_offsets >= limit][0])
        raise CorruptionError(
            f"{what} at {bad:#x} lies beyond the end of the image file ({limit} bytes)"
        )
    skip = (overlap.ACTIVE_L2,) if what == "L2 table" else ()
    overlap.guard_write(meta, host_offsets, what, skip)


def writable_l2(meta: Metadata, l1_index: int) -> tuple[int, U64]:
    """The L2 table of l1_index made ours alone: used in place when COPIED, else copied (or
    created empty) into a new cluster that the L1 entry then points at. The old table's
    reference is dropped only after the new one is durable (defer_free)."""
    l2 = meta.l2
    if l1_index >= l2.l1_size:
        raise CorruptionError(f"L1 index {l1_index} beyond l1_size {l2.l1_size}")
    entry = int(l2.l1[l1_index])
    old = l2.l2_offset(l1_index)
    if old and entry & C.OFLAG_COPIED:
        check_in_place(meta, np.array([old], dtype=np.int64), "L2 table")
        return old, l2.table(old)
    new = meta.refcounts.allocate(1) * meta.geom.cluster_size
    if old:
        table = l2.table(old).copy()
        meta.defer_free(np.array([old >> meta.geom.cluster_bits], dtype=np.int64))
    else:
        shape = (meta.geom.l2_entries, 2) if meta.geom.extended_l2 else (meta.geom.l2_entries,)
        table = np.zeros(shape, dtype=np.uint64)
    l2.cache.put(new, table, dirty=True)
    l2.set_l1(l1_index, new | C.OFLAG_COPIED)
    return new, table


@dataclass(slots=True)
class WritePlan:
    """How one guest write within one L2 table reaches the host.

    Per cluster i of the write (clusters first_cluster .. first_cluster+count-1 of the
    table): the guest bytes [write_start[i], write_end[i]) of the cluster come from the
    caller; the host bytes [host_start[i], host_end[i]) of the cluster are written, the
    difference being filled with the cluster's current content (`fills`). host_offset[i] is
    the cluster's host byte offset, known for new clusters only after allocate_write."""

    l1_index: int
    table_guest_offset: int
    first_cluster: int
    host_offset: I64
    write_start: I64
    write_end: I64
    host_start: I64
    host_end: I64
    needs_new: npt.NDArray[np.bool_]
    old_entries: U64
    new_bitmap: U64 | None
    l2_offset: int = 0  # the table's host offset once allocate_write made it ours

    def cluster_guest(self, i: int, cluster_size: int) -> int:
        return self.table_guest_offset + (self.first_cluster + i) * cluster_size

    def fills(self, cluster_size: int) -> Iterator[tuple[int, tuple[int, int], tuple[int, int]]]:
        """(cluster index, head guest range, tail guest range) of the old bytes to keep."""
        gap = (self.host_start < self.write_start) | (self.host_end > self.write_end)
        for i in np.flatnonzero(gap).tolist():
            g = self.cluster_guest(i, cluster_size)
            head = (g + int(self.host_start[i]), int(self.write_start[i] - self.host_start[i]))
            tail = (g + int(self.write_end[i]), int(self.host_end[i] - self.write_end[i]))
            yield i, head, tail


def plan_write(meta: Metadata, pos: int, end: int) -> WritePlan:
    """Plan the write of guest bytes [pos, end), which lie within one L2 table."""
    g = meta.geom
    cs = g.cluster_size
    span = g.l2_span_bytes
    l1_index = pos // span
    base = l1_index * span
    c0 = (pos - base) // cs
    c1 = -(-(end - base) // cs)
    n = c1 - c0
    ext = g.extended_l2
    data_file = meta.header.has_data_file
    l2_off = meta.l2.l2_offset(l1_index)
    if l2_off:
        cur = meta.l2.table(l2_off)
        ent = (cur[c0:c1, 0] if ext else cur[c0:c1]).copy()
        bitmap = cur[c0:c1, 1].copy() if ext else None
    else:
        ent = np.zeros(n, dtype=np.uint64)
        bitmap = np.zeros(n, dtype=np.uint64) if ext else None
    f = decode_l2(ent)
    zero = f.zero & (not ext)
    if data_file:
        # an external data file maps guest offset = host offset; nothing is allocated in it
        host = base + np.arange(c0, c1, dtype=np.int64) * cs
        owned = ~f.compressed & (f.copied | (f.host != 0))
    else:
        host = f.host.copy()
        owned = f.copied & ~f.compressed & (f.host != 0)
        check_in_place(meta, host[owned], "data cluster")
    needs_new = ~owned
    write_start = np.zeros(n, dtype=np.int64)
    write_end = np.full(n, cs, dtype=np.int64)
    write_start[0] = (pos - base) - c0 * cs
    write_end[-1] = (end - base) - (c1 - 1) * cs
    host_start = write_start.copy()
    host_end = write_end.copy()
    new_bitmap: U64 | None = None
    if bitmap is None:
        # a new cluster (or one that reads as zero clusters) is written whole
        whole = needs_new | zero
        host_start[whole] = 0
        host_end[whole] = cs
    else:
        new_bitmap = _plan_subclusters(
            g, bitmap, f.compressed, f.host, owned, needs_new,
            write_start, write_end, host_start, host_end,
        )
    return WritePlan(
        l1_index, base, c0, host, write_start, write_end, host_start, host_end,
        needs_new, ent, new_bitmap,
    )


def _plan_subclusters(
    g: Geometry,
    bitmap: U64,
    compressed: npt.NDArray[np.bool_],
    raw_host: I64,
    owned: npt.NDArray[np.bool_],
    needs_new: npt.NDArray[np.bool_],
    write_start: I64,
    write_end: I64,
    host_start: I64,
    host_end: I64,
) -> U64:
    """Extended L2: the host window grows to whole subclusters, and only the subclusters
    written become allocated; a shared or compressed cluster is copied whole. Adjusts
    host_start/host_end in place and returns the new allocation bitmaps."""
    cs = g.cluster_size
    scs = g.subcluster_size
    whole = needs_new & (compressed | (raw_host != 0))
    host_start[whole] = 0
    host_end[whole] = cs
    part = ~whole
    host_start[part] = (write_start[part] // scs) * scs
    host_end[part] = -(-write_end[part] // scs) * scs
    first_sc = (host_start // scs).astype(np.uint64)
    last_sc = (host_end // scs).astype(np.uint64)  # exclusive
    one = np.uint64(1)
    mask = ((one << last_sc) - one) ^ ((one << first_sc) - one)
    mask = np.where(whole, np.uint64(C.BITMAP_ALL_ALLOC), mask)
    # a boundary subcluster already allocated in place needs no fill
    alloc = bitmap & np.uint64(C.BITMAP_ALL_ALLOC)
    first_alloc = ((alloc >> first_sc) & one).astype(bool)
    last_alloc = ((alloc >> (last_sc - one)) & one).astype(bool)
    keep_start = part & owned & first_alloc
    keep_end = part & owned & last_alloc
    host_start[keep_start] = write_start[keep_start]
    host_end[keep_end] = write_end[keep_end]
    return np.where(
        whole, np.uint64(C.BITMAP_ALL_ALLOC), (bitmap | mask) & ~(mask << np.uint64(32))
    )


def allocate_write(meta: Metadata, plan: WritePlan) -> None:
    """Make the plan's L2 table ours and give its new clusters host offsets. The clusters
    they replace lose their reference only once the new entries are durable."""
    new_idx = np.flatnonzero(plan.needs_new)
    data_file = meta.header.has_data_file
    if len(new_idx) and not data_file:
        meta.defer_free(referenced_clusters(plan.old_entries[new_idx], meta.geom, data_file))
    plan.l2_offset = writable_l2(meta, plan.l1_index)[0]
    if len(new_idx) and not data_file:
        start = meta.refcounts.allocate(len(new_idx))
        plan.host_offset[new_idx] = (start + np.arange(len(new_idx), dtype=np.int64)) << (
            meta.geom.cluster_bits
        )


def commit_write(meta: Metadata, plan: WritePlan) -> None:
    """Point the L2 entries at the written clusters (the caller wrote the data first)."""
    meta.note_data_written(new_clusters=bool(plan.needs_new.any()))
    l2_off = plan.l2_offset
    # allocating the data clusters may have evicted the table from the cache: get() reloads
    # it (the eviction wrote it back first)
    table = meta.l2.table(l2_off)
    c0, c1 = plan.first_cluster, plan.first_cluster + len(plan.host_offset)
    entries = plan.host_offset.astype(np.uint64) | np.uint64(C.OFLAG_COPIED)
    if plan.new_bitmap is not None:
        table[c0:c1, 0] = entries
        table[c0:c1, 1] = plan.new_bitmap
    else:
        table[c0:c1] = entries
    meta.l2.cache.mark_dirty(l2_off)


def clear_clusters(meta: Metadata, pos: int, end: int, mode: str, *, has_backing: bool) -> None:
    """Whole clusters [pos, end) within one L2 table read as zeros ("zero": keep our own
    allocation, "zero_unmap": drop it) or as the backing file ("discard")."""
    if mode not in MODES:
        raise ValueError(f"unknown clear mode {mode!r}")
    g = meta.geom
    cs = g.cluster_size
    span = g.l2_span_bytes
    l1_index = pos // span
    base = l1_index * span
    c0, c1 = (pos - base) // cs, (end - base) // cs
    l2_off = meta.l2.l2_offset(l1_index)
    data_file = meta.header.has_data_file
    if l2_off == 0 and (mode == "discard" or not has_backing):
        return  # unallocated already reads as wanted
    ext = g.extended_l2
    if l2_off:
        cur = meta.l2.table(l2_off)
        ent = (cur[c0:c1, 0] if ext else cur[c0:c1]).copy()
        bitmap = cur[c0:c1, 1].copy() if ext else np.zeros(0, dtype=np.uint64)
    else:
        ent = np.zeros(c1 - c0, dtype=np.uint64)
        bitmap = np.zeros(c1 - c0, dtype=np.uint64)
    f = decode_l2(ent)
    if mode == "discard":
        new_ent = np.zeros_like(ent)
        new_bitmap = np.zeros_like(bitmap)
        keep = np.zeros(len(ent), dtype=bool)
    else:
        if data_file:
            keep = (~f.compressed & (f.host != 0)) | (f.copied & ~f.compressed)
        else:
            keep = f.copied & ~f.compressed & (f.host != 0) & (mode == "zero")
        if ext:
            new_ent = np.where(keep, ent, np.uint64(0))
            new_bitmap = np.full_like(bitmap, np.uint64(C.BITMAP_ALL_ZERO))
        else:
            new_ent = np.where(keep, ent | np.uint64(1), np.uint64(1))
            new_bitmap = bitmap
    if np.array_equal(new_ent, ent) and (not ext or np.array_equal(new_bitmap, bitmap)):
        return
    dropped = referenced_clusters(ent[~keep], g, data_file)
    if data_file:
        for first, count in _runs(np.flatnonzero((ent != 0) & ~f.compressed)):
            meta.data_storage.punch_hole(base + (c0 + first) * cs, count * cs)
    l2_off, table = writable_l2(meta, l1_index)
    if ext:
        table[c0:c1, 0] = new_ent
        table[c0:c1, 1] = new_bitmap
    else:
        table[c0:c1] = new_ent
    meta.l2.cache.mark_dirty(l2_off)
    meta.defer_free(dropped)


def _runs(indices: I64) -> list[tuple[int, int]]:
    """Sorted indices as (first, count) runs of consecutive values."""
    if not len(indices):
        return []
    bounds = np.flatnonzero(np.diff(indices) != 1) + 1
    return [(int(part[0]), len(part)) for part in np.split(indices, bounds)]


def preallocate(meta: Metadata, pos: int, end: int, mode: str) -> None:
    """Allocate (and for "falloc"/"full" reserve or zero-fill) host clusters for the guest
    clusters of [pos, end) within one L2 table, as QEMU's preallocation modes do."""
    g = meta.geom
    cs = g.cluster_size
    l1_index = pos // g.l2_span_bytes
    base = l1_index * g.l2_span_bytes
    c0, c1 = (pos - base) // cs, -(-(end - base) // cs)
    l2_off, table = writable_l2(meta, l1_index)
    if meta.header.has_data_file:
        host = base + np.arange(c0, c1, dtype=np.int64) * cs
    else:
        storage = meta.storage
        first = meta.refcounts.allocate(c1 - c0)
        host = (first + np.arange(c1 - c0, dtype=np.int64)) * cs
        storage.punch_hole(first * cs, (c1 - c0) * cs)
        if mode == "falloc":
            storage.allocate(first * cs, (c1 - c0) * cs)
        elif mode == "full":
            fill_zeros(storage, first * cs, (c1 - c0) * cs)
        if storage.size() < (first + c1 - c0) * cs:
            storage.truncate((first + c1 - c0) * cs)
    entries = host.astype(np.uint64) | np.uint64(C.OFLAG_COPIED)
    if g.extended_l2:
        table[c0:c1, 0] = entries
        table[c0:c1, 1] = C.BITMAP_ALL_ALLOC
    else:
        table[c0:c1] = entries
    meta.l2.cache.mark_dirty(l2_off)
    meta.note_tables_changed()


def fill_zeros(storage: Storage, offset: int, length: int) -> None:
    """Write real zero bytes (preallocation=full), 8 MiB at a time."""
    step = 8 << 20
    zeros = bytes(min(step, length))
    pos = offset
    while pos < offset + length:
        n = min(step, offset + length - pos)
        storage.pwrite(pos, zeros[:n])
        pos += n


__all__ = [
    "MODES",
    "WritePlan",
    "l2_chunks",
    "check_in_place",
    "writable_l2",
    "plan_write",
    "allocate_write",
    "commit_write",
    "clear_clusters",
    "preallocate",
    "fill_zeros",
]
