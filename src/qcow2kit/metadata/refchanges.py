"""A dense, in-memory view of every refcount before an operation, and the net change the
operation makes: what snapshot_commit builds its new refcount blocks from.

Owns: reading all refcount blocks once (one pread per contiguous run), adding reference
changes with numpy (bincount, no per-cluster Python), the refcounts after the change, and
first-fit allocation among the clusters free before the operation.
Must never write to storage, nor change the Refcounts object it reads.

Memory: one refcount-width integer and one int32 per host cluster up to the last refcount
block (a fully allocated 100 GiB image of 4 KiB clusters: about 150 MiB).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..errors import CorruptionError
from ..format import constants as C
from ..format.tables import decode_refblock, refcount_dtype
from .meta import Metadata
from .overlap import first_overlap

I64 = npt.NDArray[np.int64]
_SMALL = 4096  # below this many clusters np.add.at beats a full-length bincount


def read_all_refcounts(meta: Metadata) -> npt.NDArray[np.unsignedinteger]:
    """Every refcount up to the end of the last refcount block, as stored on disk."""
    rc = meta.refcounts
    e = rc.entries_per_block
    cs = meta.geom.cluster_size
    present = np.flatnonzero(rc.reftable & ~np.uint64(C.REFT_RESERVED_MASK))
    out = np.zeros(((int(present[-1]) + 1) * e) if len(present) else 0,
                   dtype=refcount_dtype(meta.geom.refcount_order))
    if not len(present):
        return out
    offsets = np.array([rc.block_offset(int(b)) for b in present], dtype=np.int64)
    order = np.argsort(offsets, kind="stable")
    offsets, blocks = offsets[order], present[order]
    bounds = np.flatnonzero(np.diff(offsets) != cs) + 1
    for offs, idx in zip(np.split(offsets, bounds), np.split(blocks, bounds), strict=True):
        raw = meta.storage.pread(int(offs[0]), len(offs) * cs)
        if len(raw) < len(offs) * cs:
            raise CorruptionError(f"refcount block at {int(offs[0]):#x} lies past the end of the file")
        values = decode_refblock(raw, meta.geom.refcount_order)
        for j, b in enumerate(idx.tolist()):
            out[b * e : (b + 1) * e] = values[j * e : (j + 1) * e]
    return out


class RefChanges:
    """Refcounts before the operation (`before`) and the net change per cluster (`delta`)."""

    def __init__(self, meta: Metadata) -> None:
        self.meta = meta
        self.before = read_all_refcounts(meta)
        self.delta = np.zeros(len(self.before), dtype=np.int32)

    def _cover(self, top: int) -> None:
        """Grow both arrays to describe clusters below top (past the end: refcount 0)."""
        n = len(self.delta)
        if top > n:
            more = max(top, n + n // 4) - n
            self.before = np.concatenate((self.before, np.zeros(more, dtype=self.before.dtype)))
            self.delta = np.concatenate((self.delta, np.zeros(more, dtype=np.int32)))

    def add(self, clusters: I64, delta: int, *, referenced: str | None = None) -> None:
        """Add delta once per occurrence. With `referenced`, the clusters are references
        that already exist, so they must have a refcount: otherwise the image is corrupt
        and adding to a wrong count would hide it."""
        if not len(clusters):
            return
        clusters = np.asarray(clusters, dtype=np.int64)
        if int(clusters.min()) < 0:
            raise CorruptionError("a negative cluster index")
        self._cover(int(clusters.max()) + 1)
        if referenced is not None:
            zero = clusters[self.before[clusters] == 0]
            if len(zero):
                raise CorruptionError(
                    f"cluster {int(zero[0])} ({referenced}) is referenced but has refcount "
                    "0; run 'check -r all' first"
                )
        if len(clusters) < _SMALL:
            np.add.at(self.delta, clusters, delta)
        else:
            counts = np.bincount(clusters, minlength=len(self.delta))
            self.delta += (counts * delta).astype(np.int32)

    def add_range(self, start: int, count: int, delta: int) -> None:
        self.add(np.arange(start, start + count, dtype=np.int64), delta)

    def resolve(self) -> tuple[I64, I64, I64]:
        """(clusters, refcount before, refcount after) of every cluster whose count changes."""
        changed = np.flatnonzero(self.delta).astype(np.int64)
        before = self.before[changed].astype(np.int64)
        return changed, before, before + self.delta[changed]

    def after(self, clusters: I64) -> I64:
        """Refcounts after the change of any clusters (any order, repeats allowed)."""
        clusters = np.asarray(clusters, dtype=np.int64)
        if len(clusters):
            self._cover(int(clusters.max()) + 1)
        return self.before[clusters].astype(np.int64) + self.delta[clusters]


class Allocator:
    """First fit among the clusters free before the operation; each run is taken above the
    last one, so runs never overlap each other and nothing the old state uses is handed
    out. The runs are only counted (RefChanges) and written by the caller."""

    def __init__(self, meta: Metadata, refs: RefChanges) -> None:
        self.meta = meta
        self.refs = refs
        self.cursor = 1
        self.runs: list[tuple[int, int]] = []

    def take(self, count: int) -> int:
        """First cluster of `count` contiguous free ones (0 when count is 0); counted +1."""
        if count == 0:
            return 0
        # a cluster whose count this operation changes is in use even when its refcount
        # reads 0 (a corrupt count): handing it out would hide the underflow
        used = (self.refs.before[self.cursor :] != 0) | (self.refs.delta[self.cursor :] != 0)
        start = self.cursor + _first_gap(used, count)
        if (start + count) >> (56 - self.meta.geom.cluster_bits):
            raise CorruptionError("allocation beyond the 2^56 byte host offset limit")
        self.cursor = start + count
        self.runs.append((start, count))
        self.refs.add_range(start, count, 1)
        return start

    def check(self) -> None:
        """Free clusters that still hold metadata mean the refcounts are wrong: refuse
        before anything overwrites them (QEMU's overlap check)."""
        if not self.runs:
            return
        clusters = np.concatenate([np.arange(s, s + n, dtype=np.int64) for s, n in self.runs])
        hit = first_overlap(self.meta, clusters)
        if hit is not None:
            raise CorruptionError(
                f"Preventing invalid allocation of cluster {hit[1]} (overlaps with {hit[0]}); "
                "the refcounts are wrong"
            )

    @property
    def end(self) -> int:
        return max((s + n for s, n in self.runs), default=0)


def _first_gap(used: npt.NDArray[np.bool_], count: int) -> int:
    """Index of the first run of `count` False values; past the end everything is free."""
    if not len(used):
        return 0
    edges = np.flatnonzero(np.diff(np.concatenate(([True], used, [True])).astype(np.int8)))
    # edges alternate: a free run starts at edges[0::2] and ends at edges[1::2]
    starts, ends = edges[0::2], edges[1::2]
    fits = np.flatnonzero(ends - starts >= count)
    if len(fits):
        return int(starts[fits[0]])
    if len(starts) and ends[-1] == len(used):
        return int(starts[-1])  # the free tail continues past the end
    return len(used)
