"""qcow2 output of convert: create the target with ops.create and fill it from a Source.

Owns the target Image from creation to close:
- plain output is read and zero-scanned on a reader thread (source.ReadAhead) and written
  through Image.write, one call per run of data clusters; cluster-aligned all-zero blocks
  stay unallocated;
- compressed output deflates (or zstd-compresses, per compression_type) the clusters in a
  thread pool, a group of clusters per job and one zstd context per thread (the same bytes
  as format.compression.compress), and hands the results to
  Image.write_compressed_clusters, which packs them at byte granularity as QEMU does; a
  cluster that does not shrink is stored plain;
- with a backing file (-B) only clusters that read differently from the backing file are
  written; a zero cluster over non-zero backing data becomes a zero cluster.
Goes through public Image methods only, so every crash-safety rule of the write path
(DESIGN.md section 3) holds here too. Never writes to the source.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ...image import Image
from ...io.file import FileStorage
from ..create import create
from .compressor import (
    COMPRESS_GROUP_BYTES,
    COMPRESS_WORKERS,
    Compressed,
    CompressPump,
    compress_group,
)
from .source import CHUNK_BYTES, ReadAhead, Source
from .zeroscan import BoolArray, aligned_data_ranges, differs, nonzero_blocks, runs_of, union

if TYPE_CHECKING:
    # imported where a pool is made: concurrent.futures pulls in logging (plain output,
    # the common case, needs neither)
    from concurrent.futures import Future, ThreadPoolExecutor

Progress = Callable[[int], None]

# plain output: large pieces keep the per-write metadata work small (storage splits the
# data into 2 MiB syscalls)
PLAIN_CHUNK_BYTES = 16 << 20
PLAIN_READ_AHEAD = 1
CompressJobs = list["Future[Compressed]"]
# compressed clusters handed to Image.write_compressed_clusters at once (at least)
WRITE_BATCH_CLUSTERS = 128


def convert_qcow2(
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
    early: CompressPump | None = None,
) -> None:
    """Create dst as a qcow2 image of src's size (options as ops.create takes them) and
    copy src's guest bytes into it. early: compressed output whose source is already being
    read and compressed (the caller closes it)."""
    opts = dict(options)
    if backing is not None:
        opts["backing_file"] = backing
        if backing_fmt is not None:
            opts["backing_fmt"] = backing_fmt
    create(dst, src.size, **opts)
    img = Image.open_path(dst, writable=True)
    if isinstance(img.storage, FileStorage):
        img.storage.durable = durable
    try:
        cs = img.cluster_size
        if sparse_bytes:
            ranges = aligned_data_ranges(src.segments(0, src.size), cs, src.size)
        else:
            ranges = [(0, src.size)] if src.size else []
        if img.backing is not None:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(max_workers=COMPRESS_WORKERS) if compressed else None
            try:
                _copy_over_backing(src, img, ranges, progress, sparse_bytes, pool)
            finally:
                if pool is not None:
                    pool.shutdown()
        elif early is not None:
            _copy_compressed_early(early, img, progress)
        elif compressed:
            _copy_compressed(src, img, ranges, progress, sparse_bytes)
        else:
            _copy_plain(src, img, ranges, progress, sparse_bytes)
        img.flush()
    finally:
        img.close()


def _scanner(cs: int, sparse_bytes: int) -> Callable[[memoryview], BoolArray]:
    """Which clusters of a chunk to write: those holding data (all of them with -S 0)."""
    if sparse_bytes:
        return lambda mv: nonzero_blocks(mv, cs)
    return lambda mv: np.ones(-(-len(mv) // cs), dtype=bool)


def _copy_plain(
    src: Source, img: Image, ranges: list[tuple[int, int]], progress: Progress, sparse_bytes: int
) -> None:
    """Read and zero-scan on the reader thread while this one plans and writes: each run
    of data clusters is one Image.write (one allocation for the run; the storage writes
    each host run in 2 MiB syscalls)."""
    cs = img.cluster_size
    chunk = max(PLAIN_CHUNK_BYTES // cs, 1) * cs
    done = 0
    with ReadAhead(src, ranges, chunk, _scanner(cs, sparse_bytes), PLAIN_READ_AHEAD) as reader:
        for pos, mv, want in reader:
            for s, e in runs_of(want):
                lo, hi = s * cs, min(len(mv), e * cs)
                img.write(pos + lo, mv[lo:hi])
            progress(pos + len(mv) - done)
            done = pos + len(mv)
    progress(src.size - done)


def _copy_compressed(
    src: Source, img: Image, ranges: list[tuple[int, int]], progress: Progress, sparse_bytes: int
) -> None:
    """Compress each chunk's clusters in a pool while the previous chunk is written."""
    from concurrent.futures import ThreadPoolExecutor

    cs = img.cluster_size
    ctype = img.header.compression_type
    chunk = max(CHUNK_BYTES // cs, 1) * cs
    done = 0
    pending: CompressJobs = []
    with (
        ThreadPoolExecutor(max_workers=COMPRESS_WORKERS) as pool,
        ReadAhead(src, ranges, chunk, _scanner(cs, sparse_bytes), depth=2) as reader,
    ):
        for pos, mv, want in reader:
            jobs = _submit_compressed(pool, mv, pos, want, cs, ctype)
            _finish_compressed(img, pending)
            pending = jobs
            progress(pos + len(mv) - done)
            done = pos + len(mv)
        _finish_compressed(img, pending)
    progress(src.size - done)


def _copy_compressed_early(pump: CompressPump, img: Image, progress: Progress) -> None:
    """Write what the pump compressed, WRITE_BATCH_CLUSTERS clusters or more at a time."""
    batch: list[Compressed] = []
    count = 0
    for group in pump.results():
        batch.append(group)
        count += len(group)
        if count >= WRITE_BATCH_CLUSTERS:
            _write_compressed(img, batch)
            progress(sum(len(g) for g in batch) * img.cluster_size)
            batch, count = [], 0
    _write_compressed(img, batch)


def _copy_over_backing(
    src: Source,
    img: Image,
    ranges: list[tuple[int, int]],
    progress: Progress,
    sparse_bytes: int,
    pool: ThreadPoolExecutor | None,
) -> None:
    """Write only the clusters that read differently from the backing file (compressed
    in `pool` if given); a zero cluster over non-zero backing data becomes a zero cluster.
    Reads on this thread: the backing file is read through the target image, which is
    being written."""
    cs = img.cluster_size
    ctype = img.header.compression_type
    pending: CompressJobs = []
    base = Source(img)
    ranges = union(ranges, aligned_data_ranges(base.segments(0, src.size), cs, src.size))
    chunk = max(CHUNK_BYTES // cs, 1) * cs
    buf = bytearray(chunk)
    bbuf = bytearray(chunk)
    done = 0
    for a, b in ranges:
        progress(a - done)
        for pos in range(a, b, chunk):
            n = min(chunk, b - pos)
            mv = memoryview(buf)[:n]
            src.read_into(mv, pos)
            want = nonzero_blocks(mv, cs)
            if not sparse_bytes:
                want[:] = True
            bmv = memoryview(bbuf)[:n]
            base.read_into(bmv, pos)
            diff = differs(mv, bmv, cs)
            if pool is not None:
                # compress this chunk while the previous one is written
                jobs = _submit_compressed(pool, mv, pos, want & diff, cs, ctype)
                _finish_compressed(img, pending)
                pending = jobs
            else:
                for s, e in runs_of(want & diff):
                    lo, hi = s * cs, min(n, e * cs)
                    img.write(pos + lo, mv[lo:hi])
            for s, e in runs_of(diff & ~want):
                lo, hi = s * cs, min(n, e * cs)
                img.write_zeroes(pos + lo, hi - lo)
            progress(n)
        done = b
    _finish_compressed(img, pending)
    progress(src.size - done)


def _submit_compressed(
    pool: ThreadPoolExecutor,
    mv: memoryview,
    pos: int,
    want: BoolArray,
    cs: int,
    ctype: int,
) -> CompressJobs:
    """Start compressing the wanted clusters of a chunk, COMPRESS_GROUP_BYTES of them per
    job (few jobs: the pool's cost per job and the GIL hand-overs stay small)."""
    per_job = max(1, COMPRESS_GROUP_BYTES // cs)
    wanted = np.flatnonzero(want).tolist()
    jobs: CompressJobs = []
    for k in range(0, len(wanted), per_job):
        group = wanted[k : k + per_job]
        lo, hi = group[0] * cs, min(len(mv), (group[-1] + 1) * cs)
        data = bytes(mv[lo:hi])  # the chunk's buffer is reused once this returns
        jobs.append(pool.submit(compress_group, data, [pos + i * cs for i in group],
                                [i * cs - lo for i in group], cs, ctype))
    return jobs


def _finish_compressed(img: Image, jobs: CompressJobs) -> None:
    """Write a chunk's clusters: compressed where that shrinks them, plain otherwise. A
    plain write may allocate after the compressed tail; packing then starts a new region
    (it only continues while allocations stay contiguous)."""
    _write_compressed(img, [fut.result() for fut in jobs])


def _write_compressed(img: Image, groups: list[Compressed]) -> None:
    """Write compressed groups' clusters: packed where that shrinks them, plain otherwise."""
    items: list[tuple[int, bytes]] = []
    plain: list[tuple[int, memoryview]] = []
    for group in groups:
        for guest, data, packed in group:
            if packed is None:
                plain.append((guest, data))
            else:
                items.append((guest, packed))
    img.write_compressed_clusters(items)
    for guest, data in plain:
        img.write(guest, data)


__all__ = ["convert_qcow2"]
