"""Compaction: move clusters from the end of the file into free holes nearer the start, then
truncate, so the file shrinks to what it uses.

Every move is "copy, flush, re-point, flush, free":
1. the destination gets the source's refcount, and that is durable;
2. the bytes are copied and flushed;
3. every reference is switched to the destination (L2 entries, L1 entries, reftable entries,
   snapshot-table fields, header fields) and flushed;
4. only then does the source's refcount drop.
A power cut anywhere leaves both copies valid: the image is consistent and at worst leaks.

Moves happen in phases, each phase one batch of the same kind of referrer:
data and compressed clusters (referenced by L2 entries), L2 tables (by L1 entries), refcount
blocks (by the reftable), then the tables the header or snapshot table point at.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from ..errors import UnsupportedFeatureError
from ..format import constants as C
from ..format.entries import compressed_extents, decode_l2
from ..format.tables import decode_table, encode_refblock, encode_table
from . import overlap, resize
from .meta import Metadata

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
Progress = Callable[[int], None]
_BATCH_CLUSTERS_BYTES = 64 << 20


@dataclass
class CompactResult:
    old_file_bytes: int
    new_file_bytes: int
    moved_clusters: int


def _l1_tables(meta: Metadata) -> list[tuple[str, int, U64]]:
    """(owner, index, entries) for the active L1 and each snapshot's L1."""
    out: list[tuple[str, int, U64]] = [("active", -1, meta.l2.l1)]
    for i, snap in enumerate(meta.snapshots):
        raw = meta.storage.pread(snap.l1_table_offset, snap.l1_size * 8)
        out.append(("snapshot", i, decode_table(raw).copy()))
    return out


def _l2_offsets(meta: Metadata) -> list[int]:
    offs: set[int] = set()
    for _, _, l1 in _l1_tables(meta):
        live = l1 & np.uint64(C.OFFSET_MASK)
        offs.update(int(o) for o in live[live != 0])
    return sorted(offs)


class Compactor:
    def __init__(self, meta: Metadata, progress: Progress | None = None) -> None:
        if meta.header.bitmaps is not None:
            raise UnsupportedFeatureError(
                "compact does not support images with persistent dirty bitmaps yet"
            )
        self.meta = meta
        self.rc = meta.refcounts
        self.cs = meta.geom.cluster_size
        self.bits = meta.geom.cluster_bits
        self.progress = progress
        self.moved = 0

    # ---- bookkeeping ----------------------------------------------------------------
    def _counts(self) -> U64:
        end = max(self.rc.end_cluster, self.meta.geom.clusters_for(self.meta.storage.size()))
        return self.rc.get_range(0, end)

    def _target(self) -> int:
        counts = self._counts()
        return int(np.count_nonzero(counts))

    def _free_slots(self, target: int) -> I64:
        counts = self._counts()[:target]
        free = np.flatnonzero(counts == 0).astype(np.int64)
        free = free[free > 0]
        e = self.rc.entries_per_block
        covered = np.array([self.rc.has_block(int(b)) for b in np.unique(free // e)], dtype=bool)
        ok_blocks = np.unique(free // e)[covered]
        return free[np.isin(free // e, ok_blocks)]

    def _assign(self, groups: list[I64], slots: I64) -> dict[int, int]:
        """Map old cluster -> new cluster; multi-cluster groups need consecutive slots."""
        mapping: dict[int, int] = {}
        taken = np.zeros(len(slots), dtype=bool)
        single = [g for g in groups if len(g) == 1]
        multi = [g for g in groups if len(g) > 1]
        for g in multi:
            n = len(g)
            if len(slots) < n:
                continue
            run_ok = (slots[n - 1 :] - slots[: len(slots) - n + 1]) == n - 1
            for k in np.flatnonzero(run_ok).tolist():
                if not taken[k : k + n].any():
                    taken[k : k + n] = True
                    for j in range(n):
                        mapping[int(g[j])] = int(slots[k + j])
                    break
        free_idx = np.flatnonzero(~taken)
        for g, k in zip(single, free_idx.tolist(), strict=False):
            mapping[int(g[0])] = int(slots[k])
        return mapping

    def _copy(self, mapping: dict[int, int]) -> None:
        """Copy cluster contents old -> new in coalesced runs, then flush."""
        if not mapping:
            return
        old = np.array(sorted(mapping), dtype=np.int64)
        new = np.array([mapping[int(o)] for o in old], dtype=np.int64)
        brk = np.flatnonzero((np.diff(old) != 1) | (np.diff(new) != 1)) + 1
        max_run = max(1, _BATCH_CLUSTERS_BYTES // self.cs)
        for o_part, n_part in zip(np.split(old, brk), np.split(new, brk), strict=True):
            for s in range(0, len(o_part), max_run):
                o0, n0 = int(o_part[s]), int(n_part[s])
                cnt = min(max_run, len(o_part) - s)
                data = self.meta.storage.pread(o0 * self.cs, cnt * self.cs)
                self.meta.storage.event("compact_copy")
                self.meta.storage.pwrite(n0 * self.cs, data)
        self.meta.storage.flush()

    def _take(self, mapping: dict[int, int]) -> None:
        """Destinations get the sources' refcounts, durably, before anything points there."""
        old = np.array(sorted(mapping), dtype=np.int64)
        counts = self.rc.values(old).astype(np.int64)
        new = np.array([mapping[int(o)] for o in old], dtype=np.int64)
        order = np.argsort(new)
        self.rc.adjust(new[order], counts[order])
        self.rc.sync()

    def _release(self, mapping: dict[int, int]) -> None:
        """Sources drop to zero once nothing on disk points at them any more."""
        old = np.array(sorted(mapping), dtype=np.int64)
        counts = self.rc.values(old).astype(np.int64)
        freed = self.rc.adjust(old, -counts)
        self.meta.forget_freed(freed, punch=False)
        self.rc.sync()
        self.moved += len(mapping)
        if self.progress is not None:
            self.progress(len(mapping))

    # ---- phases ---------------------------------------------------------------------
    def move_data(self, target: int) -> None:
        meta = self.meta
        g = meta.geom
        l2_offsets = _l2_offsets(meta)
        moving: set[int] = set()
        spans: list[tuple[int, int]] = []
        for off in l2_offsets:
            table = meta.l2.table(off)
            ent = table[:, 0] if g.extended_l2 else table
            fields = decode_l2(ent)
            comp = fields.compressed
            if not meta.header.has_data_file:
                host = fields.host[~comp] >> self.bits
                moving.update(host[(host >= target)].tolist())
            if comp.any():
                coff, clen = compressed_extents(fields.descriptor[comp], g)
                first = coff >> self.bits
                last = (coff + clen - 1) >> self.bits
                for f, la in zip(first.tolist(), last.tolist(), strict=True):
                    if la >= target:
                        spans.append((f, la))
        groups = self._groups(moving, spans, target)
        if not groups:
            return
        for batch in self._batches(groups):
            mapping = self._assign(batch, self._free_slots(target))
            if not mapping:
                return
            self._take(mapping)
            self._copy(mapping)
            self._repoint_l2_entries(mapping, l2_offsets)
            meta.flush()
            self._release(mapping)

    def _groups(self, moving: set[int], spans: list[tuple[int, int]], target: int) -> list[I64]:
        """Clusters that must move together: compressed data spanning two host clusters
        keeps its two clusters adjacent."""
        parent: dict[int, int] = {}

        def find(a: int) -> int:
            while parent.get(a, a) != a:
                a = parent[a]
            return a

        for f, la in spans:
            for c in range(f, la + 1):
                moving.add(c)
                if c > f:
                    parent[find(c)] = find(f)
        comps: dict[int, list[int]] = {}
        for c in moving:
            comps.setdefault(find(c), []).append(c)
        out = []
        for members in comps.values():
            members.sort()
            if members[-1] >= target and members == list(range(members[0], members[-1] + 1)):
                out.append(np.array(members, dtype=np.int64))
        out.sort(key=lambda a: int(a[0]))  # keep their order: contiguous runs stay contiguous
        return out

    def _batches(self, groups: list[I64]) -> list[list[I64]]:
        per = max(1, _BATCH_CLUSTERS_BYTES // self.cs)
        batches: list[list[I64]] = []
        cur: list[I64] = []
        n = 0
        for grp in groups:
            cur.append(grp)
            n += len(grp)
            if n >= per:
                batches.append(cur)
                cur, n = [], 0
        if cur:
            batches.append(cur)
        return batches

    def _repoint_l2_entries(self, mapping: dict[int, int], l2_offsets: list[int]) -> None:
        meta = self.meta
        g = meta.geom
        x = g.compressed_offset_bits
        old = np.array(sorted(mapping), dtype=np.int64)
        new = np.array([mapping[int(o)] for o in old], dtype=np.int64)

        def lookup(hc: I64) -> tuple[npt.NDArray[np.bool_], I64]:
            pos = np.clip(np.searchsorted(old, hc), 0, len(old) - 1)
            hit = old[pos] == hc
            return hit, new[pos]

        for off in l2_offsets:
            table = meta.l2.table(off)
            ent = table[:, 0] if g.extended_l2 else table
            fields = decode_l2(ent)
            comp = fields.compressed
            changed = False
            if not meta.header.has_data_file:
                host = fields.host >> self.bits
                hit, dest = lookup(host)
                sel = hit & ~comp & (host != 0)
                if sel.any():
                    ent[sel] = (ent[sel] & ~np.uint64(C.OFFSET_MASK)) | (
                        dest[sel].astype(np.uint64) << np.uint64(self.bits)
                    )
                    changed = True
            if comp.any():
                mask = np.uint64((1 << x) - 1)
                coff = (ent & mask).astype(np.int64)
                hit, dest = lookup(coff >> self.bits)
                sel = hit & comp
                if sel.any():
                    new_coff = coff[sel] + ((dest[sel] - (coff[sel] >> self.bits)) << self.bits)
                    ent[sel] = (ent[sel] & ~mask) | new_coff.astype(np.uint64)
                    changed = True
            if changed:
                meta.l2.cache.mark_dirty(off)

    def move_l2_tables(self, target: int) -> None:
        meta = self.meta
        l2_offsets = [o for o in _l2_offsets(meta) if o >> self.bits >= target]
        if not l2_offsets:
            return
        meta.flush()
        groups = [np.array([o >> self.bits], dtype=np.int64) for o in l2_offsets]
        mapping = self._assign(groups, self._free_slots(target))
        if not mapping:
            return
        self._take(mapping)
        self._copy(mapping)
        cs = self.cs
        # the cache is keyed by offset: carry the (clean) tables over to their new place
        for o, n in mapping.items():
            if o * cs in meta.l2.cache:
                table = meta.l2.table(o * cs)
                meta.l2.cache.discard(o * cs)
                meta.l2.cache.put(n * cs, table, dirty=False)
        for owner, index, l1 in _l1_tables(meta):
            live = (l1 & np.uint64(C.OFFSET_MASK)) >> np.uint64(self.bits)
            dirty = []
            for i in np.flatnonzero(np.isin(live.astype(np.int64), list(mapping))).tolist():
                newoff = mapping[int(live[i])] * cs
                value = (int(l1[i]) & ~C.OFFSET_MASK) | newoff
                if owner == "active":
                    meta.l2.set_l1(i, value)
                else:
                    l1[i] = value
                    dirty.append(i)
            if owner == "snapshot" and dirty:
                snap = meta.snapshots[index]
                meta.storage.event("snapshot_l1_update")
                meta.storage.pwrite(snap.l1_table_offset, encode_table(l1))
        meta.flush()
        self._release(mapping)

    def move_refblocks(self, target: int) -> None:
        rc = self.rc
        meta = self.meta
        offsets = rc.reftable & ~np.uint64(C.REFT_RESERVED_MASK)
        for index in np.flatnonzero(offsets >= np.uint64(target << self.bits)).tolist():
            off = rc.block_offset(index)
            slots = self._free_slots(target)
            if not len(slots):
                return
            old, new = off >> self.bits, int(slots[0])
            # new table, switch, free old: the copy's own refcount is durable, then the copy,
            # then the one reftable entry that switches to it, each flushed before the next;
            # a crash leaves the old block in use (and at most a leaked copy)
            overlap.guard_write(meta, np.array([new * self.cs], dtype=np.int64), "refcount block")
            rc.add_range(new, 1, 1)
            rc.sync()
            block = rc.cache.get(index)
            meta.storage.event("refblock_move")
            meta.storage.pwrite(new * self.cs, encode_refblock(block, meta.geom.refcount_order))
            meta.storage.flush()
            meta.storage.event("reftable_update")
            meta.storage.pwrite(rc.reftable_offset + index * 8, struct.pack(">Q", new * self.cs))
            meta.storage.flush()
            rc.reftable[index] = new * self.cs
            freed = rc.add_range(old, 1, -1)
            meta.forget_freed(freed, punch=False)
            rc.sync()
            self.moved += 1

    def move_snapshot_tables(self, target: int) -> None:
        meta = self.meta
        pos = 0
        table_off = meta.header.snapshots_offset
        for i, snap in enumerate(meta.snapshots):
            entry_at = table_off + pos
            pos += len(snap.to_bytes())
            if not snap.l1_size or snap.l1_table_offset >> self.bits < target:
                continue
            data = meta.storage.pread(snap.l1_table_offset, snap.l1_size * 8)

            def switch(off: int, at: int = entry_at) -> tuple[int, bytes]:
                return at, struct.pack(">Q", off)  # the entry's l1_table_offset field

            new = resize.move_down(meta, snap.l1_table_offset, data, switch, "snapshot_l1_move")
            if new is not None:
                meta.snapshots[i] = replace(snap, l1_table_offset=new)
                self.moved += 1
        if meta.snapshots and table_off >> self.bits >= target:
            count = len(meta.snapshots)
            new = resize.move_down(
                meta, table_off, meta.storage.pread(table_off, pos),
                lambda off: (C.HEADER_SNAPSHOTS_OFFSET, struct.pack(">IQ", count, off)),
                "snapshot_table_move",
            )
            if new is not None:
                meta.header = meta.header.replace(snapshots_offset=new)
                self.moved += 1

    def run(self) -> CompactResult:
        meta = self.meta
        meta.release_pending()
        meta.flush()
        self.rc.sync()
        before = meta.storage.size()
        for _ in range(3):
            target = self._target()
            self.move_data(target)
            self.move_l2_tables(self._target())
            self.move_refblocks(self._target())
            self.move_snapshot_tables(self._target())
            if resize.relocate_tables(meta):
                pass
            resize.drop_empty_refblocks(meta)
            last = self.rc.last_used_cluster()
            if last + 1 <= self._target() + 1:
                break
        meta.flush()
        last = self.rc.last_used_cluster()
        end = (last + 1) * self.cs
        if 0 < end < meta.storage.size():
            meta.storage.event("truncate")
            meta.storage.truncate(end)
            meta.storage.flush()
            self.rc.end_cluster = last + 1
        # free space left inside the file reads as holes
        counts = self.rc.get_range(0, last + 1)
        free = np.flatnonzero(counts == 0)
        meta.forget_freed(free[free > 0].astype(np.int64), punch=True)
        return CompactResult(before, meta.storage.size(), self.moved)


def compact(meta: Metadata, progress: Progress | None = None) -> CompactResult:
    return Compactor(meta, progress).run()
