"""Image: an open qcow2 image, its lifecycle, and the guest I/O loops.

Owns: opening (the file, its data file and backing chain through chain.py; open-time
checks; the promises dropped before the first write; the dirty-image repair), closing, and
the loops that move guest bytes: read over the runs metadata answers, write as plan ->
fills -> allocate -> one pwrite per contiguous host run -> commit, zero writes and
discards over whole clusters. Every ordering rule lives in metadata; resize and compaction
orchestration live in resizing.py and compaction.py, the file object in imagefile.py.

A guest write, function by function: Image.write -> write_guest -> _write_piece ->
mapping.plan_write -> (read the fills) -> mapping.allocate_write -> _write_host_runs ->
storage.pwrite -> mapping.commit_write; then Metadata.release_pending.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .chain import MAX_BACKING_DEPTH, RawImage, Readable, backing_path, open_data_file, open_raw, probe_format
from .errors import CorruptionError, FormatError, ImageStateError, InvalidArgumentError, UnsupportedFeatureError
from .format.compression import compress_clusters, decompress
from .format.features import Incompatible
from .format.header import Header
from .format.snapshot import Snapshot
from .hostwrite import write_host_runs
from .imagefile import ImageFile
from .io.file import FileStorage
from .io.storage import Storage
from .metadata import header_io, mapping
from .metadata.bitmaps import Bitmaps
from .metadata.l2map import Kind, Run
from .metadata.meta import Metadata

if TYPE_CHECKING:
    # imported where used: a command that only reads pays for none of them at start-up
    from .metadata.check import CheckResult
    from .metadata.compact import CompactResult
    from .metadata.compressed import CompressedPacker

ZERO_WRITE_BYTES = 4 << 20


def open_any(
    path: str,
    fmt: str | None = None,
    *,
    writable: bool = False,
    force_share: bool = False,
    backing: bool = True,
    chain: tuple[str, ...] = (),
) -> Image | RawImage:
    """Open a file as qcow2 or raw (probing when fmt is None)."""
    fmt = fmt or probe_format(path)
    if fmt == "qcow2":
        return Image.open_path(
            path, writable=writable, force_share=force_share, backing=backing, chain=chain
        )
    if fmt == "raw":
        return open_raw(path, writable=writable, force_share=force_share)
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
        chain: tuple[str, ...] = (),
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
                self.data_storage = data_storage or open_data_file(
                    self.filename, header, storage.writable
                )
            self.meta = Metadata(storage, header, data_storage=self.data_storage)
            self.bitmaps = Bitmaps(self.meta)  # persistent dirty bitmaps (img.bitmaps)
            if backing and header.backing_file:  # an empty name means none, as in QEMU
                self.backing = self._open_backing(header, chain)
            if storage.writable:
                # before anything else is written: bitmaps in use, and no feature bit
                # left claiming what our writes will not maintain
                self.bitmaps.start_writing()
                if header.incompatible_features & Incompatible.DIRTY:
                    self._repair_dirty()
        except BaseException:
            self._close_children()
            raise
        self._zbuf_key = -1
        self._zbuf = b""
        self._packer: CompressedPacker | None = None

    # ---- opening ------------------------------------------------------------------------
    @classmethod
    def open_path(
        cls,
        path: str,
        *,
        writable: bool = False,
        force_share: bool = False,
        backing: bool = True,
        chain: tuple[str, ...] = (),
    ) -> Image:
        storage = FileStorage(path, writable, force_share=force_share)
        try:
            return cls(storage, backing=backing, chain=chain)
        except BaseException:
            storage.close()
            raise

    def _validate_open(self, header: Header) -> None:
        """Open-time checks that need the file size: every table the header points at lies
        inside the file, so nothing is read (or allocated) in proportion to a header field
        that the file cannot back."""
        if header.incompatible_features & Incompatible.CORRUPT and self.storage.writable:
            raise ImageStateError(
                f"{self.filename}: Image is corrupt; cannot be opened read/write "
                "(run 'qcow2kit check -r all' to repair it)"
            )
        header.check_fits(self.storage.size())

    def _open_backing(self, header: Header, chain: tuple[str, ...]) -> Image | RawImage:
        path, deeper = backing_path(self.filename, header, chain)
        try:
            return open_any(path, header.backing_format, force_share=True, chain=deeper)
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
            raise InvalidArgumentError(
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

    def read_guest(self, offset: int, length: int) -> bytes:
        """Guest bytes with no range or state check (for whole-image operations, which may
        look past the current end while it moves)."""
        if length <= 0:
            return b""
        out = bytearray(length)
        self._read_into(memoryview(out), offset)
        return bytes(out)

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
        # one cluster kept: sequential reads of a compressed cluster decompress it once
        if self._zbuf_key != run.host_offset:
            raw = self.storage.pread(run.host_offset, run.comp_bytes)
            self._zbuf = decompress(raw, self.cluster_size, self.header.compression_type)
            self._zbuf_key = run.host_offset
        return self._zbuf

    # ---- writing ------------------------------------------------------------------------
    def _begin_write(self) -> None:
        self._zbuf_key = -1  # the cached decompressed cluster may be freed and reused
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
            self.bitmaps.mark(offset, len(mv))
            self.write_guest(offset, mv)
            self.meta.release_pending()
        except CorruptionError as exc:
            raise self.meta.mark_corrupt(str(exc)) from None

    def write_guest(self, offset: int, data: memoryview) -> None:
        """The write loop without range or state checks (whole-image operations call it
        after their own checks); refcount drops stay queued for the caller to release."""
        for pos, end in mapping.l2_chunks(self.meta.geom, offset, len(data)):
            self._write_piece(pos, data[pos - offset : end - offset])

    def _write_piece(self, pos: int, buf: memoryview) -> None:
        """Write guest bytes that lie within one L2 table."""
        meta = self.meta
        plan = mapping.plan_write(meta, pos, pos + len(buf))
        # old content around partial writes to new clusters, read before anything changes
        cs = self.cluster_size
        fills = {
            i: (self.read_guest(*head), self.read_guest(*tail)) for i, head, tail in plan.fills(cs)
        }
        mapping.allocate_write(meta, plan)
        # data reaches the storage before the L2 entries that point at it
        write_host_runs(self.data_storage or self.storage, buf, pos, plan, fills, cs)
        mapping.commit_write(meta, plan)

    # ---- compressed clusters ------------------------------------------------------------
    def write_compressed(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write whole clusters compressed with the image's compression type. The offset
        must be cluster-aligned and the length whole clusters (or end at the disk end). A
        cluster that does not shrink is stored uncompressed, as QEMU does."""
        mv = memoryview(data).cast("B")
        self._check_range(offset, len(mv))
        cs = self.cluster_size
        if offset % cs or (len(mv) % cs and offset + len(mv) != self.virtual_size):
            raise InvalidArgumentError(
                f"compressed writes cover whole clusters of {cs} bytes "
                f"(got offset {offset}, length {len(mv)})"
            )
        packed, plain = compress_clusters(mv, cs, self.header.compression_type)
        self.write_compressed_clusters([(offset + pos, out) for pos, out in packed])
        for pos in plain:
            self.write(offset + pos, mv[pos : pos + cs])

    def write_compressed_clusters(self, items: list[tuple[int, bytes]]) -> None:
        """Store already-compressed clusters: (guest cluster offset, compressed bytes),
        each shorter than a cluster and made with the image's compression type. For
        pipelines that compress in parallel; packs them at byte granularity."""
        if not items:
            return
        cs = self.cluster_size
        for guest, packed in items:
            if guest % cs or not 0 <= guest < self.virtual_size or not 0 < len(packed) < cs:
                raise InvalidArgumentError(
                    f"compressed cluster at {guest} ({len(packed)} bytes) is not a whole "
                    f"cluster inside the disk, compressed below {cs} bytes"
                )
        self._begin_write()
        if self.header.has_data_file:
            raise UnsupportedFeatureError("compressed clusters cannot be written with a data file")
        if self._packer is None:
            from .metadata.compressed import CompressedPacker

            self._packer = CompressedPacker(self.meta)
        sizes = [len(packed) for _, packed in items]
        for guest, _ in items:
            self.bitmaps.mark(guest, cs)
        try:
            placement = self._packer.place([g for g, _ in items], sizes)
            # the bytes reach the storage before the L2 entries that point at them
            self._packer.write_payload(placement, [packed for _, packed in items])
            self._packer.install(placement, sizes)
            self.meta.release_pending()
        except CorruptionError as exc:
            raise self.meta.mark_corrupt(str(exc)) from None

    # ---- zeroes and discard ---------------------------------------------------------------
    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make the guest range read zeros, using zero clusters where the format allows."""
        self._check_range(offset, length)
        self._begin_write()
        try:
            self.bitmaps.mark(offset, length)
            v2 = self.header.version < 3 and not self.meta.geom.extended_l2
            if v2 and self.backing is not None:
                self.write_zero_bytes(offset, length)
            else:
                self.clear_guest(offset, length, "discard" if v2 else
                                 ("zero_unmap" if unmap else "zero"))
            self.meta.release_pending()
        except CorruptionError as exc:
            raise self.meta.mark_corrupt(str(exc)) from None

    def discard(self, offset: int, length: int) -> None:
        """Drop the guest range: it reads as zeros, or as the backing file, afterwards."""
        self._check_range(offset, length)
        self._begin_write()
        try:
            self.bitmaps.mark(offset, length)
            self.clear_guest(offset, length, "discard")
            self.meta.release_pending()
        except CorruptionError as exc:
            raise self.meta.mark_corrupt(str(exc)) from None

    def write_zero_bytes(self, offset: int, length: int) -> None:
        """Real zero bytes through the write loop (v2 images over a backing file have no
        zero clusters)."""
        zeros = bytes(min(ZERO_WRITE_BYTES, length))
        pos = offset
        while pos < offset + length:
            n = min(ZERO_WRITE_BYTES, offset + length - pos)
            self.write_guest(pos, memoryview(zeros)[:n])
            pos += n

    def clear_guest(self, offset: int, length: int, mode: str) -> None:
        """Whole clusters of the range become zero clusters or unallocated (see
        mapping.clear_clusters); partial clusters at either end get the bytes the mode
        means, through the write loop. No range or state check."""
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
        has_backing = self.backing is not None
        for pos, piece_end in mapping.l2_chunks(self.meta.geom, a, b - a):
            mapping.clear_clusters(self.meta, pos, piece_end, mode, has_backing=has_backing)

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
            self.write_guest(offset, memoryview(wanted))

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
                self.bitmaps.store()
                self.meta.flush()
                if self.meta.lazy:
                    self.meta.clear_dirty_bit()
        finally:
            self.closed = True
            self._close_children()
            self.storage.close()

    # ---- whole-image operations -----------------------------------------------------------
    def resize(self, new_size: int, *, shrink: bool = False, preallocation: str = "off") -> None:
        """Change the virtual size; shrinking needs shrink=True and frees everything past
        the new end, crash-safely (see resizing.py)."""
        self._check_open()
        from . import resizing

        resizing.resize(self, new_size, shrink=shrink, preallocation=preallocation)

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
            self.bitmaps.detach()  # stored anew on close, where compaction left room
            from . import compaction

            return compaction.compact(self, discard_zeroes=discard_zeroes, progress=progress)
        except CorruptionError as exc:
            raise self.meta.mark_corrupt(str(exc)) from None

    def create_snapshot(self, name: str) -> Snapshot:
        """Snapshot the active disk (qemu-img snapshot -c); see metadata/snapshots.py."""
        self._begin_write()
        self.flush()
        from .metadata import snapshots

        return snapshots.create(self.meta, name)

    def apply_snapshot(self, id_or_name: str) -> Snapshot:
        """Revert the disk, and its size, to a snapshot (qemu-img snapshot -a)."""
        from .metadata import snapshots

        self._begin_write()
        if len(self.bitmaps):
            raise snapshots.ActiveBitmapsError("Device has active dirty bitmaps")
        self.flush()
        return snapshots.apply(self.meta, id_or_name)

    def delete_snapshot(self, id_or_name: str) -> Snapshot:
        """Delete a snapshot (qemu-img snapshot -d), freeing what only it held."""
        self._begin_write()
        self.flush()
        from .metadata import snapshots

        return snapshots.delete(self.meta, id_or_name)

    def as_file(self) -> ImageFile:
        """A seekable binary file object over the virtual disk."""
        self._check_open()
        return ImageFile(self)

    def check(self, repair: str | None = None) -> CheckResult:
        """qemu-img check: repair None, "leaks" or "all" (see metadata.check)."""
        from .metadata.check import check_image

        return check_image(self.meta, repair)


__all__ = ["Image", "ImageFile", "RawImage", "Readable", "open_any", "MAX_BACKING_DEPTH"]
