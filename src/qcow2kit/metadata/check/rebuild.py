"""Rebuilding the whole refcount structure from the in-memory refcount table (qemu's
rebuild_refcount_structure), when the on-disk one is beyond patching.

Ordering (crash safety): new refcount blocks and the new refcount table are written into
clusters that nothing references, flushed, the header is switched with one 12-byte write at
offset 48, flushed, and only then are the old structures freed. A crash at any point
leaves either the old structure (which a second repair rebuilds again) or the new one with
leaked old clusters. Guest data is never rewritten. Must not import qcow2kit.image.
"""

from __future__ import annotations

import struct

import numpy as np

from ...format import constants as C
from ...format.tables import encode_refblock, encode_table
from .state import CheckState


def _alloc_imrt(st: CheckState, count: int, first_free: int) -> tuple[int, int]:
    """First run of `count` clusters with IMRT value 0 at or after first_free (appending
    at the end if none); marks them used. Returns (start, new first_free)."""
    imrt = st.imrt
    n = len(imrt)
    start = -1
    new_first = first_free
    if count == 1 and st.free_list is not None:
        # single clusters (refcount blocks): search the free list made when the rebuild
        # started instead of rescanning the table for every block
        free_list = st.free_list
        k = int(np.searchsorted(free_list, first_free))
        while k < len(free_list) and imrt[free_list[k]] != 0:
            k += 1
        if k < len(free_list):
            start = int(free_list[k])
        else:
            lo = max(first_free, st.free_list_end)
            if lo < n:
                tail = np.flatnonzero(imrt[lo:] == 0)
                if len(tail):
                    start = lo + int(tail[0])
        if start >= 0:
            new_first = start
    elif first_free < n:
        free = np.flatnonzero(imrt[first_free:] == 0) + first_free
        if len(free):
            new_first = int(free[0])
            if count == 1:
                start = new_first
            else:
                brk = np.flatnonzero(np.diff(free) != 1)
                run_starts = np.concatenate(([0], brk + 1))
                run_ends = np.concatenate((brk + 1, [len(free)]))
                lengths = run_ends - run_starts
                fits = np.flatnonzero(lengths >= count)
                if len(fits):
                    start = int(free[run_starts[fits[0]]])
                elif int(free[-1]) == n - 1:
                    # a free tail run continues past the end
                    start = int(free[run_starts[-1]])
    if start < 0:
        start = max(n, first_free)
    if start + count > len(st.imrt):
        st.grow_imrt(start + count)
    st.imrt[start : start + count] = 1
    return start, new_first


def rebuild_structure(st: CheckState) -> None:
    meta = st.meta
    cs, cb = st.cs, st.cb
    e = st.geom.refblock_entries
    st.forget_disk_refcounts()
    meta.refcounts.sync()
    meta.refcounts.cache.clear()
    reftable: list[int] = []
    # room for every block and table the rebuild may append, so that appending does
    # not copy the IMRT each time; trimmed back to what was used below
    orig_n = len(st.imrt)
    blocks = -(-orig_n // e) + 2
    st.grow_imrt(orig_n + 2 * (blocks + -(-blocks * 8 // cs) + 2))
    st.free_list = np.flatnonzero(st.imrt == 0)
    st.free_list_end = len(st.imrt)

    def place_refblocks(lo: int, hi: int) -> bool:
        """Give every refblock range in [lo, hi) that holds a used cluster a block
        (allocations made on the way are seen, as QEMU walks the live IMRT)."""
        changed = False
        first_free = 0
        for index in range(lo // e, -(-hi // e)):
            seg_lo, seg_hi = max(lo, index * e), min(hi, (index + 1) * e)
            if not st.imrt[seg_lo:seg_hi].any():
                continue
            if index < len(reftable) and reftable[index]:
                continue
            first_free = max(first_free, index * e)
            block, first_free = _alloc_imrt(st, 1, first_free)
            if index >= len(reftable):
                want = -(-((index + 1) * 8) // cs) * cs // 8
                reftable.extend([0] * (want - len(reftable)))
                changed = True
            reftable[index] = block << cb
        return changed

    place_refblocks(0, orig_n)
    while True:
        table_clusters = -(-(len(reftable) * 8) // cs)
        start, _ = _alloc_imrt(st, table_clusters, 0)
        if place_refblocks(start, start + table_clusters):
            continue  # the table grew: find room for the bigger one
        # QEMU stops here; a block appended past the old end into a range that has no
        # block yet would stay uncounted, so cover every range once more
        if not place_refblocks(0, len(st.imrt)):
            break
    used = np.flatnonzero(st.imrt[orig_n:])
    keep = orig_n + (int(used[-1]) + 1 if len(used) else 0)
    st.imrt = st.imrt[:keep].copy()
    st.nb_clusters = keep
    st.free_list = None
    # every allocation is decided: write the blocks, then the table, then switch
    table = np.array(reftable, dtype=np.uint64)
    order = st.geom.refcount_order
    imrt = st.imrt
    for index in np.flatnonzero(table).tolist():
        block = np.zeros(e, dtype=np.uint64)
        part = imrt[index * e : (index + 1) * e]
        block[: len(part)] = part.astype(np.uint64)
        st.storage.event("refblock_alloc_write")
        st.storage.pwrite(int(table[index]), encode_refblock(block, order))
    st.storage.event("reftable_grow")
    st.storage.pwrite(start << cb, encode_table(table))
    st.storage.flush()  # the new structure is durable before the header points at it
    st.storage.event("header_update")
    st.storage.pwrite(C.HEADER_REFTABLE_OFFSET, struct.pack(">QI", start << cb, table_clusters))
    st.storage.flush()
    rc = meta.refcounts
    rc.reftable = table
    rc.reftable_offset = start << cb
    rc.reftable_clusters = table_clusters
    rc.cache.clear()
    rc.hint = 0
    st.file_len = st.storage.size()
    rc.end_cluster = max(rc.end_cluster, st.geom.clusters_for(st.file_len), len(st.imrt))
    meta.set_reftable(start << cb, table_clusters)
