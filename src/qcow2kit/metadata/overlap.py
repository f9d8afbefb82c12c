"""The registry of metadata ranges: which host clusters hold which structure of one image.

Owns: naming the structure (header, refcount table, refcount blocks, active L1 and L2
tables, snapshot table, inactive L1 tables, bitmap directory) that a host range overlaps,
and the guard that runs before every metadata write and every in-place data write. A write
aimed at another structure is refused with a CorruptionError (the caller marks the image
corrupt), as QEMU's overlap check does: a corrupt pointer must never let one table be
written over another.

Reads the Metadata's in-memory tables only; never writes, never imports qcow2kit.image.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ..errors import CorruptionError
from ..format import constants as C

if TYPE_CHECKING:
    from .meta import Metadata

I64 = npt.NDArray[np.int64]

HEADER = "the image header"
REFTABLE = "the refcount table"
REFBLOCK = "a refcount block"
ACTIVE_L1 = "the active L1 table"
ACTIVE_L2 = "an active L2 table"
SNAPSHOT_TABLE = "the snapshot table"
INACTIVE_L1 = "an inactive L1 table"
BITMAP_DIRECTORY = "the bitmap directory"

def _span(offset: int, nbytes: int, bits: int) -> I64:
    if nbytes <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.arange(offset >> bits, ((offset + nbytes - 1) >> bits) + 1, dtype=np.int64)


def regions(meta: Metadata, skip: Iterable[str] = ()) -> Iterator[tuple[str, I64]]:
    """(name, host clusters) of every metadata structure, computed lazily so a caller that
    stops at the first hit pays only for what it looked at."""
    skipped = frozenset(skip)
    bits = meta.geom.cluster_bits
    rc = meta.refcounts
    if HEADER not in skipped:
        yield HEADER, np.zeros(1, dtype=np.int64)
    if REFTABLE not in skipped:
        yield REFTABLE, _span(rc.reftable_offset, rc.reftable_clusters << bits, bits)
    if REFBLOCK not in skipped:
        yield REFBLOCK, (rc.reftable[rc.reftable != 0] >> np.uint64(bits)).astype(np.int64)
    l2 = meta.l2
    if ACTIVE_L1 not in skipped:
        yield ACTIVE_L1, _span(l2.l1_offset, l2.l1_size * 8, bits)
    if ACTIVE_L2 not in skipped:
        tables = (l2.l1 & np.uint64(C.OFFSET_MASK)) >> np.uint64(bits)
        yield ACTIVE_L2, tables[tables != 0].astype(np.int64)
    if meta.snapshots:
        if SNAPSHOT_TABLE not in skipped:
            table_bytes = sum(len(sn.to_bytes()) for sn in meta.snapshots)
            yield SNAPSHOT_TABLE, _span(meta.header.snapshots_offset, table_bytes, bits)
        if INACTIVE_L1 not in skipped:
            for sn in meta.snapshots:
                yield INACTIVE_L1, _span(sn.l1_table_offset, sn.l1_size * 8, bits)
    ext = meta.header.bitmaps
    if BITMAP_DIRECTORY not in skipped and ext is not None and meta.header.autoclear_features & 1:
        yield BITMAP_DIRECTORY, _span(ext.directory_offset, ext.directory_size, bits)


def first_overlap(meta: Metadata, clusters: I64, skip: Iterable[str] = ()) -> tuple[str, int] | None:
    """The first structure (and the host cluster) that any of `clusters` belongs to."""
    if not len(clusters):
        return None
    # sorted, not np.unique: numpy 2.4's unique imports numpy.ma (60 ms on the first write)
    wanted = np.sort(np.asarray(clusters, dtype=np.int64))
    for name, held in regions(meta, skip):
        if not len(held):
            continue
        # the usual guard asks about one or a few clusters: a direct comparison beats
        # isin's sort by far there
        if len(wanted) <= 16:
            hit = (held[:, None] == wanted[None, :]).any(axis=0)
        else:
            hit = np.isin(wanted, held)
        if hit.any():
            return name, int(wanted[hit][0])
    return None


def overlapping_range(meta: Metadata, start: int, count: int) -> str | None:
    """The structure among host clusters [start, start+count), for the allocation guard
    in Refcounts (a corrupt refcount of 0 on a live table)."""
    end = start + count
    for name, held in regions(meta):
        if ((held >= start) & (held < end)).any():
            return name
    return None


def guard_write(meta: Metadata, host_offsets: I64, what: str, skip: Iterable[str] = ()) -> None:
    """Refuse to write `what` (whole clusters at host_offsets) over other metadata."""
    bits = meta.geom.cluster_bits
    hit = first_overlap(meta, np.asarray(host_offsets, dtype=np.int64) >> bits, skip)
    if hit is not None:
        name, cluster = hit
        raise CorruptionError(
            f"Preventing invalid write on metadata: {what} at {cluster << bits:#x} "
            f"overlaps with {name}"
        )


__all__ = [
    "regions",
    "first_overlap",
    "overlapping_range",
    "guard_write",
    "HEADER",
    "REFTABLE",
    "REFBLOCK",
    "ACTIVE_L1",
    "ACTIVE_L2",
    "SNAPSHOT_TABLE",
    "INACTIVE_L1",
    "BITMAP_DIRECTORY",
]
