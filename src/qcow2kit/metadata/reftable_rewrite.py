"""Rewriting every refcount structure at a new refcount width (amend -o refcount_bits=N).

Owns the one crash-safe order for that rewrite, on a storage no Image has open:
1. check that every refcount fits the new width (QEMU's refusal names the first cluster
   that does not), before anything is written;
2. allocate the new refcount blocks and the new reftable in one run of clusters through
   the OLD structures (which may grow for it), until the allocation covers what the new
   blocks must count, themselves included; surplus clusters are given back;
3. write the new blocks (a copy of every refcount, at the new width) and the new table,
   then make the old structures' counts durable (flush): a crash up to here leaves the
   old structures in charge, the new clusters merely leaked;
4. switch the header with ONE write inside the first sector (reftable offset and size
   and refcount_order together, the fields between them rewritten unchanged), flush;
5. through the NEW structures, free the old refcount blocks and table, flush: a crash in
   between leaves them leaked, never referenced.
Never writes an L1/L2 table, data, or anything but the new refcount clusters and the
header fields named above; must not import qcow2kit.image or anything above it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from ..errors import InvalidArgumentError
from ..format import constants as C
from ..format.features import KNOWN_AUTOCLEAR
from ..format.tables import encode_refblock, encode_table, refcount_dtype
from ..io.storage import Storage
from . import header_io
from .meta import Metadata

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
# refcount_table_offset (u64) at 48 ... refcount_order (u32) at 96: one write in sector 0
_SWITCH_START = C.HEADER_REFTABLE_OFFSET
_SWITCH = struct.Struct(">QIIQQQQI")


class RefcountWidthError(InvalidArgumentError):
    """Some refcount does not fit the narrower width asked for."""


def all_refcounts(meta: Metadata) -> U64:
    """The refcount of every cluster up to the last one in use (index = host cluster)."""
    last = meta.refcounts.last_used_cluster()
    return meta.refcounts.get_range(0, last + 1)


def check_fits(counts: U64, cluster_size: int, refcount_bits: int) -> None:
    """QEMU's refusal of a narrowing that loses a refcount: the first cluster too big."""
    if refcount_bits >= 64:
        return
    bad = np.flatnonzero(counts >> np.uint64(refcount_bits))
    if len(bad):
        i = int(bad[0])
        raise RefcountWidthError(
            f"Cannot decrease refcount entry width to {refcount_bits} bits: Cluster at offset "
            f"{i * cluster_size:#x} has a refcount of {int(counts[i])}"
        )


def _needs(counts: U64, per_block: int, cluster_size: int) -> tuple[I64, int]:
    """The new blocks needed (indices of blocks that count something) and the clusters of
    the table that points at them."""
    used = np.flatnonzero(counts)
    blocks = np.unique(used // per_block).astype(np.int64)
    entries = int(blocks[-1]) + 1 if len(blocks) else 1
    return blocks, -(-entries * 8 // cluster_size)


def change_refcount_order(
    storage: Storage, new_order: int, progress: Callable[[float], None] | None = None
) -> None:
    """Rewrite the refcount structures of the qcow2 image on storage at refcount width
    2**new_order (see the module docstring for the order). The image must be clean (no
    dirty bit) and open nowhere else."""
    meta = Metadata(storage, header_io.read_header(storage))
    header = meta.header
    if header.refcount_order == new_order:
        return
    cs = meta.geom.cluster_size
    check_fits(all_refcounts(meta), cs, 1 << new_order)
    per_block = cs * 8 >> new_order
    # old refcount blocks and table, freed once the new ones are in charge
    old = [meta.refcounts.block_offset(i) // cs for i in range(len(meta.refcounts.reftable))]
    old_clusters = [c for c in old if c]
    old_clusters += range(header.refcount_table_offset // cs,
                          header.refcount_table_offset // cs + header.refcount_table_clusters)
    start = count = 0
    while True:
        counts = all_refcounts(meta)
        blocks, table_clusters = _needs(counts, per_block, cs)
        need = len(blocks) + table_clusters
        if count >= need:
            break
        if count:
            meta.refcounts.add_range(start, count, -1)
        # some slack: the allocation itself may need one more block or table cluster
        count = need + 1 + need // 16
        start = meta.refcounts.allocate(count)
    if count > need:
        meta.refcounts.add_range(start + need, count - need, -1)
        counts = all_refcounts(meta)
        blocks, table_clusters = _needs(counts, per_block, cs)
    if progress is not None:
        progress(33.0)
    dtype = refcount_dtype(new_order)
    values = np.zeros(len(blocks) * per_block, dtype=dtype)
    table = np.zeros(table_clusters * cs // 8, dtype=np.uint64)
    for j, b in enumerate(blocks.tolist()):
        part = counts[b * per_block : (b + 1) * per_block]
        values[j * per_block : j * per_block + len(part)] = part.astype(dtype)
        table[b] = (start + j) * cs
    storage.event("refblock_alloc_write")
    storage.pwrite(start * cs, encode_refblock(values, new_order))
    table_offset = (start + len(blocks)) * cs
    storage.event("reftable_grow")
    storage.pwrite(table_offset, encode_table(table))
    # the old structures' counts for the new clusters, and the new clusters themselves,
    # are durable before the header names them
    meta.refcounts.sync()
    storage.flush()
    if progress is not None:
        progress(66.0)
    h = meta.header
    storage.event("header_update")
    storage.pwrite(_SWITCH_START, _SWITCH.pack(
        table_offset, table_clusters, h.nb_snapshots, h.snapshots_offset,
        h.incompatible_features, h.compatible_features,
        h.autoclear_features & KNOWN_AUTOCLEAR, new_order,
    ))
    storage.flush()
    fresh = Metadata(storage, header_io.read_header(storage))
    gone = np.unique(np.array(old_clusters, dtype=np.int64))
    fresh.refcounts.adjust(gone, -1)
    fresh.refcounts.sync()
    storage.flush()
    if progress is not None:
        progress(100.0)


__all__ = ["RefcountWidthError", "all_refcounts", "check_fits", "change_refcount_order"]
