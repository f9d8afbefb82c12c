"""Compaction orchestration: optionally drop data clusters that read as all zeros, then let
metadata/compact.py move clusters from the end of the file into free holes and truncate.

Owns the zero-cluster scan (numpy over whole runs, 8 MiB at a time) and the choice of how a
zero cluster is dropped (a zero cluster on v3; unallocated on v2 without a backing file,
where unallocated reads as zeros). The moves and their crash ordering live in
metadata/compact.py. Works on any object with the `GuestDisk` surface (Image provides
it); must not import qcow2kit.image.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .guestdisk import GuestDisk
from .metadata import compact as compact_mod
from .metadata.compact import CompactResult
from .metadata.l2map import Kind

SCAN_BYTES = 8 << 20


def discard_zero_clusters(disk: GuestDisk) -> int:
    """Drop every allocated data cluster whose bytes are all zero; return how many."""
    v2 = disk.header.version < 3
    if v2 and disk.backing is not None:
        return 0  # an unallocated cluster would show the backing file instead
    mode = "discard" if v2 else "zero_unmap"
    meta = disk.meta
    cs = meta.geom.cluster_size
    data = disk.data_storage or meta.storage
    found = 0
    pos = 0
    size = disk.virtual_size
    while pos < size:
        n = min(SCAN_BYTES, size - pos)
        zero_clusters: list[int] = []
        for run in meta.l2.lookup(pos, n):
            if run.kind != Kind.DATA:
                continue
            a = -(-run.guest_offset // cs) * cs
            b = (run.end // cs) * cs
            if b <= a:
                continue
            buf = data.pread(run.host_offset + (a - run.guest_offset), b - a)
            rows = np.frombuffer(buf, dtype=np.uint8).reshape(-1, cs)
            empty = np.flatnonzero(~rows.any(axis=1))
            zero_clusters.extend((a + empty * cs).tolist())
        # one clear per run of adjacent zero clusters, not one per cluster
        index = np.array(zero_clusters, dtype=np.int64) // cs
        bounds = np.flatnonzero(np.diff(index) != 1) + 1
        for part in np.split(index, bounds) if len(index) else []:
            disk.clear_guest(int(part[0]) * cs, len(part) * cs, mode)
        found += len(zero_clusters)
        pos += n
    meta.release_pending()
    return found


def compact(
    disk: GuestDisk,
    *,
    discard_zeroes: bool = False,
    progress: Callable[[int], None] | None = None,
) -> CompactResult:
    if discard_zeroes:
        discard_zero_clusters(disk)
    return compact_mod.compact(disk.meta, progress)


__all__ = ["GuestDisk", "discard_zero_clusters", "compact", "CompactResult"]
