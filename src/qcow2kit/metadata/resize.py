"""Resize primitives on Metadata: grow the L1 table, drop the L1 tail, drop refcount blocks
that describe nothing but themselves (and each other), and the final header switch.

Ordering (the shrink recipe; each step only relies on what earlier steps made durable):
1. the caller zeroes L2 entries past the new end and the caller-side boundary table;
2. `drop_l1_tail` zeroes L1 entries in memory and queues the refcount drops of those L2
   tables and of everything they reference; `Metadata.release_pending` writes the tables,
   flushes, and only then lowers the refcounts;
3. `drop_empty_refblocks` unhooks empty refcount blocks from the reftable generation by
   generation (a block is unhooked only after every block it still counts was), flushing
   after each generation, then lowers the counts other blocks hold for them;
4. `switch_header` writes size, l1_size and l1_table_offset with one write inside the
   first sector, flushes, and frees the L1 clusters that fell out of use.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from ..errors import CorruptionError
from ..format import constants as C
from ..format.tables import encode_table
from .l2map import referenced_clusters
from .meta import Metadata

I64 = npt.NDArray[np.int64]

# L2 entries read and decoded at once when dropping the L1 tail: bounds the temporaries
# of shrinking a large, fully allocated image (2^20 entries: 8 MiB per array)
_BATCH_ENTRIES = 1 << 20


def drop_l1_tail(meta: Metadata, first_index: int) -> int:
    """Unhook every L2 table at L1 index >= first_index; returns how many were dropped.
    Unallocated entries need no work at all (nothing is allocated to discard them).

    Only memory changes here (the L1 entries, and refcount drops queued with defer_free):
    the tables are read in batches (offset order, one pread per adjacent run) and what
    they reference is found with one vectorised pass per batch."""
    l2 = meta.l2
    geom = meta.geom
    tail = l2.l1[first_index:]
    live = (np.flatnonzero(tail & np.uint64(C.OFFSET_MASK)) + first_index).tolist()
    per_batch = max(1, _BATCH_ENTRIES // geom.l2_entries)
    for k in range(0, len(live), per_batch):
        batch = live[k : k + per_batch]
        tables = l2.read_tables(batch)
        entries = tables[:, 0] if geom.extended_l2 else tables
        refs = referenced_clusters(entries, geom, meta.header.has_data_file)
        own = np.array([l2.l2_offset(i) >> geom.cluster_bits for i in batch], dtype=np.int64)
        # dropping one path to a (possibly shared) L2 drops one count on it and on
        # everything reached through it
        meta.defer_free(np.concatenate((own, refs)).astype(np.int64))
        l2.l1[batch] = 0
        l2.l1_dirty.update(batch)
    return len(live)


def empty_refblock_generations(meta: Metadata) -> list[list[int]]:
    """Refcount blocks that count nothing but themselves or blocks dropped before them,
    grouped so that each group only depends on earlier groups."""
    rc = meta.refcounts
    e = rc.entries_per_block
    present = np.flatnonzero(rc.reftable & ~np.uint64(C.REFT_RESERVED_MASK)).tolist()
    block_cluster = {i: rc.block_offset(i) >> meta.geom.cluster_bits for i in present}
    refblock_clusters = set(block_cluster.values())
    nonzero: dict[int, set[int]] = {}
    for i in present:
        if i == 0:
            continue  # block 0 always counts the header
        nz = np.flatnonzero(rc.cache.get(i))
        if len(nz) > len(refblock_clusters):
            continue
        used = set((nz + i * e).tolist())
        if used <= refblock_clusters:
            nonzero[i] = used
    dropped_clusters: set[int] = set()
    generations: list[list[int]] = []
    remaining = dict(nonzero)
    while True:
        gen = [
            i for i, used in remaining.items()
            if used <= dropped_clusters | {block_cluster[i]}
        ]
        if not gen:
            break
        for i in gen:
            del remaining[i]
            dropped_clusters.add(block_cluster[i])
        generations.append(sorted(gen))
    return generations


def drop_empty_refblocks(meta: Metadata) -> int:
    """Unhook empty refcount blocks, repeatedly; returns how many were dropped."""
    rc = meta.refcounts
    meta.flush()
    rc.sync()
    table_entries = len(rc.reftable)
    generations = empty_refblock_generations(meta)
    dropped: list[int] = []
    for gen in generations:
        for i in gen:
            rc.storage.event("reftable_shrink")
            rc.storage.pwrite(rc.reftable_offset + i * 8, struct.pack(">Q", 0))
        rc.storage.flush()
        dropped.extend(gen)
    if not dropped:
        return 0
    if len(rc.reftable) != table_entries:
        raise CorruptionError("refcount table changed size while blocks were being dropped")
    clusters = np.array(sorted(rc.block_offset(i) >> meta.geom.cluster_bits for i in dropped),
                        dtype=np.int64)
    for i in dropped:
        # the disk no longer references these blocks: forget them in memory too, before
        # anything could write a count into a block a reopen would ignore
        rc.cache.discard(i)
        rc.reftable[i] = 0
    e = rc.entries_per_block
    still_counted = clusters[[rc.has_block(int(c) // e) for c in clusters]]
    if len(still_counted):
        freed = rc.adjust(still_counted, -1)
        meta.forget_freed(freed)
    rc.sync()
    return len(dropped)


def switch_header(meta: Metadata, new_size: int, new_l1_entries: int) -> None:
    """Write size + l1_size (+ unchanged crypt_method and l1_table_offset) in one write,
    flush, then free L1 clusters beyond what the new l1_size needs."""
    meta.flush()
    header = meta.header
    cs = meta.geom.cluster_size
    old_l1_entries = meta.l2.l1_size
    if new_l1_entries < old_l1_entries and (meta.l2.l1[new_l1_entries:] != 0).any():
        raise CorruptionError("L1 entries past the new end are still in use")
    meta.storage.event("header_update")
    meta.storage.pwrite(
        C.HEADER_SIZE_OFFSET,
        struct.pack(">QIIQ", new_size, header.crypt_method, new_l1_entries,
                    meta.l2.l1_offset),
    )
    meta.storage.flush()
    meta.header = header.replace(size=new_size, l1_size=new_l1_entries)
    if new_l1_entries < old_l1_entries:
        meta.l2.l1 = meta.l2.l1[:new_l1_entries].copy()
        meta.l2.l1_size = new_l1_entries
        meta.l2.l1_dirty = {i for i in meta.l2.l1_dirty if i < new_l1_entries}
        old_clusters = meta.geom.clusters_for(old_l1_entries * 8)
        new_clusters = meta.geom.clusters_for(new_l1_entries * 8)
        if new_clusters < old_clusters and meta.l2.l1_offset:
            first = meta.l2.l1_offset // cs + max(new_clusters, 1)
            count = old_clusters - max(new_clusters, 1)
            if count > 0:
                freed = meta.refcounts.add_range(first, count, -1)
                meta.forget_freed(freed)
                meta.refcounts.sync()


def grow_l1(meta: Metadata, new_l1_entries: int) -> None:
    """Make the L1 table hold new_l1_entries: in place when its clusters have room,
    otherwise new table, flush, switch header, free the old one."""
    l2 = meta.l2
    old = l2.l1_size
    if new_l1_entries <= old:
        return
    if new_l1_entries * 8 > C.MAX_L1_BYTES:
        raise CorruptionError(f"the L1 table would exceed {C.MAX_L1_BYTES} bytes")
    cs = meta.geom.cluster_size
    meta.flush()
    new_table = np.zeros(new_l1_entries, dtype=np.uint64)
    new_table[:old] = l2.l1
    old_clusters = meta.geom.clusters_for(old * 8) if old else 0
    need_clusters = meta.geom.clusters_for(new_l1_entries * 8)
    if l2.l1_offset and need_clusters <= old_clusters:
        # the tail of the existing clusters becomes table: make sure it reads zeros
        meta.storage.event("l1_grow_write_table")
        meta.storage.pwrite(l2.l1_offset + old * 8, bytes((new_l1_entries - old) * 8))
        meta.storage.flush()
        new_offset = l2.l1_offset
        free_old = False
    else:
        start = meta.refcounts.allocate(need_clusters)
        meta.refcounts.sync()  # the new clusters are counted before anything points at them
        new_offset = start * cs
        meta.storage.event("l1_grow_write_table")
        padding = bytes(need_clusters * cs - new_l1_entries * 8)
        meta.storage.pwrite(new_offset, encode_table(new_table) + padding)
        meta.storage.flush()
        free_old = bool(l2.l1_offset and old_clusters)
    old_offset = l2.l1_offset
    meta.storage.event("l1_grow_activate_table")
    meta.storage.pwrite(C.HEADER_L1_OFFSET, struct.pack(">IQ", new_l1_entries, new_offset))
    meta.storage.flush()
    l2.l1 = new_table
    l2.l1_size = new_l1_entries
    l2.l1_offset = new_offset
    meta.header = meta.header.replace(l1_size=new_l1_entries, l1_table_offset=new_offset)
    if free_old:
        freed = meta.refcounts.add_range(old_offset // cs, old_clusters, -1)
        meta.forget_freed(freed)


def move_down(
    meta: Metadata,
    old_offset: int,
    data: bytes,
    switch: Callable[[int], tuple[int, bytes]],
    event: str,
) -> int | None:
    """Move a contiguous table into the lowest free run below it: count the new clusters
    (durably), write the copy, flush, switch the one referrer with one small write, flush,
    then free the old clusters. `switch(new_offset)` gives (byte offset, bytes) of that
    write. Returns the new offset, or None when no lower free run is available."""
    rc = meta.refcounts
    cs = meta.geom.cluster_size
    e = rc.entries_per_block
    n = meta.geom.clusters_for(len(data))
    start = rc.find_free(n, start_at=1)
    if start + n > old_offset // cs:
        return None
    if not all(rc.has_block(b) for b in range(start // e, (start + n - 1) // e + 1)):
        return None
    rc.add_range(start, n, 1)
    rc.sync()  # the new clusters are counted before anything points at them
    meta.storage.event(event)
    meta.storage.pwrite(start * cs, data + bytes(n * cs - len(data)))
    meta.storage.flush()
    where, payload = switch(start * cs)
    meta.storage.event("header_update" if where < cs else event + "_switch")
    meta.storage.pwrite(where, payload)
    meta.storage.flush()
    meta.forget_freed(rc.add_range(old_offset // cs, n, -1))
    rc.sync()
    return start * cs


def relocate_tables(meta: Metadata) -> bool:
    """Move the L1 table and the refcount table down into free space when they sit past
    everything else, so that the file can end earlier."""
    rc = meta.refcounts
    l2 = meta.l2
    meta.flush()
    n = rc.reftable_clusters
    new = move_down(
        meta, rc.reftable_offset, encode_table(rc.reftable),
        lambda off: (C.HEADER_REFTABLE_OFFSET, struct.pack(">QI", off, n)), "reftable_move",
    )
    if new is not None:
        rc.reftable_offset = new
        meta.header = meta.header.replace(refcount_table_offset=new)
    moved_l1 = None
    if l2.l1_size and l2.l1_offset:
        size = l2.l1_size
        moved_l1 = move_down(
            meta, l2.l1_offset, encode_table(l2.l1),
            lambda off: (C.HEADER_L1_OFFSET, struct.pack(">IQ", size, off)), "l1_move",
        )
        if moved_l1 is not None:
            l2.l1_offset = moved_l1
            meta.header = meta.header.replace(l1_table_offset=moved_l1)
    return new is not None or moved_l1 is not None
