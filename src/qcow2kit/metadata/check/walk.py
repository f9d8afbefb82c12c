"""Reference counting of one pass (qemu's calculate_refcounts): every structure the image
references is added to the in-memory refcount table, with qemu-img check's diagnostics for
the L1 and L2 entries, refcount table entries and refcount blocks that are broken.

L2 tables are read in batches of whole tables; only their entries that are not all zero
are byte-swapped and classified, with numpy over the whole batch; only the entries that
need a diagnostic go through the per-entry path, in table order, so that messages come
out in qemu-img's order. Repairs made here (a misaligned preallocated cluster turned
into a zero cluster, a refcount block outside the file brought back inside) go straight
to storage. Must not import qcow2kit.image.
"""

from __future__ import annotations

import struct

import numpy as np
import numpy.typing as npt

from ...format import constants as C
from ...format.entries import compressed_extent, compressed_extents, decode_l2
from .bitmaps import check_bitmaps
from .result import FIX_ERRORS, hx
from .state import (
    BDRV_MAX_LENGTH,
    I64,
    INT64_MAX,
    L2_BATCH_BYTES,
    REFT_OFFSET_MASK,
    U64,
    CheckState,
    L2Masks,
    Mask,
)


def calculate(st: CheckState, fix: int) -> None:
    header = st.meta.header
    st.allocated = st.fragmented = st.compressed = 0
    st.reset_active()
    st.forget_disk_refcounts()
    st.inc_region(0, st.cs)
    _check_l1(st, header.l1_table_offset, header.l1_size, fix, active=True)
    if st.data_file and st.snapshots:
        st.msgs.append(f"ERROR {len(st.snapshots)} snapshots in image with data file")
        st.res.corruptions += 1
    for sn in st.snapshots:
        if sn.l1_table_offset & (st.cs - 1):
            st.msgs.append(
                f"ERROR snapshot {sn.id_str} ({sn.name}) l1_offset={hx(sn.l1_table_offset)}: "
                "L1 table is not cluster aligned; snapshot table entry corrupted"
            )
            st.res.corruptions += 1
            continue
        if sn.l1_size > C.MAX_L1_BYTES // 8:
            st.msgs.append(
                f"ERROR snapshot {sn.id_str} ({sn.name}) l1_size={hx(sn.l1_size)}: "
                "L1 table is too large; snapshot table entry corrupted"
            )
            st.res.corruptions += 1
            continue
        _check_l1(st, sn.l1_table_offset, sn.l1_size, fix, active=False)
    st.inc_region(st.snapshots_offset, st.snapshots_size)
    reftable = st.meta.refcounts
    st.inc_region(reftable.reftable_offset, len(reftable.reftable) * 8)
    crypto = header.extension(C.EXT_CRYPTO)
    if crypto is not None and len(crypto) >= 16:
        c_off, c_len = struct.unpack_from(">QQ", crypto)
        st.inc_region(c_off, c_len)
    check_bitmaps(st)
    _check_refblocks(st, fix)
    st.finish_imrt()


def _check_l1(st: CheckState, l1_offset: int, l1_size: int, fix: int, *, active: bool) -> None:
    if l1_size == 0:
        return
    cs = st.cs
    st.inc_region(l1_offset, l1_size * 8)
    l1 = np.frombuffer(st.storage.pread(l1_offset, l1_size * 8), dtype=">u8").astype(np.uint64)
    idx = np.flatnonzero(l1)
    entries = l1[idx]
    l2offs = (entries & np.uint64(C.OFFSET_MASK)).astype(np.int64)
    plain = (entries & np.uint64(C.L1E_RESERVED_MASK)) == 0
    plain &= ((l2offs & (cs - 1)) == 0) & (l2offs < st.file_len)
    batch = max(1, L2_BATCH_BYTES // cs)
    # runs of plain entries between the ones that need diagnostics, in L1 order: each run
    # in batches of whole tables, each other entry on its own
    pos = 0
    for odd in [*np.flatnonzero(~plain).tolist(), len(idx)]:
        for lo in range(pos, odd, batch):
            offs = l2offs[lo : min(odd, lo + batch)]
            st.inc_clusters(offs >> st.cb)
            _check_l2_tables(st, offs.tolist(), fix, active)
        if odd < len(idx):
            _check_l1_entry(st, int(entries[odd]), fix, active)
        pos = odd + 1


def _check_l1_entry(st: CheckState, entry: int, fix: int, active: bool) -> None:
    """An L1 entry that needs diagnostics (reserved bits, unaligned, outside the file)."""
    if entry & C.L1E_RESERVED_MASK:
        st.msgs.append(f"ERROR found L1 entry with reserved bits set: {entry:x}")
        st.res.corruptions += 1
    l2_offset = entry & C.OFFSET_MASK
    st.inc_region(l2_offset, st.cs)
    if l2_offset & (st.cs - 1):
        st.msgs.append(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted")
        st.res.corruptions += 1
    _check_l2_tables(st, [l2_offset], fix, active)


def _classify(st: CheckState, ent: U64, bmp: U64 | None) -> L2Masks:
    """Vectorised view of L2 entries of any shape; `bad` marks the entries that need
    a diagnostic (they go through _l2_entry_slow, in table order)."""
    cs = st.cs
    # the hot path of the whole check: only the compressed flag and a copy-free view of the
    # offsets are computed for every entry (format.entries.decode_l2 materialises every
    # field, about 18 times the cost); the full decode runs where compressed entries exist
    comp = (ent & np.uint64(C.OFLAG_COMPRESSED)) != 0
    any_comp = bool(comp.any())
    # offsets are below 2^56: the masked words can be viewed as signed without a copy
    off = (ent & np.uint64(C.OFFSET_MASK)).view(np.int64)
    f = decode_l2(ent) if any_comp or st.data_file else None
    if f is not None:
        off = f.host
    if st.data_file and f is not None:
        zero = f.zero if not st.ext else np.zeros(ent.shape, dtype=bool)
        normal = ~comp & ((off != 0) | (~zero & f.copied))
    else:
        normal = off != 0
    # reserved bits and unaligned offsets in one test (unallocated entries have no offset)
    check_mask = np.uint64(C.L2E_STD_RESERVED_MASK | ((cs - 1) & ~0x1FF))
    bad = (ent & check_mask) != 0
    if any_comp:
        bad &= ~comp
    if not st.data_file:
        bad |= off >= st.file_len
    coff = csize = None
    if any_comp and f is not None:
        coff, csize = compressed_extents(f.descriptor, st.geom)
        bad |= comp & (f.copied | st.data_file | (coff + csize - st.file_len >= cs))
    if bmp is not None:
        if any_comp:
            bad |= comp & (bmp != 0)
        bad |= normal & (((bmp >> np.uint64(32)) & bmp) != 0)
        bad |= ~comp & ~normal & ((bmp & np.uint64(C.BITMAP_ALL_ALLOC)) != 0)
    return L2Masks(comp if any_comp else None, normal, off, coff, csize, bad)


def _check_l2_tables(st: CheckState, offsets: list[int], fix: int, active: bool) -> None:
    raw = st.read_clusters(np.asarray(offsets, dtype=np.int64), scratch=True)
    # only the entries that are not all zero: the others have nothing to count or report
    idx, ent, bmp = st.l2_nonzero(raw)
    m = _classify(st, ent, bmp)
    rows = idx >> (st.geom.l2_entries.bit_length() - 1)
    # a dense batch is all normal: whole arrays (views) instead of masked copies
    normal: Mask | slice = slice(None) if m.normal.all() else m.normal
    if active:
        st.keep_active(offsets, rows[normal], m.off[normal], (ent[normal] & np.uint64(C.OFLAG_COPIED)) != 0)
    bad = np.flatnonzero(m.bad)
    counted = normal  # normal / allocated-zero clusters that reach the frag count
    comp_counted = None
    if m.comp is not None:
        comp_counted = m.comp & ~m.bad
    if len(bad):
        counted = m.normal.copy()
        if comp_counted is None:
            comp_counted = np.zeros(ent.shape, dtype=bool)
        bad_rows = rows[bad]
        cut = [0, *(np.flatnonzero(bad_rows[1:] != bad_rows[:-1]) + 1).tolist(), len(bad)]
        for a, b in zip(cut[:-1], cut[1:], strict=True):
            r = int(bad_rows[a])
            _l2_row_slow(st, offsets[r], raw[r], bad[a:b], idx, ent, bmp, counted, comp_counted, fix)
    cb = st.cb
    plain_ok = (m.normal & ~m.bad) if len(bad) else normal
    if not st.data_file:
        st.inc_clusters(m.off[plain_ok] >> cb)
    if m.comp is not None and m.coff is not None and m.csize is not None:
        comp_ok = m.comp & ~m.bad
        coff, csize = m.coff[comp_ok], m.csize[comp_ok]
        first = coff >> cb
        last = (coff + csize - 1) >> cb
        st.inc_clusters(first)
        for extra in range(1, int((last - first).max(initial=0)) + 1):
            st.inc_clusters((first + extra)[last - first >= extra])
    if active:
        seq = m.off[counted]
        seq_rows = rows[counted]
        # QEMU counts a fragment where a cluster does not follow the previous one of the
        # same L2 table (it restarts with every table)
        frag = int(np.count_nonzero((seq[1:] != seq[:-1] + st.cs) & (seq_rows[1:] == seq_rows[:-1])))
        ncomp = int(np.count_nonzero(comp_counted)) if comp_counted is not None else 0
        st.allocated += len(seq) + ncomp
        st.compressed += ncomp
        st.fragmented += frag + ncomp


def _l2_row_slow(
    st: CheckState,
    l2_offset: int,
    raw_row: npt.NDArray[np.uint8],
    bad: I64,
    idx: I64,
    ent: U64,
    bmp: U64 | None,
    counted: Mask,
    comp_counted: Mask,
    fix: int,
) -> None:
    """The entries of one L2 table that need diagnostics (positions `bad` in the batch's
    non-zero entries), in table order; a repaired table is written back whole."""
    table_ent: U64 | None = None
    table_bmp: U64 | None = None
    epr = st.geom.l2_entries
    for p in bad.tolist():
        i = int(idx[p]) % epr
        state = _l2_entry_slow(st, i, int(ent[p]), int(bmp[p]) if bmp is not None else 0, fix)
        if state == "skip":
            counted[p] = False
            if table_ent is None:
                full_ent, full_bmp = st.l2_words(raw_row[None, :])
                table_ent = full_ent[0]
                table_bmp = full_bmp[0] if full_bmp is not None else None
            table_ent[i] = np.uint64(C.OFLAG_ZERO if not st.ext else 0)
            if table_bmp is not None:
                table_bmp[i] = table_bmp[i] & np.uint64(C.BITMAP_ALL_ZERO)
        elif state == "comp":
            comp_counted[p] = True
    if table_ent is not None:
        st.write_l2(l2_offset, table_ent, table_bmp)


def _l2_entry_slow(st: CheckState, i: int, entry: int, bitmap: int, fix: int) -> str:
    """One L2 entry that needs diagnostics, in qemu-img's order. Returns "comp" for a
    compressed cluster counted as allocated, "skip" for an entry repaired to a zero
    cluster, "" otherwise."""
    cs = st.cs
    is_comp = bool(entry & C.OFLAG_COMPRESSED)
    if not is_comp and entry & C.L2E_STD_RESERVED_MASK:
        st.msgs.append(f"ERROR found l2 entry with reserved bits set: {entry:x}")
        st.res.corruptions += 1
    if is_comp:
        coff, csize = compressed_extent(entry, st.geom)
        if entry & C.OFLAG_COPIED:
            st.msgs.append(
                f"ERROR: coffset=0x{coff:x}: copied flag must never be set "
                "for compressed clusters"
            )
            entry &= ~C.OFLAG_COPIED
            st.res.corruptions += 1
        if st.data_file:
            st.msgs.append(f"ERROR compressed cluster {i} with data file, entry=0x{entry:x}")
            st.res.corruptions += 1
            return ""
        if bitmap:
            st.msgs.append(
                f"ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry=0x{entry:x}"
            )
            st.res.corruptions += 1
            return ""
        st.inc_region(coff, csize)
        return "comp"
    zero = bool(entry & 1) and not st.ext
    offset = entry & C.OFFSET_MASK
    copied = bool(entry & C.OFLAG_COPIED)
    normal = offset != 0 or (not zero and copied and st.data_file)
    if not normal:
        if st.ext and bitmap & C.BITMAP_ALL_ALLOC:
            st.res.corruptions += 1
            st.msgs.append("ERROR: Unallocated cluster has non-zero subcluster allocation map")
        return ""
    if (bitmap >> 32) & bitmap:
        st.res.corruptions += 1
        st.msgs.append(f"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap")
    if offset & (cs - 1):
        st.res.corruptions += 1
        contains_data = bool(bitmap & C.BITMAP_ALL_ALLOC) if st.ext else not zero
        if not contains_data:
            word = "Repairing" if fix & FIX_ERRORS else "ERROR"
            st.msgs.append(
                f"{word} offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
            )
            if fix & FIX_ERRORS:
                st.res.corruptions -= 1
                st.res.corruptions_fixed += 1
                return "skip"
        else:
            st.msgs.append(
                f"ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted."
            )
    if not st.data_file:
        st.inc_region(offset, cs)
    return ""


def _check_refblocks(st: CheckState, fix: int) -> None:
    reftable = st.meta.refcounts.reftable
    cs = st.cs
    st.flush_refs()
    if _refblocks_clean(st, reftable):
        return
    for i in np.flatnonzero(reftable).tolist():
        entry = int(reftable[i])
        offset = entry & REFT_OFFSET_MASK
        cluster = offset >> st.cb
        if entry & C.REFT_RESERVED_MASK:
            st.msgs.append(f"ERROR refcount table entry {i} has reserved bits set")
            st.res.corruptions += 1
            st.rebuild = True
            continue
        if offset & (cs - 1):
            st.msgs.append(f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted")
            st.res.corruptions += 1
            st.rebuild = True
            continue
        if cluster >= st.nb_clusters:
            st.res.corruptions += 1
            word = "Repairing" if fix & FIX_ERRORS else "ERROR"
            st.msgs.append(f"{word} refcount block {i} is outside image")
            if not fix & FIX_ERRORS:
                continue
            # a hostile offset far past the end would make a huge sparse file and an
            # in-memory refcount array to match: only modest growth is a repair
            sane = offset + cs <= max(2 * st.file_len, st.file_len + (1 << 30))
            if offset > INT64_MAX - cs:
                # negative, or overflowing once the block's size is added, as a signed file
                # offset: QEMU's resize fails with EINVAL
                st.msgs.append("ERROR could not resize image: Invalid argument")
                st.rebuild = True
                continue
            if offset + cs > BDRV_MAX_LENGTH:
                st.msgs.append("ERROR could not resize image: Input/output error")
                st.rebuild = True
                continue
            if offset >= C.MAX_HOST_OFFSET or not sane:
                st.msgs.append("ERROR could not resize image: File too large")
                st.rebuild = True
                continue
            # extend the file so that the block lies inside it again
            try:
                st.storage.truncate(offset + cs)
            except OSError as exc:
                st.msgs.append(f"ERROR could not resize image: {exc.strerror}")
                st.rebuild = True
                continue
            st.storage.flush()
            st.file_len = st.storage.size()
            st.grow_imrt(st.geom.clusters_for(st.file_len))
            st.res.corruptions -= 1
            st.res.corruptions_fixed += 1
            st.imrt[cluster] += 1
            continue
        if offset != 0:
            st.imrt[cluster] += 1
            if st.imrt[cluster] != 1:
                st.msgs.append(f"ERROR refcount block {i} refcount={int(st.imrt[cluster])}")
                st.res.corruptions += 1
                st.rebuild = True


def _refblocks_clean(st: CheckState, reftable: U64) -> bool:
    """The common case in one step: every refcount table entry is a valid block inside the
    image, no two share a cluster and nothing else references one. Counts them and
    returns True; otherwise changes nothing and returns False (the entry-by-entry path
    then gives qemu-img's diagnostics in order)."""
    entries = np.asarray(reftable, dtype=np.uint64)
    entries = entries[entries != 0]
    offs = entries & np.uint64(REFT_OFFSET_MASK)
    clusters = (offs >> np.uint64(st.cb)).astype(np.int64)
    if (
        (entries & np.uint64(C.REFT_RESERVED_MASK)).any()
        or (offs & np.uint64(st.cs - 1)).any()
        or not (offs != 0).all()
        or (offs >> np.uint64(st.cb) >= np.uint64(st.nb_clusters)).any()
    ):
        return False
    ordered = np.sort(clusters)
    if (ordered[1:] == ordered[:-1]).any() or st.imrt[clusters].any():
        return False
    st.imrt[clusters] += 1
    return True
