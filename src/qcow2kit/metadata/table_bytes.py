"""Reading metadata tables as plain bytes, without numpy, for the fast read-only paths of
`map` and `check` (format/lanes.py does their arithmetic).

Owns: gathering many same-sized tables (L2 tables, refcount blocks) with one pread per
contiguous host run, and the L1 table and refcount table of a header. Validates only what it
needs not to read nonsense (alignment, QEMU's size limits); callers that find anything unusual
fall back to the full numpy path, which reports errors properly. Never writes; must not import
numpy.
"""

from __future__ import annotations

from ..format import constants as C

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time
if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..format.header import Header
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


def read_l1(storage: Storage, header: Header) -> bytes | None:
    """The L1 table's bytes, or None when its place or size is unusual (the caller falls
    back to the full path, which explains what is wrong)."""
    length = header.l1_size * 8
    if length > C.MAX_L1_BYTES or header.l1_table_offset % header.cluster_size:
        return None
    if length == 0:
        return b""
    return storage.pread(header.l1_table_offset, length)


def read_reftable(storage: Storage, header: Header) -> bytes | None:
    """The refcount table's bytes, or None when its place or size is unusual."""
    length = header.refcount_table_clusters * header.cluster_size
    if length > C.MAX_REFTABLE_BYTES or header.refcount_table_offset % header.cluster_size:
        return None
    return storage.pread(header.refcount_table_offset, length)


__all__ = ["read_tables", "read_l1", "read_reftable"]
