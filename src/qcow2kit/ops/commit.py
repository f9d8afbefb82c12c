"""commit: write the data an overlay (and the images between it and the base) holds into
its base, as `qemu-img commit` 7.2 does (QEMU's active commit, a mirror job), then empty the
overlay unless asked to keep it.

Owns: finding the base in the backing chain (by the stored name or the same file), the
ranges to copy (everything allocated above the base; ops/commit_copy.py cuts them into the
mirror's pieces, decides between bytes and zero clusters, and moves the bytes), and the
emptying of the overlay. Crash safety: the base only ever gains bytes the
overlay already showed (ordinary writes, each crash-safe), and is flushed and closed before
the overlay is emptied, so an interruption leaves both images consistent and the overlay's
disk unchanged. Never writes to the images between the overlay and the base.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError, Qcow2Error
from ..format import constants as C
from ..format.features import Incompatible
from ..format.geometry import Geometry
from ..format.tables import encode_refblock, refcount_dtype
from ..image import Image, RawImage, open_any
from ..io.file import FileStorage
from ..io.storage import Storage
from ..metadata import header_io
from ..metadata.l2map import Kind
from .commit_copy import copy_into

Progress = Callable[[float], None]


class CommitError(Qcow2Error):
    """A commit qemu-img refuses (no backing file, base not in the chain)."""


@dataclass(frozen=True, slots=True)
class CommitResult:
    base: str
    copied_bytes: int
    zeroed_bytes: int
    emptied: bool


def _chain(top: Image) -> list[Image | RawImage]:
    out: list[Image | RawImage] = [top]
    cur: Image | RawImage = top
    while isinstance(cur, Image) and cur.backing is not None:
        cur = cur.backing
        out.append(cur)
    return out


def find_base(top: Image, name: str | None) -> int:
    """Index in the chain (1 = the backing file) of the base `name` names: the backing name
    stored in the image above it, or the same file by path (relative to the current
    directory). None means the backing file."""
    chain = _chain(top)
    if len(chain) < 2:
        raise CommitError("Image does not have a backing file")
    if name is None:
        return 1
    want = os.path.realpath(name) if name else None
    for i in range(1, len(chain)):
        above = chain[i - 1]
        assert isinstance(above, Image)
        if above.header.backing_file == name:
            return i
        if want is not None and os.path.realpath(chain[i].filename) == want:
            return i
    raise CommitError(f"Did not find '{name}' in the backing chain of '{top.filename}'")


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _allocated_above(chain: list[Image | RawImage], base_index: int,
                     size: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Merged [start, end) ranges some image above the base holds (data or zero), and the
    ranges where one of them has zero clusters."""
    spans: list[tuple[int, int]] = []
    zeros: list[tuple[int, int]] = []
    for layer in chain[:base_index]:
        if isinstance(layer, RawImage):
            spans.append((0, min(size, layer.virtual_size)))
            continue
        end = min(size, layer.virtual_size)
        if end <= 0:
            continue
        for run in layer.runs(0, end):
            if run.kind != Kind.UNALLOCATED:
                spans.append((run.guest_offset, run.end))
            if run.kind == Kind.ZERO:
                zeros.append((run.guest_offset, run.end))
    return _merge(spans), _merge(zeros)


def commit(
    path: str,
    *,
    base: str | None = None,
    drop: bool = False,
    fmt: str | None = None,
    progress: Progress | None = None,
) -> CommitResult:
    """Commit the image at path into its backing file, or into `base` somewhere down its
    chain (which implies drop). Without drop the overlay is emptied afterwards (it then reads
    through to the base)."""
    from ..chain import probe_format

    fmt = fmt or probe_format(path)
    if fmt == "raw":
        raise CommitError("Image does not have a backing file")  # raw has none, as in QEMU
    if fmt != "qcow2":
        raise InvalidArgumentError(f"committing '{fmt}' images is not supported (only qcow2)")
    drop = drop or base is not None
    top = Image.open_path(path, writable=False)
    try:
        index = find_base(top, base)
        chain = _chain(top)
        base_img = chain[index]
        base_path = base_img.filename
        base_fmt = base_img.format_name
        size = top.virtual_size
        allocated, zeros = _allocated_above(chain, index, size)
        target = open_any(base_path, base_fmt, writable=True, backing=True)
        try:
            copied, zeroed = copy_into(top, target, allocated, zeros, size, progress,
                                       drop_cache=not drop)
        finally:
            target.close()
    finally:
        top.close()
    if not drop:
        empty_image(path)
    if progress is not None:
        progress(100.0)
    return CommitResult(base_path, copied, zeroed, not drop)


def empty_image(path: str) -> None:
    """Drop every cluster of the overlay, as QEMU's bdrv_make_empty: a v3 image without
    snapshots, bitmaps or data file is rebuilt as header, reftable, one refblock and the L1
    table in its first clusters and the file cut after them (make_completely_empty, under
    the dirty bit: a crash leaves an image `check -r all` repairs, as QEMU's opening does);
    any other image gets every cluster discarded, which keeps its L2 tables."""
    storage = FileStorage(path, True)
    try:
        header = header_io.read_header(storage)
        geom = Geometry(header.cluster_bits, header.refcount_order, header.extended_l2)
        cs = geom.cluster_size
        l1_clusters = -(-header.l1_size * 8 // cs)
        if (header.version >= 3 and header.nb_snapshots == 0
                and header.extension(C.EXT_BITMAPS) is None and not header.has_data_file
                and 3 + l1_clusters <= geom.refblock_entries):
            make_completely_empty(storage)
            return
    finally:
        storage.close()
    # a fresh open: the overlay's view of the base must not come from tables cached before
    # the base changed
    with Image.open_path(path, writable=True) as img:
        img.discard(0, img.virtual_size)


def make_completely_empty(storage: Storage) -> None:
    """QEMU's make_completely_empty on a v3 image without snapshots, bitmaps or data file
    (callers check): under the dirty bit, the L1 table and clusters 1.. are zeroed, the header
    names a one-cluster reftable at cluster 1, a refblock at 2 and the L1 at 3, the counts are
    written, the dirty bit cleared and the file cut. A crash in between leaves a dirty image
    that `check -r all` (QEMU's and ours, on opening) repairs; every state reads as the
    image before or as an empty one."""
    header = header_io.read_header(storage)
    geom = Geometry(header.cluster_bits, header.refcount_order, header.extended_l2)
    l1_clusters = -(-header.l1_size * 8 // geom.cluster_size)
    cs = geom.cluster_size
    dirty = header.incompatible_features | Incompatible.DIRTY
    # refcounts are about to be wrong on purpose: the dirty bit is durable first
    storage.flush()
    header_io.write_incompatible(storage, dirty)
    storage.flush()
    storage.event("l1_update")
    storage.pwrite(header.l1_table_offset, bytes(l1_clusters * cs))
    storage.flush()
    storage.event("empty_image_prepare")
    storage.pwrite(cs, bytes((2 + l1_clusters) * cs))
    storage.flush()
    # l1_table_offset, refcount_table_offset and refcount_table_clusters in one write
    header_io.write_field(storage, C.HEADER_L1_OFFSET + 4,
                          struct.pack(">QQI", 3 * cs, cs, 1), "l1_update")
    storage.flush()
    storage.event("refblock_alloc")
    storage.pwrite(cs, struct.pack(">Q", 2 * cs))
    storage.flush()
    counts = np.zeros(geom.refblock_entries, dtype=refcount_dtype(geom.refcount_order))
    counts[: 3 + l1_clusters] = 1
    storage.event("refblock_update")
    storage.pwrite(2 * cs, encode_refblock(counts, geom.refcount_order))
    storage.flush()
    header_io.write_incompatible(storage, header.incompatible_features & ~Incompatible.DIRTY)
    storage.flush()
    storage.truncate((3 + l1_clusters) * cs)


__all__ = ["CommitError", "CommitResult", "commit", "find_base", "make_completely_empty",
           "empty_image"]
