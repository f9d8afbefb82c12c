"""The source side of convert (and of compare): a virtual disk read in chunks.

Owns `Source`: which guest ranges read as zeros without any I/O (zero or unallocated
clusters of a qcow2 chain, holes of a raw file found by SEEK_DATA / SEEK_HOLE, never read),
and filling a caller's buffer with guest bytes by preadv straight into it (2 MiB per
syscall). `ReadAhead` runs those reads, and a scan of each chunk, on a reader thread
ahead of the writer; `iter_chunks` is compare's loop. Only reads: never writes to any
image, never opens or closes one (the caller owns the image's lifetime), and uses only
public Image / RawImage attributes.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Generic, TypeVar

from ...image import Image, RawImage
from ...metadata.l2map import Kind
from ..map import disk_size, host_segments

CHUNK_BYTES = 8 << 20
# one read syscall copies at most this much (large single copies measured slower; see
# FileStorage.pwrite)
READ_PIECE = 2 << 20

Segment = tuple[int, int, bool]
T = TypeVar("T")


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
        n = os.preadv(fd, [mv[done : done + READ_PIECE]], offset + done)
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


class ReadAhead(Generic[T]):
    """Read ranges of a Source on a reader thread, `depth` chunks ahead of the consumer.

    Iterating yields (guest offset, view, scan(view)) for every chunk of at most `chunk`
    bytes of each [a, b) range, in order; `scan` runs on the reader thread too (numpy
    releases the GIL while it scans). A view is valid until the next item is asked for: its
    buffer then goes back to the reader. Only the reader thread touches the source image
    while this is open; an error on it is raised in the consumer. Use as a context manager:
    leaving stops the thread. depth=0: no thread, the consumer reads each chunk itself when
    it asks for it (less CPU in all: no hand-over between cores, no GIL traffic)."""

    def __init__(
        self,
        src: Source,
        ranges: list[tuple[int, int]],
        chunk: int,
        scan: Callable[[memoryview], T],
        depth: int = 4,
    ) -> None:
        self._src = src
        self._ranges = ranges
        self._chunk = chunk
        self._scan = scan
        self._stop = False
        self._depth = depth
        # a None in `free` tells the reader to stop
        self._free: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
        for _ in range(depth + 1):
            self._free.put(bytearray(chunk))
        self._ready: queue.SimpleQueue[tuple[int, bytearray, int, T] | BaseException | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._read, name="qcow2kit-convert-reader",
                                        daemon=True)

    def _read(self) -> None:
        try:
            for a, b in self._ranges:
                for pos in range(a, b, self._chunk):
                    buf = self._free.get()
                    if buf is None or self._stop:
                        return
                    n = min(self._chunk, b - pos)
                    mv = memoryview(buf)[:n]
                    self._src.read_into(mv, pos)
                    self._ready.put((pos, buf, n, self._scan(mv)))
            self._ready.put(None)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._ready.put(exc)

    def __enter__(self) -> ReadAhead[T]:
        if self._depth:
            self._thread.start()
        return self

    def __exit__(
        self,
        et: type[BaseException] | None,
        ev: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop = True
        if self._depth:
            self._free.put(None)
            self._thread.join()

    def __iter__(self) -> Iterator[tuple[int, memoryview, T]]:
        if not self._depth:
            yield from self._read_here()
            return
        prev: bytearray | None = None
        while True:
            item = self._ready.get()
            if prev is not None:
                self._free.put(prev)
                prev = None
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            pos, buf, n, extra = item
            prev = buf
            yield pos, memoryview(buf)[:n], extra

    def _read_here(self) -> Iterator[tuple[int, memoryview, T]]:
        buf = self._free.get()
        assert buf is not None
        for a, b in self._ranges:
            for pos in range(a, b, self._chunk):
                mv = memoryview(buf)[: min(self._chunk, b - pos)]
                self._src.read_into(mv, pos)
                yield pos, mv, self._scan(mv)


__all__ = ["CHUNK_BYTES", "ReadAhead", "Segment", "Source", "iter_chunks", "preadinto"]
