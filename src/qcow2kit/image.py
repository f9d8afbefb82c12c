"""Image: an open qcow2 image. Reads and writes are short loops over the runs that the
metadata layer answers for a guest range; the crash ordering lives in metadata.

Also RawImage, the same read surface over a raw file (used for raw backing files)."""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np
import numpy.typing as npt

from .errors import (
    CorruptionError,
    FormatError,
    ImageStateError,
    Qcow2Error,
    ResizeError,
    UnsupportedFeatureError,
)
from .format import constants as C
from .format.compression import decompress
from .format.features import Incompatible
from .format.header import Header
from .format.snapshot import Snapshot
from .io.file import FileStorage
from .io.storage import Storage
from .metadata import compact as compact_mod
from .metadata import header_io, resize
from .metadata.check import CheckResult, check_image
from .metadata.compact import CompactResult
from .metadata.l2map import Kind, Run, referenced_clusters
from .metadata.meta import Metadata

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
MAX_BACKING_DEPTH = 64
_PROBE_BYTES = 4096


class Readable(Protocol):
    virtual_size: int
    filename: str

    def read(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class RawImage:
    """A raw file seen as a virtual disk."""

    format_name = "raw"

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.filename = storage.name
        self.virtual_size = storage.size()

    def read(self, offset: int, length: int) -> bytes:
        return self.storage.pread(offset, length)

    def close(self) -> None:
        self.storage.close()


def _probe_format(path: str) -> str:
    with open(path, "rb") as f:
        magic = f.read(4)
    return "qcow2" if magic == b"QFI\xfb" else "raw"


def open_any(
    path: str,
    fmt: str | None = None,
    *,
    writable: bool = False,
    force_share: bool = False,
    backing: bool = True,
    _chain: tuple[str, ...] = (),
) -> Image | RawImage:
    """Open a file as qcow2 or raw (probing when fmt is None)."""
    fmt = fmt or _probe_format(path)
    if fmt == "qcow2":
        return Image.open_path(
            path, writable=writable, force_share=force_share, backing=backing, _chain=_chain
        )
    if fmt == "raw":
        return RawImage(FileStorage(path, writable, force_share=force_share))
    raise UnsupportedFeatureError(f"unsupported image format '{fmt}'")


class Image:
    """An open qcow2 image. Use qcow2kit.open() to get one; it is a context manager."""

    format_name = "qcow2"

    def __init__(
        self,
        storage: Storage,
        *,
        backing: bool = True,
        data_storage: Storage | None = None,
        _chain: tuple[str, ...] = (),
    ) -> None:
        self.storage = storage
        self.filename = storage.name
        self.closed = False
        self.backing: Image | RawImage | None = None
        self.data_storage: Storage | None = None
        header = header_io.read_header(storage)
        self._validate_open(header)
        try:
            if header.has_data_file:
                self.data_storage = data_storage or self._open_data_file(header)
            self.meta = Metadata(storage, header, data_storage=self.data_storage)
            self.meta.refcounts.overlap_check = self._metadata_overlap
            if backing and header.backing_file:  # an empty name means none, as in QEMU
                self.backing = self._open_backing(header, _chain)
            if storage.writable and header.incompatible_features & Incompatible.DIRTY:
                self._repair_dirty()
        except BaseException:
            self._close_children()
            raise
        self._zbuf_key = -1
        self._zbuf = b""

    # ---- opening ------------------------------------------------------------------------
    @classmethod
    def open_path(
        cls,
        path: str,
        *,
        writable: bool = False,
        force_share: bool = False,
        backing: bool = True,
        _chain: tuple[str, ...] = (),
    ) -> Image:
        storage = FileStorage(path, writable, force_share=force_share)
        try:
            return cls(storage, backing=backing, _chain=_chain)
        except BaseException:
            storage.close()
            raise

    def _validate_open(self, header: Header) -> None:
        """Open-time checks that need the file size: every table the header points at lies
        inside the file, so nothing is read (or allocated) in proportion to a header field
        that the file cannot back."""
        size = self.storage.size()
        if header.incompatible_features & Incompatible.CORRUPT and self.storage.writable:
            raise ImageStateError(
                f"{self.filename}: Image is corrupt; cannot be opened read/write "
                "(run 'qcow2kit check -r all' to repair it)"
            )
        header.check_fits(size)  # read_header checked it too; Image(storage) may skip it

    def _metadata_overlap(self, start: int, count: int) -> str | None:
        """Which metadata (besides the refcount structures, which Refcounts checks itself)
        the host clusters [start, start+count) hold, or None: the guard that stops a corrupt
        refcount table from handing out clusters that are still in use as tables."""
        meta = self.meta
        bits = meta.geom.cluster_bits
        end = start + count

        def hits(offset: int, nbytes: int) -> bool:
            return nbytes > 0 and offset >> bits < end and start <= (offset + nbytes - 1) >> bits

        l2 = meta.l2
        if hits(l2.l1_offset, l2.l1_size * 8):
            return "the active L1 table"
        tables = (l2.l1 & np.uint64(C.OFFSET_MASK)) >> np.uint64(bits)
        if ((tables >= start) & (tables < end) & (tables != 0)).any():
            return "an active L2 table"
        header = meta.header
        if meta.snapshots:
            table_bytes = sum(len(sn.to_bytes()) for sn in meta.snapshots)
            if hits(header.snapshots_offset, table_bytes):
                return "the snapshot table"
            for sn in meta.snapshots:
                if hits(sn.l1_table_offset, sn.l1_size * 8):
                    return "an inactive L1 table"
        if header.extension(C.EXT_BITMAPS) is not None and header.autoclear_features & 1:
            ext = header.bitmaps
            if ext is not None and hits(ext.directory_offset, ext.directory_size):
                return "the bitmap directory"
        return None

    def _relative(self, name: str) -> str:
        if os.path.isabs(name) or not self.filename:
            return name
        return os.path.join(os.path.dirname(self.filename), name)

    def _check_plain_file(self, name: str, what: str) -> str:
        """The path of a file named inside the image, refused unless it is a regular file:
        never a protocol URL, a directory, a FIFO (which would block), or a device."""
        if "\0" in name:
            raise FormatError(f"{what} name {name!r} contains a NUL byte")
        path = self._relative(name)
        if ":" in name.split("/")[0] and not os.path.lexists(path):
            raise UnsupportedFeatureError(
                f"{what} '{name}' looks like a protocol URL; only plain files are opened"
            )
        try:
            st = os.stat(path)
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise FormatError(f"Could not open {what} '{path}': {reason}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise UnsupportedFeatureError(
                f"{what} '{path}' is not a regular file; only plain files are opened"
            )
        return path

    def _open_data_file(self, header: Header) -> Storage:
        name = header.data_file
        if name is None:
            raise FormatError("'data-file' is required for this image (no data file extension)")
        path = self._check_plain_file(name, "data file")
        try:
            return FileStorage(path, self.storage.writable, lock=False)
        except OSError as exc:
            raise FormatError(f"Could not open data file '{path}': {exc.strerror}") from exc

    def _open_backing(self, header: Header, chain: tuple[str, ...]) -> Image | RawImage:
        assert header.backing_file is not None
        path = self._check_plain_file(header.backing_file, "backing file")
        real = os.path.realpath(path)
        me = os.path.realpath(self.filename)
        if real in chain or real == me:
            raise FormatError(f"backing chain loops back to '{header.backing_file}'")
        if len(chain) >= MAX_BACKING_DEPTH:
            raise FormatError(f"backing chain deeper than {MAX_BACKING_DEPTH} images")
        fmt = header.backing_format
        try:
            return open_any(path, fmt, force_share=True, _chain=chain + (me,))
        except OSError as exc:
            raise FormatError(f"Could not open backing file '{path}': {exc.strerror}") from exc

    def _repair_dirty(self) -> None:
        from .metadata.check import check_image

        result = check_image(self.meta, repair="all")
        if result.error is not None or result.check_errors:
            raise CorruptionError(f"{self.filename}: Could not repair dirty image")
        if not result.corruptions:
            self.meta.clear_dirty_bit()

    def _close_children(self) -> None:
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        if self.data_storage is not None:
            self.data_storage.close()
            self.data_storage = None

    # ---- properties ---------------------------------------------------------------------
    @property
    def header(self) -> Header:
        return self.meta.header

    @property
    def snapshots(self) -> list[Snapshot]:
        return self.meta.snapshots

    @property
    def virtual_size(self) -> int:
        return self.meta.header.size

    @property
    def cluster_size(self) -> int:
        return self.meta.geom.cluster_size

    @property
    def writable(self) -> bool:
        return self.storage.writable

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<qcow2kit.Image {self.filename!r} size={self.virtual_size}>"

    def _check_open(self) -> None:
        if self.closed:
            raise ImageStateError("I/O on a closed image")

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise ValueError(
                f"range [{offset}, {offset + length}) outside the virtual disk "
                f"[0, {self.virtual_size})"
            )

    # ---- reading ------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """Read guest bytes [offset, offset+length)."""
        self._check_open()
        self._check_range(offset, length)
        out = bytearray(length)
        try:
            self._read_into(memoryview(out), offset)
        except CorruptionError as exc:
            raise self.meta.mark_corrupt(str(exc)) from None
        return bytes(out)

    def runs(self, offset: int, length: int) -> list[Run]:
        """The mapping of a guest range, merged into runs (see metadata.l2map.Run)."""
        self._check_open()
        self._check_range(offset, length)
        return self.meta.l2.lookup(offset, length)

    def _read_into(self, out: memoryview, offset: int) -> None:
        """Fill `out` (zero-initialised) with guest bytes starting at offset."""
        data = self.data_storage or self.storage
        for run in self.meta.l2.lookup(offset, len(out)):
            a = run.guest_offset - offset
            b = a + run.length
            if run.kind == Kind.DATA:
                out[a:b] = data.pread(run.host_offset, run.length)
            elif run.kind == Kind.COMPRESSED:
                cluster = self._decompressed(run)
                lo = run.guest_offset - run.comp_guest_cluster
                out[a:b] = cluster[lo : lo + run.length]
            elif run.kind == Kind.UNALLOCATED and self.backing is not None:
                bsize = self.backing.virtual_size
                if run.guest_offset < bsize:
                    n = min(run.length, bsize - run.guest_offset)
                    out[a : a + n] = self.backing.read(run.guest_offset, n)

    def _decompressed(self, run: Run) -> bytes:
        if self._zbuf_key != run.host_offset:
            raw = self.storage.pread(run.host_offset, run.comp_bytes)
            self._zbuf = decompress(raw, self.cluster_size, self.header.compression_type)
            self._zbuf_key = run.host_offset
        return self._zbuf

    def iter_chunks(self, chunk_bytes: int = 8 << 20) -> Iterator[tuple[int, bytes | None]]:
        """Yield (offset, data) over the whole disk; data is None for ranges that read as
        zeros without any I/O (unallocated without backing, or zero clusters)."""
        pos = 0
        size = self.virtual_size
        while pos < size:
            n = min(chunk_bytes, size - pos)
            runs = self.meta.l2.lookup(pos, n)
            if all(
                r.kind == Kind.ZERO or (r.kind == Kind.UNALLOCATED and self.backing is None)
                for r in runs
            ):
                yield pos, None
            else:
                out = bytearray(n)
                self._read_into(memoryview(out), pos)
                yield pos, bytes(out)
            pos += n

    # ---- writing ------------------------------------------------------------------------
    def _begin_write(self) -> None:
        self._check_open()
        self.meta.check_writable()
        if self.meta.lazy:
            self.meta.set_dirty_bit()

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write bytes at guest offset."""
        mv = memoryview(data).cast("B")
        self._check_range(offset, len(mv))
        self._begin_write()
        try:
            self._write(offset, mv)
            self.meta.release_pending()
        except CorruptionError as exc:
            raise self.meta.mark_corrupt(str(exc)) from None

    def _chunks(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        span = self.meta.geom.l2_span_bytes
        pos, end = offset, offset + length
        while pos < end:
            cend = min(end, (pos // span + 1) * span)
            yield pos, cend
            pos = cend

    def _write(self, offset: int, mv: memoryview) -> None:
        for pos, cend in self._chunks(offset, len(mv)):
            self._write_chunk(pos, mv[pos - offset : cend - offset])

    def _check_in_place(self, host_offsets: I64, what: str) -> None:
        """A cluster about to be rewritten in place must lie inside the image file (below
        the allocation high-water mark): hostile metadata pointing far past the end would
        otherwise make the file huge, or fail with EFBIG."""
        limit = self.meta.refcounts.end_cluster * self.cluster_size
        if len(host_offsets) and int(host_offsets.max()) >= limit:
            bad = int(host_offsets[host_offsets >= limit][0])
            raise CorruptionError(
                f"{what} at {bad:#x} lies beyond the end of the image file ({limit} bytes)"
            )
        # nor may it be metadata (QEMU's overlap check): an L2 entry aimed at the L1 table
        # or the refcount table would otherwise let a guest write rewrite them
        if len(host_offsets):
            clusters = np.unique(host_offsets >> self.meta.geom.cluster_bits)
            for name, meta_clusters in self._metadata_clusters(with_l2=what != "L2 table"):
                hit = np.isin(clusters, meta_clusters)
                if hit.any():
                    bad = int(clusters[hit][0]) << self.meta.geom.cluster_bits
                    raise CorruptionError(
                        f"Preventing invalid write on metadata: {what} at {bad:#x} "
                        f"overlaps with {name}"
                    )

    def _metadata_clusters(self, *, with_l2: bool) -> list[tuple[str, I64]]:
        """Host clusters holding metadata, by kind (what an in-place write must not hit)."""
        meta = self.meta
        bits = meta.geom.cluster_bits
        rc = meta.refcounts

        def span(offset: int, nbytes: int) -> I64:
            if nbytes <= 0:
                return np.zeros(0, dtype=np.int64)
            return np.arange(offset >> bits, ((offset + nbytes - 1) >> bits) + 1, dtype=np.int64)

        out = [
            ("the image header", np.zeros(1, dtype=np.int64)),
            ("the refcount table", span(rc.reftable_offset, rc.reftable_clusters << bits)),
            ("a refcount block", (rc.reftable[rc.reftable != 0] >> np.uint64(bits)).astype(np.int64)),
            ("the active L1 table", span(meta.l2.l1_offset, meta.l2.l1_size * 8)),
        ]
        if with_l2:
            tables = (meta.l2.l1 & np.uint64(C.OFFSET_MASK)) >> np.uint64(bits)
            out.append(("an active L2 table", tables[tables != 0].astype(np.int64)))
        if meta.snapshots:
            table_bytes = sum(len(sn.to_bytes()) for sn in meta.snapshots)
            out.append(("the snapshot table", span(meta.header.snapshots_offset, table_bytes)))
            out.extend(("an inactive L1 table", span(sn.l1_table_offset, sn.l1_size * 8))
                       for sn in meta.snapshots)
        return out

    def _l2_for_write(self, l1_index: int) -> tuple[int, U64]:
        """The L2 table of l1_index, allocated or copied so that it is ours alone."""
        meta = self.meta
        l2 = meta.l2
        if l1_index >= l2.l1_size:
            raise CorruptionError(f"L1 index {l1_index} beyond l1_size {l2.l1_size}")
        entry = int(l2.l1[l1_index])
        old = l2.l2_offset(l1_index)
        if old and entry & C.OFLAG_COPIED:
            self._check_in_place(np.array([old], dtype=np.int64), "L2 table")
            return old, l2.table(old)
        new = meta.refcounts.allocate(1) * self.cluster_size
        if old:
            table = l2.table(old).copy()
            meta.defer_free(np.array([old >> meta.geom.cluster_bits], dtype=np.int64))
        else:
            shape = (meta.geom.l2_entries, 2) if meta.geom.extended_l2 else (meta.geom.l2_entries,)
            table = np.zeros(shape, dtype=np.uint64)
        l2.cache.put(new, table, dirty=True)
        l2.set_l1(l1_index, new | C.OFLAG_COPIED)
        return new, table

    def _write_chunk(self, pos: int, buf: memoryview) -> None:
        meta = self.meta
        g = meta.geom
        cs = g.cluster_size
        span = g.l2_span_bytes
        l1i = pos // span
        base = l1i * span
        end = pos + len(buf)
        c0 = (pos - base) // cs
        c1 = -(-(end - base) // cs)
        n = c1 - c0
        data_file = self.header.has_data_file
        # current state of the clusters (read-only view; the table may be copied below)
        l2_off = meta.l2.l2_offset(l1i)
        ext = g.extended_l2
        if l2_off:
            cur = meta.l2.table(l2_off)
            ent = (cur[c0:c1, 0] if ext else cur[c0:c1]).copy()
            bmp = cur[c0:c1, 1].copy() if ext else None
        else:
            ent = np.zeros(n, dtype=np.uint64)
            bmp = np.zeros(n, dtype=np.uint64) if ext else None
        comp = ((ent >> np.uint64(62)) & np.uint64(1)).astype(bool)
        copied = ((ent >> np.uint64(63)) & np.uint64(1)).astype(bool)
        host = (ent & np.uint64(C.OFFSET_MASK)).astype(np.int64)
        zero = ((ent & np.uint64(1)) != 0) & ~comp & (not ext)
        raw_host = host.copy()
        if data_file:
            host = (base + np.arange(c0, c1, dtype=np.int64) * cs).astype(np.int64)
            owned = ~comp & (copied | (raw_host != 0))
        else:
            owned = copied & ~comp & (host != 0)
        need_new = ~owned
        if not data_file:
            self._check_in_place(host[owned], "data cluster")
        # write windows per cluster, relative to the cluster start
        ws = np.zeros(n, dtype=np.int64)
        we = np.full(n, cs, dtype=np.int64)
        ws[0] = (pos - base) - c0 * cs
        we[-1] = (end - base) - (c1 - 1) * cs
        hs = ws.copy()
        he = we.copy()
        new_bmp = bmp.copy() if bmp is not None else None
        if not ext:
            full_fill = need_new | zero
            hs[full_fill] = 0
            he[full_fill] = cs
        else:
            assert bmp is not None and new_bmp is not None
            scs = g.subcluster_size
            whole = need_new & (comp | (raw_host != 0))  # shared or compressed: copy it
            hs[whole] = 0
            he[whole] = cs
            part = ~whole
            hs[part] = (ws[part] // scs) * scs
            he[part] = -(-we[part] // scs) * scs
            first_sc = hs // scs
            last_sc = he // scs  # exclusive
            mask = ((np.uint64(1) << last_sc.astype(np.uint64)) - np.uint64(1)) ^ (
                (np.uint64(1) << first_sc.astype(np.uint64)) - np.uint64(1)
            )
            mask = np.where(whole, np.uint64(C.BITMAP_ALL_ALLOC), mask)
            # an allocated subcluster inside the window needs no fill: shrink hs/he to ws/we
            # where the boundary subcluster is already allocated in place
            alloc = bmp & np.uint64(C.BITMAP_ALL_ALLOC)
            fs_alloc = ((alloc >> first_sc.astype(np.uint64)) & np.uint64(1)).astype(bool)
            ls_alloc = ((alloc >> (last_sc - 1).astype(np.uint64)) & np.uint64(1)).astype(bool)
            keep_start = part & owned & fs_alloc
            keep_end = part & owned & ls_alloc
            hs[keep_start] = ws[keep_start]
            he[keep_end] = we[keep_end]
            new_bmp = np.where(
                whole, np.uint64(C.BITMAP_ALL_ALLOC), (bmp | mask) & ~(mask << np.uint64(32))
            )
        # old content needed around the write windows, read before anything changes
        fills: dict[int, tuple[bytes, bytes]] = {}
        for i in np.flatnonzero((hs < ws) | (he > we)).tolist():
            gcs = base + (c0 + i) * cs
            head = self.read_guest(gcs + int(hs[i]), int(ws[i] - hs[i]))
            tail = self.read_guest(gcs + int(we[i]), int(he[i] - we[i]))
            fills[i] = (head, tail)
        # drop references the new clusters replace, once the new mapping is durable
        new_idx = np.flatnonzero(need_new)
        if len(new_idx) and not data_file:
            old_refs = referenced_clusters(ent[new_idx], g, data_file)
            meta.defer_free(old_refs)
        l2_off, table = self._l2_for_write(l1i)
        if len(new_idx) and not data_file:
            start = meta.refcounts.allocate(len(new_idx))
            host[new_idx] = (start + np.arange(len(new_idx), dtype=np.int64)) * cs
        # data goes to disk before the L2 entries that point at it
        self._write_clusters(buf, pos, base + c0 * cs, host, hs, he, ws, fills)
        meta.unsynced = True
        if len(new_idx):
            meta.data_unsynced = True
        newent = (host.astype(np.uint64) | np.uint64(C.OFLAG_COPIED))
        if ext:
            assert new_bmp is not None
            table[c0:c1, 0] = newent
            table[c0:c1, 1] = new_bmp
        else:
            table[c0:c1] = newent
        meta.l2.cache.mark_dirty(l2_off)

    def read_guest(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        out = bytearray(length)
        self._read_into(memoryview(out), offset)
        return bytes(out)

    def _write_clusters(
        self,
        buf: memoryview,
        pos: int,
        first_cluster_guest: int,
        host: I64,
        hs: I64,
        he: I64,
        ws: I64,
        fills: dict[int, tuple[bytes, bytes]],
    ) -> None:
        cs = self.cluster_size
        target = self.data_storage or self.storage
        seg_host = -1
        seg_parts: list[bytes | memoryview] = []
        seg_len = 0

        def emit() -> None:
            if seg_parts:
                payload = seg_parts[0] if len(seg_parts) == 1 else b"".join(seg_parts)
                target.pwrite(seg_host, payload)

        hs_l, he_l, ws_l, host_l = hs.tolist(), he.tolist(), ws.tolist(), host.tolist()
        buf_start = buf_end = -1
        for i in range(len(host_l)):
            gcs = first_cluster_guest + i * cs
            a = gcs + ws_l[i] - pos
            wlen = min(cs - ws_l[i], len(buf) - a)
            head, tail = fills.get(i, (b"", b""))
            h = host_l[i] + hs_l[i]
            if seg_parts and h == seg_host + seg_len and hs_l[i] == 0:
                pass
            else:
                emit()
                seg_parts, seg_host, seg_len = [], h, 0
            if head:
                seg_parts.append(head)
            if not head and seg_parts and buf_end == a and isinstance(seg_parts[-1], memoryview):
                # the caller's buffer continues: widen the slice instead of joining copies
                seg_parts[-1] = buf[buf_start : a + wlen]
            else:
                buf_start = a
                seg_parts.append(buf[a : a + wlen])
            buf_end = a + wlen
            if tail:
                seg_parts.append(tail)
                buf_end = -1
            seg_len += he_l[i] - hs_l[i]
            if he_l[i] != cs:
                emit()
                seg_parts, seg_len = [], 0
        emit()

    # ---- zeroes and discard ---------------------------------------------------------------
    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make the guest range read zeros, using zero clusters where the format allows."""
        self._check_range(offset, length)
        self._begin_write()
        try:
            v2 = self.header.version < 3 and not self.meta.geom.extended_l2
            if v2 and self.backing is not None:
                self._write_zero_bytes(offset, length)
            else:
                self._for_whole_clusters(offset, length, "discard" if v2 else
                                         ("zero_unmap" if unmap else "zero"))
            self.meta.release_pending()
        except CorruptionError as exc:
            raise self.meta.mark_corrupt(str(exc)) from None

    def discard(self, offset: int, length: int) -> None:
        """Drop the guest range: it reads as zeros, or as the backing file, afterwards."""
        self._check_range(offset, length)
        self._begin_write()
        try:
            self._for_whole_clusters(offset, length, "discard")
            self.meta.release_pending()
        except CorruptionError as exc:
            raise self.meta.mark_corrupt(str(exc)) from None

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        step = 4 << 20
        zeros = bytes(min(step, length))
        pos = offset
        while pos < offset + length:
            n = min(step, offset + length - pos)
            self._write(pos, memoryview(zeros)[:n])
            pos += n

    def _partial_fill(self, offset: int, length: int, mode: str) -> None:
        """A partial cluster gets the bytes the mode asks for, written normally."""
        if length <= 0:
            return
        if mode == "discard" and self.backing is not None:
            want = bytearray(length)
            bsize = self.backing.virtual_size
            if offset < bsize:
                n = min(length, bsize - offset)
                want[:n] = self.backing.read(offset, n)
            wanted = bytes(want)
        else:
            wanted = bytes(length)
        if self.read_guest(offset, length) != wanted:
            self._write(offset, memoryview(wanted))

    def _for_whole_clusters(self, offset: int, length: int, mode: str) -> None:
        cs = self.cluster_size
        end = offset + length
        a = -(-offset // cs) * cs
        b = (end // cs) * cs
        if end == self.virtual_size:
            b = -(-end // cs) * cs  # the last partial cluster lies past the disk end
        if a >= b:
            self._partial_fill(offset, length, mode)
            return
        self._partial_fill(offset, a - offset, mode)
        self._partial_fill(b, max(0, end - b), mode)
        for pos, cend in self._chunks(a, b - a):
            self._clear_chunk(pos, cend, mode)

    def _clear_chunk(self, pos: int, end: int, mode: str) -> None:
        meta = self.meta
        g = meta.geom
        cs = g.cluster_size
        span = g.l2_span_bytes
        l1i = pos // span
        base = l1i * span
        c0, c1 = (pos - base) // cs, (end - base) // cs
        l2_off = meta.l2.l2_offset(l1i)
        data_file = self.header.has_data_file
        if l2_off == 0 and (mode == "discard" or self.backing is None):
            return
        ext = g.extended_l2
        if l2_off:
            cur = meta.l2.table(l2_off)
            ent = (cur[c0:c1, 0] if ext else cur[c0:c1]).copy()
            bmp = cur[c0:c1, 1].copy() if ext else np.zeros(0, dtype=np.uint64)
        else:
            ent = np.zeros(c1 - c0, dtype=np.uint64)
            bmp = np.zeros(c1 - c0, dtype=np.uint64)
        comp = ((ent >> np.uint64(62)) & np.uint64(1)).astype(bool)
        copied = ((ent >> np.uint64(63)) & np.uint64(1)).astype(bool)
        host = ent & np.uint64(C.OFFSET_MASK)
        if mode == "discard":
            new_ent = np.zeros_like(ent)
            new_bmp = np.zeros_like(bmp)
            keep = np.zeros(len(ent), dtype=bool)
        else:
            keep = copied & ~comp & (host != 0) & (mode == "zero")
            if data_file:
                keep = ~comp & (host != 0) | (copied & ~comp)
            if ext:
                new_ent = np.where(keep, ent, np.uint64(0))
                new_bmp = np.full_like(bmp, np.uint64(C.BITMAP_ALL_ZERO))
            else:
                new_ent = np.where(keep, ent | np.uint64(1), np.uint64(1))
                new_bmp = bmp
        if np.array_equal(new_ent, ent) and (not ext or np.array_equal(new_bmp, bmp)):
            return
        dropped = ~keep
        refs = referenced_clusters(ent[dropped], g, data_file)
        if data_file and self.data_storage is not None:
            for i in np.flatnonzero((ent != 0) & ~comp).tolist():
                self.data_storage.punch_hole(base + (c0 + i) * cs, cs)
        l2_off, table = self._l2_for_write(l1i)
        if ext:
            table[c0:c1, 0] = new_ent
            table[c0:c1, 1] = new_bmp
        else:
            table[c0:c1] = new_ent
        meta.l2.cache.mark_dirty(l2_off)
        meta.defer_free(refs)

    # ---- lifecycle ----------------------------------------------------------------------
    def flush(self) -> None:
        self._check_open()
        self.meta.flush()

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self.writable and not self.meta.corrupt:
                self.meta.release_pending()
                self.meta.flush()
                if self.meta.lazy:
                    self.meta.clear_dirty_bit()
        finally:
            self.closed = True
            self._close_children()
            self.storage.close()

    # ---- resize -------------------------------------------------------------------------
    def resize(self, new_size: int, *, shrink: bool = False, preallocation: str = "off") -> None:
        """Change the virtual size. Shrinking needs shrink=True and frees everything past
        the new end; every step keeps the image consistent (at worst leaking) on a crash."""
        self._check_open()
        self.meta.check_writable()
        old_size = self.virtual_size
        if new_size <= 0:
            raise ResizeError("New image size must be positive")
        if new_size % 512:
            raise ResizeError("The new size must be a multiple of 512")
        if preallocation not in ("off", "metadata", "falloc", "full"):
            raise ResizeError(f"Unsupported preallocation mode '{preallocation}'")
        if new_size < old_size and preallocation != "off":
            raise ResizeError("Preallocation can only be used for growing images")
        if new_size < old_size and not shrink:
            raise ResizeError(
                "Use the --shrink option to perform a shrink operation.\n"
                "warning: Shrinking an image will delete all data beyond the shrunken image's "
                "end. Before performing such an operation, make sure there is no important "
                "data there."
            )
        if self.snapshots and self.header.version < 3:
            raise ResizeError("Can't resize a v2 image which has snapshots")
        if self.header.bitmaps is not None:
            raise ResizeError(
                "Cannot resize an image with persistent dirty bitmaps (not supported by "
                "qcow2kit); remove them with qemu-img bitmap --remove first"
            )
        if new_size > self.meta.geom.l2_span_bytes * (C.MAX_L1_BYTES // 8):
            raise ResizeError(f"New size {new_size} exceeds the largest size the L1 table allows")
        if new_size == old_size:
            return
        if self.meta.lazy:
            self.meta.set_dirty_bit()
        try:
            if new_size < old_size:
                self._shrink(new_size)
            else:
                self._grow(old_size, new_size, preallocation)
        except CorruptionError as exc:
            raise self.meta.mark_corrupt(str(exc)) from None

    def _grow(self, old_size: int, new_size: int, preallocation: str) -> None:
        meta = self.meta
        cs = self.cluster_size
        # bytes past the old end inside its last cluster must read as zeros once visible
        tail_end = min(-(-old_size // cs) * cs, new_size)
        if tail_end > old_size and any(self.read_guest(old_size, tail_end - old_size)):
            self._write(old_size, memoryview(bytes(tail_end - old_size)))
        meta.release_pending()
        resize.grow_l1(meta, meta.geom.l1_entries_for(new_size))
        if self.backing is not None and self.backing.virtual_size > old_size:
            # the added range must read as zeros, not as the backing file's old data
            zero_end = min(new_size, self.backing.virtual_size)
            if self.header.version >= 3 or meta.geom.extended_l2:
                self._for_whole_clusters(old_size, zero_end - old_size, "zero")
            else:
                self._write_zero_bytes(old_size, zero_end - old_size)
            meta.release_pending()
        if self.data_storage is not None and self.data_storage.size() < new_size:
            self.data_storage.truncate(new_size)
        if preallocation != "off":
            self._preallocate(-(-old_size // cs) * cs, new_size, preallocation)
        meta.flush()
        meta.write_size(new_size)
        meta.storage.flush()

    def _preallocate(self, start: int, end: int, mode: str) -> None:
        meta = self.meta
        cs = self.cluster_size
        for pos, cend in self._chunks(start, end - start):
            l1i = pos // meta.geom.l2_span_bytes
            base = l1i * meta.geom.l2_span_bytes
            c0, c1 = (pos - base) // cs, -(-(cend - base) // cs)
            l2_off, table = self._l2_for_write(l1i)
            if self.header.has_data_file:
                host = base + np.arange(c0, c1, dtype=np.int64) * cs
            else:
                first = meta.refcounts.allocate(c1 - c0)
                host = (first + np.arange(c1 - c0, dtype=np.int64)) * cs
                meta.storage.punch_hole(first * cs, (c1 - c0) * cs)
                if mode == "falloc":
                    meta.storage.allocate(first * cs, (c1 - c0) * cs)
                elif mode == "full":
                    self._fill_zeros(meta.storage, first * cs, (c1 - c0) * cs)
                if meta.storage.size() < (first + c1 - c0) * cs:
                    meta.storage.truncate((first + c1 - c0) * cs)
            entries = host.astype(np.uint64) | np.uint64(C.OFLAG_COPIED)
            if meta.geom.extended_l2:
                table[c0:c1, 0] = entries
                table[c0:c1, 1] = C.BITMAP_ALL_ALLOC
            else:
                table[c0:c1] = entries
            meta.l2.cache.mark_dirty(l2_off)
            meta.unsynced = True

    @staticmethod
    def _fill_zeros(storage: Storage, offset: int, length: int) -> None:
        step = 8 << 20
        zeros = bytes(min(step, length))
        pos = offset
        while pos < offset + length:
            n = min(step, offset + length - pos)
            storage.pwrite(pos, zeros[:n])
            pos += n

    def _shrink(self, new_size: int) -> None:
        meta = self.meta
        cs = self.cluster_size
        old_size = self.virtual_size
        meta.release_pending()
        meta.flush()
        # 1. the bytes past the new end in its last cluster: zeros, so a later grow never
        #    shows them again
        cut = -(-new_size // cs) * cs
        if cut > new_size and any(self.read_guest(new_size, cut - new_size)):
            self._write(new_size, memoryview(bytes(cut - new_size)))
            meta.release_pending()
        # 2. unreference everything past the cut: the straddling L2 table's tail entries
        #    and whole L2 tables past the new L1 end. release_pending writes and flushes
        #    the tables before any refcount falls.
        new_l1 = meta.geom.l1_entries_for(new_size)
        span = meta.geom.l2_span_bytes
        if cut < old_size:
            boundary_end = min(-(-old_size // cs) * cs, new_l1 * span)  # incl. a partial last cluster
            if cut < boundary_end:
                self._clear_chunk(cut, boundary_end, "discard")
            resize.drop_l1_tail(meta, new_l1)
        # holes are punched at the end, and only below the final end of the file
        freed = meta.release_pending(punch=False)
        meta.refcounts.sync()
        # 3. refcount blocks left counting nothing but themselves (or each other)
        resize.drop_empty_refblocks(meta)
        # 4. size and L1 size in one header write; then the data file and the file tail
        resize.switch_header(meta, new_size, new_l1)
        # 5. tables left near the old end move down, so the file can end earlier
        if resize.relocate_tables(meta):
            resize.drop_empty_refblocks(meta)  # blocks that only counted the old tables
        if self.data_storage is not None:
            self.data_storage.truncate(new_size)
            self.data_storage.flush()
        last = meta.refcounts.last_used_cluster()
        end = (last + 1) * cs
        if 0 < end < meta.storage.size():
            meta.storage.event("truncate")
            meta.storage.truncate(end)
            meta.storage.flush()
            meta.refcounts.end_cluster = last + 1
        keep = freed[freed <= last]
        if len(keep):
            # relocated tables may have reused some of these clusters since
            keep = np.sort(keep)
            meta.forget_freed(keep[meta.refcounts.values(keep) == 0], punch=True)

    # ---- compaction -------------------------------------------------------------------
    def compact(
        self, *, discard_zeroes: bool = False, progress: Callable[[int], None] | None = None
    ) -> CompactResult:
        """Move clusters from the end of the file into free holes, then truncate. With
        discard_zeroes, data clusters that read as all zeros are dropped first."""
        self._check_open()
        self.meta.check_writable()
        if self.meta.lazy:
            self.meta.set_dirty_bit()
        try:
            if discard_zeroes:
                self._discard_zero_clusters()
            return compact_mod.compact(self.meta, progress)
        except CorruptionError as exc:
            raise self.meta.mark_corrupt(str(exc)) from None

    def _discard_zero_clusters(self) -> int:
        v2 = self.header.version < 3
        if v2 and self.backing is not None:
            return 0  # an unallocated cluster would show the backing file instead
        mode = "discard" if v2 else "zero_unmap"
        cs = self.cluster_size
        data = self.data_storage or self.storage
        found = 0
        step = 8 << 20
        pos = 0
        while pos < self.virtual_size:
            n = min(step, self.virtual_size - pos)
            zero_clusters: list[int] = []
            for run in self.meta.l2.lookup(pos, n):
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
            for g in zero_clusters:
                self._for_whole_clusters(g, cs, mode)
            found += len(zero_clusters)
            pos += n
        self.meta.release_pending()
        return found

    def as_file(self) -> ImageFile:
        """A seekable binary file object over the virtual disk."""
        self._check_open()
        return ImageFile(self)

    # ---- whole-image helpers --------------------------------------------------------------
    def check(self, repair: str | None = None) -> CheckResult:
        """qemu-img check: repair None, "leaks" or "all" (see metadata.check)."""
        return check_image(self.meta, repair)


class ImageFile(io.RawIOBase):
    """io.RawIOBase view of an Image's virtual disk (read, readinto, write, seek, tell)."""

    def __init__(self, image: Image) -> None:
        super().__init__()
        self.image = image
        self.pos = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return self.image.writable

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            new = offset
        elif whence == io.SEEK_CUR:
            new = self.pos + offset
        elif whence == io.SEEK_END:
            new = self.image.virtual_size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if new < 0:
            raise ValueError("negative seek position")
        self.pos = new
        return new

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        mv = memoryview(b).cast("B")
        n = max(0, min(len(mv), self.image.virtual_size - self.pos))
        if n:
            mv[:n] = self.image.read(self.pos, n)
            self.pos += n
        return n

    def write(self, b: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        mv = memoryview(b).cast("B")
        if self.pos + len(mv) > self.image.virtual_size:
            raise OSError(28, "write past the end of the virtual disk")
        self.image.write(self.pos, mv)
        self.pos += len(mv)
        return len(mv)

    def flush(self) -> None:
        if not self.closed and self.image.writable and not self.image.closed:
            self.image.flush()


__all__ = ["Image", "ImageFile", "RawImage", "open_any", "Qcow2Error"]
