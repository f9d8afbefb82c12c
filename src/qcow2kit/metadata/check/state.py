"""The state of one check pass: the in-memory refcount table (IMRT) and how references are
added to it, the L2 tables read (and rewritten) during the pass, and the on-disk refcounts
the IMRT is compared with.

Clusters (L2 tables, refcount blocks) are read in ascending order, adjacent ones with one
preadv straight into a numpy buffer; the on-disk refcounts are read once per pass (until
something writes refcounts) and the active tables' normal entries are kept for the COPIED
check, so that a clean image's metadata is read and decoded exactly once.

Every other check module works on a `CheckState`. The IMRT is one numpy int64 array
indexed by host cluster; references are queued as arrays of cluster indices and added
with one `bincount` per batch, never one cluster at a time.

Must not import qcow2kit.image (layering) nor the other check modules except `result`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ...format.snapshot import RawSnapshotEntry
from ...format.tables import decode_refblock, encode_table
from ...io.file import FileStorage
from ..meta import Metadata
from .result import Counts

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
Mask = npt.NDArray[np.bool_]

REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
INT64_MAX = (1 << 63) - 1  # QEMU's file offsets are signed 64-bit
# QEMU's block layer fails any request reaching past INT64_MAX rounded down to 1 GiB (EIO)
BDRV_MAX_LENGTH = INT64_MAX & ~((1 << 30) - 1)
# normal entries of active L2 tables kept between the refcount pass and the COPIED pass
# (17 bytes each); beyond that the COPIED pass reads the tables again
ACTIVE_KEEP_ENTRIES = 8 << 20
_IOV_MAX = 1024  # buffers per preadv (Linux's UIO_MAXIOV)
L2_BATCH_BYTES = 8 << 20  # L2 tables read and classified together
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
        # the normal entries of the active L2 tables, from the refcount pass: per batch of
        # tables (table count, row in the batch, host offset, COPIED flag), reused by the
        # COPIED pass as long as no L2 table was rewritten in between
        self.active_parts: list[tuple[int, I64, I64, Mask]] = []
        self.active_offsets: list[int] = []
        self.active_kept = 0
        self.active_dropped = False
        self._scratch: npt.NDArray[np.uint8] | None = None
        self.disk_cache: tuple[int, npt.NDArray[np.uint64], list[tuple[int, int, int]]] | None = None
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

    # ---- reading clusters and L2 tables --------------------------------------------------------
    def read_clusters(self, offsets: I64, *, scratch: bool = False) -> npt.NDArray[np.uint8]:
        """The cs bytes at each offset, one row each (past the end of the file: zeros).

        Offsets are read in ascending order, each run of adjacent clusters with one preadv
        straight into the rows (a dense image's L2 tables and refcount blocks are scattered:
        one syscall each; tables allocated together: one for the run); no bytes object per
        cluster, no join. Storage other than a plain file is read cluster by cluster, in
        the given order.

        scratch=True reads into a buffer reused by the next such call (the caller copies
        what it keeps): batch after batch of tables then lands in memory already mapped,
        instead of new pages the kernel must fault in and zero (measured: about a third of
        the time of reading 1,024 tables of 64 KiB)."""
        cs = self.cs
        n = len(offsets)
        if scratch:
            if self._scratch is None or len(self._scratch) < n * cs:
                self._scratch = np.empty(n * cs, dtype=np.uint8)
            buf = self._scratch[: n * cs].reshape(n, cs)
        else:
            buf = np.empty((n, cs), dtype=np.uint8)
        if n == 0:
            return buf
        fd = self.storage.fd if isinstance(self.storage, FileStorage) else None
        if fd is None:
            for r, o in enumerate(offsets.tolist()):
                data = self.storage.pread(o, cs)
                buf[r, : len(data)] = np.frombuffer(data, dtype=np.uint8)
                buf[r, len(data) :] = 0
            return buf
        flat = buf.reshape(-1).data
        order = np.argsort(offsets, kind="stable")
        so = offsets[order]
        cut = (np.flatnonzero(so[1:] != so[:-1] + cs) + 1).tolist()
        rows = order.tolist()
        pos_l = so.tolist()
        views = [flat[r * cs : (r + 1) * cs] for r in range(n)]
        # sorted: the clusters before `inside` lie wholly inside the file
        inside = int(np.searchsorted(so, self.storage.size() - cs, side="right"))
        preadv = os.preadv
        for a, b in zip([0, *cut], [*cut, n], strict=True):
            if b - a == 1 and a < inside:  # the usual case: a lone cluster
                if preadv(fd, [views[rows[a]]], pos_l[a]) != cs:
                    self._pread_rows(views, rows[a:b], pos_l[a:b])
                continue
            while a < b:
                k = min(b - a, _IOV_MAX)
                if a + k > inside or preadv(fd, [views[r] for r in rows[a : a + k]], pos_l[a]) != k * cs:
                    # the end of the file (zeros past it): the storage's own read
                    self._pread_rows(views, rows[a : a + k], pos_l[a : a + k])
                a += k
        return buf

    def _pread_rows(self, views: list[memoryview], rows: list[int], positions: list[int]) -> None:
        for r, pos in zip(rows, positions, strict=True):
            views[r][:] = self.storage.pread(pos, self.cs)

    def l2_words(self, raw: npt.NDArray[np.uint8]) -> tuple[U64, U64 | None]:
        """All entries (and extended-L2 bitmaps) of raw tables, one row per table."""
        tab = raw.view(">u8").astype(np.uint64)
        if self.ext:
            return tab[:, 0::2].copy(), tab[:, 1::2].copy()
        return tab, None

    def l2_nonzero(self, raw: npt.NDArray[np.uint8]) -> tuple[I64, U64, U64 | None]:
        """(flat index, entry, bitmap) of the entries of raw tables that are not all zero,
        in table order. An all-zero entry (and bitmap) is an unallocated cluster with
        nothing to count or report, so a sparse image's tables cost one scan for zeros and
        only their few live entries are byte-swapped and classified."""
        words = raw.view(np.uint64)  # byte order does not matter to a test for zero
        be = raw.view(">u8")
        if self.ext:
            ent_be, bmp_be = be[:, 0::2].reshape(-1), be[:, 1::2].reshape(-1)
            live = (words[:, 0::2] | words[:, 1::2]).reshape(-1) != 0
        else:
            ent_be, bmp_be = be.reshape(-1), None
            # a boolean mask first: numpy's nonzero over the words themselves is about 3x slower
            live = words.reshape(-1) != 0
        if live.all():  # a dense batch: no gather
            idx = np.arange(len(live), dtype=np.int64)
            return idx, ent_be.astype(np.uint64), bmp_be.astype(np.uint64) if bmp_be is not None else None
        idx = np.flatnonzero(live)
        return idx, ent_be[idx].astype(np.uint64), bmp_be[idx].astype(np.uint64) if bmp_be is not None else None

    def read_l2_tables(self, offsets: list[int]) -> tuple[U64, U64 | None]:
        """Entries (and extended-L2 bitmaps) of the tables at offsets, one row per table."""
        return self.l2_words(self.read_clusters(np.asarray(offsets, dtype=np.int64)))

    def read_l2(self, l2_offset: int) -> tuple[U64, U64 | None]:
        ent, bmp = self.read_l2_tables([l2_offset])
        return ent[0], (bmp[0] if bmp is not None else None)

    def keep_active(self, offsets: list[int], rows: I64, host: I64, copied: Mask) -> None:
        """Remember the normal entries of active L2 tables for the COPIED pass (rows
        within this batch), while they fit in ACTIVE_KEEP_ENTRIES."""
        if self.active_dropped:
            return
        self.active_kept += len(rows)
        if self.active_kept > ACTIVE_KEEP_ENTRIES:
            self.drop_active()
            return
        self.active_parts.append((len(offsets), rows, host, copied))
        self.active_offsets.extend(offsets)

    def reset_active(self) -> None:
        """A new refcount pass: keep the active tables' entries again."""
        self.drop_active()
        self.active_dropped = False
        self.active_kept = 0

    def drop_active(self) -> None:
        self.active_parts.clear()
        self.active_offsets.clear()
        self.active_dropped = True  # the COPIED pass reads the tables again

    def write_l2(self, l2_offset: int, ent: U64, bmp: U64 | None) -> None:
        if bmp is not None:
            table = np.stack([ent, bmp], axis=1)
        else:
            table = ent
        self.storage.event("l2_update")
        self.storage.pwrite(l2_offset, encode_table(table))
        self.storage.flush()
        self.meta.l2.cache.discard(l2_offset)
        self.drop_active()

    # ---- on-disk refcounts ----------------------------------------------------------------------
    def disk_refcounts(self, n: int) -> tuple[npt.NDArray[np.uint64], list[tuple[int, int, int]]]:
        """On-disk refcounts of clusters [0, n), and the (start, end, reftable index) ranges
        whose refcount block cannot be read (unaligned, or beyond any file offset).

        Kept until `forget_disk_refcounts` (called by whatever writes refcounts), so that
        the comparison and the COPIED check share one read of the refcount blocks."""
        if self.disk_cache is not None and self.disk_cache[0] == n:
            return self.disk_cache[1], self.disk_cache[2]
        e = self.geom.refblock_entries
        reftable = self.meta.refcounts.reftable
        nb = min(len(reftable), -(-n // e))
        # unsigned: an offset with the top bit set is beyond any file offset, not negative
        offs = np.asarray(reftable[:nb], dtype=np.uint64) & np.uint64(REFT_OFFSET_MASK)
        unreadable = (offs != 0) & (
            ((offs & np.uint64(self.cs - 1)) != 0) | (offs > np.uint64(BDRV_MAX_LENGTH - self.cs))
        )
        bad = [(b * e, min(n, (b + 1) * e), b) for b in np.flatnonzero(unreadable).tolist()]
        blocks = np.flatnonzero((offs != 0) & ~unreadable)
        out = np.zeros(max(nb * e, n), dtype=np.uint64)
        if len(blocks):
            raw = self.read_clusters(offs[blocks].astype(np.int64))
            values = decode_refblock(raw.reshape(-1).data, self.geom.refcount_order)
            out[: nb * e].reshape(nb, e)[blocks] = values.reshape(len(blocks), e)
        out = out[:n]
        self.disk_cache = (n, out, bad)
        return out, bad

    def forget_disk_refcounts(self) -> None:
        self.disk_cache = None

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
