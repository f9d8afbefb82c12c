"""The check's driver (qemu's qcow2_co_check_locked and qemu-img check's repair flow):
`check_image` runs one pass, and after a repair a second, non-repairing pass whose numbers
are reported ("Double checking the fixed image now..."). One pass reads the snapshot table,
counts references, compares (and repairs) refcounts, rebuilds the refcount structure when
it is beyond patching, checks the COPIED flags, rewrites an incomplete snapshot table and
finally clears the dirty and corrupt bits of a repaired image.

Must not import qcow2kit.image (layering: image > metadata).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ...errors import ImageStateError, UnsupportedFeatureError
from ...format.features import Incompatible
from .. import header_io
from ..meta import Metadata
from .compare import compare
from .copied import check_oflag_copied
from .result import FIX_ERRORS, FIX_LEAKS, CheckFailedError, CheckResult, Counts, add_counts
from .snapshots import read_snapshot_table, rewrite_snapshot_table
from .state import CheckState
from .walk import calculate


def check_image(meta: Metadata, repair: str | None = None) -> CheckResult:
    """Check (and with repair="leaks" or "all", repair) the image behind `meta`."""
    if repair not in (None, "leaks", "all"):
        raise ValueError(f"repair must be None, 'leaks' or 'all', not {repair!r}")
    fix = 0 if repair is None else (FIX_LEAKS if repair == "leaks" else FIX_LEAKS | FIX_ERRORS)
    if fix and not meta.writable:
        raise ImageStateError(f"{meta.storage.name} is opened read-only; a repair needs write access")
    if meta.header.crypt_method not in (0, 2):
        raise UnsupportedFeatureError("checking images with legacy AES encryption is not supported")
    if meta.writable:
        meta.release_pending()
        meta.flush()
    result = run_pass(meta, fix)
    if not fix or result.error is not None:
        return result
    if not (result.corruptions_fixed or result.leaks_fixed):
        return result
    # qemu-img: "Double checking the fixed image now..." with a non-repairing pass
    second = run_pass(meta, 0)
    if second.error is None and second.image_end_offset and not second.corruptions:
        _truncate_tail(meta, second.image_end_offset)
    second.corruptions_fixed = result.corruptions_fixed
    second.leaks_fixed = result.leaks_fixed
    second.recheck_messages = second.messages
    second.messages = result.messages
    second.rechecked = True
    return second


def _truncate_tail(meta: Metadata, end: int) -> None:
    """After a repair, cut the file back to the last cluster in use (QEMU does not)."""
    storage = meta.storage
    if storage.size() > end:
        meta.flush()
        storage.event("cluster_free")
        storage.truncate(end)
        storage.flush()
        meta.refcounts.end_cluster = meta.geom.clusters_for(end)


def run_pass(meta: Metadata, fix: int) -> CheckResult:
    """One pass of qcow2_co_check_locked: snapshot table, refcounts, COPIED flags."""
    st = CheckState(meta, fix)
    out = CheckResult(messages=st.msgs)
    snap = Counts()
    try:
        read_snapshot_table(st, snap)
    except CheckFailedError as exc:
        add_counts(out, snap)
        out.error = str(exc)
        return out
    try:
        highest = _check_refcounts(st)
    except CheckFailedError as exc:
        add_counts(out, st.res)
        add_counts(out, snap)
        out.error = str(exc)
        return out
    add_counts(out, st.res)
    out.image_end_offset = (highest + 1) * st.cs
    out.total_clusters = st.geom.clusters_for(st.meta.header.size)
    out.allocated_clusters = st.allocated
    out.fragmented_clusters = st.fragmented
    out.compressed_clusters = st.compressed
    if snap.corruptions and st.fix & FIX_ERRORS:
        try:
            rewrite_snapshot_table(st)
        except CheckFailedError as exc:
            snap.check_errors += 1
            add_counts(out, snap)
            out.error = str(exc)
            return out
        snap.corruptions_fixed += snap.corruptions
        snap.corruptions = 0
    add_counts(out, snap)
    if st.fix and out.check_errors == 0 and out.corruptions == 0:
        _mark_clean(st)
    return out


def _mark_clean(st: CheckState) -> None:
    meta = st.meta
    if meta.header.version < 3:
        return
    if meta.header.incompatible_features & Incompatible.DIRTY:
        meta.clear_dirty_bit()
    if meta.header.incompatible_features & Incompatible.CORRUPT:
        bits = meta.header.incompatible_features & ~Incompatible.CORRUPT
        meta.flush()
        header_io.write_incompatible(st.storage, bits)
        st.storage.flush()
        meta.header = meta.header.replace(incompatible_features=bits)
        meta.corrupt = False


def _check_refcounts(st: CheckState) -> int:
    fix = st.fix
    calculate(st, fix)
    pre = replace(st.res)
    highest = compare(st, 0)
    if st.rebuild and fix & FIX_ERRORS:
        from .rebuild import rebuild_structure  # rare: not imported by every check

        old = replace(st.res)
        st.msgs.append("Rebuilding refcount structure")
        rebuild_structure(st)
        st.res.corruptions = 0
        st.res.leaks = 0
        st.rebuild = False
        st.imrt = np.zeros(st.nb_clusters, dtype=np.int64)
        calculate(st, 0)
        saved = st.res
        st.res = Counts()
        highest = compare(st, FIX_LEAKS)
        if st.rebuild:
            st.msgs.append("ERROR rebuilt refcount structure is still broken")
        fresh_leaks = st.res.leaks
        st.res = saved
        if st.res.corruptions < old.corruptions:
            st.res.corruptions_fixed += old.corruptions - st.res.corruptions
        if st.res.leaks < old.leaks:
            st.res.leaks_fixed += old.leaks - st.res.leaks
        st.res.leaks += fresh_leaks
    elif fix:
        if st.rebuild:
            st.msgs.append("ERROR need to rebuild refcount structures")
            st.res.check_errors += 1
            raise CheckFailedError("Input/output error")
        if st.res.leaks or st.res.corruptions:
            st.res = pre
            highest = compare(st, fix)
    check_oflag_copied(st, fix)
    return highest
