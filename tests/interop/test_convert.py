"""convert and compare against qemu-img: outputs read equal (qemu-img compare), qcow2 outputs
pass qemu-img check with no leaks, raw outputs are sparse, compare agrees with qemu-img."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

import qcow2kit
from qcow2kit.ops.compare import compare
from qcow2kit.ops.convert import convert
from qcow2kit.ops.map import format_json, map_path
from tests.helpers import assert_clean, qemu_compare, qemu_img, qemu_io


def _source_raw(path: Path, size: int = 6 << 20, seed: int = 3) -> bytes:
    """Random, compressible, zero and tiny-non-zero regions at odd boundaries."""
    rng = random.Random(seed)
    data = bytearray(size)
    pos = 0
    kind = 0
    while pos < size:
        n = min(size - pos, rng.choice([512, 4096, 65536, 100_000, 300_000, 1 << 20]))
        if kind % 4 == 0:
            data[pos : pos + n] = rng.randbytes(n)
        elif kind % 4 == 1:
            data[pos : pos + n] = bytes([kind & 255]) * n
        elif kind % 4 == 3:
            data[pos + n // 2] = 1
        kind += 1
        pos += n
    path.write_bytes(bytes(data))
    return bytes(data)


def _qemu_chain(tmp: Path) -> Path:
    base = tmp / "cbase.raw"
    qemu_img("create", "-f", "raw", str(base), "4M")
    qemu_io(base, "write -P 1 0 2M", fmt="raw")
    top = tmp / "ctop.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "raw", str(top), "6M")
    qemu_io(top, "write -P 2 1M 100k", "write -z 1536k 64k", "write -c -P 3 3M 64k",
            "write -P 4 5M 4k")
    return top


def _check(path: Path) -> dict[str, Any]:
    """qemu-img check clean, and our map of what we wrote equals qemu-img's."""
    out = assert_clean(path)
    assert format_json(map_path(str(path))) == qemu_img("map", "--output=json", str(path)).stdout
    return out


def test_raw_to_qcow2_to_raw(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    data = _source_raw(src)
    q = tmp_path / "out.qcow2"
    convert(str(src), str(q), out_fmt="qcow2")
    _check(q)
    qemu_compare(q, src)
    back = tmp_path / "back.raw"
    convert(str(q), str(back), out_fmt="raw")
    assert back.read_bytes() == data


def test_zero_clusters_stay_unallocated(tmp_path: Path) -> None:
    src = tmp_path / "z.raw"
    data = bytearray(4 << 20)
    data[65536 * 3 : 65536 * 3 + 10] = b"x" * 10
    data[65536 * 40 + 65535] = 7
    src.write_bytes(bytes(data))
    q = tmp_path / "z.qcow2"
    convert(str(src), str(q), out_fmt="qcow2")
    _check(q)
    qemu_compare(q, src)
    extents = json.loads(qemu_img("map", "--output=json", str(q)).stdout)
    data_bytes = sum(e["length"] for e in extents if e["data"])
    assert data_bytes == 2 * 65536


@pytest.mark.parametrize(
    "opts",
    [
        "cluster_size=512",
        "cluster_size=4096,refcount_bits=1",
        "cluster_size=2M",
        "compat=0.10",
        "extended_l2=on",
        "refcount_bits=64,lazy_refcounts=on",
        "preallocation=metadata",
        "preallocation=full,cluster_size=4096",
    ],
)
def test_qcow2_output_options(tmp_path: Path, opts: str) -> None:
    src = tmp_path / "s.raw"
    _source_raw(src, 3 << 20)
    q = tmp_path / "o.qcow2"
    kw: dict[str, Any] = {}
    for part in opts.split(","):
        k, v = part.split("=")
        if k in ("cluster_size", "refcount_bits"):
            kw[k] = 2 << 20 if v == "2M" else int(v)
        elif v in ("on", "off"):
            kw[k] = v == "on"
        else:
            kw[k] = v
    convert(str(src), str(q), out_fmt="qcow2", options=kw)
    _check(q)
    qemu_compare(q, src)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cs", [4096, 65536])
def test_compressed_output(tmp_path: Path, ctype: str, cs: int) -> None:
    src = tmp_path / "c.raw"
    _source_raw(src, 4 << 20)
    q = tmp_path / "c.qcow2"
    convert(str(src), str(q), out_fmt="qcow2", compressed=True,
            options={"compression_type": ctype, "cluster_size": cs})
    out = _check(q)
    qemu_compare(q, src)
    assert out.get("compressed-clusters", 0) > 0
    info = json.loads(qemu_img("info", "--output=json", str(q)).stdout)
    assert info["format-specific"]["data"]["compression-type"] == ctype
    # packed at byte granularity: far smaller than one host cluster per compressed cluster
    mine = q.stat().st_size
    theirs = tmp_path / "qemu.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype},cluster_size={cs}",
             str(src), str(theirs))
    assert mine <= theirs.stat().st_size * 1.1 + 4 * cs
    with qcow2kit.open(str(q)) as img:
        assert img.read(0, img.virtual_size) == src.read_bytes()


def test_compressed_incompressible_stored_plain(tmp_path: Path) -> None:
    src = tmp_path / "rand.raw"
    src.write_bytes(random.Random(5).randbytes(1 << 20))
    q = tmp_path / "rand.qcow2"
    convert(str(src), str(q), out_fmt="qcow2", compressed=True)
    out = _check(q)
    assert out.get("compressed-clusters", 0) == 0
    qemu_compare(q, src)


def test_compressed_extended_l2_and_odd_size(tmp_path: Path) -> None:
    src = tmp_path / "odd.raw"
    data = bytes([7]) * ((1 << 20) + 3 * 512)
    src.write_bytes(data)
    q = tmp_path / "odd.qcow2"
    convert(str(src), str(q), out_fmt="qcow2", compressed=True, options={"extended_l2": True})
    _check(q)
    qemu_compare(q, src)


def test_qcow2_chain_to_raw_and_qcow2(tmp_path: Path) -> None:
    top = _qemu_chain(tmp_path)
    raw = tmp_path / "chain.raw"
    convert(str(top), str(raw))
    qemu_compare(top, raw)
    assert compare(str(top), str(raw)).identical
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-O", "raw", str(top), str(ref))
    assert raw.read_bytes() == ref.read_bytes()
    # sparse: no more allocated than qemu-img's own output
    assert raw.stat().st_blocks <= ref.stat().st_blocks
    q = tmp_path / "chain.qcow2"
    convert(str(top), str(q), out_fmt="qcow2")
    _check(q)
    qemu_compare(q, top, "qcow2", "qcow2")


def test_raw_output_is_sparse(tmp_path: Path) -> None:
    p = tmp_path / "sp.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "256M")
    qemu_io(p, "write -P 1 100M 64k", "write -P 0 150M 1M")  # an allocated all-zero range
    raw = tmp_path / "sp.raw"
    convert(str(p), str(raw))
    assert raw.stat().st_size == 256 << 20
    assert raw.stat().st_blocks * 512 <= 128 << 10
    qemu_compare(p, raw)


def test_backing_output_writes_only_differences(tmp_path: Path) -> None:
    base = tmp_path / "bb.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "4M")
    qemu_io(base, "write -P 1 0 4M")
    src = tmp_path / "bsrc.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(src))
    qemu_io(src, "write -P 2 1M 64k", "write -z 2M 128k")
    flat = tmp_path / "bflat.raw"
    qemu_img("convert", "-O", "raw", str(src), str(flat))
    out = tmp_path / "bout.qcow2"
    convert(str(flat), str(out), out_fmt="qcow2", backing=str(base), backing_fmt="qcow2")
    _check(out)
    qemu_compare(out, flat)
    extents = json.loads(qemu_img("map", "--output=json", str(out)).stdout)
    own = [(e["start"], e["length"], e["zero"]) for e in extents if e["depth"] == 0]
    assert own == [(1 << 20, 65536, False), (2 << 20, 131072, True)]


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_qemu_compressed_source_roundtrip(tmp_path: Path, ctype: str) -> None:
    src = tmp_path / "r.raw"
    _source_raw(src, 2 << 20, seed=9)
    qc = tmp_path / "qc.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", str(src), str(qc))
    out = tmp_path / "qc.raw"
    convert(str(qc), str(out))
    assert out.read_bytes() == src.read_bytes()
    again = tmp_path / "again.qcow2"
    convert(str(qc), str(again), out_fmt="qcow2", compressed=True,
            options={"compression_type": ctype})
    _check(again)
    qemu_compare(again, src)


# ---- compare ---------------------------------------------------------------------------
def _pair(tmp: Path, name: str, size: str, *cmds: str) -> Path:
    p = tmp / name
    qemu_img("create", "-f", "qcow2", str(p), size)
    if cmds:
        qemu_io(p, *cmds)
    return p


@pytest.mark.parametrize(
    "a_cmds,b_cmds,b_size",
    [
        (("write -P 1 1M 64k",), ("write -P 1 1M 64k",), "4M"),
        (("write -P 1 1M 64k",), ("write -P 1 1M 64k", "write -P 2 1040000 3"), "4M"),
        (("write -P 1 1M 64k",), ("write -P 1 1M 64k", "write -P 0 1M 64k"), "4M"),
        (("write -P 1 1M 64k",), (), "8M"),
        (("write -P 1 1M 64k",), ("write -P 1 1M 64k", "write -P 3 6000000 1"), "8M"),
        (("write -P 1 1M 64k",), ("write -P 1 1M 64k", "write -z 6M 64k"), "8M"),
        (("write -z 0 64k",), (), "4M"),
    ],
)
def test_compare_matches_qemu(tmp_path: Path, a_cmds: tuple[str, ...], b_cmds: tuple[str, ...],
                              b_size: str, capsys: pytest.CaptureFixture[str]) -> None:
    from qcow2kit.cli.main import main

    a = _pair(tmp_path, "a.qcow2", "4M", *a_cmds)
    b = _pair(tmp_path, "b.qcow2", b_size, *b_cmds)
    theirs = qemu_img("compare", str(a), str(b), check=False)
    rc = main(["compare", str(a), str(b)])
    assert (rc, capsys.readouterr().out) == (theirs.returncode, theirs.stdout)
    res = compare(str(a), str(b))
    assert res.identical == (theirs.returncode == 0)


def test_compare_raw_vs_qcow2(tmp_path: Path) -> None:
    src = tmp_path / "cr.raw"
    _source_raw(src, 2 << 20)
    q = tmp_path / "cr.qcow2"
    qemu_img("convert", "-O", "qcow2", str(src), str(q))
    assert compare(str(q), str(src)).identical
    with open(src, "r+b") as f:
        f.seek(777_777)
        old = f.read(1)
        f.seek(777_777)
        f.write(bytes([old[0] ^ 0xFF]))
    res = compare(str(q), str(src), fmt_b="raw")
    assert not res.identical and res.mismatch_offset == 777_777 // 512 * 512
    theirs = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(q), str(src), check=False)
    assert f"offset {res.mismatch_offset}!" in theirs.stdout


@pytest.mark.parametrize(
    "opts",
    [
        {"cluster_size": 512},
        {"cluster_size": 1024, "refcount_bits": 1},
        {"refcount_bits": 2, "cluster_size": 4096},
        {"cluster_size": 2 << 20},
        {"extended_l2": True, "cluster_size": 16384, "compression_type": "zstd"},
        {"compat": "0.10"},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_compressed_output_geometries(tmp_path: Path, opts: dict[str, Any]) -> None:
    """Many L2 tables (small clusters) interleave with the packed data; narrow refcounts
    cap how many compressed clusters may share one host cluster."""
    src = tmp_path / "g.raw"
    rng = random.Random(11)
    src.write_bytes(rng.randbytes(1 << 20).hex().encode()[: 3 << 20] + bytes(1 << 20))
    q = tmp_path / "g.qcow2"
    convert(str(src), str(q), out_fmt="qcow2", compressed=True, options=opts)
    out = _check(q)
    assert out.get("compressed-clusters", 0) > 0
    qemu_compare(q, src)


def test_data_file_and_subcluster_sources(tmp_path: Path) -> None:
    df = tmp_path / "df.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'df.data'}", str(df), "4M")
    qemu_io(df, "write -P 3 100k 1M", "write -z 64k 64k")
    ex = tmp_path / "ex.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on", "-b", df.name, "-F", "qcow2",
             str(ex))
    qemu_io(ex, "write -P 1 2k 2k", "write -P 2 70k 3k", "write -z 200k 2k")
    for src in (df, ex):
        raw = tmp_path / f"{src.stem}.raw"
        convert(str(src), str(raw))
        qemu_compare(src, raw)
        out = tmp_path / f"{src.stem}.out.qcow2"
        convert(str(src), str(out), out_fmt="qcow2", compressed=src is df,
                options={"extended_l2": True})
        _check(out)
        qemu_compare(out, raw)
        assert compare(str(out), str(raw)).identical


def test_raw_source_of_odd_size(tmp_path: Path) -> None:
    src = tmp_path / "odd.raw"
    src.write_bytes(b"\x5a" * 1000)
    out = tmp_path / "odd.out.raw"
    ref = tmp_path / "odd.ref.raw"
    convert(str(src), str(out))
    qemu_img("convert", "-O", "raw", str(src), str(ref))
    assert out.read_bytes() == ref.read_bytes()  # qemu sees 1024 bytes: whole sectors
    q = tmp_path / "odd.qcow2"
    convert(str(src), str(q), out_fmt="qcow2")
    _check(q)
    qemu_compare(q, ref)


# ---- the pipeline's own parts: hole skipping, the zero scan, the reader thread ---------
def _sparse_raw(path: Path) -> dict[int, bytes]:
    """A 64 MiB raw file that is mostly a hole: data (some of it all-zero bytes) at a few
    places, among them a piece that is not cluster-aligned."""
    rng = random.Random(11)
    pieces = {0: rng.randbytes(70_000), 20 << 20: bytes(1 << 20),
              (33 << 20) + 4096: rng.randbytes(200_000), (64 << 20) - 512: rng.randbytes(512)}
    with open(path, "wb") as f:
        f.truncate(64 << 20)
        for off, data in pieces.items():
            f.seek(off)
            f.write(data)
    return pieces


@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
def test_holes_of_a_raw_source_are_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out_fmt: str
) -> None:
    src = tmp_path / "holey.img"
    pieces = _sparse_raw(src)
    allocated = src.stat().st_blocks * 512
    assert allocated < 8 << 20  # the filesystem keeps holes (else the test proves nothing)
    read = 0
    real_preadv = os.preadv

    def counting_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        nonlocal read
        n = real_preadv(fd, buffers, offset)
        read += n
        return n

    monkeypatch.setattr(os, "preadv", counting_preadv)
    out = tmp_path / f"holey.{out_fmt}"
    convert(str(src), str(out), src_fmt="raw", out_fmt=out_fmt)
    monkeypatch.undo()
    # holes are skipped by SEEK_DATA/SEEK_HOLE; only the data extents (whole clusters
    # around them for qcow2 output) are read
    assert 0 < read <= allocated + len(pieces) * (128 << 10)
    qemu_compare(out, src, out_fmt, "raw")
    if out_fmt == "qcow2":
        _check(out)
        extents = json.loads(qemu_img("map", "--output=json", str(out)).stdout)
        data = sum(e["length"] for e in extents if e["data"])
        assert data <= 1 << 20  # the holes and the all-zero megabyte stay unallocated
    else:
        assert out.stat().st_blocks * 512 <= allocated


def _nonzero_reference(buf: bytes, block: int) -> list[bool]:
    return [any(buf[i : i + block]) for i in range(0, len(buf), block)]


@pytest.mark.parametrize("block", [512, 4096, 65536])
def test_nonzero_blocks_matches_a_byte_scan(block: int) -> None:
    from qcow2kit.ops.convert import nonzero_blocks

    rng = random.Random(block)
    cases: list[bytes] = [b"", bytes(block), bytes(3 * block + 8)]
    for _ in range(40):
        n = rng.randrange(0, 24) * block + rng.choice([0, 8, 100, block - 8])
        buf = bytearray(n)
        for _ in range(rng.randrange(0, 12)):
            if n:
                buf[rng.randrange(n)] = rng.randrange(1, 256)
        cases.append(bytes(buf))
    # more runs of zero blocks than the scan reads run by run: one pass over everything
    many = bytearray(300 * block)
    for i in range(0, 300, 2):
        many[i * block + block // 3] = 7  # the pre-test's sample words stay zero
    cases.append(bytes(many))
    for case in cases:
        got = nonzero_blocks(memoryview(case), block).tolist()
        assert got == _nonzero_reference(case, block)


class _FailingSource:
    """A Source whose reads fail from the given offset on."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at = fail_at
        self.size = 64 << 20

    def read_into(self, mv: memoryview, pos: int) -> None:
        if pos >= self.fail_at:
            raise OSError(5, "Input/output error")
        mv[:] = bytes(len(mv))


def test_read_ahead_raises_reader_errors_and_stops() -> None:
    import threading

    from qcow2kit.ops.convert.source import ReadAhead

    before = threading.active_count()
    src: Any = _FailingSource(3 << 20)
    seen = []
    with pytest.raises(OSError, match="Input/output"), ReadAhead(
        src, [(0, 8 << 20)], 1 << 20, len
    ) as reader:
        for pos, mv, n in reader:
            assert n == len(mv) == 1 << 20
            seen.append(pos)
    assert seen == [0, 1 << 20, 2 << 20]
    # leaving early (a consumer error) stops the reader too
    endless: Any = _FailingSource(1 << 40)
    with pytest.raises(KeyError), ReadAhead(endless, [(0, 64 << 20)], 1 << 20, len) as again:
        for _ in again:
            raise KeyError("consumer")
    assert threading.active_count() == before


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_read_ahead_yields_every_chunk_in_order(tmp_path: Path, depth: int) -> None:
    from qcow2kit.image import open_any
    from qcow2kit.ops.convert.source import ReadAhead, Source

    raw = tmp_path / "ra.img"
    data = _source_raw(raw, 5 << 20, seed=depth)
    img = open_any(str(raw), "raw")
    try:
        ranges = [(0, 1 << 20), (3 << 20, (5 << 20) - 100)]
        got = bytearray()
        with ReadAhead(Source(img), ranges, 768 << 10, bytes, depth) as reader:
            for pos, mv, copy in reader:
                assert bytes(mv) == copy == data[pos : pos + len(mv)]
                got += copy
        assert bytes(got) == data[: 1 << 20] + data[3 << 20 : (5 << 20) - 100]
    finally:
        img.close()
