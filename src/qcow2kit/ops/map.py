"""map: the allocation of every guest byte through the backing chain, as `qemu-img map`
reports it (same extents, same merging, same JSON).

Per layer, one vectorised pass over each L2 table classifies allocation units; unallocated
ranges fall through to the backing file (depth + 1). Like QEMU 7.2:
- data clusters answer data=true with their host offset; when the image looks metadata
  preallocated (more clusters in use than the host file has allocated), holes in the host
  file under data clusters answer zero=true as well;
- zero clusters answer zero=true, with an offset when a host cluster is still allocated;
- compressed clusters answer data=true without an offset;
- unallocated ranges without a backing file (or past its end) answer zero=true,
  present=false at the layer that has them;
- raw files answer data/zero by their holes (SEEK_DATA / SEEK_HOLE), always present.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError
from ..format import constants as C
from ..format.entries import decode_l2
from ..image import Image, RawImage, open_any
from ..metadata.l2map import Kind


@dataclass(slots=True)
class MapEntry:
    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int  # -1: no offset
    filename: str

    def mergeable(self, nxt: MapEntry) -> bool:
        if (self.depth, self.present, self.zero, self.data) != (
            nxt.depth, nxt.present, nxt.zero, nxt.data
        ):
            return False
        if (self.offset < 0) != (nxt.offset < 0):
            return False
        if self.offset >= 0 and self.offset + self.length != nxt.offset:
            return False
        return self.filename == nxt.filename or self.offset < 0

    def to_json(self) -> dict[str, int | bool]:
        out: dict[str, int | bool] = {
            "start": self.start, "length": self.length, "depth": self.depth,
            "present": self.present, "zero": self.zero, "data": self.data,
        }
        if self.offset >= 0:
            out["offset"] = self.offset
        return out


def disk_size(img: Image | RawImage) -> int:
    """The virtual size QEMU sees: a raw file counts in whole 512-byte sectors."""
    if isinstance(img, RawImage):
        return -(-img.virtual_size // 512) * 512
    return img.virtual_size


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


class _Mapper:
    def __init__(self) -> None:
        self.entries: list[MapEntry] = []
        self._prealloc: dict[int, bool] = {}

    def add(self, e: MapEntry) -> None:
        if self.entries and self.entries[-1].mergeable(e) and (
            self.entries[-1].start + self.entries[-1].length == e.start
        ):
            self.entries[-1].length += e.length
        else:
            self.entries.append(e)

    # ---- raw --------------------------------------------------------------------------
    def raw_layer(self, img: RawImage, start: int, end: int, depth: int) -> None:
        fd = getattr(img.storage, "fd", None)
        if fd is None:
            self.add(MapEntry(start, end - start, depth, True, False, True, start, img.filename))
            return
        for a, b, is_data in host_segments(fd, start, end):
            self.add(MapEntry(a, b - a, depth, True, not is_data, is_data, a, img.filename))

    # ---- qcow2 ------------------------------------------------------------------------
    def _metadata_preallocated(self, img: Image) -> bool:
        key = id(img)
        if key not in self._prealloc:
            cs = img.cluster_size
            file_length = img.storage.size()
            real = img.storage.allocated_bytes()
            real_clusters = real // cs
            threshold = max(real_clusters * 10 // 9, real_clusters + 2)
            end_cluster = -(-file_length // cs)
            counts = img.meta.refcounts.get_range(0, end_cluster)
            self._prealloc[key] = int(np.count_nonzero(counts)) >= threshold
        return self._prealloc[key]

    def _data(self, img: Image, a: int, b: int, host: int, depth: int) -> None:
        storage = img.data_storage or img.storage
        name = storage.name
        fd = getattr(storage, "fd", None)
        if fd is None or not self._metadata_preallocated(img):
            self.add(MapEntry(a, b - a, depth, True, False, True, host, name))
            return
        for ha, hb, is_data in host_segments(fd, host, host + (b - a)):
            ga = a + (ha - host)
            self.add(MapEntry(ga, hb - ha, depth, True, not is_data, True, ha, name))

    def _unallocated(self, img: Image, a: int, b: int, host: int, depth: int) -> None:
        backing = img.backing
        name = (img.data_storage or img.storage).name
        if backing is None:
            self.add(MapEntry(a, b - a, depth, False, True, False, host, name))
            return
        bsize = disk_size(backing)
        if a < bsize:
            mid = min(b, bsize)
            self.layer(backing, a, mid, depth + 1)
            a_host = host + (mid - a) if host >= 0 else -1
            a, host = mid, a_host
        if a < b:
            self.add(MapEntry(a, b - a, depth, False, True, False, host, name))

    def layer(self, img: Image | RawImage, start: int, end: int, depth: int) -> None:
        if isinstance(img, RawImage):
            self.raw_layer(img, start, end, depth)
            return
        g = img.meta.geom
        l2 = img.meta.l2
        span = g.l2_span_bytes
        l2_offsets = (l2.l1 & np.uint64(C.OFFSET_MASK)).astype(np.int64)
        first, last = start // span, (end - 1) // span
        hit = np.flatnonzero(l2_offsets[first : last + 1]) + first
        pos = start
        for l1i in hit.tolist():
            base = l1i * span
            if pos < base:
                self._unallocated(img, pos, base, -1, depth)
                pos = base
            cend = min(end, base + span)
            self._table(img, l1i, pos, cend, depth)
            pos = cend
        if pos < end:
            self._unallocated(img, pos, end, -1, depth)

    def _table(self, img: Image, l1i: int, pos: int, end: int, depth: int) -> None:
        g = img.meta.geom
        l2 = img.meta.l2
        span = g.l2_span_bytes
        base = l1i * span
        unit = g.subcluster_size
        sub = g.subclusters
        table = l2.table(l2.l2_offset(l1i))
        u0 = (pos - base) // unit
        u1 = -(-(end - base) // unit)
        kind, _host, _desc = l2.classify(table, u0, u1)
        c0, c1 = u0 // sub, -(-u1 // sub)
        ent = table[c0:c1, 0] if g.extended_l2 else table[c0:c1]
        fields = decode_l2(ent)
        chost = fields.host
        alloc = ~fields.compressed & ((chost != 0) | (fields.copied & l2.data_file))
        units = np.arange(u0, u1, dtype=np.int64)
        cl = units // sub - c0
        off = np.where(alloc[cl], chost[cl] + (units % sub) * unit, -1)
        n = len(kind)
        brk = np.ones(n, dtype=bool)
        if n > 1:
            both = (off[1:] >= 0) & (off[:-1] >= 0)
            brk[1:] = (
                (kind[1:] != kind[:-1])
                | ((off[1:] >= 0) != (off[:-1] >= 0))
                | (both & (off[1:] != off[:-1] + unit))
            )
        starts = np.flatnonzero(brk)
        ends = np.append(starts[1:], n)
        name = (img.data_storage or img.storage).name
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            ga = max(pos, base + (u0 + s) * unit)
            gb = min(end, base + (u0 + e) * unit)
            k = int(kind[s])
            h = int(off[s])
            if h >= 0:
                h += ga - (base + (u0 + s) * unit)
            if k == Kind.DATA:
                self._data(img, ga, gb, h, depth)
            elif k == Kind.COMPRESSED:
                self.add(MapEntry(ga, gb - ga, depth, True, False, True, -1, name))
            elif k == Kind.ZERO:
                self.add(MapEntry(ga, gb - ga, depth, True, True, False, h, name))
            else:
                self._unallocated(img, ga, gb, h, depth)


def map_image(img: Image | RawImage, start: int = 0, length: int | None = None) -> list[MapEntry]:
    """The merged extents of the virtual disk (or of [start, start+length) inside it)."""
    if start < 0 or (length is not None and length < 0):
        raise InvalidArgumentError("start offset and length must not be negative")
    size = disk_size(img)
    end = size if length is None else min(size, start + length)
    m = _Mapper()
    if start < end:
        m.layer(img, start, end, 0)
    else:
        # qemu-img prints one empty extent when there is nothing to map
        m.entries.append(MapEntry(start, 0, 0, False, False, False, -1, img.filename))
    return m.entries


def map_path(
    path: str,
    fmt: str | None = None,
    *,
    force_share: bool = False,
    start: int = 0,
    length: int | None = None,
    backing: bool = True,
) -> list[MapEntry]:
    img = open_any(path, fmt, force_share=force_share, backing=backing)
    try:
        return map_image(img, start, length)
    finally:
        img.close()


def format_json(entries: list[MapEntry]) -> str:
    """Byte-for-byte the layout qemu-img 7.2 prints."""
    lines = []
    for e in entries:
        d = e.to_json()
        body = ", ".join(f'"{k}": {json.dumps(v)}' for k, v in d.items())
        lines.append("{ " + body + "}")
    return "[" + ",\n".join(lines) + "]\n"


def _hex(v: int) -> str:
    return f"{v:#x}" if v else "0"


def format_human(entries: list[MapEntry]) -> tuple[str, str | None]:
    """qemu-img's human table; the error message (if any) stops it like qemu-img does."""
    out = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    for e in entries:
        if e.data and e.offset < 0:
            return "\n".join(out) + "\n", "File contains external, encrypted or compressed clusters."
        if e.data and not e.zero:
            out.append(f"{_hex(e.start):<16}{_hex(e.length):<16}{_hex(e.offset):<16}{e.filename}")
    return "\n".join(out) + "\n", None


__all__ = ["MapEntry", "map_image", "map_path", "format_json", "format_human", "host_segments",
           "disk_size"]
