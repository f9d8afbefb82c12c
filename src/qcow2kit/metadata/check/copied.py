"""The OFLAG_COPIED check (qemu's check_oflag_copied): an L1 or L2 entry must carry the
COPIED flag exactly when its cluster's refcount is 1; with `-r all` (or `-r leaks` on an
otherwise clean image) wrong flags are rewritten.

The L1 entries and L2 tables that may hold a wrong flag are found with whole-table numpy
operations (over the normal entries the refcount pass kept, when no table was rewritten
since; otherwise the tables are read again in batches);
only those are then examined entry by entry, in qemu-img's message order. An L2 table is
never rewritten over other metadata. Must not import qcow2kit.image.
"""

from __future__ import annotations

import struct

import numpy as np
import numpy.typing as npt

from ...format import constants as C
from ...format.entries import decode_l2
from .. import overlap
from .result import FIX_ERRORS, FIX_LEAKS, CheckFailedError
from .state import I64, L2_BATCH_BYTES, U64, CheckState, Mask


def check_oflag_copied(st: CheckState, fix: int) -> None:
    if fix & FIX_ERRORS:
        repair = True
    elif fix & FIX_LEAKS:
        repair = not (st.res.check_errors or st.res.corruptions or st.res.leaks)
    else:
        repair = False
    meta = st.meta
    cs, cb = st.cs, st.cb
    l1 = meta.l2.l1
    n_disk = len(st.imrt)
    disk, bad = st.disk_refcounts(n_disk)
    unreadable = np.zeros(n_disk, dtype=bool)
    for lo, hi, _b in bad:
        unreadable[lo:hi] = True
    word = "Repairing" if repair else "ERROR"

    def refcounts_of(clusters: I64) -> tuple[U64, npt.NDArray[np.bool_]]:
        inside = clusters < n_disk
        vals = np.zeros(len(clusters), dtype=np.uint64)
        okay = np.ones(len(clusters), dtype=bool)
        vals[inside] = disk[clusters[inside]]
        okay[inside] = ~unreadable[clusters[inside]]
        for j in np.flatnonzero(~inside).tolist():
            v = st.disk_refcount_one(int(clusters[j]))
            if v is None:
                okay[j] = False
            else:
                vals[j] = v
        return vals, okay

    for i in _copied_suspects(st, l1, disk, unreadable).tolist():
        l1_entry = int(l1[i])
        l2_offset = l1_entry & C.OFFSET_MASK
        if not l2_offset:
            continue
        rc_arr, okay = refcounts_of(np.array([l2_offset >> cb], dtype=np.int64))
        if okay[0]:
            refcount = int(rc_arr[0])
            if (refcount == 1) != bool(l1_entry & C.OFLAG_COPIED):
                st.res.corruptions += 1
                st.msgs.append(
                    f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} refcount={refcount}"
                )
                if repair:
                    hit = _overlaps_metadata(st, meta.l2.l1_offset + i * 8, overlap.ACTIVE_L1)
                    if hit is not None:
                        _refuse_write(st, hit)
                        st.res.check_errors += 1
                        raise CheckFailedError("Input/output error")
                    new = (l1_entry | C.OFLAG_COPIED) if refcount == 1 else (l1_entry & ~C.OFLAG_COPIED)
                    st.storage.event("l1_update")
                    st.storage.pwrite(meta.l2.l1_offset + i * 8, struct.pack(">Q", new))
                    st.storage.flush()
                    meta.l2.l1[i] = np.uint64(new)
                    st.res.corruptions -= 1
                    st.res.corruptions_fixed += 1
        ent, bmp = st.read_l2(l2_offset)
        copied, normal, off = _normal_entries(st, ent)
        idx = np.flatnonzero(normal)
        if len(idx) == 0:
            continue
        if st.data_file:
            refc = np.ones(len(idx), dtype=np.uint64)
            okay = np.ones(len(idx), dtype=bool)
        else:
            refc, okay = refcounts_of(off[idx] >> cb)
        wrong = okay & ((refc == 1) != copied[idx])
        if not wrong.any():
            continue
        dirty = 0
        for j, r in zip(idx[wrong].tolist(), refc[wrong].tolist(), strict=True):
            entry = int(ent[j])
            st.res.corruptions += 1
            st.msgs.append(f"{word} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={r}")
            if repair:
                ent[j] = np.uint64((entry | C.OFLAG_COPIED) if r == 1 else (entry & ~C.OFLAG_COPIED))
                dirty += 1
        if dirty:
            hit = _overlaps_metadata(st, l2_offset, overlap.ACTIVE_L2)
            if hit is not None:
                _refuse_write(st, hit)
            if l2_offset & (cs - 1) or hit is not None:
                st.msgs.append(
                    "ERROR: Could not write L2 table; metadata overlap check failed: Input/output error"
                )
                st.res.check_errors += 1
                raise CheckFailedError("Input/output error")
            st.write_l2(l2_offset, ent, bmp)
            st.res.corruptions -= dirty
            st.res.corruptions_fixed += dirty


def _copied_suspects(
    st: CheckState, l1: U64, disk: npt.NDArray[np.uint64], unreadable: npt.NDArray[np.bool_]
) -> I64:
    """L1 indices whose entry or L2 table may have a wrong COPIED flag, found with
    whole-table numpy operations; only those are examined entry by entry."""
    cb = st.cb
    n_disk = len(disk)
    idx = np.flatnonzero(l1 & np.uint64(C.OFFSET_MASK))
    if len(idx) == 0:
        return idx
    entries = l1[idx]
    l2c = ((entries & np.uint64(C.OFFSET_MASK)) >> np.uint64(cb)).astype(np.int64)
    inside = l2c < n_disk
    suspect = ~inside.copy()
    l2c_in = np.where(inside, l2c, 0)
    rc = disk[l2c_in].astype(np.int64)
    suspect |= inside & ~unreadable[l2c_in] & ((rc == 1) != ((entries >> np.uint64(63)) != 0))
    offsets = (entries & np.uint64(C.OFFSET_MASK)).astype(np.int64).tolist()
    if st.active_dropped or st.active_offsets != offsets:
        parts = _copied_chunks(st, offsets, max(1, L2_BATCH_BYTES // st.cs))
    else:
        # the normal entries the refcount pass kept: no second read or decode
        parts = []
        lo = 0
        for ntables, rows, host, copied in st.active_parts:
            parts.append((lo, rows, host, copied))
            lo += ntables
    for lo, rows, host, copied in parts:
        if st.data_file:
            wrong = ~copied
        else:
            clusters = host >> cb
            far = clusters >= n_disk
            safe = np.where(far, 0, clusters)
            wrong = far | (~unreadable[safe] & ((disk[safe] == 1) != copied))
        suspect[lo + rows[wrong]] = True
    return idx[suspect]


def _copied_chunks(st: CheckState, offsets: list[int], batch: int) -> list[tuple[int, I64, I64, Mask]]:
    """(first table, row, host offset, COPIED flag) of the normal entries of the tables at
    offsets, read again in batches."""
    out = []
    for lo in range(0, len(offsets), batch):
        raw = st.read_clusters(np.asarray(offsets[lo : lo + batch], dtype=np.int64), scratch=True)
        flat, ent, _bmp = st.l2_nonzero(raw)
        copied, normal, host = _normal_entries(st, ent)
        out.append((lo, flat[normal] // st.geom.l2_entries, host[normal], copied[normal]))
    return out


def _normal_entries(st: CheckState, ent: U64) -> tuple[Mask, Mask, I64]:
    """(COPIED flag, "normal" cluster, host offset) of L2 entries of any shape, as QEMU's
    COPIED check sees them: a normal cluster has a host offset, or (with an external data
    file, where offset 0 is valid) is allocated and not a zero cluster."""
    f = decode_l2(ent)
    zero = f.zero if not st.ext else np.zeros(ent.shape, dtype=bool)
    normal = ~f.compressed & ((f.host != 0) | (~zero & f.copied & st.data_file))
    return f.copied, normal, f.host


# QEMU's names for the structures in its overlap messages
_QEMU_NAMES = {
    overlap.HEADER: "qcow2_header",
    overlap.REFTABLE: "refcount table",
    overlap.REFBLOCK: "refcount block",
    overlap.ACTIVE_L1: "active L1 table",
    overlap.ACTIVE_L2: "active L2 table",
    overlap.SNAPSHOT_TABLE: "snapshot table",
    overlap.INACTIVE_L1: "inactive L1 table",
    overlap.BITMAP_DIRECTORY: "bitmap directory",
}


def _overlaps_metadata(st: CheckState, offset: int, own: str) -> str | None:
    """The structure that rewriting the cluster at offset (part of `own`) would hit, if any.
    Asks the registry of metadata ranges (QEMU's overlap check), and the snapshot table as
    this pass read it (opening skips a table that does not parse)."""
    cluster = np.array([offset >> st.cb], dtype=np.int64)
    hit = overlap.first_overlap(st.meta, cluster, skip=(own,))
    if hit is not None:
        return hit[0]
    start, size = st.snapshots_offset, st.snapshots_size
    if size and start >> st.cb <= offset >> st.cb <= (start + size - 1) >> st.cb:
        return overlap.SNAPSHOT_TABLE
    return None


def _refuse_write(st: CheckState, hit: str) -> None:
    """Like QEMU: a table write that would land on other metadata marks the image corrupt."""
    name = _QEMU_NAMES.get(hit, hit)
    st.msgs.append(
        f"qcow2: Marking image as corrupt: Preventing invalid write on metadata (overlaps with "
        f"{name}); further corruption events will be suppressed"
    )
    st.meta.mark_corrupt(f"Preventing invalid write on metadata (overlaps with {name})")
