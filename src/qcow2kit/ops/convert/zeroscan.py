"""The zero scan of convert: which blocks of a buffer hold data, which differ from the
backing file, and which aligned ranges of a disk hold anything at all.

Pure functions over numpy views of the caller's buffers (np.frombuffer, no copies of the
data); never does I/O and never keeps a reference to a buffer after returning.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .source import Segment

BoolArray = np.ndarray[Any, np.dtype[np.bool_]]

# past this many runs of candidate zero blocks, one pass over the whole buffer is cheaper
_MAX_RUNS = 64


def nonzero_blocks(mv: memoryview, block: int) -> BoolArray:
    """Per block of `block` bytes (the last may be short): does it hold a non-zero byte?
    `block` is a multiple of 8. Reads the buffer in place: no copy of the data is made."""
    n = len(mv)
    nblocks = -(-n // block)
    out = np.ones(nblocks, dtype=bool)
    full = n // block
    if full:
        words = np.frombuffer(mv[: full * block], dtype=np.uint64).reshape(full, block // 8)
        # cheap pre-test on a few words; only blocks where those are zero are read whole,
        # one contiguous run of blocks at a time (a view: fancy indexing would copy them)
        cand = (words[:, 0] == 0) & (words[:, -1] == 0) & (words[:, block // 16] == 0)
        runs = runs_of(cand)
        if len(runs) > _MAX_RUNS:
            out[:full] = np.bitwise_or.reduce(words, axis=1) != 0
        else:
            for s, e in runs:
                out[s:e] = np.bitwise_or.reduce(words[s:e], axis=1) != 0
    if nblocks > full:
        out[full] = bool(np.frombuffer(mv[full * block :], dtype=np.uint8).any())
    return out


def runs_of(mask: BoolArray) -> list[tuple[int, int]]:
    """[start, end) index runs where mask is True."""
    if not len(mask):
        return []
    d = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def differs(a: memoryview, b: memoryview, cs: int) -> BoolArray:
    """Per cluster of cs bytes: do a and b differ there?"""
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


def aligned_data_ranges(segs: list[Segment], cs: int, size: int) -> list[tuple[int, int]]:
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


def union(x: list[tuple[int, int]], y: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The merged union of two lists of [lo, hi) ranges."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(x + y):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


__all__ = ["BoolArray", "aligned_data_ranges", "differs", "nonzero_blocks", "runs_of", "union"]
