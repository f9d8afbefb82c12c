"""Reading metadata tables as plain bytes, without numpy, for the light read-only path of
`map` (format/lanes.py does its arithmetic).

Owns: gathering many same-sized tables (L2 tables) with one pread per contiguous host run,
in the order asked. Validates nothing: the caller checked the offsets. Never writes; must not
import numpy.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time
if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..io.storage import Storage


def read_tables(storage: Storage, offsets: Sequence[int], size: int) -> bytes:
    """The `size` bytes at each offset, concatenated in the order given. Tables that are
    adjacent in the file (in any order of `offsets`) are read with one pread per run."""
    if not offsets:
        return b""
    order = sorted(range(len(offsets)), key=offsets.__getitem__)
    pieces: list[bytes] = [b""] * len(offsets)
    i = 0
    while i < len(order):
        j = i + 1
        start = offsets[order[i]]
        while j < len(order) and offsets[order[j]] == start + (j - i) * size:
            j += 1
        data = storage.pread(start, (j - i) * size)
        if j - i == len(order) and order == sorted(order):
            return data  # one run, already in the order asked for
        for k in range(i, j):
            pieces[order[k]] = data[(k - i) * size : (k - i + 1) * size]
        i = j
    return b"".join(pieces)


__all__ = ["read_tables"]
