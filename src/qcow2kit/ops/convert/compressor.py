"""Compressing clusters for convert -c: the per-thread compression functions, and
`CompressPump`, which reads a raw source and compresses its clusters on threads of its own,
started before numpy and the image code are imported.

Owns the compression of one group of clusters (`compress_group`: the same bytes as
format.compression.compress, with one zstd context per thread) and, for a raw source, the
whole read-and-compress side: a reader thread (preadv into a fresh buffer per group of
clusters, all-zero clusters left out as the -S rule says) and worker threads that compress
the groups. The writer (qcow2out.py, once the image exists) takes the results in guest
order. At most PUMP_INFLIGHT groups are read ahead of the writer.

Pure Python: must not import numpy or qcow2kit.image. Only reads the source.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import zlib
from collections.abc import Callable, Iterator

from ...format import constants as C
from ...io.file import FileStorage
from .rawpump import data_pieces, read_at

# compression threads (zlib and zstd release the GIL while they work)
COMPRESS_WORKERS = max(4, 2 * (os.cpu_count() or 2))
# input bytes per compression job
COMPRESS_GROUP_BYTES = 256 << 10
# jobs read ahead of the writer (bounds the memory: 64 MiB of input)
PUMP_INFLIGHT = 256

Compressed = list[tuple[int, memoryview, "bytes | None"]]
_local = threading.local()  # per compression thread: its zstd context


def compress_function(ctype: int) -> Callable[[bytes | bytearray | memoryview], bytes]:
    """format.compression.compress for this thread: the same bytes (zlib: raw deflate,
    window bits 12, memLevel 9; zstd: level 3 with the content size), but one zstd context
    per thread instead of one per cluster."""
    if ctype != C.COMPRESSION_ZSTD:
        def deflate(data: bytes | bytearray | memoryview) -> bytes:
            c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
            return c.compress(data) + c.flush()

        return deflate
    zstd = getattr(_local, "zstd", None)
    if zstd is None:
        import zstandard

        zstd = _local.zstd = zstandard.ZstdCompressor()
    out: Callable[[bytes | bytearray | memoryview], bytes] = zstd.compress
    return out


def compress_group(data: bytes | bytearray, guests: list[int], offsets: list[int], cs: int,
                   ctype: int) -> Compressed:
    """Compress the clusters of one job: (guest offset, data, compressed bytes, or None
    where compressing does not shrink the cluster)."""
    compress_one = compress_function(ctype)
    mv = memoryview(data)
    out: Compressed = []
    for guest, off in zip(guests, offsets, strict=True):
        piece = mv[off : off + cs]
        if len(piece) < cs:  # a disk may end inside its last cluster
            packed = compress_one(bytes(piece) + bytes(cs - len(piece)))
        else:
            packed = compress_one(piece)
        out.append((guest, piece, packed if len(packed) < cs else None))
    return out


Job = tuple[int, bytearray, list[int], list[int]]  # (sequence number, data, guests, offsets)


class CompressPump:
    """Read `ranges` (cluster-aligned [lo, hi) byte ranges, hi capped at the disk's end) of
    a raw source and compress their clusters; iterate `results()` for them in guest order.
    `close()` stops and joins every thread; an error on any thread is raised by results()."""

    def __init__(self, source: FileStorage, ranges: list[tuple[int, int]], cs: int,
                 ctype: int, sparse: bool) -> None:
        self.source = source
        self.ranges = ranges
        self.cs = cs
        self.ctype = ctype
        self.sparse = sparse
        self.error: BaseException | None = None
        self._stop = False
        self._slots = threading.Semaphore(PUMP_INFLIGHT)
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[int, Compressed] | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._guard, args=(self._read,), daemon=True,
                                          name="qcow2kit-convert-reader")]
        self._threads += [
            threading.Thread(target=self._guard, args=(self._work,), daemon=True,
                             name=f"qcow2kit-convert-compress{i}")
            for i in range(COMPRESS_WORKERS)
        ]
        self._count = -1  # jobs in all, once the reader knows
        self._interval = sys.getswitchinterval()

    def start(self) -> CompressPump:
        # a worker back from compressing gets the GIL soon (the default 5 ms would leave
        # it waiting behind the importing thread)
        sys.setswitchinterval(min(self._interval, 0.0005))
        for t in self._threads:
            t.start()
        return self

    def _guard(self, body: Callable[[], None]) -> None:
        try:
            body()
        except BaseException as exc:  # raised by results()
            if self.error is None:
                self.error = exc
            self._stop = True
            self._done.put(None)
            for _ in self._threads:
                self._jobs.put(None)
            self._slots.release()

    def _read(self) -> None:
        cs = self.cs
        fd = self.source.fd
        group = max(1, COMPRESS_GROUP_BYTES // cs) * cs
        zero = bytes(cs)
        zeros = bytes(group)
        needle = zero[:4096]
        seq = 0
        for a, b in self.ranges:
            for pos in range(a, b, group):
                n = min(group, b - pos)
                buf = bytearray(n)
                read_at(fd, memoryview(buf), pos)
                tail = -n % cs
                pieces = data_pieces(buf + zero[:tail] if tail else buf, n + tail, cs, needle,
                                     zeros) if self.sparse else [(0, n)]
                offsets = [off for lo, hi in pieces for off in range(lo, min(hi, n), cs)]
                if not offsets:
                    continue
                self._slots.acquire()
                if self._stop:
                    return
                self._jobs.put((seq, buf, [pos + off for off in offsets], offsets))
                seq += 1
        self._count = seq
        self._done.put(None)  # wakes results() to notice the count
        for _ in range(COMPRESS_WORKERS):
            self._jobs.put(None)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self._stop:
                return
            seq, buf, guests, offsets = job
            self._done.put((seq, compress_group(buf, guests, offsets, self.cs, self.ctype)))

    def results(self) -> Iterator[Compressed]:
        """Each job's results, in guest order."""
        pending: dict[int, Compressed] = {}
        expected = 0
        while self._count < 0 or expected < self._count:
            while expected in pending:
                self._slots.release()
                yield pending.pop(expected)
                expected += 1
            if 0 <= self._count <= expected:
                break
            item = self._done.get()
            if self.error is not None:
                raise self.error
            if item is not None:
                pending[item[0]] = item[1]

    def close(self) -> None:
        """Stop every thread and wait for them."""
        self._stop = True
        for _ in self._threads:
            self._jobs.put(None)
        self._slots.release()
        self._done.put(None)
        for t in self._threads:
            if t.is_alive():
                t.join()
        sys.setswitchinterval(self._interval)


__all__ = ["COMPRESS_GROUP_BYTES", "COMPRESS_WORKERS", "CompressPump", "Compressed",
           "compress_function", "compress_group"]
