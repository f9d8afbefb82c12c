"""map's fast path through a backing chain: a qcow2 image over plain qcow2 images and/or a
raw base, mapped without numpy; and the one reading of a raw file's holes (host_segments,
which ops/map.py uses too).

Opens the chain as Image's open does (chain.backing_path: the same paths, loop and depth
limits; backing files by their backing format or probed, read-only with force_share), every
layer at once, before mapping anything, as the full open does. Each qcow2 layer must be one
ops/map_plain.py maps (unusual() and walk_layer() decide); a raw layer answers by its holes.
Like ops/map.py: unallocated ranges of a layer fall through to the backing file at depth + 1
up to the backing file's size (a raw file counts in whole 512-byte sectors) and past it read
as zeros at the layer that has them; extents are merged once at the end as qemu-img merges
them. Any error and anything unusual in any layer: the reason as a string, and the caller
runs ops/map.py for the output or the error. Never prints, never writes; must not import
numpy, image.py or metadata.meta (start-up time).
"""

from __future__ import annotations

import errno
import os

from ..chain import backing_path, probe_format
from ..errors import Qcow2Error
from ..format.header import Header
from ..io.file import FileStorage
from ..metadata.header_io import read_header
from .map_format import flag_code
from .map_plain import UNALLOCATED, PlainExtents, unusual, walk_layer

# one extent: guest start, length, map_format.flag_code, host offset (-1: none), file name
_Row = tuple[int, int, int, int, str]
_DEPTH = flag_code(1, False, False, False)  # what one more level of depth adds to a code
_NOTHING = flag_code(0, False, False, False)


def host_segments(fd: int, start: int, end: int) -> list[tuple[int, int, bool]]:
    """(start, end, is_data) pieces of a host byte range by SEEK_DATA / SEEK_HOLE; bytes
    past the end of the file count as a hole."""
    out: list[tuple[int, int, bool]] = []
    pos = start
    while pos < end:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                return [(start, end, True)]
            d = end
        if d > pos:
            stop = min(d, end)
            out.append((pos, stop, False))
            pos = stop
            continue
        h = os.lseek(fd, pos, os.SEEK_HOLE)
        stop = min(max(h, pos + 1), end)
        out.append((pos, stop, True))
        pos = stop
    return out


class _Layer:
    """One open file of the chain: its header (None: a raw file) and its disk's size."""

    __slots__ = ("storage", "header", "size")

    def __init__(self, storage: FileStorage, header: Header | None) -> None:
        self.storage, self.header = storage, header
        self.size = header.size if header is not None else -(-storage.size() // 512) * 512


class _DeclineError(Exception):
    """A layer the fast path does not map: the reason."""


def chain_map(path: str, fmt: str | None, force_share: bool, start: int,
              length: int | None) -> PlainExtents | str:
    """The extents of the disk of `path` through its backing chain (or of [start, start +
    length) inside it, start and length not negative, as ops/map.map_extents cuts them), or
    why ops/map.py must answer (ops/map_plain.plain_map's promise for a chain)."""
    layers: list[_Layer] = []
    try:
        try:
            if (fmt or probe_format(path)) != "qcow2":
                return "not a qcow2 file"
            layers.append(_Layer(FileStorage(path, False, force_share=force_share), None))
        except (Qcow2Error, OSError) as exc:
            return f"cannot open: {exc}"
        reason = _open_chain(layers)
        if reason is not None:
            return reason
        top = layers[0]
        end = top.size if length is None else min(top.size, start + length)
        name = top.storage.name
        if start >= end:  # nothing to map: qemu-img's one empty extent
            return PlainExtents([start], [0], [_NOTHING], [-1], name)
        if len(layers) == 1:
            assert top.header is not None
            return walk_layer(top.storage, top.header, start, end)
        rows = _merged(_resolve(layers, 0, [(start, end)]))
        return PlainExtents([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                            [r[3] for r in rows], [r[4] for r in rows])
    except _DeclineError as exc:
        return str(exc)
    except (Qcow2Error, OSError) as exc:
        return f"error: {exc}"
    finally:
        for layer in layers:
            layer.storage.close()


def _open_chain(layers: list[_Layer]) -> str | None:
    """Read the header of layers[0] (opened, its header not yet read) and open every file
    below it into `layers`; None, or why the fast path declines."""
    chain: tuple[str, ...] = ()
    storage = layers[0].storage
    while True:
        header = read_header(storage)  # the checks Image's open makes of the header
        layers[-1] = _Layer(storage, header)
        reason = unusual(header, False)
        if reason is not None:
            return reason
        if not header.backing_file:  # an empty name means none, as in Image
            return None
        path, chain = backing_path(storage.name, header, chain)
        fmt = header.backing_format or probe_format(path)
        if fmt not in ("qcow2", "raw"):
            return "a backing file of another format"
        storage = FileStorage(path, False, force_share=True)
        layers.append(_Layer(storage, None))
        if fmt == "raw":
            return None


def _resolve(layers: list[_Layer], i: int, ranges: list[tuple[int, int]]) -> list[_Row]:
    """The unmerged extents of the sorted, disjoint, nonempty guest ranges `ranges` (inside
    the disk of layers[i]) seen from layers[i] (depth i)."""
    layer = layers[i]
    name = layer.storage.name
    if layer.header is None:
        fd = layer.storage.fd
        return [(a, b - a, flag_code(i, True, not is_data, is_data), a, name)
                for lo, hi in ranges for a, b, is_data in host_segments(fd, lo, hi)]
    # one walk over the span of the ranges (declining for anything in it), cut to them
    found = walk_layer(layer.storage, layer.header, ranges[0][0], ranges[-1][1])
    if isinstance(found, str):
        raise _DeclineError(found)
    pieces = _cut(found, ranges)
    below = layers[i + 1] if i + 1 < len(layers) else None
    bsize = below.size if below is not None else 0
    deep: list[_Row] = []
    if below is not None:
        wanted = [(a, min(a + n, bsize)) for a, n, code, _o in pieces
                  if code == UNALLOCATED and a < bsize]
        if wanted:
            deep = _resolve(layers, i + 1, wanted)
    out: list[_Row] = []
    shift = i * _DEPTH
    j = 0
    for a, n, code, off in pieces:
        if code == UNALLOCATED and a < bsize:
            mid = min(a + n, bsize)
            while j < len(deep) and deep[j][0] < mid:
                out.append(deep[j])
                j += 1
            if mid < a + n:
                out.append((mid, a + n - mid, UNALLOCATED + shift, -1, name))
        else:
            out.append((a, n, code + shift, off, name))
    return out


def _cut(found: PlainExtents, ranges: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """The extents of `found` (which cover the span of `ranges`) cut to the ranges."""
    starts, lengths, codes, offsets = found.starts, found.lengths, found.codes, found.offsets
    out: list[tuple[int, int, int, int]] = []
    j = 0
    for lo, hi in ranges:
        while starts[j] + lengths[j] <= lo:
            j += 1
        pos = lo
        while pos < hi:
            s, n, o = starts[j], lengths[j], offsets[j]
            stop = min(s + n, hi)
            out.append((pos, stop - pos, codes[j], o + (pos - s) if o >= 0 else -1))
            pos = stop
            if stop == s + n:
                j += 1
    return out


def _merged(rows: list[_Row]) -> list[_Row]:
    """Adjacent extents joined as qemu-img joins them (ops/map.py's MapEntry.mergeable):
    the same flags and depth, and both without an offset or contiguous in the same file."""
    out: list[_Row] = []
    for row in rows:
        if out:
            a, n, code, off, name = out[-1]
            if a + n == row[0] and code == row[2] and (
                    (off < 0 and row[3] < 0)
                    or (off >= 0 and off + n == row[3] and name == row[4])):
                out[-1] = (a, n + row[1], code, off, name)
                continue
        out.append(row)
    return out


__all__ = ["chain_map", "host_segments"]
