"""The source side of convert (and of compare): a virtual disk read in chunks.

Owns `Source`: which guest ranges read as zeros without any I/O (zero or unallocated
clusters of a qcow2 chain, holes of a raw file found by SEEK_DATA / SEEK_HOLE, never read),
and filling a caller's buffer with guest bytes by preadv straight into it. Also
`iter_chunks` (compare's loop) and `pieces` (the direct host ranges raw output copies).
Only reads: never writes to any image, never opens or closes one (the caller owns the
image's lifetime), and uses only public Image / RawImage attributes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from ...image import Image, RawImage
from ...metadata.l2map import Kind
from ..map import disk_size, host_segments

CHUNK_BYTES = 8 << 20

Segment = tuple[int, int, bool]


class Source:
    """A virtual disk read in chunks, knowing which ranges read as zeros without I/O."""

    def __init__(self, img: Image | RawImage) -> None:
        self.img = img
        self.size = disk_size(img)

    def segments(self, start: int, end: int) -> list[Segment]:
        """(start, end, known_zero) pieces covering [start, end), merged."""
        out: list[Segment] = []
        _segments(self.img, start, end, out)
        return out

    def read_into(self, mv: memoryview, pos: int) -> None:
        """Fill mv with guest bytes from pos (mv need not be zeroed)."""
        _read_into(self.img, mv, pos)


def _add(out: list[Segment], a: int, b: int, zero: bool) -> None:
    if a >= b:
        return
    if out and out[-1][2] == zero and out[-1][1] == a:
        out[-1] = (out[-1][0], b, zero)
    else:
        out.append((a, b, zero))


def _segments(img: Image | RawImage, start: int, end: int, out: list[Segment]) -> None:
    if start >= end:
        return
    if isinstance(img, RawImage):
        fd = getattr(img.storage, "fd", None)
        if fd is None:
            _add(out, start, end, False)
            return
        for a, b, is_data in host_segments(fd, start, end):
            _add(out, a, b, not is_data)
        return
    for run in img.runs(start, end - start):
        a, b = run.guest_offset, run.end
        if run.kind == Kind.ZERO:
            _add(out, a, b, True)
        elif run.kind == Kind.UNALLOCATED:
            if img.backing is None:
                _add(out, a, b, True)
            else:
                bsize = disk_size(img.backing)
                _segments(img.backing, a, min(b, bsize), out)
                _add(out, max(a, bsize), b, True)
        else:
            _add(out, a, b, False)


def preadinto(storage: Any, mv: memoryview, offset: int) -> None:
    """Fill mv from storage at offset; bytes past the end of the storage read as zeros."""
    fd = getattr(storage, "fd", None)
    if fd is None:
        data = storage.pread(offset, len(mv))
        mv[: len(data)] = data
        mv[len(data) :] = bytes(len(mv) - len(data))
        return
    done = 0
    while done < len(mv):
        n = os.preadv(fd, [mv[done:]], offset + done)
        if n <= 0:
            mv[done:] = bytes(len(mv) - done)
            return
        done += n


def _read_into(img: Image | RawImage, mv: memoryview, pos: int) -> None:
    if isinstance(img, RawImage):
        n = max(0, min(len(mv), img.virtual_size - pos))
        if n:
            preadinto(img.storage, mv[:n], pos)
        if n < len(mv):
            mv[n:] = bytes(len(mv) - n)
        return
    data = img.data_storage or img.storage
    for run in img.runs(pos, len(mv)):
        a = run.guest_offset - pos
        b = a + run.length
        if run.kind == Kind.DATA:
            preadinto(data, mv[a:b], run.host_offset)
        elif run.kind == Kind.UNALLOCATED and img.backing is not None:
            bsize = img.backing.virtual_size
            n = max(0, min(run.length, bsize - run.guest_offset))
            if n:
                _read_into(img.backing, mv[a : a + n], run.guest_offset)
            if a + n < b:
                mv[a + n : b] = bytes(b - a - n)
        elif run.kind == Kind.COMPRESSED:
            mv[a:b] = img.read(run.guest_offset, run.length)
        else:
            mv[a:b] = bytes(b - a)


def pieces(src: Source, a: int, b: int, piece: int) -> Iterator[tuple[int, int, int, Any]]:
    """(guest offset, length, host offset, storage) pieces of at most `piece` bytes over
    [a, b); host offset -1 means "read through the image" (compressed, backing, zero)."""
    img = src.img
    if isinstance(img, RawImage):
        for pos in range(a, b, piece):
            yield pos, min(piece, b - pos), pos, img.storage
        return
    data = img.data_storage or img.storage
    span = 256 << 20
    for lo in range(a, b, span):
        for run in img.runs(lo, min(span, b - lo)):
            direct = run.kind == Kind.DATA
            for pos in range(run.guest_offset, run.end, piece):
                n = min(piece, run.end - pos)
                host = run.host_offset + (pos - run.guest_offset) if direct else -1
                yield pos, n, host, data


def iter_chunks(src: Source, chunk: int = CHUNK_BYTES) -> Iterator[tuple[int, memoryview | None]]:
    """(offset, data or None when known zero) over the whole disk, in pieces <= chunk. The
    data view is reused by the next step."""
    buf = bytearray(chunk)
    for a, b, zero in src.segments(0, src.size):
        pos = a
        while pos < b:
            n = min(chunk, b - pos)
            if zero:
                yield pos, None
            else:
                mv = memoryview(buf)[:n]
                src.read_into(mv, pos)
                yield pos, mv
            pos += n


__all__ = ["CHUNK_BYTES", "Segment", "Source", "iter_chunks", "pieces", "preadinto"]
