"""map: the allocation of every guest byte through the backing chain, as `qemu-img map`
reports it (same extents, same merging, same JSON).

Per layer, batches of consecutive L2 tables are classified and split into runs with numpy
at once (no Python loop per entry); extents are kept as columns and merged once at the end,
and ops/map_format.py prints the columns (the one place that formats an extent). Unallocated
ranges fall through to the backing file (depth + 1), run by run. Never writes to an image.
The command line tries ops/map_plain.py first (plain images, without numpy); this module
answers everything else and is the reference that fast path must agree with. Like QEMU 7.2:
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

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..errors import InvalidArgumentError
from ..format import constants as C
from ..format.entries import decode_l2
from ..image import Image, RawImage, open_any
from ..metadata.l2map import Kind
from .map_chain import host_segments
from .map_format import flag_code, human_text, json_text
from .map_plain import l1_batches

I64 = npt.NDArray[np.int64]
B = npt.NDArray[np.bool_]


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
        """The extent as the JSON value qemu-img gives it (the text: map_format)."""
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


# the most consecutive L2 entries (units) classified at once: bounds the temporaries of a
# walk over a large dense image (2^18 entries: a few MiB) while keeping numpy's per-call
# overhead per batch, not per table
_BATCH_UNITS = 1 << 18


class Extents:
    """Merged extents as columns (numpy arrays, one row per extent): what `map` prints.
    `names[name[i]]` is row i's file name."""

    def __init__(self, start: I64, length: I64, depth: I64, present: B, zero: B, data: B,
                 offset: I64, name: I64, names: list[str]) -> None:
        self.start, self.length, self.depth = start, length, depth
        self.present, self.zero, self.data = present, zero, data
        self.offset, self.name, self.names = offset, name, names

    def __len__(self) -> int:
        return len(self.start)

    def entries(self) -> list[MapEntry]:
        names = self.names
        return [MapEntry(s, n, d, p, z, da, o, names[f]) for s, n, d, p, z, da, o, f in zip(
            self.start.tolist(), self.length.tolist(), self.depth.tolist(),
            self.present.tolist(), self.zero.tolist(), self.data.tolist(),
            self.offset.tolist(), self.name.tolist(), strict=True)]

    def codes(self) -> list[int]:
        """Each row's flags as map_format.flag_code packs them."""
        codes: list[int] = (((self.depth * 2 + self.present) * 2 + self.zero) * 2
                            + self.data).tolist()
        return codes

    def json(self) -> str:
        """Byte-for-byte the layout qemu-img 7.2 prints (map_format.json_text)."""
        return json_text(self.start.tolist(), self.length.tolist(), self.codes(),
                         self.offset.tolist())

    def human(self) -> tuple[str, str | None]:
        """qemu-img's human table and the error that stops it (map_format.human_text)."""
        names = self.names
        return human_text(self.start.tolist(), self.length.tolist(), self.codes(),
                          self.offset.tolist(), [names[i] for i in self.name.tolist()])


class _Mapper:
    """Collects unmerged extents in guest order, as rows (one at a time) or as blocks of
    columns (a whole batch of L2 entries at once), and merges them once at the end exactly
    as qemu-img does entry by entry (same flags, same file, contiguous host offsets)."""

    def __init__(self) -> None:
        self._rows: list[tuple[int, int, int, bool, bool, bool, int, int]] = []
        self._blocks: list[tuple[I64, ...]] = []
        self._names: dict[str, int] = {}
        self._prealloc: dict[int, bool] = {}

    def _name(self, name: str) -> int:
        return self._names.setdefault(name, len(self._names))

    def add(self, e: MapEntry) -> None:
        self._rows.append((e.start, e.length, e.depth, e.present, e.zero, e.data, e.offset,
                           self._name(e.filename)))

    def _flush_rows(self) -> None:
        if self._rows:
            cols = np.array(self._rows, dtype=np.int64).reshape(-1, 8)
            self._blocks.append(tuple(cols[:, k].copy() for k in range(8)))
            self._rows = []

    def add_block(self, start: I64, length: I64, depth: int, present: B, zero: B, data: B,
                  offset: I64, name: str) -> None:
        self._flush_rows()
        n = len(start)
        self._blocks.append((start, length, np.full(n, depth, dtype=np.int64),
                             present.astype(np.int64), zero.astype(np.int64),
                             data.astype(np.int64), offset,
                             np.full(n, self._name(name), dtype=np.int64)))

    def result(self) -> Extents:
        self._flush_rows()
        names = list(self._names)
        if not self._blocks:
            e = np.zeros(0, dtype=np.int64)
            return Extents(e, e, e, e.astype(bool), e.astype(bool), e.astype(bool), e, e, names)
        start, length, depth, present, zero, data, offset, name = (
            np.concatenate([b[k] for b in self._blocks]) for k in range(8))
        # extent i joins extent i-1 under the rule of MapEntry.mergeable (pairwise is the
        # same as entry by entry: a merged extent keeps its first row's file and offset)
        has = offset >= 0
        join = np.zeros(len(start), dtype=bool)
        join[1:] = (
            (depth[1:] == depth[:-1]) & (present[1:] == present[:-1])
            & (zero[1:] == zero[:-1]) & (data[1:] == data[:-1])
            & (has[1:] == has[:-1])
            & (~has[:-1] | ((offset[:-1] + length[:-1] == offset[1:]) & (name[1:] == name[:-1])))
            & (start[:-1] + length[:-1] == start[1:])
        )
        first = np.flatnonzero(~join)
        return Extents(start[first], np.add.reduceat(length, first), depth[first],
                       present[first].astype(bool), zero[first].astype(bool),
                       data[first].astype(bool), offset[first], name[first], names)

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

    def _holes_matter(self, img: Image) -> bool:
        """Whether data clusters must be split by the host file's holes (QEMU does so for
        images that look metadata-preallocated)."""
        storage = img.data_storage or img.storage
        return getattr(storage, "fd", None) is not None and self._metadata_preallocated(img)

    def _data(self, img: Image, a: int, b: int, host: int, depth: int) -> None:
        storage = img.data_storage or img.storage
        name = storage.name
        if not self._holes_matter(img):
            self.add(MapEntry(a, b - a, depth, True, False, True, host, name))
            return
        fd = getattr(storage, "fd", None)
        assert fd is not None
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
        hit = (np.flatnonzero(l2_offsets[first : last + 1]) + first).tolist()
        per_batch = max(1, _BATCH_UNITS // (g.l2_entries * g.subclusters))
        pos = start
        for k, j in l1_batches(hit, per_batch):
            base = hit[k] * span
            if pos < base:
                self._unallocated(img, pos, base, -1, depth)
                pos = base
            bend = min(end, hit[j - 1] * span + span)
            self._tables(img, hit[k:j], pos, bend, depth)
            pos = bend
        if pos < end:
            self._unallocated(img, pos, end, -1, depth)

    def _tables(self, img: Image, l1_indices: list[int], pos: int, end: int, depth: int) -> None:
        """The extents of [pos, end) inside the L2 tables of consecutive L1 entries, every
        entry of the batch classified at once."""
        g = img.meta.geom
        l2 = img.meta.l2
        base = l1_indices[0] * g.l2_span_bytes
        unit = g.subcluster_size
        sub = g.subclusters
        table = l2.read_tables(l1_indices)
        u0 = (pos - base) // unit
        u1 = -(-(end - base) // unit)
        kind, unit_host, _desc = l2.classify(table, u0, u1)
        if g.extended_l2:
            # zero subclusters of an allocated cluster keep the cluster's host offset
            c0, c1 = u0 // sub, -(-u1 // sub)
            fields = decode_l2(table[c0:c1, 0])
            chost = fields.host
            alloc = ~fields.compressed & ((chost != 0) | (fields.copied & l2.data_file))
            units = np.arange(u0, u1, dtype=np.int64)
            cl = units // sub - c0
            off = np.where(alloc[cl], chost[cl] + (units % sub) * unit, -1)
        else:
            off = unit_host
        n = len(kind)
        has = off >= 0
        brk = np.ones(n, dtype=bool)
        if n > 1:
            brk[1:] = (
                (kind[1:] != kind[:-1])
                | (has[1:] != has[:-1])
                | (has[1:] & has[:-1] & (off[1:] != off[:-1] + unit))
            )
        starts = np.flatnonzero(brk)
        unit_start = base + (u0 + starts) * unit
        ga = np.maximum(unit_start, pos)
        gb = np.minimum(np.append(unit_start[1:], base + (u0 + n) * unit), end)
        rkind = kind[starts]
        h = off[starts]
        h = np.where(h >= 0, h + (ga - unit_start), -1)
        name = (img.data_storage or img.storage).name
        unalloc = rkind == Kind.UNALLOCATED
        is_data = rkind == Kind.DATA
        if (img.backing is not None and unalloc.any()) or (
            is_data.any() and self._holes_matter(img)
        ):
            self._runs_one_by_one(img, ga, gb, rkind, h, depth, name)
            return
        is_zero = rkind == Kind.ZERO
        is_comp = rkind == Kind.COMPRESSED
        # data: present, data, host offset; compressed: present, data, no offset; zero:
        # present, zero, offset if allocated; unallocated without backing: zero, absent
        self.add_block(ga, gb - ga, depth, ~unalloc, is_zero | unalloc, is_data | is_comp,
                       np.where(is_comp, -1, h), name)

    def _runs_one_by_one(self, img: Image, ga: I64, gb: I64, rkind: I64, h: I64, depth: int,
                         name: str) -> None:
        for a, b, k, off in zip(ga.tolist(), gb.tolist(), rkind.tolist(), h.tolist(),
                                strict=True):
            if k == Kind.DATA:
                self._data(img, a, b, off, depth)
            elif k == Kind.COMPRESSED:
                self.add(MapEntry(a, b - a, depth, True, False, True, -1, name))
            elif k == Kind.ZERO:
                self.add(MapEntry(a, b - a, depth, True, True, False, off, name))
            else:
                self._unallocated(img, a, b, off, depth)


def map_extents(img: Image | RawImage, start: int = 0, length: int | None = None) -> Extents:
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
        m.add(MapEntry(start, 0, 0, False, False, False, -1, img.filename))
    return m.result()


def map_image(img: Image | RawImage, start: int = 0, length: int | None = None) -> list[MapEntry]:
    """map_extents as a list of MapEntry."""
    return map_extents(img, start, length).entries()


def map_path_extents(
    path: str,
    fmt: str | None = None,
    *,
    force_share: bool = False,
    start: int = 0,
    length: int | None = None,
    backing: bool = True,
) -> Extents:
    img = open_any(path, fmt, force_share=force_share, backing=backing)
    try:
        return map_extents(img, start, length)
    finally:
        img.close()


def map_path(
    path: str,
    fmt: str | None = None,
    *,
    force_share: bool = False,
    start: int = 0,
    length: int | None = None,
    backing: bool = True,
) -> list[MapEntry]:
    return map_path_extents(path, fmt, force_share=force_share, start=start, length=length,
                            backing=backing).entries()


def _columns(entries: list[MapEntry]) -> tuple[list[int], list[int], list[int], list[int]]:
    return ([e.start for e in entries], [e.length for e in entries],
            [flag_code(e.depth, e.present, e.zero, e.data) for e in entries],
            [e.offset for e in entries])


def format_json(entries: list[MapEntry] | Extents) -> str:
    """Byte-for-byte the layout qemu-img 7.2 prints."""
    if isinstance(entries, Extents):
        return entries.json()
    return json_text(*_columns(entries))


def format_human(entries: list[MapEntry] | Extents) -> tuple[str, str | None]:
    """qemu-img's human table; the error message (if any) stops it like qemu-img does."""
    if isinstance(entries, Extents):
        return entries.human()
    return human_text(*_columns(entries), [e.filename for e in entries])


__all__ = ["MapEntry", "Extents", "map_image", "map_extents", "map_path", "map_path_extents",
           "format_json", "format_human", "host_segments", "disk_size"]
