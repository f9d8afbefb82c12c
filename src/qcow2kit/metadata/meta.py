"""Metadata: the header, refcounts and L1/L2 map of one open image, and the order in which
their changes reach the disk.

The three rules (DESIGN.md section 3):
1. allocate before you reference: refcount blocks are written and flushed before any L2 or
   L1 entry that uses what they count (`_before_l2_write`, `flush`);
2. unreference before you free: callers queue refcount drops with `defer_free`;
   `release_pending` makes every table change durable first, then applies the drops;
3. new table, switch, free old: see Refcounts.grow_reftable and the resize code.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..errors import CorruptionError, FormatError, ImageStateError
from ..format import constants as C
from ..format.features import Compatible, Incompatible
from ..format.geometry import Geometry
from ..format.header import Header
from ..format.snapshot import Snapshot, parse_snapshots
from ..io.storage import Storage
from . import header_io, overlap
from .l2map import L2Map
from .refcount import Refcounts

I64 = npt.NDArray[np.int64]


class Metadata:
    def __init__(
        self,
        storage: Storage,
        header: Header,
        *,
        data_storage: Storage | None = None,
        l2_cache_tables: int | None = None,
        for_check: bool = False,
    ) -> None:
        # an image without a refcount table may only be opened for check to judge and rebuild
        missing = header.refcount_table_clusters == 0 or header.refcount_table_offset == 0
        if missing and not for_check:
            raise FormatError("Image does not contain a reference count table")
        self.storage = storage
        self.data_storage = data_storage if data_storage is not None else storage
        self.header = header
        self.geom = Geometry(header.cluster_bits, header.refcount_order, header.extended_l2)
        self.writable = storage.writable
        self.lazy = bool(header.compatible_features & Compatible.LAZY_REFCOUNTS) and self.writable
        self.corrupt = bool(header.incompatible_features & Incompatible.CORRUPT)
        self.refcounts = Refcounts(
            storage,
            self.geom,
            header.refcount_table_offset,
            header.refcount_table_clusters,
            on_reftable_switch=self.set_reftable,
        )
        # allocation must never hand out a live table's clusters, and a refcount block is
        # never written over another structure (QEMU's overlap check)
        self.refcounts.overlap_check = lambda start, count: overlap.overlapping_range(
            self, start, count
        )
        self.refcounts.before_block_write = self._guard_refblock_write
        if l2_cache_tables is None:
            # like QEMU: enough to cover the whole disk, capped at 32 MiB of tables
            need = max(1, header.l1_size)
            l2_cache_tables = max(16, min(need, (32 << 20) // self.geom.cluster_size))
        self.l2 = L2Map(
            storage,
            self.geom,
            header.l1_table_offset,
            header.l1_size,
            data_file=header.has_data_file,
            before_l2_write=self._before_l2_write,
            cache_tables=l2_cache_tables,
            zero_flags=header.version >= 3,
        )
        self.snapshots = self._read_snapshots()
        self.pending_free: list[tuple[I64, I64]] = []
        self.unsynced = False
        # data written into newly allocated clusters and not flushed yet (see _before_l2_write)
        self.data_unsynced = False

    def _read_snapshots(self) -> list[Snapshot]:
        header = self.header
        if header.nb_snapshots == 0:
            return []
        size = self.storage.size()
        if header.snapshots_offset == 0 or header.snapshots_offset >= size:
            raise FormatError(f"snapshots_offset {header.snapshots_offset:#x} lies outside the file")
        nbytes = min(C.MAX_SNAPSHOT_TABLE_BYTES, size - header.snapshots_offset)
        buf = self.storage.pread(header.snapshots_offset, nbytes)
        return parse_snapshots(buf, header.nb_snapshots, header.cluster_size)

    # ---- state --------------------------------------------------------------------------
    def set_reftable(self, offset: int, clusters: int) -> None:
        """The header now names this refcount table (after a grow or a rebuild)."""
        self.header = self.header.replace(
            refcount_table_offset=offset, refcount_table_clusters=clusters
        )

    def check_writable(self) -> None:
        if not self.writable:
            raise ImageStateError(f"{self.storage.name} is opened read-only")
        if self.corrupt:
            raise ImageStateError(f"{self.storage.name} is marked corrupt; writes are refused")

    def mark_corrupt(self, reason: str) -> CorruptionError:
        """Set the corrupt bit like QEMU does, and return the error to raise."""
        if self.writable and not self.corrupt:
            self.corrupt = True
            bits = self.header.incompatible_features | Incompatible.CORRUPT
            if self.header.version >= 3:
                try:
                    header_io.write_incompatible(self.storage, bits)
                    self.storage.flush()
                    self.header = self.header.replace(incompatible_features=bits)
                except OSError:
                    pass
        if not self.writable:
            return CorruptionError(f"Image is corrupt (opened read-only, not marked): {reason}")
        return CorruptionError(f"Marking image as corrupt: {reason}")

    def set_dirty_bit(self) -> None:
        """Lazy refcounts: the dirty bit must be durable before refcounts may lag behind."""
        if self.header.incompatible_features & Incompatible.DIRTY:
            return
        bits = self.header.incompatible_features | Incompatible.DIRTY
        self.storage.flush()
        header_io.write_incompatible(self.storage, bits)
        self.storage.flush()
        self.header = self.header.replace(incompatible_features=bits)

    def clear_dirty_bit(self) -> None:
        if not self.header.incompatible_features & Incompatible.DIRTY:
            return
        bits = self.header.incompatible_features & ~Incompatible.DIRTY
        self.flush()
        header_io.write_incompatible(self.storage, bits)
        self.storage.flush()
        self.header = self.header.replace(incompatible_features=bits)

    # ---- ordering -----------------------------------------------------------------------
    def note_data_written(self, *, new_clusters: bool) -> None:
        """Guest data reached the storage (not yet flushed). Data in newly allocated
        clusters must be durable before an L2 entry points at it (see _before_l2_write)."""
        self.unsynced = True
        if new_clusters:
            self.data_unsynced = True

    def note_tables_changed(self) -> None:
        """Cached tables changed without a data write: the next flush must sync."""
        self.unsynced = True

    def _guard_refblock_write(self, offset: int) -> None:
        overlap.guard_write(
            self, np.array([offset], dtype=np.int64), "refcount block", skip=(overlap.REFBLOCK,)
        )

    def _before_l2_write(self, offset: int) -> None:
        # an L2 table is never written over another structure (a corrupt L1 entry)
        overlap.guard_write(
            self, np.array([offset], dtype=np.int64), "L2 table", skip=(overlap.ACTIVE_L2,)
        )
        if not self.lazy:
            self.refcounts.sync()  # flushes, so new clusters' data is durable too
        elif self.data_unsynced:
            # lazy refcounts order no refcount writes here, but an L2 entry must still never
            # point at a new cluster whose data (or the file extension) is not on disk yet
            self.data_storage.flush()
        self.data_unsynced = False
        self.unsynced = True

    def flush(self) -> None:
        """Make every cached change durable, in dependency order."""
        if not self.writable:
            return
        if self.lazy:
            self.refcounts.cache.write_dirty()
            self.refcounts.unsynced = True
        else:
            self.refcounts.sync()
        # L2 tables go first (each after the refcounts it relies on, see _before_l2_write);
        # an L1 entry may only point at an L2 table that is durable, so flush between
        wrote_l2 = self.l2.cache.write_dirty()
        if self.l2.l1_dirty:
            if wrote_l2 or self.unsynced or self.refcounts.unsynced:
                self.storage.flush()
                self.refcounts.unsynced = False
            overlap.guard_write(
                self,
                np.arange(self.l2.l1_offset, self.l2.l1_offset + self.l2.l1_size * 8,
                          self.geom.cluster_size, dtype=np.int64),
                "L1 table",
                skip=(overlap.ACTIVE_L1,),
            )
            self.l2.write_l1_dirty()
            self.unsynced = True
        if self.unsynced or self.refcounts.unsynced:
            self.storage.flush()
        if self.data_storage is not self.storage:
            self.data_storage.flush()
        self.unsynced = False
        self.refcounts.unsynced = False

    def defer_free(self, clusters: I64, delta: int | I64 = -1) -> None:
        """Queue a refcount drop that may only happen once the dropped references are durable."""
        if len(clusters):
            deltas = np.broadcast_to(np.asarray(delta, dtype=np.int64), clusters.shape).copy()
            self.pending_free.append((clusters.astype(np.int64), deltas))

    def release_pending(self, punch: bool = True) -> I64:
        if not self.pending_free:
            return np.zeros(0, dtype=np.int64)
        self.flush()  # the references are gone on disk before any refcount falls
        clusters = np.concatenate([c for c, _ in self.pending_free])
        deltas = np.concatenate([d for _, d in self.pending_free])
        self.pending_free.clear()
        order = np.argsort(clusters, kind="stable")
        clusters, deltas = clusters[order], deltas[order]
        uniq, first = np.unique(clusters, return_index=True)
        sums = np.add.reduceat(deltas, first) if len(clusters) else deltas
        keep = sums != 0
        freed = self.refcounts.adjust(uniq[keep], sums[keep])
        self.forget_freed(freed, punch)
        return freed

    def forget_freed(self, freed: I64, punch: bool = True) -> None:
        cs = self.geom.cluster_size
        # the cache holds a few tables and `freed` may hold millions of clusters: look the
        # cached ones up among the freed, not the other way round
        keys = self.l2.cache.keys()
        if keys and len(freed):
            ordered = np.sort(freed)
            clusters = np.array(keys, dtype=np.int64) // cs
            at = np.minimum(np.searchsorted(ordered, clusters), len(ordered) - 1)
            for key, gone in zip(keys, (ordered[at] == clusters).tolist(), strict=True):
                if gone:
                    self.l2.cache.discard(key)
        if punch and len(freed):
            bounds = np.flatnonzero(np.diff(freed) != 1) + 1
            for part in np.split(freed, bounds):
                self.storage.punch_hole(int(part[0]) * cs, len(part) * cs)

    def write_size(self, size: int) -> None:
        header_io.write_size(self.storage, size)
        self.header = self.header.replace(size=size)
