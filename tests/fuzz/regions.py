"""Regions of a seed image for the fuzzer (see harness.py): an independent reading of the
qcow2 file with plain `struct` (not qcow2kit) into header fields, extension headers, L1 / L2 /
reftable / refblock entries, snapshot table fields, bitmap directory and compressed data,
the places a mutation (mutations.py) aims at.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class Region:
    """`count` items of `width` bytes at `offset`, `stride` apart (width 0: a byte blob)."""

    kind: str
    offset: int
    count: int
    width: int
    stride: int = 0


HEADER_FIELDS = (  # (offset, width) of every v2 / v3 header field
    (4, 4), (8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4), (40, 8), (48, 8), (56, 4),
    (60, 4), (64, 8), (72, 8), (80, 8), (88, 8), (96, 4), (100, 4), (104, 1),
)
OFFSET_MASK = 0x00FFFFFFFFFFFE00


def find_regions(buf: bytes) -> list[Region]:
    u32 = lambda off: struct.unpack_from(">I", buf, off)[0]  # noqa: E731
    u64 = lambda off: struct.unpack_from(">Q", buf, off)[0]  # noqa: E731
    version = u32(4)
    cbits = u32(20)
    cs = 1 << cbits
    regions: list[Region] = []
    nfields = len(HEADER_FIELDS) if version == 3 else 12
    for off, width in HEADER_FIELDS[:nfields]:
        regions.append(Region("header", off, 1, width))
    hlen = u32(100) if version == 3 else 72
    bf_off = u64(8)
    ext_end = bf_off if bf_off else cs
    pos = hlen
    bitmap_dir: tuple[int, int] | None = None
    while pos + 8 <= ext_end:
        etype, elen = u32(pos), u32(pos + 4)
        regions.append(Region("ext-type", pos, 1, 4))
        regions.append(Region("ext-len", pos + 4, 1, 4))
        if etype == 0:
            break
        if elen:
            regions.append(Region("ext-data", pos + 8, elen, 1, 1))
        if etype == 0x23852875 and elen == 24:
            bitmap_dir = (u64(pos + 24), u64(pos + 16))
            for fo, fw in ((0, 4), (4, 4), (8, 8), (16, 8)):
                regions.append(Region("bitmaps-ext", pos + 8 + fo, 1, fw))
        pos += 8 + ((elen + 7) & ~7)
    if bf_off:
        regions.append(Region("backing-name", bf_off, max(1, u32(16)), 1, 1))
    l1_size, l1_off = u32(36), u64(40)
    ext_l2 = version == 3 and bool(u64(72) & 16)
    l2_width = 16 if ext_l2 else 8
    if l1_size:
        regions.append(Region("l1", l1_off, l1_size, 8, 8))
    seen_l2: set[int] = set()

    def add_l2_of(l1_offset: int, n: int, kind: str) -> None:
        for i in range(n):
            e = u64(l1_offset + 8 * i) & OFFSET_MASK
            if e and e + cs <= len(buf) and e not in seen_l2:
                seen_l2.add(e)
                regions.append(Region(kind, e, cs // l2_width, 8, l2_width))
                if ext_l2:
                    regions.append(Region("l2-bitmap", e + 8, cs // 16, 8, 16))
                for j in range(cs // l2_width):
                    ent = u64(e + j * l2_width)
                    if ent >> 62 & 1:
                        x = 62 - (cbits - 8)
                        coff = ent & ((1 << x) - 1)
                        nsec = ((ent >> x) & ((1 << (cbits - 8)) - 1)) + 1
                        length = nsec * 512 - (coff & 511)
                        if coff + length <= len(buf):
                            regions.append(Region("compressed", coff, length, 1, 1))

    add_l2_of(l1_off, l1_size, "l2")
    rt_off, rt_clusters = u64(48), u32(56)
    regions.append(Region("reftable", rt_off, rt_clusters * cs // 8, 8, 8))
    for i in range(rt_clusters * cs // 8):
        rb = u64(rt_off + 8 * i) & ~0x1FF
        if rb and rb + cs <= len(buf):
            regions.append(Region("refblock", rb, cs, 1, 1))
    nb_snap, snap_off = u32(60), u64(64)
    pos = snap_off
    for _ in range(nb_snap):
        for fo, fw in ((0, 8), (8, 4), (12, 2), (14, 2), (32, 4), (36, 4)):
            regions.append(Region("snapshot", pos + fo, 1, fw))
        sl1_off, sl1_size = u64(pos), u32(pos + 8)
        id_len, name_len, extra = struct.unpack_from(">HH", buf, pos + 12) + (u32(pos + 36),)
        if extra:
            regions.append(Region("snapshot-extra", pos + 40, extra, 1, 1))
        if sl1_size:
            regions.append(Region("snapshot-l1", sl1_off, sl1_size, 8, 8))
            add_l2_of(sl1_off, sl1_size, "snapshot-l2")
        end = pos + 40 + extra + id_len + name_len
        pos = end + (-end % 8)
    if bitmap_dir is not None:
        doff, dsize = bitmap_dir
        regions.append(Region("bitmap-dir", doff, dsize, 1, 1))
        for fo, fw in ((0, 8), (8, 4), (12, 4), (16, 1), (17, 1), (18, 2), (20, 4)):
            regions.append(Region("bitmap-dir-entry", doff + fo, 1, fw))
        tbl_off, tbl_size = u64(doff), u32(doff + 8)
        if tbl_size:
            regions.append(Region("bitmap-table", tbl_off, tbl_size, 8, 8))
    regions.append(Region("cluster0", 0, min(cs, len(buf)), 1, 1))
    regions.append(Region("file", 0, len(buf), 1, 1))
    return [r for r in regions if r.count > 0 and r.offset + max(r.width, 1) <= len(buf)]
