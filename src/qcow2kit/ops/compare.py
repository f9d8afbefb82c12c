"""compare: do two virtual disks read the same? Like `qemu-img compare`: ranges both images
map as zeros are not read; a size difference is allowed when the extra part reads as
zeros; the first mismatch is reported at its 512-byte sector boundary."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..image import open_any
from .convert import CHUNK_BYTES, Source

SECTOR = 512


@dataclass(frozen=True, slots=True)
class CompareResult:
    identical: bool
    mismatch_offset: int | None
    size_a: int
    size_b: int

    @property
    def size_mismatch(self) -> bool:
        return self.size_a != self.size_b


def _first_diff(a: memoryview, b: memoryview | None) -> int:
    """Index of the first differing byte (b None: of the first non-zero byte), or -1."""
    x = np.frombuffer(a, dtype=np.uint8)
    if b is None:
        nz = np.flatnonzero(x)
    else:
        if a == b:
            return -1
        nz = np.flatnonzero(x != np.frombuffer(b, dtype=np.uint8))
    return int(nz[0]) if len(nz) else -1


def _boundaries(*lists: list[tuple[int, int, bool]]) -> list[tuple[int, int, bool]]:
    """Split into pieces where every list has one known-zero state; state = all zero."""
    cuts = sorted({p for segs in lists for s in segs for p in (s[0], s[1])})
    out: list[tuple[int, int, bool]] = []
    idx = [0] * len(lists)
    for a, b in zip(cuts, cuts[1:], strict=False):
        zero = True
        for k, segs in enumerate(lists):
            while idx[k] < len(segs) and segs[idx[k]][1] <= a:
                idx[k] += 1
            if idx[k] < len(segs) and not segs[idx[k]][2]:
                zero = False
        if out and out[-1][2] == zero and out[-1][1] == a:
            out[-1] = (out[-1][0], b, zero)
        else:
            out.append((a, b, zero))
    return out


def compare_sources(sa: Source, sb: Source) -> CompareResult:
    common = min(sa.size, sb.size)
    buf_a, buf_b = bytearray(CHUNK_BYTES), bytearray(CHUNK_BYTES)
    if common:
        for lo, hi, zero in _boundaries(sa.segments(0, common), sb.segments(0, common)):
            if zero:
                continue
            pos = lo
            while pos < hi:
                n = min(CHUNK_BYTES, hi - pos)
                ma, mb = memoryview(buf_a)[:n], memoryview(buf_b)[:n]
                sa.read_into(ma, pos)
                sb.read_into(mb, pos)
                d = _first_diff(ma, mb)
                if d >= 0:
                    off = (pos + d) // SECTOR * SECTOR
                    return CompareResult(False, off, sa.size, sb.size)
                pos += n
    longer = sa if sa.size > sb.size else sb
    if longer.size > common:
        for lo, hi, zero in longer.segments(common, longer.size):
            if zero:
                continue
            pos = lo
            while pos < hi:
                n = min(CHUNK_BYTES, hi - pos)
                ma = memoryview(buf_a)[:n]
                longer.read_into(ma, pos)
                d = _first_diff(ma, None)
                if d >= 0:
                    off = (pos + d) // SECTOR * SECTOR
                    return CompareResult(False, off, sa.size, sb.size)
                pos += n
    return CompareResult(True, None, sa.size, sb.size)


def compare(
    path_a: str,
    path_b: str,
    *,
    fmt_a: str | None = None,
    fmt_b: str | None = None,
    force_share: bool = False,
) -> CompareResult:
    a = open_any(path_a, fmt_a, force_share=force_share)
    try:
        b = open_any(path_b, fmt_b, force_share=force_share)
        try:
            return compare_sources(Source(a), Source(b))
        finally:
            b.close()
    finally:
        a.close()


__all__ = ["compare", "compare_sources", "CompareResult"]
