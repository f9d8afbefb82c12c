"""format/ codecs: round trips, and golden bytes taken from images qemu-img made (header,
extensions, L1/L2/extended-L2 entries, compressed descriptors, refcount blocks of every
width, snapshot table)."""

from __future__ import annotations

import json
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from qcow2kit.format import constants as C
from qcow2kit.format.compression import compress, decompress
from qcow2kit.format.entries import compressed_extent
from qcow2kit.format.extensions import (
    BitmapsExtension,
    Extension,
    encode_extensions,
    feature_names,
    feature_table_bytes,
    parse_extensions,
)
from qcow2kit.format.geometry import Geometry
from qcow2kit.format.header import Header
from qcow2kit.format.snapshot import parse_snapshots, snapshot_table_bytes
from qcow2kit.format.tables import decode_refblock, decode_table, encode_refblock, encode_table
from tests.helpers import qemu_img, qemu_io


def _cluster0(path: Path) -> bytes:
    data = path.read_bytes()
    cbits = struct.unpack_from(">I", data, 20)[0]
    return data[: 1 << cbits]


def _header(path: Path) -> Header:
    return Header.from_bytes(_cluster0(path))


# ---- header and extensions ---------------------------------------------------------------
@pytest.mark.parametrize(
    "opts,size",
    [
        ("compat=0.10", "1G"),
        ("compat=1.1", "1G"),
        ("cluster_size=512,refcount_bits=1", "64M"),
        ("cluster_size=2M,refcount_bits=64", "1T"),
        ("extended_l2=on,compression_type=zstd,lazy_refcounts=on", "3G"),
    ],
)
def test_header_golden(tmp_path: Path, opts: str, size: str) -> None:
    p = tmp_path / "h.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", opts, str(p), size)
    raw = _cluster0(p)
    h = Header.from_bytes(raw)
    info = json.loads(qemu_img("info", "--output=json", str(p)).stdout)
    spec = info["format-specific"]["data"]
    assert h.size == info["virtual-size"]
    assert h.cluster_size == info["cluster-size"]
    assert h.refcount_bits == spec["refcount-bits"]
    assert h.version == (2 if spec["compat"] == "0.10" else 3)
    assert C.COMPRESSION_NAMES[h.compression_type] == spec["compression-type"]
    assert h.extended_l2 == spec.get("extended-l2", False)
    enc = h.to_bytes()
    assert raw[: len(enc)] == enc  # byte-exact re-encoding of header + extensions
    assert not any(raw[len(enc) : 4096])


def test_header_backing_and_data_file_golden(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "16M")
    p = tmp_path / "ov.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(p))
    h = _header(p)
    assert h.backing_file == "base.qcow2"
    assert h.backing_format == "qcow2"
    assert h.backing_file_size == len("base.qcow2")
    raw = _cluster0(p)
    assert raw[h.backing_file_offset : h.backing_file_offset + h.backing_file_size] == b"base.qcow2"
    assert raw[: len(h.to_bytes())] == h.to_bytes()
    assert h.relayout() == h
    d = tmp_path / "d.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'd.raw'},data_file_raw=on",
             str(d), "4M")
    hd = _header(d)
    assert hd.has_data_file and hd.data_file_raw
    assert hd.data_file == str(tmp_path / "d.raw")
    assert _cluster0(d)[: len(hd.to_bytes())] == hd.to_bytes()


def test_feature_table_matches_qemu(tmp_path: Path) -> None:
    p = tmp_path / "f.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "1M")
    theirs = _header(p).extension(C.EXT_FEATURE_TABLE)
    assert theirs is not None
    assert feature_names(theirs) == feature_names(feature_table_bytes())
    assert theirs == feature_table_bytes()


def test_extensions_round_trip_keeps_unknown() -> None:
    exts = [
        Extension(C.EXT_BACKING_FORMAT, b"qcow2"),
        Extension(0x12345678, b"\x01\x02\x03"),
        Extension(C.EXT_FEATURE_TABLE, feature_table_bytes()),
    ]
    blob = encode_extensions(exts)
    assert len(blob) % 8 == 0
    assert parse_extensions(blob, 0, len(blob)) == exts
    assert blob.endswith(b"\0" * 8)


def test_bitmaps_extension_golden(tmp_path: Path) -> None:
    p = tmp_path / "b.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "4M")
    qemu_img("bitmap", "--add", str(p), "one")
    qemu_img("bitmap", "--add", str(p), "two")
    h = _header(p)
    raw = h.extension(C.EXT_BITMAPS)
    assert raw is not None
    ext = BitmapsExtension.from_bytes(raw)
    assert ext.nb_bitmaps == 2
    assert ext.to_bytes() == raw
    assert ext.directory_offset % h.cluster_size == 0


# ---- L1 / L2 / extended L2 entries -----------------------------------------------------
def _l1(path: Path, h: Header) -> np.ndarray:
    data = path.read_bytes()
    return decode_table(data[h.l1_table_offset : h.l1_table_offset + h.l1_size * 8])


def test_l1_l2_entries_golden(tmp_path: Path) -> None:
    p = tmp_path / "e.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "1G")
    qemu_io(p, "write -P 1 0 64k", "write -P 2 512M 128k", "write -z 128k 64k")
    h = _header(p)
    data = p.read_bytes()
    l1 = _l1(p, h)
    assert encode_table(l1) == data[h.l1_table_offset : h.l1_table_offset + h.l1_size * 8]
    assert len(l1) == 2 and all(int(e) & C.OFLAG_COPIED for e in l1)
    l2_off = int(l1[0]) & C.OFFSET_MASK
    raw_l2 = data[l2_off : l2_off + h.cluster_size]
    l2 = decode_table(raw_l2)
    assert encode_table(l2) == raw_l2
    e0, e1, e2 = (int(x) for x in l2[:3])
    assert e0 & C.OFLAG_COPIED and e0 & C.OFFSET_MASK and not e0 & 1
    assert data[e0 & C.OFFSET_MASK : (e0 & C.OFFSET_MASK) + 16] == b"\x01" * 16
    assert e1 == 0
    assert e2 == C.OFLAG_ZERO  # zero cluster, no host cluster
    assert not (l2[3:] != 0).any()


def test_extended_l2_entries_golden(tmp_path: Path) -> None:
    p = tmp_path / "x.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on", str(p), "8M")
    qemu_io(p, "write -P 1 2k 2k", "write -z 8k 2k", "write -P 3 64k 64k")
    h = _header(p)
    data = p.read_bytes()
    l2_off = int(_l1(p, h)[0]) & C.OFFSET_MASK
    raw_l2 = data[l2_off : l2_off + h.cluster_size]
    l2 = decode_table(raw_l2, extended=True)
    assert l2.shape == (h.cluster_size // 16, 2)
    assert encode_table(l2) == raw_l2
    assert int(l2[0, 1]) == (1 << 1) | (1 << (32 + 4))  # subcluster 1 data, subcluster 4 zero
    assert int(l2[1, 1]) == C.BITMAP_ALL_ALLOC
    assert int(l2[0, 0]) & C.OFLAG_COPIED
    assert int(l2[2, 0]) == 0 and int(l2[2, 1]) == 0


def test_compressed_descriptors_golden(tmp_path: Path) -> None:
    p = tmp_path / "c.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "4M")
    qemu_io(p, *(f"write -c -P {i + 1} {i * 65536} 64k" for i in range(4)))
    h = _header(p)
    g = Geometry(h.cluster_bits, h.refcount_order)
    data = p.read_bytes()
    l2_off = int(_l1(p, h)[0]) & C.OFFSET_MASK
    l2 = decode_table(data[l2_off : l2_off + h.cluster_size])
    hosts = []
    for i in range(4):
        e = int(l2[i])
        assert e & C.OFLAG_COMPRESSED and not e & C.OFLAG_COPIED
        desc = e & ((1 << 62) - 1)
        off, n = compressed_extent(desc, g)
        assert (off + n) % 512 == 0
        assert g.encode_compressed(off, n) == e
        assert decompress(data[off : off + n], h.cluster_size, h.compression_type) == bytes(
            [i + 1]) * 65536
        hosts.append(off // h.cluster_size)
    assert len(set(hosts)) == 1  # qemu packs small compressed clusters into one host cluster


@pytest.mark.parametrize("cbits", [9, 12, 16, 21])
def test_compressed_descriptor_round_trip(cbits: int) -> None:
    g = Geometry(cbits)
    rng = random.Random(cbits)
    for _ in range(200):
        off = rng.randrange(0, 1 << 40)
        n = rng.randrange(1, 1 << cbits)
        e = g.encode_compressed(off, n)
        doff, dn = compressed_extent(e, g)
        assert doff == off
        assert dn >= n and (doff + dn) % 512 == 0 and dn - n < 512


# ---- refcount blocks -------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_refblock_golden(tmp_path: Path, bits: int) -> None:
    p = tmp_path / "r.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"refcount_bits={bits},cluster_size=4096", str(p),
             "16M")
    qemu_io(p, "write -P 1 0 20k")
    if bits > 1:
        qemu_img("snapshot", "-c", "s", str(p))  # refcount 2 on clusters shared with it
    h = _header(p)
    order = bits.bit_length() - 1
    data = p.read_bytes()
    reftable = decode_table(data[h.refcount_table_offset : h.refcount_table_offset + 4096])
    blk_off = int(reftable[0])
    raw = data[blk_off : blk_off + h.cluster_size]
    block = decode_refblock(raw, order)
    assert len(block) == h.cluster_size * 8 // bits
    assert encode_refblock(block, order) == raw
    used = -(-len(data) // h.cluster_size)
    check = json.loads(qemu_img("check", "--output=json", str(p)).stdout)
    assert check.get("leaks", 0) == 0
    assert int(block[0]) == 1  # the header
    assert int((block[:used] > 0).sum()) == used  # every cluster of the file is in use
    assert not block[used:].any()
    if bits >= 2:
        assert int(block.max()) == 2  # data clusters shared with the snapshot


@pytest.mark.parametrize("order", range(7))
def test_refblock_round_trip_every_width(order: int) -> None:
    rng = np.random.default_rng(order)
    entries = 4096 * 8 >> order
    maxv = (1 << (1 << order)) - 1
    values = rng.integers(0, maxv, size=entries, dtype=np.uint64, endpoint=True)
    enc = encode_refblock(values, order)
    assert len(enc) == 4096
    dec = decode_refblock(enc, order)
    assert (dec.astype(np.uint64) == values).all()
    # sub-byte widths are packed least-significant bits first
    if order < 3:
        one = np.zeros(entries, dtype=np.uint64)
        one[0] = 1
        assert encode_refblock(one, order)[0] == 1
        one[0], one[1] = 0, 1
        assert encode_refblock(one, order)[0] == 1 << (1 << order)


# ---- snapshots and compression ---------------------------------------------------------
def test_snapshot_table_golden(tmp_path: Path) -> None:
    p = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "4M")
    qemu_io(p, "write -P 1 0 64k")
    qemu_img("snapshot", "-c", "first", str(p))
    qemu_img("snapshot", "-c", "second name", str(p))
    h = _header(p)
    data = p.read_bytes()
    buf = data[h.snapshots_offset : h.snapshots_offset + 4096]
    snaps = parse_snapshots(buf, h.nb_snapshots, h.cluster_size)
    assert [s.name for s in snaps] == ["first", "second name"]
    assert [s.id_str for s in snaps] == ["1", "2"]
    assert all(s.disk_size == 4 << 20 for s in snaps)
    assert all(s.l1_table_offset % h.cluster_size == 0 for s in snaps)
    table = snapshot_table_bytes(snaps)
    # qemu does not write the last entry's padding when the table ends the file
    n = min(len(buf), len(table))
    assert buf[:n] == table[:n] and len(table) - n < 8


@pytest.mark.parametrize("ctype", [C.COMPRESSION_ZLIB, C.COMPRESSION_ZSTD])
def test_compression_round_trip(ctype: int) -> None:
    rng = random.Random(ctype)
    for cs in (512, 65536):
        data = rng.randbytes(cs // 4) + bytes(cs - cs // 4)
        packed = compress(data, ctype)
        assert decompress(packed, cs, ctype) == data
        # and a decoder that is not ours reads it: raw deflate, or a zstd frame
        if ctype == C.COMPRESSION_ZLIB:
            assert zlib.decompressobj(-15).decompress(packed) == data
        else:
            import zstandard

            assert zstandard.ZstdDecompressor().decompressobj().decompress(packed) == data


@pytest.mark.parametrize("order", range(7))
def test_create_refcounts_match_the_encoder(order: int) -> None:
    """create writes its refcount blocks without numpy (ops/create.refcounts_of_first): the
    same bytes as format/tables.encode_refblock, for every width and any count of used
    clusters, whole or partial bytes."""
    import numpy as np

    from qcow2kit.format.tables import encode_refblock, refcount_dtype
    from qcow2kit.ops.create import refcounts_of_first

    entries = 4096 * 8 >> order  # one 4 KiB block
    for used in (0, 1, 2, 3, 5, 7, 8, 9, 63, 64, 65, entries - 1, entries):
        counts = np.zeros(entries, dtype=refcount_dtype(order))
        counts[:used] = 1
        assert refcounts_of_first(used, entries, order) == encode_refblock(counts, order), used
