"""Consistency check and repair of one open image, with qemu-img check's verdicts.

What it owns: computing the reference count every host cluster should have (header, L1,
L2 and data clusters, compressed clusters by byte range, snapshot table and each
snapshot's tables, refcount table and blocks, bitmap directory and tables, the LUKS
header area) as one numpy array, comparing it with the on-disk refcounts, and the
repairs: lowering too-high refcounts (`leaks`), raising too-low ones and fixing COPIED
flags (`all`), and rebuilding the whole refcount structure when it is broken.

Counts, per-cluster diagnostics and their wording follow `qemu-img check` (QEMU 7.2), so
that `qcow2kit check --output=json` and `qemu-img check --output=json` agree.

Ordering rules for the rebuild (crash safety): new refcount blocks and the new refcount
table are written into clusters that nothing references, flushed, the header is switched
with one 12-byte write at offset 48, flushed, and only then are the old structures freed.
A crash at any point leaves either the old structure (which a second repair rebuilds
again) or the new one with leaked old clusters. Guest data is never rewritten.

Must not import qcow2kit.image (layering: image > metadata).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from ..errors import ImageStateError, UnsupportedFeatureError
from ..format import constants as C
from ..format.extensions import BitmapsExtension
from ..format.features import Autoclear, Incompatible
from ..format.snapshot import parse_snapshots
from ..format.tables import decode_refblock, encode_refblock, encode_table
from . import header_io
from .meta import Metadata

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]

FIX_LEAKS = 1
FIX_ERRORS = 2

_REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
_BME_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_BME_RESERVED_MASK = 0xFF000000000001FE
_BME_ALL_ONES = 1
_SNAP_FIXED = struct.Struct(">QIHHIIQII")
_BITMAP_DIR_ENTRY = struct.Struct(">QIIBBHI")
_REF_FLUSH_ELEMENTS = 1 << 22
_L2_KEEP_BYTES = 64 << 20  # L2 tables kept between the refcount pass and the COPIED pass


@dataclass
class CheckResult:
    """Outcome of a check, with the same numbers qemu-img check reports.

    After a repair, the `*_fixed` counts come from the repairing pass and every other
    number from the non-repairing second pass ("Double checking the fixed image now...").
    `messages` are the per-cluster diagnostics (qemu-img prints them on stderr) of the
    first pass, `recheck_messages` those of the second pass. `error` is set when the
    check could not complete (qemu-img: "Check failed: <error>", exit code 1)."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)
    recheck_messages: list[str] = field(default_factory=list)
    rechecked: bool = False
    error: str | None = None

    @property
    def exit_code(self) -> int:
        """qemu-img check's exit code: 0 clean, 1 failed, 2 corruptions, 3 leaks."""
        if self.error is not None or self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0


class _CheckFailedError(Exception):
    """The check could not complete (QEMU returns an errno; qemu-img says Check failed)."""


@dataclass
class _Counts:
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0


@dataclass
class _L2Masks:
    comp: npt.NDArray[np.bool_] | None  # None: no compressed entry at all
    normal: npt.NDArray[np.bool_]
    off: I64
    coff: I64 | None
    csize: I64 | None
    bad: npt.NDArray[np.bool_]


@dataclass
class _SnapEntry:
    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    extra_data_size: int
    fixed: tuple[int, ...] = ()
    extra: bytes = b""
    raw_id: bytes = b""
    raw_name: bytes = b""


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
    first = _Checker(meta, fix)
    result = first.run()
    if not fix or result.error is not None:
        return result
    if not (result.corruptions_fixed or result.leaks_fixed):
        return result
    # qemu-img: "Double checking the fixed image now..." with a non-repairing pass
    second = _Checker(meta, 0).run()
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


class _Checker:
    """One pass of qcow2_co_check_locked: snapshot table, refcounts, COPIED flags."""

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
        self.res = _Counts()
        self.rebuild = False
        self.file_len = self.storage.size()
        self.nb_clusters = self.geom.clusters_for(self.file_len)
        self.imrt = np.zeros(self.nb_clusters, dtype=np.int64)
        self.pending: list[I64] = []
        self.pending_n = 0
        self.allocated = 0
        self.fragmented = 0
        self.compressed = 0
        self.snapshots: list[_SnapEntry] = []
        self.snapshots_offset = 0
        self.snapshots_size = 0
        self.l2_bytes: dict[int, bytes] = {}
        # (offsets, entries, masks) of the active L2 tables from the refcount pass, reused
        # by the COPIED pass as long as no L2 table was rewritten in between
        self.active_rows: list[tuple[list[int], U64, _L2Masks]] = []
        self.active_rows_bytes = 0
        self.l2_bytes_total = 0
        self.free_list: I64 | None = None  # clusters free in the IMRT when a rebuild starts
        self.free_list_end = 0

    # ---- driver ---------------------------------------------------------------------------
    def run(self) -> CheckResult:
        out = CheckResult(messages=self.msgs)
        snap = _Counts()
        try:
            self._read_snapshot_table(snap)
        except _CheckFailedError as exc:
            _add(out, snap)
            out.error = str(exc)
            return out
        try:
            highest = self._check_refcounts()
        except _CheckFailedError as exc:
            _add(out, self.res)
            _add(out, snap)
            out.error = str(exc)
            return out
        _add(out, self.res)
        out.image_end_offset = (highest + 1) * self.cs
        out.total_clusters = self.geom.clusters_for(self.meta.header.size)
        out.allocated_clusters = self.allocated
        out.fragmented_clusters = self.fragmented
        out.compressed_clusters = self.compressed
        if snap.corruptions and self.fix & FIX_ERRORS:
            try:
                self._rewrite_snapshot_table()
            except _CheckFailedError as exc:
                snap.check_errors += 1
                _add(out, snap)
                out.error = str(exc)
                return out
            snap.corruptions_fixed += snap.corruptions
            snap.corruptions = 0
        _add(out, snap)
        if self.fix and out.check_errors == 0 and out.corruptions == 0:
            self._mark_clean()
        return out

    def _mark_clean(self) -> None:
        meta = self.meta
        if meta.header.version < 3:
            return
        if meta.header.incompatible_features & Incompatible.DIRTY:
            meta.clear_dirty_bit()
        if meta.header.incompatible_features & Incompatible.CORRUPT:
            bits = meta.header.incompatible_features & ~Incompatible.CORRUPT
            meta.flush()
            header_io.write_incompatible(self.storage, bits)
            self.storage.flush()
            meta.header = replace(meta.header, incompatible_features=bits)
            meta.corrupt = False

    def _check_refcounts(self) -> int:
        fix = self.fix
        self._calculate(fix)
        pre = replace(self.res)
        highest = self._compare(0)
        if self.rebuild and fix & FIX_ERRORS:
            old = replace(self.res)
            self.msgs.append("Rebuilding refcount structure")
            self._rebuild_structure()
            self.res.corruptions = 0
            self.res.leaks = 0
            self.rebuild = False
            self.imrt = np.zeros(self.nb_clusters, dtype=np.int64)
            self._calculate(0)
            saved = self.res
            self.res = _Counts()
            highest = self._compare(FIX_LEAKS)
            if self.rebuild:
                self.msgs.append("ERROR rebuilt refcount structure is still broken")
            fresh_leaks = self.res.leaks
            self.res = saved
            if self.res.corruptions < old.corruptions:
                self.res.corruptions_fixed += old.corruptions - self.res.corruptions
            if self.res.leaks < old.leaks:
                self.res.leaks_fixed += old.leaks - self.res.leaks
            self.res.leaks += fresh_leaks
        elif fix:
            if self.rebuild:
                self.msgs.append("ERROR need to rebuild refcount structures")
                self.res.check_errors += 1
                raise _CheckFailedError("Input/output error")
            if self.res.leaks or self.res.corruptions:
                self.res = pre
                highest = self._compare(fix)
        self._check_oflag_copied(fix)
        return highest

    # ---- the in-memory refcount table (IMRT) ------------------------------------------------
    def _inc_region(self, offset: int, size: int) -> None:
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
        self._inc_clusters(np.arange(first, last + 1, dtype=np.int64))

    def _inc_clusters(self, clusters: I64) -> None:
        if len(clusters) == 0:
            return
        self.pending.append(clusters)
        self.pending_n += len(clusters)
        if self.pending_n >= _REF_FLUSH_ELEMENTS:
            self._flush_refs()

    def _flush_refs(self) -> None:
        if not self.pending:
            return
        refs = np.concatenate(self.pending)
        self.pending.clear()
        self.pending_n = 0
        top = int(refs.max()) + 1
        if top > len(self.imrt):
            self._grow_imrt(top)
        counts = np.bincount(refs, minlength=len(self.imrt))
        self.imrt += counts

    def _grow_imrt(self, n: int) -> None:
        if n > len(self.imrt):
            grown = np.zeros(n, dtype=np.int64)
            grown[: len(self.imrt)] = self.imrt
            self.imrt = grown
            self.nb_clusters = n

    def _finish_imrt(self) -> None:
        self._flush_refs()
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

    # ---- calculate_refcounts ------------------------------------------------------------------
    def _calculate(self, fix: int) -> None:
        header = self.meta.header
        self.allocated = self.fragmented = self.compressed = 0
        self.active_rows.clear()
        self.active_rows_bytes = 0
        self._inc_region(0, self.cs)
        self._check_l1(header.l1_table_offset, header.l1_size, fix, active=True)
        if self.data_file and self.snapshots:
            self.msgs.append(f"ERROR {len(self.snapshots)} snapshots in image with data file")
            self.res.corruptions += 1
        for sn in self.snapshots:
            if sn.l1_table_offset & (self.cs - 1):
                self.msgs.append(
                    f"ERROR snapshot {sn.id_str} ({sn.name}) l1_offset={_hx(sn.l1_table_offset)}: "
                    "L1 table is not cluster aligned; snapshot table entry corrupted"
                )
                self.res.corruptions += 1
                continue
            if sn.l1_size > C.MAX_L1_BYTES // 8:
                self.msgs.append(
                    f"ERROR snapshot {sn.id_str} ({sn.name}) l1_size={_hx(sn.l1_size)}: "
                    "L1 table is too large; snapshot table entry corrupted"
                )
                self.res.corruptions += 1
                continue
            self._check_l1(sn.l1_table_offset, sn.l1_size, fix, active=False)
        self._inc_region(self.snapshots_offset, self.snapshots_size)
        reftable = self.meta.refcounts
        self._inc_region(reftable.reftable_offset, len(reftable.reftable) * 8)
        crypto = header.extension(C.EXT_CRYPTO)
        if crypto is not None and len(crypto) >= 16:
            c_off, c_len = struct.unpack_from(">QQ", crypto)
            self._inc_region(c_off, c_len)
        self._check_bitmaps()
        self._check_refblocks(fix)
        self._finish_imrt()

    def _check_l1(self, l1_offset: int, l1_size: int, fix: int, *, active: bool) -> None:
        if l1_size == 0:
            return
        cs = self.cs
        self._inc_region(l1_offset, l1_size * 8)
        l1 = np.frombuffer(self.storage.pread(l1_offset, l1_size * 8), dtype=">u8").astype(np.uint64)
        idx = np.flatnonzero(l1)
        entries = l1[idx]
        l2offs = (entries & np.uint64(C.OFFSET_MASK)).astype(np.int64)
        plain = (
            ((entries & np.uint64(C.L1E_RESERVED_MASK)) == 0)
            & ((l2offs & (cs - 1)) == 0)
            & (l2offs < self.file_len)
        ).tolist()
        batch = max(1, (32 << 20) // cs)
        pos, n = 0, len(idx)
        while pos < n:
            if not plain[pos]:
                self._check_l1_entry(int(entries[pos]), fix, active)
                pos += 1
                continue
            end = pos
            while end < n and plain[end] and end - pos < batch:
                end += 1
            offs = l2offs[pos:end]
            self._inc_clusters(offs >> self.cb)
            self._check_l2_tables(offs.tolist(), fix, active)
            pos = end

    def _check_l1_entry(self, entry: int, fix: int, active: bool) -> None:
        """An L1 entry that needs diagnostics (reserved bits, unaligned, outside the file)."""
        if entry & C.L1E_RESERVED_MASK:
            self.msgs.append(f"ERROR found L1 entry with reserved bits set: {entry:x}")
            self.res.corruptions += 1
        l2_offset = entry & C.OFFSET_MASK
        self._inc_region(l2_offset, self.cs)
        if l2_offset & (self.cs - 1):
            self.msgs.append(
                f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted"
            )
            self.res.corruptions += 1
        self._check_l2_tables([l2_offset], fix, active)

    def _read_l2_tables(self, offsets: list[int]) -> tuple[U64, U64 | None]:
        """Entries (and extended-L2 bitmaps) of the tables at offsets, one row per table."""
        cs = self.cs
        raws = []
        for o in offsets:
            raw = self.l2_bytes.get(o)
            if raw is None:
                raw = self.storage.pread(o, cs)
                if self.l2_bytes_total + cs <= _L2_KEEP_BYTES:
                    self.l2_bytes[o] = raw
                    self.l2_bytes_total += cs
            raws.append(raw)
        tab = np.frombuffer(b"".join(raws), dtype=">u8").astype(np.uint64)
        tab = tab.reshape(len(offsets), -1)
        if self.ext:
            return tab[:, 0::2].copy(), tab[:, 1::2].copy()
        return tab, None

    def _read_l2(self, l2_offset: int) -> tuple[U64, U64 | None]:
        ent, bmp = self._read_l2_tables([l2_offset])
        return ent[0], (bmp[0] if bmp is not None else None)

    def _classify(self, ent: U64, bmp: U64 | None) -> _L2Masks:
        """Vectorised view of L2 entries of any shape; `bad` marks the entries that need
        a diagnostic (they go through _l2_entry_slow, in table order)."""
        cs, cb = self.cs, self.cb
        comp = (ent & np.uint64(C.OFLAG_COMPRESSED)) != 0
        any_comp = bool(comp.any())
        # offsets are below 2^56: the masked words can be viewed as signed without a copy
        off = (ent & np.uint64(C.OFFSET_MASK)).view(np.int64)
        if any_comp:
            off = np.where(comp, 0, off)
        if self.data_file:
            copied = (ent >> np.uint64(63)) != 0
            zero = ((ent & np.uint64(1)) != 0) if not self.ext else np.zeros(ent.shape, dtype=bool)
            normal = ~comp & ((off != 0) | (~zero & copied))
        else:
            normal = off != 0
        # reserved bits and unaligned offsets in one test (unallocated entries have no offset)
        check_mask = np.uint64(C.L2E_STD_RESERVED_MASK | ((cs - 1) & ~0x1FF))
        bad = (ent & check_mask) != 0
        if any_comp:
            bad &= ~comp
        if not self.data_file:
            bad |= off >= self.file_len
        coff = csize = None
        if any_comp:
            x = self.geom.compressed_offset_bits
            coff = (ent & np.uint64((1 << x) - 1)).view(np.int64)
            nsect = ((ent >> np.uint64(x)) & np.uint64((1 << (cb - 8)) - 1)).view(np.int64) + 1
            csize = nsect * 512 - (coff & 511)
            copied = (ent >> np.uint64(63)) != 0
            bad |= comp & (copied | self.data_file | (coff + csize - self.file_len >= cs))
        if bmp is not None:
            if any_comp:
                bad |= comp & (bmp != 0)
            bad |= normal & (((bmp >> np.uint64(32)) & bmp) != 0)
            bad |= ~comp & ~normal & ((bmp & np.uint64(C.BITMAP_ALL_ALLOC)) != 0)
        return _L2Masks(comp if any_comp else None, normal, off, coff, csize, bad)

    def _check_l2_tables(self, offsets: list[int], fix: int, active: bool) -> None:
        ent, bmp = self._read_l2_tables(offsets)
        m = self._classify(ent, bmp)
        if active and self.active_rows_bytes + ent.nbytes <= _L2_KEEP_BYTES:
            self.active_rows.append((offsets, ent, m))
            self.active_rows_bytes += ent.nbytes
        elif active:
            self.active_rows_bytes = _L2_KEEP_BYTES + 1  # too big to keep: re-read later
            self.active_rows.clear()
        any_bad = bool(m.bad.any())
        counted = m.normal  # normal / allocated-zero clusters that reach the frag count
        comp_counted = None
        if m.comp is not None:
            comp_counted = m.comp & ~m.bad
        if any_bad:
            counted = counted.copy()
            if comp_counted is None:
                comp_counted = np.zeros(ent.shape, dtype=bool)
            for r in np.flatnonzero(m.bad.any(axis=1)).tolist():
                self._l2_row_slow(offsets[r], ent, bmp, r, m, counted, comp_counted, fix)
        cb = self.cb
        plain_ok = (m.normal & ~m.bad) if any_bad else m.normal
        if not self.data_file:
            self._inc_clusters(m.off[plain_ok] >> cb)
        if m.comp is not None and m.coff is not None and m.csize is not None:
            comp_ok = m.comp & ~m.bad
            coff, csize = m.coff[comp_ok], m.csize[comp_ok]
            first = coff >> cb
            last = (coff + csize - 1) >> cb
            self._inc_clusters(first)
            for extra in range(1, int((last - first).max(initial=0)) + 1):
                self._inc_clusters((first + extra)[last - first >= extra])
        if active:
            seq = m.off[counted]
            frag = 0
            if len(seq) > 1:
                step = seq[1:] != seq[:-1] + self.cs
                frag = int(np.count_nonzero(step))
                # pairs that straddle two tables do not count (QEMU restarts per table)
                per_row = np.count_nonzero(counted, axis=-1) if counted.ndim > 1 else None
                if per_row is not None and len(per_row) > 1:
                    starts = np.cumsum(per_row)[:-1]
                    starts = np.unique(starts[(starts > 0) & (starts < len(seq))])
                    frag -= int(np.count_nonzero(step[starts - 1]))
            ncomp = int(np.count_nonzero(comp_counted)) if comp_counted is not None else 0
            self.allocated += len(seq) + ncomp
            self.compressed += ncomp
            self.fragmented += frag + ncomp

    def _l2_row_slow(
        self,
        l2_offset: int,
        ent: U64,
        bmp: U64 | None,
        r: int,
        m: _L2Masks,
        counted: npt.NDArray[np.bool_],
        comp_counted: npt.NDArray[np.bool_],
        fix: int,
    ) -> None:
        """The entries of one L2 table that need diagnostics, in table order."""
        table_dirty = False
        row_bmp = bmp[r] if bmp is not None else None
        for i in np.flatnonzero(m.bad[r]).tolist():
            state = self._l2_entry_slow(
                i, int(ent[r, i]), int(row_bmp[i]) if row_bmp is not None else 0, fix
            )
            if state == "skip":
                counted[r, i] = False
                ent[r, i] = np.uint64(C.OFLAG_ZERO if not self.ext else 0)
                if row_bmp is not None:
                    row_bmp[i] = row_bmp[i] & np.uint64(C.BITMAP_ALL_ZERO)
                table_dirty = True
            elif state == "comp":
                comp_counted[r, i] = True
        if table_dirty:
            self._write_l2(l2_offset, ent[r], row_bmp)

    def _l2_entry_slow(self, i: int, entry: int, bitmap: int, fix: int) -> str:
        """One L2 entry that needs diagnostics, in qemu-img's order. Returns "comp" for a
        compressed cluster counted as allocated, "skip" for an entry repaired to a zero
        cluster, "" otherwise."""
        cs = self.cs
        is_comp = bool(entry & C.OFLAG_COMPRESSED)
        if not is_comp and entry & C.L2E_STD_RESERVED_MASK:
            self.msgs.append(f"ERROR found l2 entry with reserved bits set: {entry:x}")
            self.res.corruptions += 1
        if is_comp:
            x = self.geom.compressed_offset_bits
            if entry & C.OFLAG_COPIED:
                self.msgs.append(
                    f"ERROR: coffset=0x{entry & ((1 << x) - 1):x}: copied flag must never be set "
                    "for compressed clusters"
                )
                entry &= ~C.OFLAG_COPIED
                self.res.corruptions += 1
            if self.data_file:
                self.msgs.append(f"ERROR compressed cluster {i} with data file, entry=0x{entry:x}")
                self.res.corruptions += 1
                return ""
            if bitmap:
                self.msgs.append(
                    f"ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, "
                    f"entry=0x{entry:x}"
                )
                self.res.corruptions += 1
                return ""
            coff, csize = self.geom.decode_compressed(entry & ((1 << 62) - 1))
            self._inc_region(coff, csize)
            return "comp"
        zero = bool(entry & 1) and not self.ext
        offset = entry & C.OFFSET_MASK
        copied = bool(entry & C.OFLAG_COPIED)
        normal = offset != 0 or (not zero and copied and self.data_file)
        if not normal:
            if self.ext and bitmap & C.BITMAP_ALL_ALLOC:
                self.res.corruptions += 1
                self.msgs.append("ERROR: Unallocated cluster has non-zero subcluster allocation map")
            return ""
        if (bitmap >> 32) & bitmap:
            self.res.corruptions += 1
            self.msgs.append(
                f"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"
            )
        if offset & (cs - 1):
            self.res.corruptions += 1
            contains_data = bool(bitmap & C.BITMAP_ALL_ALLOC) if self.ext else not zero
            if not contains_data:
                word = "Repairing" if fix & FIX_ERRORS else "ERROR"
                self.msgs.append(
                    f"{word} offset={offset:x}: Preallocated cluster is not properly aligned; "
                    "L2 entry corrupted."
                )
                if fix & FIX_ERRORS:
                    self.res.corruptions -= 1
                    self.res.corruptions_fixed += 1
                    return "skip"
            else:
                self.msgs.append(
                    f"ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted."
                )
        if not self.data_file:
            self._inc_region(offset, cs)
        return ""

    def _write_l2(self, l2_offset: int, ent: U64, bmp: U64 | None) -> None:
        if bmp is not None:
            table = np.stack([ent, bmp], axis=1)
        else:
            table = ent
        self.storage.event("l2_update")
        self.storage.pwrite(l2_offset, encode_table(table))
        self.storage.flush()
        self.meta.l2.cache.discard(l2_offset)
        self.l2_bytes.pop(l2_offset, None)
        self.active_rows.clear()
        self.active_rows_bytes = _L2_KEEP_BYTES + 1  # stale from here on: re-read

    # ---- bitmaps ------------------------------------------------------------------------------
    def _check_bitmaps(self) -> None:
        header = self.meta.header
        data = header.extension(C.EXT_BITMAPS)
        if data is None or not header.autoclear_features & Autoclear.BITMAPS:
            return
        try:
            ext = BitmapsExtension.from_bytes(data)
        except ValueError:
            return
        if ext.nb_bitmaps == 0:
            return
        self._inc_region(ext.directory_offset, ext.directory_size)
        directory = self.storage.pread(ext.directory_offset, ext.directory_size)
        pos = 0
        tables: list[tuple[int, int]] = []
        for _ in range(ext.nb_bitmaps):
            if pos + _BITMAP_DIR_ENTRY.size > len(directory):
                self.res.corruptions += 1
                raise _CheckFailedError("Invalid argument")
            t_off, t_size, _flags, _typ, _gran, name_size, extra = _BITMAP_DIR_ENTRY.unpack_from(
                directory, pos
            )
            pos += _BITMAP_DIR_ENTRY.size + extra + name_size
            pos += -pos % 8
            tables.append((t_off, t_size))
        for t_off, t_size in tables:
            self._inc_region(t_off, t_size * 8)
            table = np.frombuffer(self.storage.pread(t_off, t_size * 8), dtype=">u8").astype(np.uint64)
            offs = table & np.uint64(_BME_OFFSET_MASK)
            bad = (table & np.uint64(_BME_RESERVED_MASK)) != 0
            bad |= (offs != 0) & (
                ((table & np.uint64(_BME_ALL_ONES)) != 0) | ((offs & np.uint64(self.cs - 1)) != 0)
            )
            self.res.corruptions += int(np.count_nonzero(bad))
            for o in offs[~bad & (offs != 0)].tolist():
                self._inc_region(int(o), self.cs)

    # ---- refcount blocks ------------------------------------------------------------------------
    def _check_refblocks(self, fix: int) -> None:
        reftable = self.meta.refcounts.reftable
        cs = self.cs
        self._flush_refs()
        for i in np.flatnonzero(reftable).tolist():
            entry = int(reftable[i])
            offset = entry & _REFT_OFFSET_MASK
            cluster = offset >> self.cb
            if entry & C.REFT_RESERVED_MASK:
                self.msgs.append(f"ERROR refcount table entry {i} has reserved bits set")
                self.res.corruptions += 1
                self.rebuild = True
                continue
            if offset & (cs - 1):
                self.msgs.append(
                    f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                )
                self.res.corruptions += 1
                self.rebuild = True
                continue
            if cluster >= self.nb_clusters:
                self.res.corruptions += 1
                word = "Repairing" if fix & FIX_ERRORS else "ERROR"
                self.msgs.append(f"{word} refcount block {i} is outside image")
                # a hostile offset far past the end would make a huge sparse file and an
                # in-memory refcount array to match: only modest growth is a repair
                sane = offset + cs <= max(2 * self.file_len, self.file_len + (1 << 30))
                if fix & FIX_ERRORS and offset < C.MAX_HOST_OFFSET and not sane:
                    self.msgs.append("ERROR could not resize image: File too large")
                    self.rebuild = True
                elif fix & FIX_ERRORS and offset < C.MAX_HOST_OFFSET:
                    # extend the file so that the block lies inside it again
                    try:
                        self.storage.truncate(offset + cs)
                    except OSError as exc:
                        self.msgs.append(f"ERROR could not resize image: {exc.strerror}")
                        self.rebuild = True
                        continue
                    self.storage.flush()
                    self.file_len = self.storage.size()
                    self._grow_imrt(self.geom.clusters_for(self.file_len))
                    self.res.corruptions -= 1
                    self.res.corruptions_fixed += 1
                    self.imrt[cluster] += 1
                continue
            if offset != 0:
                self.imrt[cluster] += 1
                if self.imrt[cluster] != 1:
                    self.msgs.append(f"ERROR refcount block {i} refcount={int(self.imrt[cluster])}")
                    self.res.corruptions += 1
                    self.rebuild = True

    def _disk_refcounts(self, n: int) -> tuple[npt.NDArray[np.uint64], list[tuple[int, int, int]]]:
        """On-disk refcounts of clusters [0, n), and the (start, end, reftable index) ranges
        whose refcount block cannot be read (unaligned offset)."""
        out = np.zeros(n, dtype=np.uint64)
        bad: list[tuple[int, int, int]] = []
        reftable = self.meta.refcounts.reftable
        e = self.geom.refblock_entries
        order = self.geom.refcount_order
        for b in range(min(len(reftable), -(-n // e))):
            off = int(reftable[b]) & _REFT_OFFSET_MASK
            if off == 0:
                continue
            lo, hi = b * e, min(n, (b + 1) * e)
            if off & (self.cs - 1):
                bad.append((lo, hi, b))
                continue
            block = decode_refblock(self.storage.pread(off, self.cs), order)
            out[lo:hi] = block[: hi - lo]
        return out, bad

    def _disk_refcount_one(self, cluster: int) -> int | None:
        e = self.geom.refblock_entries
        reftable = self.meta.refcounts.reftable
        b = cluster // e
        if b >= len(reftable):
            return 0
        off = int(reftable[b]) & _REFT_OFFSET_MASK
        if off == 0:
            return 0
        if off & (self.cs - 1):
            return None
        block = decode_refblock(self.storage.pread(off, self.cs), self.geom.refcount_order)
        return int(block[cluster - b * e])

    # ---- compare_refcounts ----------------------------------------------------------------------
    def _compare(self, fix: int) -> int:
        n = len(self.imrt)
        disk, bad = self._disk_refcounts(n)
        ok = np.ones(n, dtype=bool)
        for lo, hi, _b in bad:
            ok[lo:hi] = False
        want = self.imrt.astype(np.uint64)
        used = np.flatnonzero(ok & ((disk > 0) | (want > 0)))
        highest = int(used[-1]) if len(used) else 0
        mism = np.flatnonzero(ok & (disk != want))
        lines: list[tuple[int, str]] = []
        if bad:
            first = bad[0]
            off = int(self.meta.refcounts.reftable[first[2]]) & _REFT_OFFSET_MASK
            lines.append((-1, (
                f"qcow2: Image is corrupt: Refblock offset {_hx(off)} unaligned (reftable index: "
                f"{_hx(first[2])}); further non-fatal corruption events will be suppressed"
            )))
            for lo, hi, _b in bad:
                for k in range(lo, hi):
                    lines.append((k, f"Can't get refcount for cluster {k}: Input/output error"))
                self.res.check_errors += hi - lo
        r1 = disk[mism].astype(np.int64)
        r2 = want[mism].astype(np.int64)
        zero = r1 == 0
        if zero.any():
            self.rebuild = True
        leak_fix = ~zero & (r1 > r2) & bool(fix & FIX_LEAKS)
        err_fix = ~zero & (r1 < r2) & bool(fix & FIX_ERRORS)
        fixing = leak_fix | err_fix
        if fixing.any():
            clusters = mism[fixing].astype(np.int64)
            deltas = (r2 - r1)[fixing]
            freed = self.meta.refcounts.adjust(clusters, deltas)
            self.meta.refcounts.sync()
            self.meta.forget_freed(freed, punch=True)
        self.res.leaks_fixed += int(np.count_nonzero(leak_fix))
        self.res.corruptions_fixed += int(np.count_nonzero(err_fix))
        self.res.corruptions += int(np.count_nonzero(~fixing & (r1 < r2)))
        self.res.leaks += int(np.count_nonzero(~fixing & (r1 > r2)))
        for k, a, b, f in zip(mism.tolist(), r1.tolist(), r2.tolist(), fixing.tolist(), strict=True):
            word = "Repairing" if f else ("ERROR" if a < b else "Leaked")
            lines.append((k, f"{word} cluster {k} refcount={a} reference={b}"))
        if bad:
            lines.sort(key=lambda t: t[0])
        self.msgs.extend(text for _k, text in lines)
        return highest

    # ---- rebuild_refcount_structure -------------------------------------------------------------
    def _alloc_imrt(self, count: int, first_free: int) -> tuple[int, int]:
        """First run of `count` clusters with IMRT value 0 at or after first_free (appending
        at the end if none); marks them used. Returns (start, new first_free)."""
        imrt = self.imrt
        n = len(imrt)
        start = -1
        new_first = first_free
        if count == 1 and self.free_list is not None:
            # single clusters (refcount blocks): search the free list made when the rebuild
            # started instead of rescanning the table for every block
            free_list = self.free_list
            k = int(np.searchsorted(free_list, first_free))
            while k < len(free_list) and imrt[free_list[k]] != 0:
                k += 1
            if k < len(free_list):
                start = int(free_list[k])
            else:
                lo = max(first_free, self.free_list_end)
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
        if start + count > len(self.imrt):
            self._grow_imrt(start + count)
        self.imrt[start : start + count] = 1
        return start, new_first

    def _rebuild_structure(self) -> None:
        meta = self.meta
        cs, cb = self.cs, self.cb
        e = self.geom.refblock_entries
        meta.refcounts.sync()
        meta.refcounts.cache.clear()
        reftable: list[int] = []
        # room for every block and table the rebuild may append, so that appending does
        # not copy the IMRT each time; trimmed back to what was used below
        orig_n = len(self.imrt)
        blocks = -(-orig_n // e) + 2
        self._grow_imrt(orig_n + 2 * (blocks + -(-blocks * 8 // cs) + 2))
        self.free_list = np.flatnonzero(self.imrt == 0)
        self.free_list_end = len(self.imrt)

        def place_refblocks(lo: int, hi: int) -> bool:
            """Give every refblock range in [lo, hi) that holds a used cluster a block
            (allocations made on the way are seen, as QEMU walks the live IMRT)."""
            changed = False
            first_free = 0
            for index in range(lo // e, -(-hi // e)):
                seg_lo, seg_hi = max(lo, index * e), min(hi, (index + 1) * e)
                if not self.imrt[seg_lo:seg_hi].any():
                    continue
                if index < len(reftable) and reftable[index]:
                    continue
                first_free = max(first_free, index * e)
                block, first_free = self._alloc_imrt(1, first_free)
                if index >= len(reftable):
                    want = -(-((index + 1) * 8) // cs) * cs // 8
                    reftable.extend([0] * (want - len(reftable)))
                    changed = True
                reftable[index] = block << cb
            return changed

        place_refblocks(0, orig_n)
        while True:
            table_clusters = -(-(len(reftable) * 8) // cs)
            start, _ = self._alloc_imrt(table_clusters, 0)
            if place_refblocks(start, start + table_clusters):
                continue  # the table grew: find room for the bigger one
            # QEMU stops here; a block appended past the old end into a range that has no
            # block yet would stay uncounted, so cover every range once more
            if not place_refblocks(0, len(self.imrt)):
                break
        used = np.flatnonzero(self.imrt[orig_n:])
        keep = orig_n + (int(used[-1]) + 1 if len(used) else 0)
        self.imrt = self.imrt[:keep].copy()
        self.nb_clusters = keep
        self.free_list = None
        # every allocation is decided: write the blocks, then the table, then switch
        table = np.array(reftable, dtype=np.uint64)
        order = self.geom.refcount_order
        imrt = self.imrt
        for index in np.flatnonzero(table).tolist():
            block = np.zeros(e, dtype=np.uint64)
            part = imrt[index * e : (index + 1) * e]
            block[: len(part)] = part.astype(np.uint64)
            self.storage.event("refblock_alloc_write")
            self.storage.pwrite(int(table[index]), encode_refblock(block, order))
        self.storage.event("reftable_grow")
        self.storage.pwrite(start << cb, encode_table(table))
        self.storage.flush()  # the new structure is durable before the header points at it
        self.storage.event("header_update")
        self.storage.pwrite(C.HEADER_REFTABLE_OFFSET, struct.pack(">QI", start << cb, table_clusters))
        self.storage.flush()
        rc = meta.refcounts
        rc.reftable = table
        rc.reftable_offset = start << cb
        rc.reftable_clusters = table_clusters
        rc.cache.clear()
        rc.hint = 0
        self.file_len = self.storage.size()
        rc.end_cluster = max(rc.end_cluster, self.geom.clusters_for(self.file_len), len(self.imrt))
        meta._reftable_switched(start << cb, table_clusters)

    # ---- check_oflag_copied ---------------------------------------------------------------------
    def _check_oflag_copied(self, fix: int) -> None:
        if fix & FIX_ERRORS:
            repair = True
        elif fix & FIX_LEAKS:
            repair = not (self.res.check_errors or self.res.corruptions or self.res.leaks)
        else:
            repair = False
        meta = self.meta
        cs, cb = self.cs, self.cb
        l1 = meta.l2.l1
        n_disk = len(self.imrt)
        disk, bad = self._disk_refcounts(n_disk)
        unreadable = np.zeros(n_disk, dtype=bool)
        for lo, hi, _b in bad:
            unreadable[lo:hi] = True
        word = "Repairing" if repair else "ERROR"

        def refcounts_of(clusters: I64) -> tuple[I64, npt.NDArray[np.bool_]]:
            inside = clusters < n_disk
            vals = np.zeros(len(clusters), dtype=np.int64)
            okay = np.ones(len(clusters), dtype=bool)
            vals[inside] = disk[clusters[inside]].astype(np.int64)
            okay[inside] = ~unreadable[clusters[inside]]
            for j in np.flatnonzero(~inside).tolist():
                v = self._disk_refcount_one(int(clusters[j]))
                if v is None:
                    okay[j] = False
                else:
                    vals[j] = min(v, (1 << 63) - 1)  # 64-bit refcounts: only "not 1" matters here
            return vals, okay

        for i in self._copied_suspects(l1, disk, unreadable).tolist():
            l1_entry = int(l1[i])
            l2_offset = l1_entry & C.OFFSET_MASK
            if not l2_offset:
                continue
            rc_arr, okay = refcounts_of(np.array([l2_offset >> cb], dtype=np.int64))
            if okay[0]:
                refcount = int(rc_arr[0])
                if (refcount == 1) != bool(l1_entry & C.OFLAG_COPIED):
                    self.res.corruptions += 1
                    self.msgs.append(
                        f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} "
                        f"refcount={refcount}"
                    )
                    if repair:
                        new = (l1_entry | C.OFLAG_COPIED) if refcount == 1 else (
                            l1_entry & ~C.OFLAG_COPIED)
                        self.storage.event("l1_update")
                        self.storage.pwrite(meta.l2.l1_offset + i * 8, struct.pack(">Q", new))
                        self.storage.flush()
                        meta.l2.l1[i] = np.uint64(new)
                        self.res.corruptions -= 1
                        self.res.corruptions_fixed += 1
            ent, bmp = self._read_l2(l2_offset)
            comp = ((ent >> np.uint64(62)) & np.uint64(1)).astype(bool)
            copied = (ent >> np.uint64(63)).astype(bool)
            off = (ent & np.uint64(C.OFFSET_MASK)).astype(np.int64)
            zero = ~comp & ((ent & np.uint64(1)) != 0) if not self.ext else np.zeros(len(ent), bool)
            normal = ~comp & ((off != 0) | (~zero & copied & self.data_file))
            idx = np.flatnonzero(normal)
            if len(idx) == 0:
                continue
            if self.data_file:
                refc = np.ones(len(idx), dtype=np.int64)
                okay = np.ones(len(idx), dtype=bool)
            else:
                refc, okay = refcounts_of(off[idx] >> cb)
            wrong = okay & ((refc == 1) != copied[idx])
            if not wrong.any():
                continue
            dirty = 0
            for j, r in zip(idx[wrong].tolist(), refc[wrong].tolist(), strict=True):
                entry = int(ent[j])
                self.res.corruptions += 1
                self.msgs.append(f"{word} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={r}")
                if repair:
                    ent[j] = np.uint64((entry | C.OFLAG_COPIED) if r == 1 else (entry & ~C.OFLAG_COPIED))
                    dirty += 1
            if dirty:
                if l2_offset & (cs - 1) or self._overlaps_metadata(l2_offset):
                    self.msgs.append(
                        "ERROR: Could not write L2 table; metadata overlap check failed: "
                        "Input/output error"
                    )
                    self.res.check_errors += 1
                    raise _CheckFailedError("Input/output error")
                self._write_l2(l2_offset, ent, bmp)
                self.res.corruptions -= dirty
                self.res.corruptions_fixed += dirty

    def _copied_suspects(
        self, l1: U64, disk: npt.NDArray[np.uint64], unreadable: npt.NDArray[np.bool_]
    ) -> I64:
        """L1 indices whose entry or L2 table may have a wrong COPIED flag, found with
        whole-table numpy operations; only those are examined entry by entry."""
        cb = self.cb
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
        batch = max(1, (32 << 20) // self.cs)
        offsets = (entries & np.uint64(C.OFFSET_MASK)).astype(np.int64).tolist()
        reuse = [o for rows in self.active_rows for o in rows[0]] == offsets
        chunks: list[tuple[int, U64, npt.NDArray[np.bool_], I64]] = []
        if reuse:
            lo = 0
            for offs, ent, m in self.active_rows:
                chunks.append((lo, ent, m.normal, m.off))
                lo += len(offs)
        for lo, ent, normal, off in chunks or self._copied_chunks(offsets, batch):
            copied = (ent >> np.uint64(63)).astype(bool)
            if self.data_file:
                wrong = normal & ~copied
            else:
                clusters = off >> cb
                far = normal & (clusters >= n_disk)
                safe = np.where(normal & ~far, clusters, 0)
                refc = disk[safe].astype(np.int64)
                wrong = normal & ~far & ~unreadable[safe] & ((refc == 1) != copied)
                wrong |= far
            suspect[lo : lo + len(ent)] |= wrong.any(axis=1)
        return idx[suspect]

    def _copied_chunks(
        self, offsets: list[int], batch: int
    ) -> list[tuple[int, U64, npt.NDArray[np.bool_], I64]]:
        out = []
        for lo in range(0, len(offsets), batch):
            ent, _bmp = self._read_l2_tables(offsets[lo : lo + batch])
            comp = ((ent >> np.uint64(62)) & np.uint64(1)).astype(bool)
            copied = (ent >> np.uint64(63)).astype(bool)
            off = (ent & np.uint64(C.OFFSET_MASK)).astype(np.int64)
            if self.ext:
                zero = np.zeros(ent.shape, dtype=bool)
            else:
                zero = ~comp & ((ent & np.uint64(1)) != 0)
            normal = ~comp & ((off != 0) | (~zero & copied & self.data_file))
            out.append((lo, ent, normal, off))
        return out

    def _overlaps_metadata(self, offset: int) -> bool:
        """Would writing one cluster at offset hit the header, L1, reftable or a refblock?"""
        cs = self.cs
        meta = self.meta
        if offset < cs:
            return True
        ranges = [
            (meta.header.l1_table_offset, meta.header.l1_size * 8),
            (meta.refcounts.reftable_offset, meta.refcounts.reftable_clusters * cs),
            (self.snapshots_offset, self.snapshots_size),
        ]
        for start, size in ranges:
            if size and start < offset + cs and offset < start + size:
                return True
        blocks = meta.refcounts.reftable & np.uint64(_REFT_OFFSET_MASK)
        return bool(np.any(blocks == np.uint64(offset)))

    # ---- snapshot table -------------------------------------------------------------------------
    def _read_snapshot_table(self, res: _Counts) -> None:
        header = self.meta.header
        nb = header.nb_snapshots
        offset = header.snapshots_offset
        reduced = 0
        if nb > C.MAX_SNAPSHOTS and self.fix & FIX_ERRORS:
            self.msgs.append(f"Discarding {nb - C.MAX_SNAPSHOTS} overhanging snapshots")
            reduced += nb - C.MAX_SNAPSHOTS
            nb = C.MAX_SNAPSHOTS
        problem = None
        if nb > C.MAX_SNAPSHOTS:
            problem = "snapshot table too large"
        elif (1 << 63) - 1 - nb * 40 < offset or offset & (self.cs - 1):
            problem = "snapshot table offset invalid"
        if problem is not None:
            res.check_errors += 1
            self.msgs.append(f"qcow2kit: ERROR {problem}")
            if nb > C.MAX_SNAPSHOTS:
                self.msgs.append(
                    f"You can force-remove all {nb - C.MAX_SNAPSHOTS} overhanging snapshots with "
                    "qemu-img check -r all"
                )
            raise _CheckFailedError("File too large" if "large" in problem else "Invalid argument")
        if nb == 0:
            return
        if self.fix & FIX_ERRORS and nb != header.nb_snapshots:
            raise _CheckFailedError("repairing an oversized snapshot table is not supported")
        pos = offset
        dropped = 0
        table: list[_SnapEntry] = []
        for i in range(nb):
            pos = (pos + 7) & ~7
            fixed = self.storage.pread(pos, _SNAP_FIXED.size)
            l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclock, vm32, extra = _SNAP_FIXED.unpack(fixed)
            pos += _SNAP_FIXED.size
            keep_extra = extra
            if extra > C.MAX_SNAPSHOT_EXTRA_BYTES and self.fix & FIX_ERRORS:
                self.msgs.append(
                    f"Discarding too much extra metadata in snapshot table entry {i} "
                    f"({extra} > {C.MAX_SNAPSHOT_EXTRA_BYTES})"
                )
                dropped += 1
                keep_extra = C.MAX_SNAPSHOT_EXTRA_BYTES
            elif extra > C.MAX_SNAPSHOT_EXTRA_BYTES:
                res.check_errors += 1
                self.msgs.append(
                    "qcow2kit: ERROR failed to read the snapshot table: Too much extra metadata in "
                    "snapshot "
                    f"table entry {i}"
                )
                self.msgs.append("You can force-remove this extra metadata with qemu-img check -r all")
                raise _CheckFailedError("File too large")
            pos += extra
            names = self.storage.pread(pos, id_len + name_len)
            pos += id_len + name_len
            if pos - offset > C.MAX_SNAPSHOT_TABLE_BYTES:
                res.check_errors += 1
                self.msgs.append(
                    "qcow2kit: ERROR failed to read the snapshot table: Snapshot table is too big"
                )
                self.msgs.append(
                    f"You can force-remove all {nb - i} overhanging snapshots with qemu-img check -r all"
                )
                raise _CheckFailedError("File too large")
            table.append(_SnapEntry(
                l1_off, l1_size, names[:id_len].decode("utf-8", "replace"),
                names[id_len:].decode("utf-8", "replace"), extra,
                fixed=(dsec, dnsec, vmclock, vm32),
                extra=self.storage.pread(pos - id_len - name_len - extra, keep_extra),
                raw_id=names[:id_len], raw_name=names[id_len:],
            ))
        self.snapshots = table
        self.snapshots_offset = offset
        self.snapshots_size = pos - offset
        res.corruptions += reduced + dropped
        if header.version >= 3:
            for i, sn in enumerate(table):
                if sn.extra_data_size < 16:
                    res.corruptions += 1
                    word = "Repairing" if self.fix & FIX_ERRORS else "ERROR"
                    self.msgs.append(f"{word} snapshot table entry {i} is incomplete")

    def _rewrite_snapshot_table(self) -> None:
        """Write the snapshot table anew with complete entries (new table, flush, switch
        the header with one write, flush, free the old table)."""
        meta = self.meta
        cs, cb = self.cs, self.cb
        size_now = meta.header.size
        parts: list[bytes] = []
        for sn in self.snapshots:
            date_sec, date_nsec, vm_clock, vm32 = sn.fixed
            ex = sn.extra
            vm_size = int.from_bytes(ex[0:8], "big") if len(ex) >= 8 else vm32
            disk = int.from_bytes(ex[8:16], "big") if len(ex) >= 16 else size_now
            icount = ex[16:24] if len(ex) >= 24 else b"\xff" * 8
            extra = vm_size.to_bytes(8, "big") + disk.to_bytes(8, "big") + icount + ex[24:]
            entry = _SNAP_FIXED.pack(
                sn.l1_table_offset, sn.l1_size, len(sn.raw_id), len(sn.raw_name), date_sec,
                date_nsec, vm_clock, vm_size if vm_size <= 0xFFFFFFFF else 0, len(extra),
            ) + extra + sn.raw_id + sn.raw_name
            parts.append(entry + b"\0" * (-len(entry) % 8))
        table = b"".join(parts)
        clusters = -(-len(table) // cs)
        rc = meta.refcounts
        start = rc.allocate(clusters)
        rc.sync()  # the new table's refcounts are durable before anything points at it
        self.storage.event("snapshot_table_write")
        self.storage.pwrite(start << cb, table + b"\0" * (clusters * cs - len(table)))
        self.storage.flush()
        self.storage.event("header_update")
        self.storage.pwrite(C.HEADER_SNAPSHOTS_OFFSET, struct.pack(">IQ", len(parts), start << cb))
        self.storage.flush()
        old_off, old_size = self.snapshots_offset, self.snapshots_size
        meta.header = replace(meta.header, nb_snapshots=len(parts), snapshots_offset=start << cb)
        if old_size:
            first, last = old_off >> cb, (old_off + old_size - 1) >> cb
            freed = rc.adjust(np.arange(first, last + 1, dtype=np.int64), -1)
            rc.sync()
            meta.forget_freed(freed, punch=True)
        try:
            meta.snapshots = parse_snapshots(table, len(parts), cs)
        except ValueError:
            pass


def _hx(value: int) -> str:
    """C's %#x: "0" for zero, else 0x-prefixed hex."""
    return f"0x{value:x}" if value else "0"


def _add(out: CheckResult, c: _Counts) -> None:
    out.corruptions += c.corruptions
    out.leaks += c.leaks
    out.check_errors += c.check_errors
    out.corruptions_fixed += c.corruptions_fixed
    out.leaks_fixed += c.leaks_fixed
