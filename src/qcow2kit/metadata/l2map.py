"""L1 + L2 tables: answer "where does guest range X live" for whole runs at once, and hold
the (cached) tables that writes change.

The L1 table is kept whole in memory (at most 32 MiB); L2 tables live in a bounded cache.
Writing a dirty L2 table goes through `before_l2_write`, which the owner uses to make the
refcounts it depends on durable first."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..errors import CorruptionError
from ..format import constants as C
from ..format.entries import compressed_extent, decode_l2, referenced_clusters
from ..format.geometry import Geometry
from ..format.tables import decode_table, encode_table
from ..io.storage import Storage
from .cache import TableCache

__all__ = ["Kind", "Run", "L2Map", "referenced_clusters"]

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]


class Kind(enum.IntEnum):
    UNALLOCATED = 0
    ZERO = 1
    DATA = 2
    COMPRESSED = 3


@dataclass(slots=True)
class Run:
    """A guest range with one kind of mapping. host_offset is the host byte of guest_offset
    for DATA (and allocated ZERO, else -1); for COMPRESSED it is the compressed data's byte
    offset and comp_bytes its length, and the run is exactly one cluster (possibly cut)."""

    guest_offset: int
    length: int
    kind: Kind
    host_offset: int = -1
    comp_bytes: int = 0
    comp_guest_cluster: int = 0

    @property
    def end(self) -> int:
        return self.guest_offset + self.length


class L2Map:
    def __init__(
        self,
        storage: Storage,
        geom: Geometry,
        l1_offset: int,
        l1_size: int,
        *,
        data_file: bool,
        before_l2_write: Callable[[int], None],
        cache_tables: int = 64,
        zero_flags: bool = True,
    ) -> None:
        self.storage = storage
        # version 2 has no zero flag: QEMU refuses to read through an entry that sets it
        self.zero_flags = zero_flags
        self.geom = geom
        self.data_file = data_file
        self.l1_offset = l1_offset
        self.l1_size = l1_size
        self.l1 = decode_table(storage.pread(l1_offset, l1_size * 8)).copy()
        self.l1_dirty: set[int] = set()
        self._before_l2_write = before_l2_write
        self.cache: TableCache[U64] = TableCache(cache_tables, self._load, self._store)

    # ---- tables -----------------------------------------------------------------------
    def l2_offset(self, l1_index: int) -> int:
        if l1_index >= self.l1_size:
            return 0
        entry = int(self.l1[l1_index])
        if entry & C.L1E_RESERVED_MASK:
            raise CorruptionError(f"L1 entry {l1_index} has reserved bits set: {entry:#x}")
        off = entry & C.OFFSET_MASK
        if off & (self.geom.cluster_size - 1):
            raise CorruptionError(f"L2 table offset {off:#x} (L1 index {l1_index}) unaligned")
        return off

    def _load(self, offset: int) -> U64:
        raw = self.storage.pread(offset, self.geom.cluster_size)
        return decode_table(raw, self.geom.extended_l2).copy()

    def _store(self, offset: int, table: U64) -> None:
        self._before_l2_write(offset)
        self.storage.event("l2_update")
        self.storage.pwrite(offset, encode_table(table))

    def table(self, offset: int) -> U64:
        return self.cache.get(offset)

    def read_tables(self, l1_indices: list[int]) -> U64:
        """The L2 tables of these (allocated) L1 entries, concatenated in the order given.
        A few go through the cache; a whole-image walk (map, shrink) would only churn it:
        tables the cache holds (possibly dirty) come from it, the others are read from the
        storage in ascending offset order, adjacent tables with one pread."""
        cs = self.geom.cluster_size
        offsets = [self.l2_offset(i) for i in l1_indices]
        if len(offsets) <= self.cache.capacity // 4:
            # a few tables (block status of a small range, asked again and again): through
            # the cache, as lookup() does
            return np.concatenate([self.table(off) for off in offsets])
        cached = {off: self.cache.get(off) for off in offsets if off in self.cache}
        raw: dict[int, bytes] = {}
        todo = sorted({off for off in offsets if off not in cached})
        k = 0
        while k < len(todo):
            j = k + 1
            while j < len(todo) and todo[j] == todo[j - 1] + cs:
                j += 1
            buf = self.storage.pread(todo[k], (j - k) * cs)
            for n in range(k, j):
                raw[todo[n]] = buf[(n - k) * cs : (n - k + 1) * cs]
            k = j
        if not cached:
            return decode_table(b"".join(raw[off] for off in offsets), self.geom.extended_l2)
        parts = [cached[off] if off in cached else decode_table(raw[off], self.geom.extended_l2)
                 for off in offsets]
        return np.concatenate(parts)

    def write_l1_dirty(self) -> bool:
        if not self.l1_dirty:
            return False
        idx = np.array(sorted(self.l1_dirty), dtype=np.int64)
        bounds = np.flatnonzero(np.diff(idx) != 1) + 1
        for part in np.split(idx, bounds):
            lo, hi = int(part[0]), int(part[-1]) + 1
            self.storage.event("l1_update")
            self.storage.pwrite(self.l1_offset + lo * 8, encode_table(self.l1[lo:hi]))
        self.l1_dirty.clear()
        return True

    def set_l1(self, index: int, value: int) -> None:
        self.l1[index] = value
        self.l1_dirty.add(index)

    # ---- lookup -----------------------------------------------------------------------
    def classify(self, table: U64, u0: int, u1: int) -> tuple[I64, I64, I64]:
        """Per allocation unit (cluster, or subcluster with extended L2) in [u0, u1) of an
        L2 table: kind, host offset of the unit (-1 if none), compressed descriptor."""
        g = self.geom
        if not g.extended_l2:
            ent = table[u0:u1]
            bitmap = None
            sub = 1
            c0 = u0
        else:
            sub = C.SUBCLUSTERS_PER_CLUSTER
            c0, c1 = u0 // sub, -(-u1 // sub)
            ent = table[c0:c1, 0]
            bitmap = table[c0:c1, 1]
        fields = decode_l2(ent)
        is_comp = fields.compressed
        host = fields.host
        plain = ~is_comp
        if not g.extended_l2:
            if (ent[plain] & np.uint64(C.L2E_STD_RESERVED_MASK)).any():
                bad = int(ent[plain & ((ent & np.uint64(C.L2E_STD_RESERVED_MASK)) != 0)][0])
                raise CorruptionError(f"L2 entry with reserved bits set: {bad:#x}")
        if (host[plain] & (g.cluster_size - 1)).any():
            bad_host = int(host[plain][(host[plain] & (g.cluster_size - 1)) != 0][0])
            raise CorruptionError(f"data cluster offset {bad_host:#x} is not cluster-aligned")
        # (the COPIED bits only matter with an external data file: skip decoding them)
        allocated = plain & ((host != 0) | (fields.copied & self.data_file)) if self.data_file \
            else plain & (host != 0)
        if bitmap is None:
            zero = fields.zero
            if not self.zero_flags and zero.any():
                raise CorruptionError("Zero cluster entry found in pre-v3 image")
            kind = np.where(
                is_comp, Kind.COMPRESSED,
                np.where(zero, Kind.ZERO, np.where(allocated, Kind.DATA, Kind.UNALLOCATED)),
            ).astype(np.int64)
            unit_host = np.where(allocated, host, -1)
            desc = fields.descriptor.astype(np.int64) if is_comp.any() else np.zeros(len(ent), np.int64)
            return kind, unit_host, desc
        shifts = np.arange(sub, dtype=np.uint64)
        alloc_bits = ((bitmap[:, None] >> shifts) & np.uint64(1)).astype(bool)
        zero_bits = ((bitmap[:, None] >> (shifts + np.uint64(32))) & np.uint64(1)).astype(bool)
        if (alloc_bits & zero_bits).any() or (alloc_bits & ~allocated[:, None]).any():
            if (alloc_bits[plain] & ~allocated[plain, None]).any() or (alloc_bits & zero_bits).any():
                raise CorruptionError("invalid extended L2 bitmap")
        scs = g.subcluster_size
        kind2 = np.full(alloc_bits.shape, Kind.UNALLOCATED, dtype=np.int64)
        kind2[zero_bits] = Kind.ZERO
        kind2[alloc_bits] = Kind.DATA
        kind2[is_comp, :] = Kind.COMPRESSED
        host2 = np.where(alloc_bits, host[:, None] + (shifts.astype(np.int64) * scs), -1)
        host2 = np.where(is_comp[:, None], -1, host2)
        desc2 = np.repeat(fields.descriptor.astype(np.int64), sub)
        lo = u0 - c0 * sub
        hi = lo + (u1 - u0)
        return kind2.reshape(-1)[lo:hi], host2.reshape(-1)[lo:hi], desc2[lo:hi]

    def lookup(self, offset: int, length: int) -> list[Run]:
        g = self.geom
        span = g.l2_span_bytes
        unit = g.subcluster_size
        runs: list[Run] = []
        pos, end = offset, offset + length
        while pos < end:
            l1i = pos // span
            base = l1i * span
            chunk_end = min(end, base + span)
            l2_off = self.l2_offset(l1i)
            if l2_off == 0:
                _append(runs, Run(pos, chunk_end - pos, Kind.UNALLOCATED))
                pos = chunk_end
                continue
            table = self.table(l2_off)
            u0 = (pos - base) // unit
            u1 = -(-(chunk_end - base) // unit)
            kind, host, desc = self.classify(table, u0, u1)
            n = len(kind)
            brk = np.ones(n, dtype=bool)
            if n > 1:
                prev_host = host[:-1]
                expect = np.where(prev_host >= 0, prev_host + unit, -1)
                brk[1:] = (
                    (kind[1:] != kind[:-1])
                    | (host[1:] != expect)
                    | (kind[1:] == Kind.COMPRESSED)
                )
                if g.extended_l2:
                    # compressed clusters span 32 units: keep one run per cluster
                    same_cluster = ((np.arange(1, n) + u0) % C.SUBCLUSTERS_PER_CLUSTER) != 0
                    brk[1:] &= ~((kind[1:] == Kind.COMPRESSED) & same_cluster & (kind[:-1] == Kind.COMPRESSED))
            starts = np.flatnonzero(brk)
            ends = np.append(starts[1:], n)
            for s, e_ in zip(starts.tolist(), ends.tolist(), strict=True):
                gs = max(pos, base + (u0 + s) * unit)
                ge = min(chunk_end, base + (u0 + e_) * unit)
                k = Kind(int(kind[s]))
                h = int(host[s])
                if h >= 0:
                    h += gs - (base + (u0 + s) * unit)
                if k == Kind.COMPRESSED:
                    coff, clen = compressed_extent(int(desc[s]), g)
                    cluster_guest = (gs // g.cluster_size) * g.cluster_size
                    _append(runs, Run(gs, ge - gs, k, coff, clen, cluster_guest))
                else:
                    _append(runs, Run(gs, ge - gs, k, h))
            pos = chunk_end
        return runs


def _append(runs: list[Run], run: Run) -> None:
    if runs and run.kind != Kind.COMPRESSED:
        last = runs[-1]
        if last.kind == run.kind and last.end == run.guest_offset:
            if run.host_offset < 0 and last.host_offset < 0:
                last.length += run.length
                return
            if last.host_offset >= 0 and last.host_offset + last.length == run.host_offset:
                last.length += run.length
                return
    runs.append(run)
