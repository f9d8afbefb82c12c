"""Resize orchestration: the steps of a grow (with preallocation) and of a crash-safe shrink,
over an open image's guest I/O and its metadata.

Owns the order of the steps; each step's own ordering lives in metadata (resize.py,
mapping.py, meta.py). The shrink order, and why every prefix of it is safe:
1. the bytes past the new end inside its last cluster become zeros (a later grow must
   never show them again);
2. the L2 entries past the cut and the L1 tail are cleared; release_pending writes and
   flushes those tables before any refcount falls (unreference before free);
3. refcount blocks left counting nothing but themselves go, generation by generation;
4. the size and the L1 size switch with one header write;
5. tables left near the old end move down (new copy, flush, switch, flush, free) so the
   file can end earlier; then the data file and the image file are truncated.
A crash after any write leaves an image that is consistent or merely leaks clusters.

Works on any object with the `GuestDisk` surface (guestdisk.py; Image provides it); must not import
qcow2kit.image.
"""

from __future__ import annotations

import numpy as np

from .errors import CorruptionError, ImageStateError, ResizeError
from .format import constants as C
from .guestdisk import GuestDisk
from .metadata import mapping
from .metadata import resize as steps

PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")


def resize(disk: GuestDisk, new_size: int, *, shrink: bool, preallocation: str) -> None:
    """Image.resize: refuse what qemu-img refuses, then grow or shrink. Persistent bitmaps
    follow the new size (their on-disk copies are dropped before a shrink moves clusters and
    stored anew on close). A CorruptionError marks the image corrupt, as for any write."""
    meta = disk.meta
    meta.check_writable()
    validate(disk, new_size, shrink, preallocation)
    if new_size == disk.virtual_size:
        return
    if meta.lazy:
        meta.set_dirty_bit()
    try:
        if new_size < disk.virtual_size:
            disk.bitmaps.detach()
            shrink_to(disk, new_size)
        else:
            grow(disk, new_size, preallocation)
        disk.bitmaps.resize(new_size)
    except CorruptionError as exc:
        raise meta.mark_corrupt(str(exc)) from None


def validate(disk: GuestDisk, new_size: int, shrink: bool, preallocation: str) -> None:
    """Refuse what qemu-img refuses, before anything is written."""
    old_size = disk.virtual_size
    if new_size <= 0:
        raise ResizeError("New image size must be positive")
    if new_size % 512:
        raise ResizeError("The new size must be a multiple of 512")
    if preallocation not in PREALLOCATION_MODES:
        raise ResizeError(f"Unsupported preallocation mode '{preallocation}'")
    if new_size < old_size and preallocation != "off":
        raise ResizeError("Preallocation can only be used for growing images")
    if new_size < old_size and not shrink:
        raise ResizeError(
            f"shrinking from {old_size} to {new_size} bytes deletes the data past the new "
            "end; pass shrink=True to confirm"
        )
    if disk.meta.snapshots and disk.header.version < 3:
        raise ResizeError("Can't resize a v2 image which has snapshots")
    try:
        disk.bitmaps.check_consistent()
    except ImageStateError as exc:
        raise ResizeError(str(exc)) from None
    if new_size > disk.meta.geom.l2_span_bytes * (C.MAX_L1_BYTES // 8):
        raise ResizeError(f"New size {new_size} exceeds the largest size the L1 table allows")


def grow(disk: GuestDisk, new_size: int, preallocation: str) -> None:
    meta = disk.meta
    old_size = disk.virtual_size
    cs = meta.geom.cluster_size
    # bytes past the old end inside its last cluster must read as zeros once visible
    tail_end = min(-(-old_size // cs) * cs, new_size)
    if tail_end > old_size and disk.read_guest(old_size, tail_end - old_size) != bytes(tail_end - old_size):
        disk.write_guest(old_size, memoryview(bytes(tail_end - old_size)))
    meta.release_pending()
    steps.grow_l1(meta, meta.geom.l1_entries_for(new_size))
    backing = disk.backing
    if backing is not None and backing.virtual_size > old_size:
        # the added range must read as zeros, not as the backing file's old data
        zero_end = min(new_size, backing.virtual_size)
        if disk.header.version >= 3 or meta.geom.extended_l2:
            disk.clear_guest(old_size, zero_end - old_size, "zero")
        else:
            disk.write_zero_bytes(old_size, zero_end - old_size)
        meta.release_pending()
    if disk.data_storage is not None and disk.data_storage.size() < new_size:
        disk.data_storage.truncate(new_size)
    if preallocation != "off":
        start = -(-old_size // cs) * cs
        for pos, end in mapping.l2_chunks(meta.geom, start, new_size - start):
            mapping.preallocate(meta, pos, end, preallocation)
    # every new table is durable before the header makes the new size visible
    meta.flush()
    meta.write_size(new_size)
    meta.storage.flush()


def shrink_to(disk: GuestDisk, new_size: int) -> None:
    meta = disk.meta
    cs = meta.geom.cluster_size
    old_size = disk.virtual_size
    meta.release_pending()
    meta.flush()
    # 1. zeros past the new end in its last cluster
    cut = -(-new_size // cs) * cs
    if cut > new_size and disk.read_guest(new_size, cut - new_size) != bytes(cut - new_size):
        disk.write_guest(new_size, memoryview(bytes(cut - new_size)))
        meta.release_pending()
    # 2. unreference everything past the cut: the straddling L2 table's tail entries and
    #    whole L2 tables past the new L1 end
    new_l1 = meta.geom.l1_entries_for(new_size)
    span = meta.geom.l2_span_bytes
    if cut < old_size:
        boundary_end = min(-(-old_size // cs) * cs, new_l1 * span)  # incl. a partial last cluster
        if cut < boundary_end:
            mapping.clear_clusters(meta, cut, boundary_end, "discard", has_backing=disk.backing is not None)
        steps.drop_l1_tail(meta, new_l1)
    # holes are punched at the end, and only below the final end of the file
    freed = meta.release_pending(punch=False)
    meta.refcounts.sync()
    # 3. refcount blocks left counting nothing but themselves (or each other)
    steps.drop_empty_refblocks(meta)
    # 4. size and L1 size in one header write
    steps.switch_header(meta, new_size, new_l1)
    # 5. tables near the old end move down, so the file can end earlier
    if steps.relocate_tables(meta):
        steps.drop_empty_refblocks(meta)  # blocks that only counted the old tables
    if disk.data_storage is not None:
        disk.data_storage.truncate(new_size)
        disk.data_storage.flush()
    last = meta.refcounts.last_used_cluster()
    end = (last + 1) * cs
    if 0 < end < meta.storage.size():
        meta.storage.event("truncate")
        meta.storage.truncate(end)
        meta.storage.flush()
        meta.refcounts.end_cluster = last + 1
    keep = freed[freed <= last]
    if len(keep):
        # relocated tables may have reused some of these clusters since
        keep = np.sort(keep)
        meta.forget_freed(keep[meta.refcounts.values(keep) == 0], punch=True)


__all__ = ["GuestDisk", "PREALLOCATION_MODES", "resize", "validate", "grow", "shrink_to"]
