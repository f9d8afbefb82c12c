"""convert: copy a virtual disk (qcow2 or raw) to a raw file or a new qcow2 image.

- Raw output is sparse: ranges the source maps as zeros are never read, and 4 KiB blocks
  of read data that are all zero are skipped; the file is sized with truncate, so every
  skipped range is a hole (as `qemu-img convert -S 4k` does).
- qcow2 output is created with ops.create, then written through Image.write in large
  coalesced pieces; cluster-aligned all-zero blocks stay unallocated.
- `compressed=True` deflates (or zstd-compresses, per compression_type) each cluster in a
  thread pool and packs the results at byte granularity into host clusters, as QEMU does;
  a cluster that does not shrink below the cluster size is stored uncompressed.
  Packing and its ordering live in metadata/compressed.py, behind
  Image.write_compressed_clusters.
- With a backing file (-B), only clusters that read differently from the backing file are
  written; a zero cluster over non-zero backing data becomes a zero cluster.

Also the shared chunked reader (`Source`) that compare uses.
"""

from __future__ import annotations

import os
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from ..errors import FormatError, InvalidArgumentError
from ..format.compression import compress
from ..image import Image, RawImage, open_any
from ..io.file import FileStorage
from ..metadata.l2map import Kind
from .create import create
from .map import disk_size, host_segments

CHUNK_BYTES = 8 << 20
# raw output goes through a small buffer that stays in the CPU cache between the read and
# the write (measured: 1-2 MiB pieces copy about twice as fast as 8 MiB ones)
RAW_CHUNK_BYTES = 2 << 20
SPARSE_BYTES = 4096
# compression threads (zlib and zstd release the GIL while they work)
COMPRESS_WORKERS = max(4, 2 * (os.cpu_count() or 2))

Progress = Callable[[int], None]


# ---- reading -------------------------------------------------------------------------
class Source:
    """A virtual disk read in chunks, knowing which ranges read as zeros without I/O."""

    def __init__(self, img: Image | RawImage) -> None:
        self.img = img
        self.size = disk_size(img)

    def segments(self, start: int, end: int) -> list[tuple[int, int, bool]]:
        """(start, end, known_zero) pieces covering [start, end), merged."""
        out: list[tuple[int, int, bool]] = []
        _segments(self.img, start, end, out)
        return out

    def read_into(self, mv: memoryview, pos: int) -> None:
        """Fill mv with guest bytes from pos (mv need not be zeroed)."""
        _read_into(self.img, mv, pos)


def _add(out: list[tuple[int, int, bool]], a: int, b: int, zero: bool) -> None:
    if a >= b:
        return
    if out and out[-1][2] == zero and out[-1][1] == a:
        out[-1] = (out[-1][0], b, zero)
    else:
        out.append((a, b, zero))


def _segments(img: Image | RawImage, start: int, end: int, out: list[tuple[int, int, bool]]) -> None:
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


def _preadinto(storage: Any, mv: memoryview, offset: int) -> None:
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
            _preadinto(img.storage, mv[:n], pos)
        if n < len(mv):
            mv[n:] = bytes(len(mv) - n)
        return
    data = img.data_storage or img.storage
    for run in img.runs(pos, len(mv)):
        a = run.guest_offset - pos
        b = a + run.length
        if run.kind == Kind.DATA:
            _preadinto(data, mv[a:b], run.host_offset)
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


def nonzero_blocks(mv: memoryview, block: int) -> np.ndarray[Any, np.dtype[np.bool_]]:
    """Per block of `block` bytes (the last may be short): does it hold a non-zero byte?"""
    n = len(mv)
    nblocks = -(-n // block)
    out = np.ones(nblocks, dtype=bool)
    full = n // block
    if full:
        words = np.frombuffer(mv[: full * block], dtype=np.uint64).reshape(full, block // 8)
        # cheap pre-test on a few words, then a full test only where those are zero
        cand = (words[:, 0] == 0) & (words[:, -1] == 0) & (words[:, block // 16] == 0)
        idx = np.flatnonzero(cand)
        if len(idx):
            out[idx] = words[idx].any(axis=1)
    if nblocks > full:
        out[full] = bool(np.frombuffer(mv[full * block :], dtype=np.uint8).any())
    return out


def _runs_of(mask: np.ndarray[Any, np.dtype[np.bool_]]) -> list[tuple[int, int]]:
    """[start, end) index runs where mask is True."""
    if not len(mask):
        return []
    d = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


# ---- raw output ----------------------------------------------------------------------
RAW_WORKERS = 4


def _pieces(src: Source, a: int, b: int) -> Iterator[tuple[int, int, int, Any]]:
    """(guest offset, length, host offset, storage) pieces of at most RAW_CHUNK_BYTES; host
    offset -1 means "read through the image" (compressed, backing, zero)."""
    img = src.img
    if isinstance(img, RawImage):
        for pos in range(a, b, RAW_CHUNK_BYTES):
            yield pos, min(RAW_CHUNK_BYTES, b - pos), pos, img.storage
        return
    data = img.data_storage or img.storage
    span = 256 << 20
    for lo in range(a, b, span):
        for run in img.runs(lo, min(span, b - lo)):
            direct = run.kind == Kind.DATA
            for pos in range(run.guest_offset, run.end, RAW_CHUNK_BYTES):
                n = min(RAW_CHUNK_BYTES, run.end - pos)
                host = run.host_offset + (pos - run.guest_offset) if direct else -1
                yield pos, n, host, data


def _convert_raw(src: Source, dst: str, progress: Progress, sparse_bytes: int) -> None:
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
    local = threading.local()

    def copy(mv: memoryview, pos: int) -> None:
        if not sparse_bytes:
            _pwrite_all(fd, mv, pos)
            return
        for s, e in _runs_of(nonzero_blocks(mv, sparse_bytes)):
            lo, hi = s * sparse_bytes, min(len(mv), e * sparse_bytes)
            _pwrite_all(fd, mv[lo:hi], pos + lo)

    def direct(pos: int, n: int, host: int, storage: Any) -> int:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = bytearray(RAW_CHUNK_BYTES)
        mv = memoryview(buf)[:n]
        _preadinto(storage, mv, host)
        copy(mv, pos)
        return n

    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            os.ftruncate(fd, src.size)  # every byte not written below stays a hole
        elif stat.S_ISBLK(mode):
            sparse_bytes = 0  # a device keeps its old bytes: write the zeros too
        own = bytearray(RAW_CHUNK_BYTES)
        # host reads and output writes of plain data run in a small pool (the image object
        # itself is only touched by this thread)
        with ThreadPoolExecutor(max_workers=RAW_WORKERS) as pool:
            inflight: deque[Future[int]] = deque()
            for a, b, zero in src.segments(0, src.size):
                if zero and sparse_bytes:
                    progress(b - a)
                    continue
                if zero:  # -S 0: every byte is written, holes included
                    zeros = memoryview(bytes(RAW_CHUNK_BYTES))
                    for pos in range(a, b, RAW_CHUNK_BYTES):
                        n = min(RAW_CHUNK_BYTES, b - pos)
                        _pwrite_all(fd, zeros[:n], pos)
                        progress(n)
                    continue
                for pos, n, host, storage in _pieces(src, a, b):
                    if host >= 0:
                        inflight.append(pool.submit(direct, pos, n, host, storage))
                        while len(inflight) > 4 * RAW_WORKERS:
                            progress(inflight.popleft().result())
                    else:
                        mv = memoryview(own)[:n]
                        src.read_into(mv, pos)
                        copy(mv, pos)
                        progress(n)
            while inflight:
                progress(inflight.popleft().result())
        # no fsync: like qemu-img convert (cache=unsafe), durability is left to the caller
    finally:
        os.close(fd)


def _pwrite_all(fd: int, mv: memoryview, offset: int) -> None:
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], offset + done)


# ---- compressed clusters -------------------------------------------------------------
def _compress_one(args: tuple[bytes, int, int]) -> bytes | None:
    data, ctype, cs = args
    out = compress(data, ctype)
    return out if len(out) < cs else None


# ---- qcow2 output --------------------------------------------------------------------
def _convert_qcow2(
    src: Source,
    dst: str,
    *,
    options: dict[str, Any],
    compressed: bool,
    backing: str | None,
    backing_fmt: str | None,
    progress: Progress,
    sparse_bytes: int,
    durable: bool = False,
) -> None:
    opts = dict(options)
    if backing is not None:
        opts["backing_file"] = backing
        if backing_fmt is not None:
            opts["backing_fmt"] = backing_fmt
    create(dst, src.size, **opts)
    img = Image.open_path(dst, writable=True)
    if isinstance(img.storage, FileStorage):
        img.storage.durable = durable
    pool: ThreadPoolExecutor | None = None
    try:
        cs = img.cluster_size
        ctype = img.header.compression_type
        if compressed:
            pool = ThreadPoolExecutor(max_workers=COMPRESS_WORKERS)
        base = Source(img) if img.backing is not None else None
        chunk = max(CHUNK_BYTES // cs, 1) * cs
        buf = bytearray(chunk)
        bbuf = bytearray(chunk) if base is not None else None
        if sparse_bytes:
            ranges = _aligned_data_ranges(src.segments(0, src.size), cs, src.size)
        else:
            ranges = [(0, src.size)] if src.size else []
        if base is not None:
            ranges = _union(ranges, _aligned_data_ranges(base.segments(0, src.size), cs, src.size))
        done = 0
        pending: CompressJobs = []
        for a, b in ranges:
            progress(a - done)
            pos = a
            while pos < b:
                n = min(chunk, b - pos)
                mv = memoryview(buf)[:n]
                src.read_into(mv, pos)
                want = nonzero_blocks(mv, cs)
                if not sparse_bytes:
                    want[:] = True
                zero_clusters: list[tuple[int, int]] = []
                if base is not None and bbuf is not None:
                    bmv = memoryview(bbuf)[:n]
                    base.read_into(bmv, pos)
                    differs = _differs(mv, bmv, cs)
                    zero_clusters = _runs_of(differs & ~want)
                    want &= differs
                if pool is not None:
                    # compress this chunk while the previous one is written
                    jobs = _submit_compressed(pool, mv, pos, want, cs, ctype)
                    _finish_compressed(img, pending)
                    pending = jobs
                else:
                    for s, e in _runs_of(want):
                        lo, hi = s * cs, min(n, e * cs)
                        img.write(pos + lo, mv[lo:hi])
                for s, e in zero_clusters:
                    lo, hi = s * cs, min(n, e * cs)
                    img.write_zeroes(pos + lo, hi - lo)
                progress(n)
                pos += n
            done = b
        if pool is not None:
            _finish_compressed(img, pending)
        progress(src.size - done)
        img.flush()
    finally:
        if pool is not None:
            pool.shutdown()
        img.close()


def _aligned_data_ranges(
    segs: list[tuple[int, int, bool]], cs: int, size: int
) -> list[tuple[int, int]]:
    """Cluster-aligned ranges holding every non-zero segment, merged."""
    out: list[tuple[int, int]] = []
    for a, b, zero in segs:
        if zero:
            continue
        lo, hi = (a // cs) * cs, min(size, -(-b // cs) * cs)
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _union(x: list[tuple[int, int]], y: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(x + y):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _differs(a: memoryview, b: memoryview, cs: int) -> np.ndarray[Any, np.dtype[np.bool_]]:
    n = len(a)
    full = n // cs
    out = np.ones(-(-n // cs), dtype=bool)
    if full:
        x = np.frombuffer(a[: full * cs], dtype=np.uint8).reshape(full, cs)
        y = np.frombuffer(b[: full * cs], dtype=np.uint8).reshape(full, cs)
        out[:full] = (x != y).any(axis=1)
    if len(out) > full:
        out[full] = bytes(a[full * cs :]) != bytes(b[full * cs :])
    return out


CompressJobs = list[tuple[int, bytes, "Future[bytes | None]"]]


def _submit_compressed(
    pool: ThreadPoolExecutor,
    mv: memoryview,
    pos: int,
    want: np.ndarray[Any, np.dtype[np.bool_]],
    cs: int,
    ctype: int,
) -> CompressJobs:
    """Start compressing the wanted clusters of a chunk: (guest offset, data, future)."""
    jobs: CompressJobs = []
    for i in np.flatnonzero(want).tolist():
        data = bytes(mv[i * cs : (i + 1) * cs])
        padded = data + bytes(cs - len(data))  # a disk may end inside its last cluster
        jobs.append((pos + i * cs, data, pool.submit(_compress_one, (padded, ctype, cs))))
    return jobs


def _finish_compressed(img: Image, jobs: CompressJobs) -> None:
    """Write a chunk's clusters: compressed where that shrinks them, plain otherwise. A
    plain write may allocate after the compressed tail; packing then starts a new region
    (it only continues while allocations stay contiguous)."""
    items: list[tuple[int, bytes]] = []
    plain: list[tuple[int, bytes]] = []
    for guest, data, fut in jobs:
        comp = fut.result()
        if comp is None:
            plain.append((guest, data))
        else:
            items.append((guest, comp))
    img.write_compressed_clusters(items)
    for guest, data in plain:
        img.write(guest, data)


# ---- entry point ---------------------------------------------------------------------
def convert(
    src_path: str,
    dst_path: str,
    *,
    src_fmt: str | None = None,
    out_fmt: str = "raw",
    options: dict[str, Any] | None = None,
    compressed: bool = False,
    backing: str | None = None,
    backing_fmt: str | None = None,
    force_share: bool = False,
    progress: Progress | None = None,
    sparse_bytes: int = SPARSE_BYTES,
    cache: str = "unsafe",
) -> None:
    """Copy the virtual disk at src_path into a new raw file or qcow2 image at dst_path.

    cache: "unsafe" (qemu-img convert's default) never waits for the disk; "writeback"
    flushes in crash-safe order and at the end.

    sparse_bytes: zero blocks of this size are left as holes / unallocated (qemu-img -S);
    0 writes every byte."""
    if sparse_bytes % 512 or not 0 <= sparse_bytes <= 16 << 20:
        raise InvalidArgumentError(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of "
            "512 up to 16777216."
        )
    if out_fmt not in ("raw", "qcow2"):
        raise FormatError(f"Unknown file format '{out_fmt}'")
    if cache not in ("unsafe", "writeback"):
        raise InvalidArgumentError(f"Invalid cache mode '{cache}' (unsafe or writeback)")
    _check_target_unlocked(dst_path)
    if out_fmt == "raw" and (compressed or backing is not None):
        what = "Compression" if compressed else "Backing files"
        raise FormatError(f"{what} not supported for file format 'raw'")
    if os.path.exists(dst_path) and os.path.exists(src_path) and os.path.samefile(
        src_path, dst_path
    ):
        raise FormatError("source and target are the same file")
    img = open_any(src_path, src_fmt, force_share=force_share)
    try:
        src = Source(img)
        prog = progress or (lambda n: None)
        if out_fmt == "raw":
            _convert_raw(src, dst_path, prog, sparse_bytes)
        else:
            _convert_qcow2(
                src, dst_path, options=options or {}, compressed=compressed,
                backing=backing, backing_fmt=backing_fmt, progress=prog,
                sparse_bytes=sparse_bytes, durable=cache != "unsafe",
            )
    finally:
        img.close()


def _check_target_unlocked(path: str) -> None:
    """Refuse (like qemu-img) to overwrite a regular file another process has open as an
    image: take and drop the write lock before anything truncates it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        return
    FileStorage(path, True).close()


def iter_chunks(src: Source, chunk: int = CHUNK_BYTES) -> Iterator[tuple[int, memoryview | None]]:
    """(offset, data or None when known zero) over the whole disk, in pieces <= chunk."""
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


__all__ = ["convert", "Source", "nonzero_blocks", "iter_chunks"]
