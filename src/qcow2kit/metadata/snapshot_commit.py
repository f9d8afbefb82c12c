"""One atomic metadata transition for the snapshot operations (create, apply, delete).

Owns: turning "these references appear / disappear, this is the new active L1, this is the
new snapshot table, this is the new size" into a complete new state written beside the old
one, and switching to it with one header write.

Why a whole new state: QEMU's check requires, for every active L1/L2 entry, COPIED set iff
the cluster's refcount is 1. A snapshot operation changes refcounts and COPIED bits of the
same clusters, which no ordering of in-place writes can keep consistent. So nothing the old
header reaches is written before the switch:
1. the net refcount change of every touched cluster is computed in memory (numpy);
2. every active L2 table whose COPIED bits must change is copied (never edited in place);
3. the new active L1, the L2 copies, the new snapshot table, a copy of every refcount block
   whose counts change and a new refcount table go to clusters that are free in the old
   state (first fit), and are flushed;
4. one write of header bytes 24..71 (size, L1, refcount table, snapshot table: all inside
   the first sector) switches to the new state, and is flushed;
5. only then are clusters that only the old state used punched.
A crash before step 4 leaves the old image untouched; after it, the new one complete: no
corruption and not even a leak in any crash state.

Must never: write a cluster that the old state reaches before the switch is durable; edit an
L2 table or a refcount block in place; import qcow2kit.image or anything above it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from ..errors import CorruptionError, InvalidArgumentError
from ..format import constants as C
from ..format.entries import decode_l2, referenced_clusters
from ..format.snapshot import Snapshot, snapshot_table_bytes
from ..format.tables import decode_table, encode_refblock, encode_table
from .meta import Metadata
from .refchanges import Allocator, RefChanges

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]

_COPIED = np.uint64(C.OFLAG_COPIED)
_OFFSET = np.uint64(C.OFFSET_MASK)
_HEADER_SWITCH = struct.Struct(">QIIQQIIQ")  # size .. snapshots_offset: bytes 24..71
_READ_BATCH_TABLES = 256


class RefcountOverflowError(InvalidArgumentError):
    """A refcount would exceed the image's refcount width (QEMU answers -EINVAL)."""

    errno = 22  # EINVAL


class TableReader:
    """L2 tables read straight from storage (the caller flushed the cache first), kept for
    the duration of one operation; contiguous tables are read with one pread."""

    def __init__(self, meta: Metadata) -> None:
        self.meta = meta
        self.tables: dict[int, U64] = {}

    def load(self, offsets: Sequence[int] | I64) -> None:
        cs = self.meta.geom.cluster_size
        want = np.unique(np.asarray(offsets, dtype=np.int64))
        want = want[[int(o) not in self.tables for o in want.tolist()]] if len(want) else want
        if not len(want):
            return
        end = self.meta.storage.size()
        bad = want[(want & (cs - 1) != 0) | (want + cs > end) | (want <= 0)]
        if len(bad):
            raise CorruptionError(
                f"L2 table offset {int(bad[0]):#x} is unaligned or outside the image file"
            )
        bounds = np.flatnonzero(np.diff(want) != cs) + 1
        for run in np.split(want, bounds):
            for i in range(0, len(run), _READ_BATCH_TABLES):
                part = run[i : i + _READ_BATCH_TABLES]
                raw = self.meta.storage.pread(int(part[0]), len(part) * cs)
                arr = decode_table(raw)
                per = cs // 8
                for j, off in enumerate(part.tolist()):
                    self.tables[off] = arr[j * per : (j + 1) * per]

    def stack(self, offsets: I64) -> U64:
        """The first words of the tables' entries (extended L2: every other word), one row
        per offset."""
        per = self.meta.geom.l2_entries
        if not len(offsets):
            return np.zeros((0, per), dtype=np.uint64)
        step = 2 if self.meta.geom.extended_l2 else 1
        return np.stack([self.tables[int(o)][0::step] for o in offsets])


def l1_table_offsets(meta: Metadata, l1: U64) -> I64:
    """L2 table byte offsets of the used entries of an L1 table (validated)."""
    used = l1[(l1 & _OFFSET) != 0]
    if (used & np.uint64(C.L1E_RESERVED_MASK)).any():
        raise CorruptionError("an L1 entry has reserved bits set")
    offs: I64 = (used & _OFFSET).astype(np.int64)
    if (offs & (meta.geom.cluster_size - 1)).any():
        raise CorruptionError("an L1 entry points at an unaligned L2 table")
    return offs


def tree_refs(meta: Metadata, reader: TableReader, l1: U64) -> tuple[I64, I64]:
    """(L2 table clusters, data cluster references) that one L1 table holds: one per L1
    entry, one per L2 entry reference (a cluster reached twice counts twice, as in check)."""
    offs = l1_table_offsets(meta, l1)
    reader.load(offs)
    refs = referenced_clusters(reader.stack(offs).reshape(-1), meta.geom, False)
    return (offs >> meta.geom.cluster_bits).astype(np.int64), refs.astype(np.int64)


def read_l1(meta: Metadata, offset: int, entries: int) -> U64:
    if entries == 0:
        return np.zeros(0, dtype=np.uint64)
    if offset <= 0 or offset % meta.geom.cluster_size or offset + entries * 8 > meta.storage.size():
        raise CorruptionError(f"L1 table at {offset:#x} ({entries} entries) lies outside the file")
    return decode_table(meta.storage.pread(offset, entries * 8)).copy()


def span(meta: Metadata, offset: int, nbytes: int) -> I64:
    if nbytes <= 0 or offset == 0:
        return np.zeros(0, dtype=np.int64)
    bits = meta.geom.cluster_bits
    return np.arange(offset >> bits, ((offset + nbytes - 1) >> bits) + 1, dtype=np.int64)


def commit(
    meta: Metadata,
    net: RefChanges,
    reader: TableReader,
    *,
    size: int,
    active_l1: U64,
    snapshots: list[Snapshot],
    old_l1_kept: bool,
) -> None:
    """Write the new state described by `net` (reference changes so far), the wanted active
    L1 entries (COPIED bits recomputed here) and the new snapshot table; then switch."""
    geom = meta.geom
    cs, bits = geom.cluster_size, geom.cluster_bits
    rc = meta.refcounts
    old = meta.header
    alloc = Allocator(meta, net)
    if old.nb_snapshots:
        net.add(span(meta, old.snapshots_offset, len(snapshot_table_bytes(meta.snapshots))), -1)

    # COPIED bits of the active L2 tables follow the new refcounts; a table that needs a
    # change is copied and the active reference moves to the copy
    new_l1 = active_l1.copy()
    l1_used = np.flatnonzero(new_l1 & _OFFSET)
    offs = (new_l1[l1_used] & _OFFSET).astype(np.int64)
    reader.load(offs)
    fixed, rows = _wanted_copied(meta, net, reader.stack(offs))
    copies: list[U64] = []
    for row in rows.tolist():
        table = reader.tables[int(offs[row])].copy()
        if geom.extended_l2:
            table[0::2] = fixed[row]
        else:
            table = fixed[row]
        copies.append(table)
    net.add(offs[rows] >> bits, -1)
    copy_start = alloc.take(len(copies))
    new_l1[l1_used[rows]] = ((copy_start + np.arange(len(rows))) * cs).astype(np.uint64)
    tables = (new_l1[l1_used] & _OFFSET).astype(np.int64) >> bits
    single = net.after(tables) == 1
    new_l1[l1_used] = np.where(single, new_l1[l1_used] | _COPIED, new_l1[l1_used] & ~_COPIED)

    # the active L1 stays in place only when nothing in it changes
    l1_clusters = geom.clusters_for(len(new_l1) * 8)
    on_disk = meta.l2.l1
    keep_l1 = (not old_l1_kept and len(new_l1) == len(on_disk) and len(new_l1) > 0
               and bool((new_l1 == on_disk).all()))
    if keep_l1:
        l1_start = meta.l2.l1_offset >> bits
    else:
        l1_start = alloc.take(l1_clusters)
        if not old_l1_kept:
            net.add(span(meta, meta.l2.l1_offset, meta.l2.l1_size * 8), -1)

    table_bytes = snapshot_table_bytes(snapshots)
    if len(table_bytes) > C.MAX_SNAPSHOT_TABLE_BYTES:
        raise InvalidArgumentError("Snapshot table is too big")
    snap_clusters = geom.clusters_for(len(table_bytes))
    snap_start = alloc.take(snap_clusters)

    placed, table_start, reftable = _place_refcount_structures(meta, net, alloc)
    changed, before, after = net.resolve()
    _validate(geom.refcount_max, changed, before, after)
    alloc.check()

    # ---- write everything new, then flush: nothing the old header reaches is touched
    st = meta.storage
    if copies:
        st.event("snapshot_l2_copy")
        st.pwrite(copy_start * cs, b"".join(encode_table(t) for t in copies))
    if not keep_l1 and l1_clusters:
        st.event("snapshot_l1_write")
        st.pwrite(l1_start * cs, _padded(encode_table(new_l1), l1_clusters * cs))
    if snap_clusters:
        st.event("snapshot_table_write")
        st.pwrite(snap_start * cs, _padded(table_bytes, snap_clusters * cs))
    _write_refblocks(meta, net, placed)
    st.event("reftable_write")
    st.pwrite(table_start * cs, encode_table(reftable))
    st.flush()

    # ---- the switch: one write inside the first sector
    l1_offset = l1_start * cs if l1_clusters else 0
    snap_offset = snap_start * cs if snapshots else 0
    reftable_clusters = len(reftable) * 8 // cs
    st.event("header_update")
    st.pwrite(C.HEADER_SIZE_OFFSET, _HEADER_SWITCH.pack(
        size, old.crypt_method, len(new_l1), l1_offset, table_start * cs, reftable_clusters,
        len(snapshots), snap_offset))
    st.flush()

    meta.header = old.replace(
        size=size, l1_size=len(new_l1), l1_table_offset=l1_offset,
        refcount_table_offset=table_start * cs, refcount_table_clusters=reftable_clusters,
        nb_snapshots=len(snapshots), snapshots_offset=snap_offset,
    )
    meta.snapshots = list(snapshots)
    rc.cache.clear()
    rc.reftable = reftable
    rc.reftable_offset, rc.reftable_clusters = table_start * cs, reftable_clusters
    rc.end_cluster = max(rc.end_cluster, alloc.end, geom.clusters_for(st.size()))
    meta.l2.cache.clear()
    meta.l2.l1 = new_l1
    meta.l2.l1_offset, meta.l2.l1_size = l1_offset, len(new_l1)
    meta.l2.l1_dirty.clear()
    freed = changed[(before > 0) & (after == 0)]
    if len(freed):
        rc.hint = min(rc.hint, int(freed[0]))
        meta.forget_freed(freed)


def _padded(data: bytes, nbytes: int) -> bytes:
    return data + bytes(nbytes - len(data))


def _wanted_copied(meta: Metadata, net: RefChanges, ent: U64) -> tuple[U64, I64]:
    """The tables' first words with COPIED set iff the new refcount is 1 (on normal and
    allocated-zero entries only), and the rows whose bits change."""
    fields = decode_l2(ent)
    host = fields.host
    alloc = ~fields.compressed & (host != 0)
    single = np.zeros(ent.shape, dtype=bool)
    single[alloc] = net.after(host[alloc] >> meta.geom.cluster_bits) == 1
    fixed = np.where(alloc, np.where(single, ent | _COPIED, ent & ~_COPIED), ent)
    rows = np.flatnonzero((fixed != ent).any(axis=1)) if ent.ndim == 2 and len(ent) else (
        np.zeros(0, dtype=np.int64))
    return fixed, rows


def _validate(limit: int, clusters: I64, before: I64, after: I64) -> None:
    if len(clusters) and (after < 0).any():
        bad = int(np.flatnonzero(after < 0)[0])
        raise CorruptionError(
            f"refcount underflow on cluster {int(clusters[bad])} (refcount {int(before[bad])}); "
            "run 'check -r all' first"
        )
    if len(clusters) and (after > limit).any():
        bad = int(np.flatnonzero(after > limit)[0])
        raise RefcountOverflowError(
            f"refcount of cluster {int(clusters[bad])} would exceed {limit} "
            f"(the image's refcount width)"
        )


def _place_refcount_structures(
    meta: Metadata, net: RefChanges, alloc: Allocator
) -> tuple[dict[int, int], int, U64]:
    """Copy every refcount block whose counts change, and the refcount table; the copies'
    own clusters change counts too, so repeat until nothing new needs a copy."""
    rc = meta.refcounts
    cs = meta.geom.cluster_size
    e = rc.entries_per_block
    placed: dict[int, int] = {}
    table_start, table_clusters = 0, 0
    old_entries = len(rc.reftable)
    for _ in range(64):
        changed, _b, _a = net.resolve()
        of = changed // e  # sorted
        blocks = of[np.concatenate(([True], of[1:] != of[:-1]))].tolist() if len(of) else []
        missing = [b for b in blocks if b not in placed]
        entries = max(old_entries, (max(blocks) + 1) if blocks else 0)
        need = max(rc.reftable_clusters, meta.geom.clusters_for(entries * 8))
        if not missing and table_clusters >= need:
            table = np.zeros(table_clusters * cs // 8, dtype=np.uint64)
            table[:old_entries] = rc.reftable
            for b, cluster in placed.items():
                table[b] = np.uint64(cluster * cs)
            return placed, table_start, table
        if need * cs > C.MAX_REFTABLE_BYTES:
            raise CorruptionError("the refcount table would exceed its 8 MiB limit")
        if missing:
            start = alloc.take(len(missing))
            olds = [rc.block_offset(b) >> meta.geom.cluster_bits for b in missing if rc.has_block(b)]
            net.add(np.array(olds, dtype=np.int64), -1)
            placed.update({b: start + j for j, b in enumerate(missing)})
        if table_clusters < need:
            if table_clusters:
                net.add(np.arange(table_start, table_start + table_clusters, dtype=np.int64), -1)
            else:
                net.add(span(meta, rc.reftable_offset, rc.reftable_clusters * cs), -1)
            table_start, table_clusters = alloc.take(need), need
    raise CorruptionError("could not place the new refcount blocks")


def _write_refblocks(meta: Metadata, net: RefChanges, placed: dict[int, int]) -> None:
    """The new refcount blocks: the old counts plus the net change, one write per run of
    adjacent new blocks."""
    cs = meta.geom.cluster_size
    e = meta.refcounts.entries_per_block
    order = meta.geom.refcount_order
    net.after(np.array([max(placed, default=0) * e + e - 1], dtype=np.int64))  # cover them all
    runs: list[tuple[int, list[bytes]]] = []
    for b in sorted(placed, key=lambda k: placed[k]):
        block = net.after(np.arange(b * e, (b + 1) * e, dtype=np.int64))
        data = encode_refblock(block.astype(net.before.dtype), order)
        cluster = placed[b]
        if runs and runs[-1][0] + len(runs[-1][1]) == cluster:
            runs[-1][1].append(data)
        else:
            runs.append((cluster, [data]))
    for cluster, parts in runs:
        meta.storage.event("refblock_alloc_write")
        meta.storage.pwrite(cluster * cs, b"".join(parts))
