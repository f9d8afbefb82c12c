"""Refcount table and refcount blocks: read, adjust, allocate, grow the reftable.

Ordering rules owned here:
- a new refcount block is written and flushed before the reftable entry points at it;
- a grown reftable (and the refcount blocks that describe it) is written and flushed
  before the header switches to it, and the old table is freed only after that switch
  is durable;
- decrements are only ever applied by callers *after* the references they drop are
  durable, so a dirty refcount block may always be written back at any time.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from ..errors import CorruptionError
from ..format import constants as C
from ..format.geometry import Geometry
from ..format.tables import (
    decode_refblock,
    decode_table,
    encode_refblock,
    encode_table,
    refcount_dtype,
)
from ..io.storage import Storage
from .cache import TableCache

I64 = npt.NDArray[np.int64]
Block = npt.NDArray[np.unsignedinteger]

MAX_CLUSTER_INDEX_BITS = 56


class Refcounts:
    def __init__(
        self,
        storage: Storage,
        geom: Geometry,
        reftable_offset: int,
        reftable_clusters: int,
        *,
        on_reftable_switch: Callable[[int, int], None],
        cache_blocks: int = 16,
    ) -> None:
        self.storage = storage
        self.geom = geom
        self.entries_per_block = geom.refblock_entries
        self.reftable_offset = reftable_offset
        self.reftable_clusters = reftable_clusters
        raw = storage.pread(reftable_offset, reftable_clusters * geom.cluster_size)
        self.reftable = decode_table(raw).copy()
        self._on_switch = on_reftable_switch
        self.cache: TableCache[Block] = TableCache(cache_blocks, self._load, self._store)
        self.unsynced = False
        self.hint = 0
        self.end_cluster = geom.clusters_for(storage.size())
        # set by the owner: names the metadata structure a cluster range overlaps, or None
        self.overlap_check: Callable[[int, int], str | None] | None = None
        # set by the owner: refuses a block write that would land on other metadata
        self.before_block_write: Callable[[int], None] | None = None
        self._dtype = refcount_dtype(geom.refcount_order)

    # ---- blocks -----------------------------------------------------------------------
    def block_offset(self, index: int) -> int:
        if index >= len(self.reftable):
            return 0
        entry = int(self.reftable[index])
        if entry & C.REFT_RESERVED_MASK:
            raise CorruptionError(f"refcount table entry {index} has reserved bits set")
        off = entry & ~C.REFT_RESERVED_MASK
        if off >= C.MAX_HOST_OFFSET:
            raise CorruptionError(f"refcount block {index} at {off:#x} beyond the offset limit")
        if off & (self.geom.cluster_size - 1):
            raise CorruptionError(
                f"refcount block {index} offset {off:#x} is not aligned to the cluster size"
            )
        if off >= self.end_cluster * self.geom.cluster_size:
            raise CorruptionError(
                f"refcount block {index} at {off:#x} lies beyond the end of the image file"
            )
        return off

    def has_block(self, index: int) -> bool:
        return self.block_offset(index) != 0

    def _load(self, index: int) -> Block:
        off = self.block_offset(index)
        if off == 0:
            raise CorruptionError(f"refcount block {index} is not allocated")
        return decode_refblock(self.storage.pread(off, self.geom.cluster_size), self.geom.refcount_order)

    def _store(self, index: int, block: Block) -> None:
        offset = self.block_offset(index)
        if self.before_block_write is not None:
            self.before_block_write(offset)
        self.storage.event("refblock_update")
        self.storage.pwrite(offset, encode_refblock(block, self.geom.refcount_order))
        self.unsynced = True

    def sync(self) -> bool:
        """Write dirty refcount blocks and make every refcount write durable."""
        wrote = self.cache.write_dirty()
        if self.unsynced:
            self.storage.flush()
            self.unsynced = False
            return True
        return wrote

    # ---- reading ----------------------------------------------------------------------
    def get(self, cluster: int) -> int:
        index, pos = divmod(cluster, self.entries_per_block)
        if not self.has_block(index):
            return 0
        return int(self.cache.get(index)[pos])

    def get_range(self, start: int, count: int) -> npt.NDArray[np.uint64]:
        out = np.zeros(count, dtype=np.uint64)
        e = self.entries_per_block
        pos = start
        while pos < start + count:
            index = pos // e
            lo = pos - index * e
            hi = min(e, lo + start + count - pos)
            if self.has_block(index):
                out[pos - start : pos - start + hi - lo] = self.cache.get(index)[lo:hi]
            pos += hi - lo
        return out

    def values(self, clusters: I64) -> npt.NDArray[np.uint64]:
        """Refcounts of (sorted) clusters, one block lookup per block touched."""
        out = np.zeros(len(clusters), dtype=np.uint64)
        if not len(clusters):
            return out
        e = self.entries_per_block
        blocks = clusters // e
        bounds = np.flatnonzero(np.diff(blocks)) + 1
        pos = 0
        for part in np.split(clusters, bounds):
            index = int(part[0] // e)
            if self.has_block(index):
                out[pos : pos + len(part)] = self.cache.get(index)[part - index * e]
            pos += len(part)
        return out

    # ---- adjusting --------------------------------------------------------------------
    def add_range(self, start: int, count: int, delta: int) -> I64:
        return self.adjust(np.arange(start, start + count, dtype=np.int64), delta)

    def adjust(self, clusters: I64, delta: int | I64) -> I64:
        """Add delta to the refcount of each (sorted, unique) cluster; return the clusters
        whose refcount dropped to zero."""
        if len(clusters) == 0:
            return np.zeros(0, dtype=np.int64)
        deltas = np.broadcast_to(np.asarray(delta, dtype=np.int64), clusters.shape)
        e = self.entries_per_block
        blocks = clusters // e
        bounds = np.flatnonzero(np.diff(blocks)) + 1
        freed: list[I64] = []
        limit = min(self.geom.refcount_max, (1 << 63) - 1)
        for part, dpart in zip(np.split(clusters, bounds), np.split(deltas, bounds), strict=True):
            index = int(part[0] // e)
            if not self.has_block(index):
                if (dpart < 0).any():
                    raise CorruptionError(
                        f"refcount underflow: cluster {int(part[0])} has no refcount block"
                    )
                raise CorruptionError(f"refcount block {index} missing for an increment")
            block = self.cache.get(index)
            pos = part - index * e
            new = block[pos].astype(np.int64) + dpart
            if (new < 0).any() or (new > limit).any():
                self._bad_refcount(part, new, limit)
            block[pos] = new.astype(block.dtype)
            zero = new == 0
            self.cache.mark_dirty(index)
            if zero.any():
                freed.append(part[zero & (dpart < 0)])
        out = np.concatenate(freed) if freed else np.zeros(0, dtype=np.int64)
        if len(out):
            self.hint = min(self.hint, int(out[0]))
        return out

    def set_values(self, clusters: I64, values: npt.NDArray[np.uint64]) -> I64:
        """Set the refcount of each (sorted, unique) cluster, whatever it was: the check's
        repair, where a 64-bit refcount may be too large for adjust's signed arithmetic.
        Returns the clusters whose refcount became zero."""
        if len(clusters) == 0:
            return np.zeros(0, dtype=np.int64)
        if (values > np.uint64(self.geom.refcount_max)).any():
            raise CorruptionError(f"refcount overflow (limit {self.geom.refcount_max})")
        e = self.entries_per_block
        bounds = np.flatnonzero(np.diff(clusters // e)) + 1
        freed: list[I64] = []
        for part, vpart in zip(np.split(clusters, bounds), np.split(values, bounds), strict=True):
            index = int(part[0] // e)
            if not self.has_block(index):
                raise CorruptionError(f"refcount block {index} missing for cluster {int(part[0])}")
            block = self.cache.get(index)
            pos = part - index * e
            was_used = block[pos] != 0
            block[pos] = vpart.astype(block.dtype)
            self.cache.mark_dirty(index)
            freed.append(part[was_used & (vpart == 0)])
        out = np.concatenate(freed)
        if len(out):
            self.hint = min(self.hint, int(out[0]))
        return out

    def _bad_refcount(self, part: I64, vals: I64, limit: int) -> None:
        bad = int(np.flatnonzero((vals < 0) | (vals > limit))[0])
        word = "underflow" if vals[bad] < 0 else "overflow"
        raise CorruptionError(
            f"refcount {word} on cluster {int(part[bad])} (limit {limit})"
        )

    # ---- allocation -------------------------------------------------------------------
    def allocate(self, count: int) -> int:
        """Reserve `count` contiguous free clusters with refcount 1; return the first index.
        Where the run reaches clusters no refcount block describes yet, the new blocks are
        placed at the head of the run (describing themselves and the run) and the data
        follows them. Block contents are durable before the reftable points at them; the
        data's counts stay in the cache, and callers sync before referencing them."""
        e = self.entries_per_block
        while True:
            total = count
            missing: list[int] = []
            for _ in range(64):
                start = self.find_free(total)
                missing = [
                    b for b in range(start // e, (start + total - 1) // e + 1)
                    if not self.has_block(b)
                ]
                if count + len(missing) == total:
                    break
                total = count + len(missing)
            else:
                raise CorruptionError("could not place new refcount blocks")
            if missing and max(missing) >= len(self.reftable):
                self.grow_reftable(max(missing) + 1)
                continue
            break
        if (start + total) >> (MAX_CLUSTER_INDEX_BITS - self.geom.cluster_bits):
            raise CorruptionError("allocation beyond the 2^56 byte host offset limit")
        self._check_overlap(start, total)
        region = np.arange(start, start + total, dtype=np.int64)
        self.adjust(region[np.isin(region // e, missing, invert=True)] if missing else region, 1)
        if missing:
            self._hook_new_blocks(start, total, missing)
        data_start = start + len(missing)
        self.hint = start + total
        self.end_cluster = max(self.end_cluster, start + total)
        return data_start

    def _hook_new_blocks(self, start: int, total: int, missing: list[int]) -> None:
        e = self.entries_per_block
        cs = self.geom.cluster_size
        region = np.arange(start, start + total, dtype=np.int64)
        blocks: dict[int, Block] = {}
        for j, b in enumerate(missing):
            block = np.zeros(e, dtype=self._dtype)
            block[region[(region // e) == b] - b * e] = 1
            blocks[b] = block
            self.storage.event("refblock_alloc_write")
            self.storage.pwrite((start + j) * cs, encode_refblock(block, self.geom.refcount_order))
        # the new blocks, and the counts existing blocks hold for them, are durable before
        # the reftable points at them
        self.sync()
        self.storage.flush()
        # a new block may sit in clusters another new block describes: that one is hooked up
        # (and flushed) first, so no reftable entry ever points at a cluster whose refcount
        # is not on disk yet
        pending = list(enumerate(missing))
        while pending:
            unhooked = {b for _, b in pending}
            ready = [(j, b) for j, b in pending if (start + j) // e == b or (start + j) // e not in unhooked]
            if not ready:
                raise CorruptionError("new refcount blocks describe each other in a cycle")
            for j, b in ready:
                self.storage.event("refblock_alloc_hookup")
                self.storage.pwrite(self.reftable_offset + b * 8, struct.pack(">Q", (start + j) * cs))
                self.reftable[b] = (start + j) * cs
                self.cache.put(b, blocks[b], dirty=False)
            pending = [p for p in pending if p not in ready]
            if pending:
                self.storage.flush()
        self.unsynced = True

    def _check_overlap(self, start: int, count: int) -> None:
        """Clusters with refcount 0 handed out by a corrupt refcount table may still hold
        metadata: refuse (like QEMU's overlap check) before anything overwrites them. The
        owner's registry (metadata/overlap.py) names every structure, these included."""
        what = "the image header" if start == 0 else None
        if what is None and self.overlap_check is not None:
            what = self.overlap_check(start, count)
        if what is not None:
            raise CorruptionError(
                f"Preventing invalid allocation of clusters {start}..{start + count - 1} "
                f"(overlaps with {what}); the refcounts are wrong"
            )

    def find_free(self, count: int, start_at: int | None = None) -> int:
        e = self.entries_per_block
        pos = max(1, self.hint if start_at is None else start_at)
        run_start = pos
        index = pos // e
        while True:
            block_end = (index + 1) * e
            if self.has_block(index):
                block = self.cache.get(index)
                lo = pos - index * e
                used = np.flatnonzero(block[lo:]) + pos
                if len(used):
                    starts = np.concatenate(([run_start], used + 1))
                    ends = np.concatenate((used, [block_end]))
                    fits = np.flatnonzero(ends[:-1] - starts[:-1] >= count)
                    if len(fits):
                        return int(starts[fits[0]])
                    run_start = int(starts[-1])
            if block_end - run_start >= count:
                return run_start
            index += 1
            pos = block_end

    def grow_reftable(self, min_entries: int) -> None:
        """New table (with the blocks that describe it), flush, switch header, free old.

        Order: the new refcount blocks and the counts for the new region are written and
        flushed; then the new table (a copy of the old plus the new blocks), flushed; then
        one 12-byte header write switches offset and size together, flushed; only then is
        the old table's space released. A crash before the switch leaves the old table in
        charge (the new clusters leak); after it, the old table's clusters leak at most."""
        cs = self.geom.cluster_size
        e = self.entries_per_block
        cur = len(self.reftable)
        want = max(min_entries, cur + cur // 2 + 1)
        while True:
            n_table = -(-want * 8 // cs)
            total = n_table
            missing: list[int] = []
            for _ in range(64):
                start = self.find_free(total, start_at=self.end_cluster)
                missing = [
                    b
                    for b in range(start // e, (start + total - 1) // e + 1)
                    if not self.has_block(b)
                ]
                if n_table + len(missing) == total:
                    break
                total = n_table + len(missing)
            if not missing or max(missing) < want:
                break
            want = max(missing) + 1
        if n_table * cs > C.MAX_REFTABLE_BYTES:
            raise CorruptionError("the refcount table would exceed its 8 MiB limit")
        region = np.arange(start, start + total, dtype=np.int64)
        new_blocks: dict[int, Block] = {}
        for j, b in enumerate(missing):
            block = np.zeros(e, dtype=self._dtype)
            inside = region[(region // e) == b] - b * e
            block[inside] = 1
            new_blocks[b] = block
            self.storage.event("refblock_alloc_write")
            self.storage.pwrite(
                (start + n_table + j) * cs, encode_refblock(block, self.geom.refcount_order)
            )
        covered = region[np.isin(region // e, missing, invert=True)]
        if len(covered):
            self.adjust(covered, 1)
        self.sync()
        self.storage.flush()
        table = np.zeros(n_table * cs // 8, dtype=np.uint64)
        table[:cur] = self.reftable
        for j, b in enumerate(missing):
            table[b] = (start + n_table + j) * cs
        self.storage.event("reftable_grow")
        self.storage.pwrite(start * cs, encode_table(table))
        self.storage.flush()
        old_offset, old_clusters = self.reftable_offset, self.reftable_clusters
        self.storage.event("header_update")
        self.storage.pwrite(
            C.HEADER_REFTABLE_OFFSET, struct.pack(">QI", start * cs, n_table)
        )
        self.storage.flush()
        self.reftable = table
        self.reftable_offset, self.reftable_clusters = start * cs, n_table
        for b, block in new_blocks.items():
            self.cache.put(b, block, dirty=False)
        self.end_cluster = max(self.end_cluster, start + total)
        self._on_switch(start * cs, n_table)
        self.add_range(old_offset // cs, old_clusters, -1)

    # ---- whole-table views ------------------------------------------------------------
    def last_used_cluster(self) -> int:
        """Index of the highest cluster with a non-zero refcount (-1 if none)."""
        e = self.entries_per_block
        # only non-zero reftable entries can hold a block (has_block still checks each one)
        index: int
        for index in np.flatnonzero(self.reftable)[::-1].tolist():
            if not self.has_block(index):
                continue
            nz = np.flatnonzero(self.cache.get(index))
            if len(nz):
                return index * e + int(nz[-1])
        return -1
