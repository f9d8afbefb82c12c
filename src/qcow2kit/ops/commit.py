"""commit: write the data an overlay (and the images between it and the base) holds into
its base, as `qemu-img commit` 7.2 does (QEMU's active commit, a mirror job), then empty the
overlay unless asked to keep it.

Owns: finding the base in the backing chain (by the stored name or the same file), the
ranges to copy (everything allocated above the base, in the mirror's granularity: the base's
cluster size between 4 KiB and 64 KiB), the choice per piece between copying the bytes and
writing zero clusters (a piece that reads as zeros, is not data, and covers whole base
clusters), and the emptying of the overlay. Crash safety: the base only ever gains bytes the
overlay already showed (ordinary writes, each crash-safe), and is flushed and closed before
the overlay is emptied, so an interruption leaves both images consistent and the overlay's
disk unchanged. Never writes to the images between the overlay and the base.
"""

from __future__ import annotations

import bisect
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import CorruptionError, InvalidArgumentError, Qcow2Error
from ..format import constants as C
from ..format.features import Incompatible
from ..format.geometry import Geometry
from ..format.tables import encode_refblock, refcount_dtype
from ..image import Image, RawImage, open_any
from ..io.file import FileStorage
from ..io.storage import Storage
from ..metadata import header_io, mapping
from ..metadata.l2map import Kind

MAX_IO_BYTES = 1 << 20
Progress = Callable[[float], None]


class CommitError(Qcow2Error):
    """A commit qemu-img refuses (no backing file, base not in the chain)."""


@dataclass(frozen=True, slots=True)
class CommitResult:
    base: str
    copied_bytes: int
    zeroed_bytes: int
    emptied: bool


def _chain(top: Image) -> list[Image | RawImage]:
    out: list[Image | RawImage] = [top]
    cur: Image | RawImage = top
    while isinstance(cur, Image) and cur.backing is not None:
        cur = cur.backing
        out.append(cur)
    return out


def find_base(top: Image, name: str | None) -> int:
    """Index in the chain (1 = the backing file) of the base `name` names: the backing name
    stored in the image above it, or the same file by path (relative to the current
    directory). None means the backing file."""
    chain = _chain(top)
    if len(chain) < 2:
        raise CommitError("Image does not have a backing file")
    if name is None:
        return 1
    want = os.path.realpath(name) if name else None
    for i in range(1, len(chain)):
        above = chain[i - 1]
        assert isinstance(above, Image)
        if above.header.backing_file == name:
            return i
        if want is not None and os.path.realpath(chain[i].filename) == want:
            return i
    raise CommitError(f"Did not find '{name}' in the backing chain of '{top.filename}'")


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _allocated_above(chain: list[Image | RawImage], base_index: int,
                     size: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Merged [start, end) ranges some image above the base holds (data or zero), and the
    ranges where one of them has zero clusters."""
    spans: list[tuple[int, int]] = []
    zeros: list[tuple[int, int]] = []
    for layer in chain[:base_index]:
        if isinstance(layer, RawImage):
            spans.append((0, min(size, layer.virtual_size)))
            continue
        end = min(size, layer.virtual_size)
        if end <= 0:
            continue
        for run in layer.runs(0, end):
            if run.kind != Kind.UNALLOCATED:
                spans.append((run.guest_offset, run.end))
            if run.kind == Kind.ZERO:
                zeros.append((run.guest_offset, run.end))
    return _merge(spans), _merge(zeros)


def _chunks(ranges: list[tuple[int, int]], granularity: int, size: int) -> list[tuple[int, int]]:
    """The ranges widened to whole granularity chunks (the mirror's dirty bitmap), merged."""
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        lo = a // granularity * granularity
        hi = min(size, -(-b // granularity) * granularity)
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def commit(
    path: str,
    *,
    base: str | None = None,
    drop: bool = False,
    fmt: str | None = None,
    progress: Progress | None = None,
) -> CommitResult:
    """Commit the image at path into its backing file, or into `base` somewhere down its
    chain (which implies drop). Without drop the overlay is emptied afterwards (it then reads
    through to the base)."""
    from ..chain import probe_format

    fmt = fmt or probe_format(path)
    if fmt == "raw":
        raise CommitError("Image does not have a backing file")  # raw has none, as in QEMU
    if fmt != "qcow2":
        raise InvalidArgumentError(f"committing '{fmt}' images is not supported (only qcow2)")
    drop = drop or base is not None
    top = Image.open_path(path, writable=False)
    try:
        index = find_base(top, base)
        chain = _chain(top)
        base_img = chain[index]
        base_path = base_img.filename
        base_fmt = base_img.format_name
        size = top.virtual_size
        allocated, zeros = _allocated_above(chain, index, size)
        target = open_any(base_path, base_fmt, writable=True, backing=True)
        try:
            copied, zeroed = _copy(top, target, allocated, zeros, size, progress)
        finally:
            target.close()
    finally:
        top.close()
    if not drop:
        empty_image(path)
    if progress is not None:
        progress(100.0)
    return CommitResult(base_path, copied, zeroed, not drop)


def empty_image(path: str) -> None:
    """Drop every cluster of the overlay, as QEMU's bdrv_make_empty: a v3 image without
    snapshots, bitmaps or data file is rebuilt as header, reftable, one refblock and the L1
    table in its first clusters and the file cut after them (make_completely_empty, under
    the dirty bit: a crash leaves an image `check -r all` repairs, as QEMU's opening does);
    any other image gets every cluster discarded, which keeps its L2 tables."""
    storage = FileStorage(path, True)
    try:
        header = header_io.read_header(storage)
        geom = Geometry(header.cluster_bits, header.refcount_order, header.extended_l2)
        cs = geom.cluster_size
        l1_clusters = -(-header.l1_size * 8 // cs)
        if (header.version >= 3 and header.nb_snapshots == 0
                and header.extension(C.EXT_BITMAPS) is None and not header.has_data_file
                and 3 + l1_clusters <= geom.refblock_entries):
            make_completely_empty(storage)
            return
    finally:
        storage.close()
    # a fresh open: the overlay's view of the base must not come from tables cached before
    # the base changed
    with Image.open_path(path, writable=True) as img:
        img.discard(0, img.virtual_size)


def make_completely_empty(storage: Storage) -> None:
    """QEMU's make_completely_empty on a v3 image without snapshots, bitmaps or data file
    (callers check): under the dirty bit, the L1 table and clusters 1.. are zeroed, the header
    names a one-cluster reftable at cluster 1, a refblock at 2 and the L1 at 3, the counts are
    written, the dirty bit cleared and the file cut. A crash in between leaves a dirty image
    that `check -r all` (QEMU's and ours, on opening) repairs; every state reads as the
    image before or as an empty one."""
    header = header_io.read_header(storage)
    geom = Geometry(header.cluster_bits, header.refcount_order, header.extended_l2)
    l1_clusters = -(-header.l1_size * 8 // geom.cluster_size)
    cs = geom.cluster_size
    dirty = header.incompatible_features | Incompatible.DIRTY
    # refcounts are about to be wrong on purpose: the dirty bit is durable first
    storage.flush()
    header_io.write_incompatible(storage, dirty)
    storage.flush()
    storage.event("l1_update")
    storage.pwrite(header.l1_table_offset, bytes(l1_clusters * cs))
    storage.flush()
    storage.event("empty_image_prepare")
    storage.pwrite(cs, bytes((2 + l1_clusters) * cs))
    storage.flush()
    # l1_table_offset, refcount_table_offset and refcount_table_clusters in one write
    header_io.write_field(storage, C.HEADER_L1_OFFSET + 4,
                          struct.pack(">QQI", 3 * cs, cs, 1), "l1_update")
    storage.flush()
    storage.event("refblock_alloc")
    storage.pwrite(cs, struct.pack(">Q", 2 * cs))
    storage.flush()
    counts = np.zeros(geom.refblock_entries, dtype=refcount_dtype(geom.refcount_order))
    counts[: 3 + l1_clusters] = 1
    storage.event("refblock_update")
    storage.pwrite(2 * cs, encode_refblock(counts, geom.refcount_order))
    storage.flush()
    header_io.write_incompatible(storage, header.incompatible_features & ~Incompatible.DIRTY)
    storage.flush()
    storage.truncate((3 + l1_clusters) * cs)


def _zero_clusters(img: Image, offset: int, length: int) -> None:
    """Whole clusters become zero clusters with their host clusters freed, as QEMU's zero
    write with MAY_UNMAP: unlike Image.write_zeroes (which leaves a range without an L2
    table alone when there is no backing file), the L2 table is allocated so the base shows
    zero clusters where the overlay had them. v2 images have no zero flag: as in QEMU, they
    discard without a backing file and write zero bytes with one."""
    if img.header.version < 3:
        img.write_zeroes(offset, length, unmap=True)
        return
    img.meta.check_writable()
    if img.meta.lazy:
        img.meta.set_dirty_bit()
    img.bitmaps.mark(offset, length)
    try:
        for pos, end in mapping.l2_chunks(img.meta.geom, offset, length):
            mapping.clear_clusters(img.meta, pos, end, "zero_unmap", has_backing=True)
        img.meta.release_pending()
    except CorruptionError as exc:
        raise img.meta.mark_corrupt(str(exc)) from None


class FastReader:
    """Guest bytes of an image that does not change while it is read: straight from the
    file where a range lies in one run of data clusters (the mapping looked up once for the
    whole disk, one copy of the bytes), through img.read anywhere else."""

    def __init__(self, img: Image | RawImage) -> None:
        self.img = img
        self.runs = img.runs(0, img.virtual_size) if isinstance(img, Image) and \
            img.virtual_size else []
        self.starts = [r.guest_offset for r in self.runs]

    def read(self, pos: int, length: int) -> bytes:
        img = self.img
        if isinstance(img, RawImage):
            return img.read(pos, length)
        i = bisect.bisect_right(self.starts, pos) - 1
        if i >= 0:
            run = self.runs[i]
            if run.kind == Kind.DATA and pos + length <= run.end:
                storage = img.data_storage or img.storage
                return storage.pread(run.host_offset + pos - run.guest_offset, length)
        return img.read(pos, length)


def _write_in_place(img: Image, pos: int, data: bytes) -> bool:
    """Overwrite a range that is one run of data clusters the image alone owns (refcount 1)
    straight in the file, as the write path would (no metadata changes, so no ordering to
    keep); False (nothing written) for any other range, which then takes the write path."""
    meta = img.meta
    if img.header.has_data_file or meta.corrupt or not meta.writable:
        return False
    runs = img.runs(pos, len(data))
    if len(runs) != 1 or runs[0].kind != Kind.DATA:
        return False
    cs = img.cluster_size
    host = runs[0].host_offset
    first, last = host // cs, (host + len(data) - 1) // cs
    if not (meta.refcounts.get_range(first, last - first + 1) == 1).all():
        return False
    clusters = np.arange(first, last + 1, dtype=np.int64) * cs
    try:
        mapping.check_in_place(meta, clusters, "data cluster")
    except CorruptionError as exc:
        raise meta.mark_corrupt(str(exc)) from None
    img.bitmaps.mark(pos, len(data))
    img.storage.pwrite(host, data)
    meta.note_data_written(new_clusters=False)
    return True


def _copy(top: Image, target: Image | RawImage, allocated: list[tuple[int, int]],
          zeros: list[tuple[int, int]], size: int, progress: Progress | None) -> tuple[int, int]:
    from .map import map_image

    # the mirror grows a shorter base to the overlay's size
    if isinstance(target, Image):
        bcs = target.cluster_size
        if target.virtual_size < size:
            target.resize(size)
    else:
        bcs = 512
        if target.storage.size() < size:
            target.storage.truncate(size)
    granularity = min(65536, max(4096, bcs))
    chunks = _chunks(allocated, granularity, size)
    total = sum(b - a for a, b in chunks) or 1
    done = copied = zeroed = 0
    reader = FastReader(top)
    z = 0
    for a, b in chunks:
        while z < len(zeros) and zeros[z][1] <= a:
            z += 1
        # QEMU's status walk decides only where some image above the base has zero
        # clusters; elsewhere every piece is copied
        entries = map_image(top, a, b - a) if z < len(zeros) and zeros[z][0] < b else []
        k = 0
        pos = a
        while pos < b:
            zero = False
            if not entries:
                io = min(b - pos, MAX_IO_BYTES)
            else:
                while entries[k].start + entries[k].length <= pos:
                    k += 1
                e = entries[k]
                io = min(e.start + e.length - pos, b - pos, MAX_IO_BYTES)
                io -= io % granularity
                if io < granularity:
                    io = min(granularity, b - pos)
                elif e.zero and not e.data and pos % bcs == 0 and io % bcs == 0:
                    zero = True
            if zero and isinstance(target, Image):
                _zero_clusters(target, pos, io)
                zeroed += io
            elif zero:
                # a raw base gets a hole, as QEMU's zero write with MAY_UNMAP; punching is
                # best effort, so the bytes are checked and written where it did not work
                target.storage.punch_hole(pos, io)
                if any(target.storage.pread(pos, io)):
                    target.storage.pwrite(pos, bytes(io))
                zeroed += io
            elif isinstance(target, Image):
                data = reader.read(pos, io)
                if not _write_in_place(target, pos, data):
                    target.write(pos, data)
                copied += io
            else:
                target.storage.pwrite(pos, reader.read(pos, io))
                copied += io
            pos += io
            done += io
            if progress is not None:
                progress(min(99.99, done * 100.0 / total))
    if isinstance(target, Image):
        target.flush()
    else:
        target.storage.flush()
    return copied, zeroed


__all__ = ["CommitError", "CommitResult", "commit", "find_base", "FastReader",
           "make_completely_empty", "empty_image"]
