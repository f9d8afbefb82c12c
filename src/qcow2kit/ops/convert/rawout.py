"""Raw output of convert: copy a Source into a plain file or block device.

Owns the target file descriptor from open to close: sparse output (ranges the source maps
as zeros are never read, all-zero blocks of read data are not written, and the file is
sized with ftruncate so every skipped range is a hole, as `qemu-img convert -S` does); with
-S 0 every byte is written. A reader thread reads and scans ahead (source.ReadAhead);
this one writes in order, each run's blocks fallocated just before it is written. No
fsync: like qemu-img convert's default cache=unsafe, durability is left to the caller.
Never writes to the source.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from ...io.file import FileStorage
from .source import ReadAhead, Source
from .zeroscan import nonzero_blocks, runs_of

Progress = Callable[[int], None]

# reads and writes are split into 2 MiB syscalls anyway (see source.READ_PIECE)
RAW_CHUNK_BYTES = 8 << 20
RAW_READ_AHEAD = 2


def convert_raw(src: Source, dst: str, progress: Progress, sparse_bytes: int) -> None:
    """Write the guest bytes of src into the file dst (created or truncated)."""
    os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0),
                     0o644))
    out = FileStorage(dst, True, lock=False)
    try:
        mode = os.fstat(out.fd).st_mode
        regular = stat.S_ISREG(mode)
        if regular:
            out.truncate(src.size)  # every byte not written below stays a hole
        elif stat.S_ISBLK(mode):
            sparse_bytes = 0  # a device keeps its old bytes: write the zeros too
        done = 0
        data: list[tuple[int, int]] = []
        for a, b, zero in src.segments(0, src.size):
            if not zero:
                data.append((a, b))
            elif not sparse_bytes:  # -S 0: every byte is written, holes included
                _write_zeros(out, a, b, regular)
        scan = _scanner(sparse_bytes)
        with ReadAhead(src, data, RAW_CHUNK_BYTES, scan, RAW_READ_AHEAD) as reader:
            for pos, mv, runs in reader:
                for lo, hi in runs:
                    _put(out, mv[lo:hi], pos + lo, regular)
                progress(pos + len(mv) - done)
                done = pos + len(mv)
        progress(src.size - done)
    finally:
        out.close()


def _scanner(sparse_bytes: int) -> Callable[[memoryview], list[tuple[int, int]]]:
    """The byte ranges of a chunk to write: those holding data (all of it with -S 0)."""
    if not sparse_bytes:
        return lambda mv: [(0, len(mv))]

    def scan(mv: memoryview) -> list[tuple[int, int]]:
        return [
            (s * sparse_bytes, min(len(mv), e * sparse_bytes))
            for s, e in runs_of(nonzero_blocks(mv, sparse_bytes))
        ]

    return scan


def _put(out: FileStorage, mv: memoryview, pos: int, regular: bool) -> None:
    if regular:
        # blocks allocated (in order, so they stay contiguous) just before they are
        # written: ext4 then skips its per-page delayed allocation (measured: about a
        # quarter less kernel time)
        out.allocate(pos, len(mv))
    out.pwrite(pos, mv)


def _write_zeros(out: FileStorage, a: int, b: int, regular: bool) -> None:
    zeros = memoryview(bytes(min(RAW_CHUNK_BYTES, b - a)))
    for pos in range(a, b, RAW_CHUNK_BYTES):
        _put(out, zeros[: min(RAW_CHUNK_BYTES, b - pos)], pos, regular)


__all__ = ["RAW_CHUNK_BYTES", "convert_raw"]
