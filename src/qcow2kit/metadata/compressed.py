"""Placing compressed clusters: pack them at byte granularity into host clusters, count
their references, and point L2 entries at them.

Owns the packing rule (a host cluster's refcount is the number of compressed clusters
whose bytes touch it; when that would pass the refcount width's maximum — one with
refcount_bits=1 — the next compressed cluster starts in a fresh host cluster, as QEMU does)
and the tail of the packed region between calls (packing continues there while
allocations stay contiguous).

Ordering: `place` takes the L2 tables and the host bytes, and puts the refcounts in the
cache; `write_payload` writes the compressed bytes (already compressed by the caller);
`install` then writes the descriptors into the L2 tables, which Metadata writes only after
the refcounts are durable. Never compresses or reads guest data; must not import
qcow2kit.image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..format.entries import referenced_clusters
from .mapping import writable_l2
from .meta import Metadata


@dataclass(slots=True)
class Placement:
    """Where a batch of compressed clusters goes: one contiguous host byte range."""

    guest_offsets: list[int]
    host_offsets: list[int]
    start: int  # host byte of the first compressed byte
    end: int  # host byte past the last one
    l2_offsets: dict[int, int]  # L1 index -> the (writable) L2 table's host offset


class CompressedPacker:
    def __init__(self, meta: Metadata) -> None:
        self.meta = meta
        self.cs = meta.geom.cluster_size
        self.max_refs = meta.geom.refcount_max
        self.tail_cluster = -1  # host cluster holding the last compressed bytes
        self.tail_used = 0  # bytes of it in use
        self.tail_refs = 0  # compressed clusters touching it

    def _layout(
        self, base: int, sizes: list[int], first_refs: int
    ) -> tuple[list[int], int, dict[int, int]]:
        """Byte offsets for `sizes` from `base`, the end, and touches per host cluster."""
        cs = self.cs
        touches: dict[int, int] = {base // cs: first_refs} if base % cs else {}
        offsets: list[int] = []
        pos = base
        for n in sizes:
            if pos % cs and touches.get(pos // cs, 0) >= self.max_refs:
                pos = (pos // cs + 1) * cs
            offsets.append(pos)
            for c in range(pos // cs, (pos + n - 1) // cs + 1):
                touches[c] = touches.get(c, 0) + 1
            pos += n
        return offsets, pos, touches

    def place(self, guest_offsets: list[int], sizes: list[int]) -> Placement:
        """Host bytes for compressed clusters of the given sizes (guest clusters that are
        unallocated), with their refcounts counted in the cache."""
        meta, cs = self.meta, self.cs
        span = meta.geom.l2_span_bytes
        refs = meta.refcounts
        # L2 tables first, so that their allocations do not split the data region
        l2_offsets = {
            l1i: writable_l2(meta, l1i)[0] for l1i in sorted({g // span for g in guest_offsets})
        }
        # whatever the clusters held loses its reference once the new entries are durable
        old = np.array(
            [self._entry(l2_offsets[g // span], (g % span) // cs) for g in guest_offsets],
            dtype=np.uint64,
        )
        meta.defer_free(referenced_clusters(old, meta.geom, meta.header.has_data_file))
        placed = None
        # the tail is reused only while its refcount is still the packer's own count (a
        # snapshot may have shared it since, or a snapshot switch freed it)
        if (0 <= self.tail_cluster and self.tail_used < cs and self.tail_refs < self.max_refs
                and refs.get(self.tail_cluster) == self.tail_refs):
            base = self.tail_cluster * cs + self.tail_used
            offsets, end, touches = self._layout(base, sizes, self.tail_refs)
            extra = (end - 1) // cs - self.tail_cluster
            start = refs.allocate(extra) if extra else self.tail_cluster + 1
            if extra == 0 or start == self.tail_cluster + 1:
                placed = (offsets, end, touches, self.tail_cluster + 1)
            else:
                refs.add_range(start, extra, -1)  # not contiguous: give them back
        if placed is None:
            offsets, end, touches = self._layout(0, sizes, 0)
            start = refs.allocate(-(-end // cs))
            shift = start * cs
            offsets = [o + shift for o in offsets]
            touches = {c + start: t for c, t in touches.items()}
            placed = (offsets, end + shift, touches, start)
        offsets, end, touches, first_new = placed
        # allocate() gave each new cluster 1; the old tail cluster already counts its own
        clusters = np.array(sorted(touches), dtype=np.int64)
        deltas = np.array(
            [touches[c] - (1 if c >= first_new else self.tail_refs) for c in sorted(touches)],
            dtype=np.int64,
        )
        keep = deltas != 0
        if keep.any():
            refs.adjust(clusters[keep], deltas[keep])
        self.tail_cluster = (end - 1) // cs
        self.tail_used = end - self.tail_cluster * cs
        self.tail_refs = touches[self.tail_cluster]
        return Placement(list(guest_offsets), offsets, offsets[0], end, l2_offsets)

    def write_payload(self, placement: Placement, packed: list[bytes]) -> None:
        """The compressed bytes, in one write, before `install` points L2 entries at them;
        the file is extended to a whole sector past them, as QEMU leaves it."""
        storage = self.meta.storage
        payload = bytearray(placement.end - placement.start)
        for data, host in zip(packed, placement.host_offsets, strict=True):
            payload[host - placement.start : host - placement.start + len(data)] = data
        storage.pwrite(placement.start, payload)
        end_sector = -(-placement.end // 512) * 512
        if storage.size() < end_sector:
            storage.truncate(end_sector)

    def _entry(self, l2_offset: int, index: int) -> int:
        table = self.meta.l2.table(l2_offset)
        return int(table[index, 0] if self.meta.geom.extended_l2 else table[index])

    def install(self, placement: Placement, sizes: list[int]) -> None:
        """Point the L2 entries at the compressed bytes (written by the caller first)."""
        meta = self.meta
        g = meta.geom
        span = g.l2_span_bytes
        meta.note_data_written(new_clusters=True)
        for guest, host, size in zip(placement.guest_offsets, placement.host_offsets, sizes, strict=True):
            l1i = guest // span
            table = meta.l2.table(placement.l2_offsets[l1i])
            idx = (guest - l1i * span) // self.cs
            desc = g.encode_compressed(host, size)
            if g.extended_l2:
                table[idx, 0] = desc
                table[idx, 1] = 0
            else:
                table[idx] = desc
        for l2_off in placement.l2_offsets.values():
            meta.l2.cache.mark_dirty(l2_off)


__all__ = ["CompressedPacker", "Placement"]
