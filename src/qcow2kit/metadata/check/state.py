"""The state of one check pass: the in-memory refcount table (IMRT) and how references are
added to it, the L2 tables read (and rewritten) during the pass, and the on-disk refcounts
the IMRT is compared with.

Every other check module works on a `CheckState`. The IMRT is one numpy int64 array
indexed by host cluster; references are queued as arrays of cluster indices and added
with one `bincount` per batch, never one cluster at a time.

Must not import qcow2kit.image (layering) nor the other check modules except `result`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ...format.snapshot import RawSnapshotEntry
from ...format.tables import decode_refblock, encode_table
from ..meta import Metadata
from .result import Counts

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
Mask = npt.NDArray[np.bool_]

REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
INT64_MAX = (1 << 63) - 1  # QEMU's file offsets are signed 64-bit
# QEMU's block layer fails any request reaching past INT64_MAX rounded down to 1 GiB (EIO)
BDRV_MAX_LENGTH = INT64_MAX & ~((1 << 30) - 1)
L2_KEEP_BYTES = 64 << 20  # L2 tables kept between the refcount pass and the COPIED pass
_REF_FLUSH_ELEMENTS = 1 << 22


@dataclass
class L2Masks:
    """Vectorised classification of L2 entries (any shape, one row per table)."""

    comp: Mask | None  # None: no compressed entry at all
    normal: Mask
    off: I64
    coff: I64 | None
    csize: I64 | None
    bad: Mask


class CheckState:
    """What one pass of the check (qcow2_co_check_locked) knows and accumulates."""

    def __init__(self, meta: Metadata, fix: int) -> None:
        self.meta = meta
        self.storage = meta.storage
        self.fix = fix
        self.geom = meta.geom
        self.cs = meta.geom.cluster_size
        self.cb = meta.geom.cluster_bits
        self.ext = meta.geom.extended_l2
        self.data_file = meta.header.has_data_file
        self.rmax = meta.geom.refcount_max
        self.msgs: list[str] = []
        self.res = Counts()
        self.rebuild = False
        self.file_len = self.storage.size()
        self.nb_clusters = self.geom.clusters_for(self.file_len)
        self.imrt = np.zeros(self.nb_clusters, dtype=np.int64)
        self.pending: list[I64] = []
        self.pending_n = 0
        self.allocated = 0
        self.fragmented = 0
        self.compressed = 0
        self.snapshots: list[RawSnapshotEntry] = []
        self.snapshots_offset = 0
        self.snapshots_size = 0
        self.l2_bytes: dict[int, bytes] = {}
        # (offsets, entries, masks) of the active L2 tables from the refcount pass, reused
        # by the COPIED pass as long as no L2 table was rewritten in between
        self.active_rows: list[tuple[list[int], U64, L2Masks]] = []
        self.active_rows_bytes = 0
        self.l2_bytes_total = 0
        self.free_list: I64 | None = None  # clusters free in the IMRT when a rebuild starts
        self.free_list_end = 0

    # ---- the in-memory refcount table (IMRT) ------------------------------------------------
    def inc_region(self, offset: int, size: int) -> None:
        if size <= 0:
            return
        if offset + size - self.file_len >= self.cs:
            self.msgs.append(
                "ERROR: counting reference for region exceeding the end of the file by one "
                f"cluster or more: offset 0x{offset:x} size 0x{size:x}"
            )
            self.res.corruptions += 1
            return
        first = offset >> self.cb
        last = (offset + size - 1) >> self.cb
        self.inc_clusters(np.arange(first, last + 1, dtype=np.int64))

    def inc_clusters(self, clusters: I64) -> None:
        if len(clusters) == 0:
            return
        self.pending.append(clusters)
        self.pending_n += len(clusters)
        if self.pending_n >= _REF_FLUSH_ELEMENTS:
            self.flush_refs()

    def flush_refs(self) -> None:
        if not self.pending:
            return
        refs = np.concatenate(self.pending)
        self.pending.clear()
        self.pending_n = 0
        top = int(refs.max()) + 1
        if top > len(self.imrt):
            self.grow_imrt(top)
        counts = np.bincount(refs, minlength=len(self.imrt))
        self.imrt += counts

    def grow_imrt(self, n: int) -> None:
        if n > len(self.imrt):
            grown = np.zeros(n, dtype=np.int64)
            grown[: len(self.imrt)] = self.imrt
            self.imrt = grown
            self.nb_clusters = n

    def finish_imrt(self) -> None:
        self.flush_refs()
        over = np.flatnonzero(self.imrt > self.rmax)
        for k in over.tolist():
            for _ in range(int(self.imrt[k]) - self.rmax):
                self.msgs.append(f"ERROR: overflow cluster offset=0x{k << self.cb:x}")
                self.msgs.append(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img convert "
                    "to create a clean copy if the image cannot be opened for writing"
                )
                self.res.corruptions += 1
            self.imrt[k] = self.rmax

    # ---- L2 tables ----------------------------------------------------------------------------
    def read_l2_tables(self, offsets: list[int]) -> tuple[U64, U64 | None]:
        """Entries (and extended-L2 bitmaps) of the tables at offsets, one row per table."""
        cs = self.cs
        raws = []
        for o in offsets:
            raw = self.l2_bytes.get(o)
            if raw is None:
                raw = self.storage.pread(o, cs)
                if self.l2_bytes_total + cs <= L2_KEEP_BYTES:
                    self.l2_bytes[o] = raw
                    self.l2_bytes_total += cs
            raws.append(raw)
        tab = np.frombuffer(b"".join(raws), dtype=">u8").astype(np.uint64)
        tab = tab.reshape(len(offsets), -1)
        if self.ext:
            return tab[:, 0::2].copy(), tab[:, 1::2].copy()
        return tab, None

    def read_l2(self, l2_offset: int) -> tuple[U64, U64 | None]:
        ent, bmp = self.read_l2_tables([l2_offset])
        return ent[0], (bmp[0] if bmp is not None else None)

    def write_l2(self, l2_offset: int, ent: U64, bmp: U64 | None) -> None:
        if bmp is not None:
            table = np.stack([ent, bmp], axis=1)
        else:
            table = ent
        self.storage.event("l2_update")
        self.storage.pwrite(l2_offset, encode_table(table))
        self.storage.flush()
        self.meta.l2.cache.discard(l2_offset)
        self.l2_bytes.pop(l2_offset, None)
        self.active_rows.clear()
        self.active_rows_bytes = L2_KEEP_BYTES + 1  # stale from here on: re-read

    # ---- on-disk refcounts ----------------------------------------------------------------------
    def disk_refcounts(self, n: int) -> tuple[npt.NDArray[np.uint64], list[tuple[int, int, int]]]:
        """On-disk refcounts of clusters [0, n), and the (start, end, reftable index) ranges
        whose refcount block cannot be read (unaligned, or beyond any file offset)."""
        out = np.zeros(n, dtype=np.uint64)
        bad: list[tuple[int, int, int]] = []
        reftable = self.meta.refcounts.reftable
        e = self.geom.refblock_entries
        order = self.geom.refcount_order
        for b in range(min(len(reftable), -(-n // e))):
            off = int(reftable[b]) & REFT_OFFSET_MASK
            if off == 0:
                continue
            lo, hi = b * e, min(n, (b + 1) * e)
            if off & (self.cs - 1) or off + self.cs > BDRV_MAX_LENGTH:
                bad.append((lo, hi, b))
                continue
            block = decode_refblock(self.storage.pread(off, self.cs), order)
            out[lo:hi] = block[: hi - lo]
        return out, bad

    def disk_refcount_one(self, cluster: int) -> int | None:
        e = self.geom.refblock_entries
        reftable = self.meta.refcounts.reftable
        b = cluster // e
        if b >= len(reftable):
            return 0
        off = int(reftable[b]) & REFT_OFFSET_MASK
        if off == 0:
            return 0
        if off & (self.cs - 1) or off + self.cs > BDRV_MAX_LENGTH:
            return None
        block = decode_refblock(self.storage.pread(off, self.cs), self.geom.refcount_order)
        return int(block[cluster - b * e])
