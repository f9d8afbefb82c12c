"""commit_copy: the copy loop of `commit` (ops/commit.py): the chunks some image above the
base holds, from the overlay's view of the disk into the base, as QEMU's mirror job writes
them (bytes, or zero clusters where the overlay has zero clusters).

Owns how the bytes move, which is most of a commit's time:
- the pieces are planned first (reads of the overlay chain never depend on the writes), so a
  background thread (ops/prefetch.py) reads a few pieces ahead of the writes (pread releases
  the interpreter);
- where the base's own data clusters (refcount 1, not metadata) take a piece, it is written
  straight into the file. InPlace looks the base's mapping up a window at a time, not once
  per piece, and only while nothing but these writes changed the base: after any other
  write its window is looked up again;
- the kernel is asked to start writing the base's dirty pages back as the copy goes
  (FileStorage.start_writeback), so the final flush has less left to wait for;
- when the overlay is emptied afterwards, its page cache is dropped as it is read, so
  emptying it does not pay for that.
FastReader (guest bytes of an image that does not change while it is read) is shared with
rebase. Crash safety is commit.py's: only ordinary writes of bytes the overlay shows, each
crash-safe, and the base flushed before anything else happens.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable

import numpy as np

from ..errors import CorruptionError
from ..image import Image, RawImage
from ..io.file import FileStorage
from ..io.storage import Storage
from ..metadata import mapping, overlap
from ..metadata.l2map import Kind
from .prefetch import Prefetch

MAX_IO_BYTES = 1 << 20
# the base's write-back is started every this many bytes written
WRITEBACK_BYTES = 16 << 20
# the base's mapping is looked up this much at a time for in-place writes
WINDOW_BYTES = 64 << 20
Progress = Callable[[float], None]


class FastReader:
    """Guest bytes of an image that does not change while it is read: straight from the
    file where a range lies in one run of data clusters (the mapping looked up once for the
    whole disk, one copy of the bytes), through img.read anywhere else. With drop_cache, the
    page cache of what was read from the image's own file is dropped after each read (the
    image is about to be emptied)."""

    def __init__(self, img: Image | RawImage, *, drop_cache: bool = False) -> None:
        self.img = img
        self.runs = img.runs(0, img.virtual_size) if isinstance(img, Image) and \
            img.virtual_size else []
        self.starts = [r.guest_offset for r in self.runs]
        storage = img.storage if isinstance(img, Image) and img.data_storage is None else None
        self.drop_fd = storage.fd if drop_cache and isinstance(storage, FileStorage) else None

    def read(self, pos: int, length: int) -> bytes:
        img = self.img
        if isinstance(img, RawImage):
            return img.read(pos, length)
        i = bisect.bisect_right(self.starts, pos) - 1
        if i >= 0:
            run = self.runs[i]
            if run.kind == Kind.DATA and pos + length <= run.end:
                storage = img.data_storage or img.storage
                host = run.host_offset + pos - run.guest_offset
                data = storage.pread(host, length)
                if self.drop_fd is not None:
                    os.posix_fadvise(self.drop_fd, host, length, os.POSIX_FADV_DONTNEED)
                return data
        return img.read(pos, length)


class InPlace:
    """Where the base takes bytes straight into its file: ranges of its data clusters that it
    alone owns (refcount 1) and that are not metadata, found a window of WINDOW_BYTES at a
    time. write() returns False (nothing written) for any other range, which the caller then
    writes through Image.write and reports with changed(): the window is looked up again."""

    def __init__(self, img: Image) -> None:
        self.img = img
        meta = img.meta
        self.usable = not (img.header.has_data_file or meta.corrupt or not meta.writable)
        self.window = (0, 0)
        self.window_bytes = WINDOW_BYTES
        self.starts: list[int] = []
        self.spans: list[tuple[int, int, int]] = []  # guest start, guest end, host start

    def changed(self) -> None:
        """The base was written some other way: look its mapping up again, a piece's worth
        first (a base that takes few pieces in place must not pay for whole windows), then
        twice as much each time, up to WINDOW_BYTES."""
        self.window = (0, 0)
        self.window_bytes = MAX_IO_BYTES

    def _look_up(self, pos: int, length: int) -> None:
        img, meta = self.img, self.img.meta
        cs = img.cluster_size
        lo = pos // cs * cs
        hi = min(img.virtual_size, max(lo + self.window_bytes, pos + length))
        self.window = (lo, hi)
        self.window_bytes = min(WINDOW_BYTES, 2 * self.window_bytes)
        self.starts, self.spans = [], []
        runs = [r for r in img.runs(lo, hi - lo)
                if r.kind == Kind.DATA and r.guest_offset % cs == 0 and r.host_offset % cs == 0]
        if not runs:
            return
        # one row per cluster of every data run: its run, guest offset and host cluster
        counts = np.array([-(-r.length // cs) for r in runs], dtype=np.int64)
        run = np.repeat(np.arange(len(runs)), counts)
        k = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        guest = np.array([r.guest_offset for r in runs], dtype=np.int64)[run] + k * cs
        host = np.array([r.host_offset // cs for r in runs], dtype=np.int64)[run] + k
        order = np.argsort(host, kind="stable")
        owned = np.empty(len(host), dtype=bool)
        owned[order] = meta.refcounts.values(host[order]) == 1
        # a cluster past the end of the file or inside metadata (a damaged image) is left to
        # Image.write, which refuses it when, and only if, a piece is written there
        owned &= host < meta.refcounts.end_cluster
        for _name, held in overlap.regions(meta):
            if len(held):
                owned &= ~np.isin(host, held)
        # stretches of owned clusters inside one run (contiguous in guest and in host)
        same = np.concatenate(([False], (run[1:] == run[:-1]) & owned[1:] & owned[:-1]))
        firsts = np.flatnonzero(owned & ~same)
        lasts = np.flatnonzero(owned & ~np.concatenate((same[1:], [False])))
        for a, b in zip(firsts.tolist(), lasts.tolist(), strict=True):
            g0 = int(guest[a])
            g1 = min(runs[int(run[b])].end, int(guest[b]) + cs)
            self.starts.append(g0)
            self.spans.append((g0, g1, int(host[a]) * cs))

    def write(self, pos: int, data: bytes) -> bool:
        if not self.usable:
            return False
        lo, hi = self.window
        if not lo <= pos <= pos + len(data) <= hi:
            self._look_up(pos, len(data))
        i = bisect.bisect_right(self.starts, pos) - 1
        if i < 0:
            return False
        g0, g1, host = self.spans[i]
        if pos + len(data) > g1:
            return False
        img = self.img
        img.bitmaps.mark(pos, len(data))
        img.storage.pwrite(host + pos - g0, data)
        img.meta.note_data_written(new_clusters=False)
        return True


class Writeback:
    """Starts the write-back of a file every WRITEBACK_BYTES written to it (see
    FileStorage.start_writeback); nothing for other storages."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage if isinstance(storage, FileStorage) else None
        self.pending = 0

    def wrote(self, length: int) -> None:
        self.pending += length
        if self.pending >= WRITEBACK_BYTES and self.storage is not None:
            self.storage.start_writeback()
            self.pending = 0


def chunks(ranges: list[tuple[int, int]], granularity: int, size: int) -> list[tuple[int, int]]:
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


def _pieces(top: Image, allocated: list[tuple[int, int]], zeros: list[tuple[int, int]],
            size: int, granularity: int, bcs: int) -> list[tuple[int, int, bool]]:
    """(offset, length, zero) of every piece to commit, in order: QEMU's status walk decides
    only where some image above the base has zero clusters (a piece that reads as zeros, is
    not data, and covers whole base clusters becomes zero clusters); elsewhere every piece is
    copied, MAX_IO_BYTES at most."""
    from .map import map_image

    out: list[tuple[int, int, bool]] = []
    z = 0
    for a, b in chunks(allocated, granularity, size):
        while z < len(zeros) and zeros[z][1] <= a:
            z += 1
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
            out.append((pos, io, zero))
            pos += io
    return out


def zero_clusters(img: Image, offset: int, length: int) -> None:
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


def copy_into(top: Image, target: Image | RawImage, allocated: list[tuple[int, int]],
              zeros: list[tuple[int, int]], size: int, progress: Progress | None, *,
              drop_cache: bool = False) -> tuple[int, int]:
    """Commit the pieces of `allocated` (the ranges some image above the base holds; `zeros`
    where one has zero clusters) from top's view into target, then flush target; (bytes
    copied, bytes zeroed). drop_cache: top is emptied afterwards (see FastReader)."""
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
    pieces = _pieces(top, allocated, zeros, size, granularity, bcs)
    total = sum(io for _, io, _ in pieces) or 1
    done = copied = zeroed = 0
    in_place = InPlace(target) if isinstance(target, Image) else None
    writeback = Writeback((target.data_storage or target.storage) if isinstance(target, Image)
                          else target.storage)
    reader = FastReader(top, drop_cache=drop_cache)
    with Prefetch(reader.read(pos, io) for pos, io, zero in pieces if not zero) as ahead:
        data_pieces = iter(ahead)
        for pos, io, zero in pieces:
            if zero and isinstance(target, Image):
                zero_clusters(target, pos, io)
                assert in_place is not None
                in_place.changed()
                zeroed += io
            elif zero:
                # a raw base gets a hole, as QEMU's zero write with MAY_UNMAP; punching is
                # best effort, so the bytes are checked and written where it did not work
                target.storage.punch_hole(pos, io)
                if target.storage.pread(pos, io) != bytes(io):
                    target.storage.pwrite(pos, bytes(io))
                zeroed += io
            elif isinstance(target, Image):
                assert in_place is not None
                data = next(data_pieces)
                if not in_place.write(pos, data):
                    target.write(pos, data)
                    in_place.changed()
                copied += io
            else:
                target.storage.pwrite(pos, next(data_pieces))
                copied += io
            done += io
            writeback.wrote(io)
            if progress is not None:
                progress(min(99.99, done * 100.0 / total))
    if isinstance(target, Image):
        target.flush()
    else:
        target.storage.flush()
    return copied, zeroed


__all__ = ["FastReader", "InPlace", "Writeback", "chunks", "copy_into", "zero_clusters",
           "MAX_IO_BYTES"]
