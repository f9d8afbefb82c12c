"""The metadata of a raw -> qcow2 convert whose data the early pump (rawpump.py) wrote.

Owns finishing a planned image: once the pump has placed every data cluster, the L2
tables, refcount blocks, refcount table, L1 table and finally the header are written into
the reserved front of the target. The header is the one ops.create makes for the same
options (`fresh_header` keeps create's rules for the options the early path takes; a test
holds the two equal). Pure Python over the array module, never cluster by cluster in a
Python loop: must not import numpy or the image code (the process never needs them).

On any failure the pump is stopped and the half-made target removed (like create does);
the source is only ever read.
"""

from __future__ import annotations

import sys
from array import array

from ...format import constants as C
from ...format.header import Header, new_header
from ...io.file import FileStorage
from .early import Early, finish_with
from .rawpump import Layout, Run, refcount_code

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time
if TYPE_CHECKING:
    from typing import Any


def finish(early: Early) -> None:
    """Wait for the pump and write the image's metadata; on failure remove the target."""
    layout = early.layout
    assert layout is not None
    finish_with(early, lambda runs: write_metadata(
        early.target, layout, fresh_header(layout, early.options), runs))


def fresh_header(layout: Layout, options: dict[str, Any]) -> Header:
    """The header ops.create writes for a version 3 image of this layout without backing
    file, data file or extended L2 entries (`options` as create takes them): both build it
    with format.header.new_header."""
    return new_header(
        version=3, cluster_bits=layout.cluster_bits, size=layout.size,
        l1_size=layout.l1_entries, l1_table_offset=layout.l1_cluster * layout.cluster_size,
        refcount_table_offset=layout.cluster_size,
        refcount_table_clusters=layout.reftable_clusters, refcount_order=layout.refcount_order,
        compression_type=(C.COMPRESSION_ZSTD if options.get("compression_type", "zlib") == "zstd"
                          else C.COMPRESSION_ZLIB),
        lazy_refcounts=bool(options.get("lazy_refcounts", False)),
    )


def _big_endian(table: array[int]) -> bytes:
    if sys.byteorder == "little":
        table.byteswap()
    return table.tobytes()


def _l2_tables(runs: list[Run], layout: Layout) -> dict[int, array[int]]:
    """L1 index -> its L2 table (host-order entries) for the runs."""
    cs = layout.cluster_size
    per = cs // 8
    tables: dict[int, array[int]] = {}
    for guest, count, host in runs:
        while count:
            l1_index, first = divmod(guest, per)
            n = min(count, per - first)
            table = tables.get(l1_index)
            if table is None:
                table = tables[l1_index] = array("Q", bytes(cs))
            base = C.OFLAG_COPIED | (host * cs)
            table[first : first + n] = array("Q", range(base, base + n * cs, cs))
            guest, count, host = guest + n, count - n, host + n
    return tables


def write_metadata(target: FileStorage, layout: Layout, header: Header, runs: list[Run]) -> None:
    """L2 tables, refcounts, refcount table, L1 and header for the data the pump placed."""
    cs = layout.cluster_size
    code = refcount_code(layout.refcount_order)
    if code is None:
        raise AssertionError("no early path for this refcount width")
    l1 = array("Q", bytes(layout.l1_entries * 8))
    # (first cluster, count) of everything that is in use
    used = [(0, 1), (1, layout.reftable_clusters), (layout.l1_cluster, layout.l1_clusters)]
    for l1_index, table in _l2_tables(runs, layout).items():
        slot = layout.l2_slots[l1_index]
        target.pwrite(slot * cs, _big_endian(table))
        l1[l1_index] = C.OFLAG_COPIED | (slot * cs)
        used.append((slot, 1))
    used.extend((host, count) for _, count, host in runs)
    per_block = (cs * 8) >> layout.refcount_order
    blocks = -(-max(first + count for first, count in used) // per_block)
    if blocks > layout.refblock_clusters:
        raise AssertionError("more refcount blocks needed than the layout reserved")
    used.append((layout.refblock_cluster, blocks))
    counts = array(code, bytes(blocks * per_block * (1 << (layout.refcount_order - 3))))
    one = array(code, [1])
    for first, count in used:
        counts[first : first + count] = one * count
    target.pwrite(layout.refblock_cluster * cs, _big_endian(counts))
    reftable = array("Q", bytes(layout.reftable_clusters * cs))
    reftable[:blocks] = array("Q", range(layout.refblock_cluster * cs,
                                         (layout.refblock_cluster + blocks) * cs, cs))
    target.pwrite(cs, _big_endian(reftable))
    if layout.l1_entries:
        target.pwrite(layout.l1_cluster * cs, _big_endian(l1))
    # the header last: until it is written the file is not an image at all
    target.pwrite(0, header.to_bytes())


__all__ = ["finish", "fresh_header", "write_metadata"]
