"""Images QEMU makes, read through qcow2kit.open(...).read and compared with
`qemu-img convert -O raw` of the same image: whole-disk reads (small images) and reads
straddling cluster, subcluster and L2-table boundaries."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

import qcow2kit
from qcow2kit.metadata.l2map import Kind
from tests.helpers import qemu_img, qemu_io, raw_file

Builder = Callable[[Path], Path]


def _mixed_raw(path: Path, clusters: int, cs: int, seed: int = 1) -> None:
    """Clusters of varying compressibility: a random prefix of random length, then zeros;
    some fully random (incompressible), some all zero."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for i in range(clusters):
            kind = i % 7
            if kind == 0:
                f.write(bytes(cs))
            elif kind == 1:
                f.write(rng.randbytes(cs))
            else:
                k = rng.randrange(1, cs)
                f.write(rng.randbytes(k // 3) + bytes([i & 255]) * (k - k // 3) + bytes(cs - k))


def boundary_windows(size: int, cs: int, scs: int, span: int) -> list[tuple[int, int]]:
    """(offset, length) pairs around cluster, subcluster and L2 boundaries, inside size."""
    out: set[tuple[int, int]] = set()
    points = {cs, 2 * cs, 3 * cs, scs, 2 * scs, 5 * scs, span, 2 * span}
    lengths = (1, scs - 1, scs, scs + 1, cs - 1, cs, cs + 1, 2 * cs - 1, 2 * cs + 1, 3 * cs)
    for p in points:
        for off in (p - 1, p, p + 1, p - scs // 2):
            for n in lengths:
                if 0 <= off and off + n <= size and n > 0:
                    out.add((off, n))
    out.add((0, min(size, 3 * cs + 5)))
    out.add((max(0, size - cs - 7), min(size, cs + 7)))
    return sorted(out)


def assert_reads_match(img: Path, tmp: Path, *, full: bool = True) -> None:
    raw = raw_file(img, tmp / (img.name + ".raw"))
    size = raw.stat().st_size
    with qcow2kit.open(str(img)) as q:
        assert q.virtual_size == size
        cs = q.cluster_size
        ext = q.header.extended_l2
        scs = cs // 32 if ext else cs
        span = cs * (cs // (16 if ext else 8))
        with open(raw, "rb") as f:
            fd = f.fileno()
            if full:
                assert q.read(0, size) == os.pread(fd, size, 0)
            for off, n in boundary_windows(size, cs, scs, span):
                assert q.read(off, n) == os.pread(fd, n, off), (off, n)


# ---- builders --------------------------------------------------------------------------
def _plain(cs: int, size: str = "8M", extra: str = "") -> Builder:
    def build(tmp: Path) -> Path:
        p = tmp / "img.qcow2"
        opts = f"cluster_size={cs}" + (f",{extra}" if extra else "")
        qemu_img("create", "-f", "qcow2", "-o", opts, str(p), size)
        c = cs
        qemu_io(
            p,
            f"write -P 0x11 {c - 100} 300",
            f"write -P 0x22 {2 * c} {3 * c}",
            f"write -P 0x33 {7 * c + 1536} 4096",
            f"write -z {3 * c} {c}",
            f"write -P 0x44 {10 * c} {2 * c}",
            f"write -z -u {11 * c} {c}",
        )
        return p

    return build


@pytest.mark.parametrize("cs", [512, 1024, 4096, 65536, 2 << 20])
def test_cluster_sizes(tmp_path: Path, cs: int) -> None:
    size = "64M" if cs >= 65536 else "4M"
    img = _plain(cs, size)(tmp_path)
    assert_reads_match(img, tmp_path)


@pytest.mark.parametrize("cs,size", [(512, 1 << 20), (4096, 8 << 20), (65536, 1 << 30)])
def test_l2_table_boundaries(tmp_path: Path, cs: int, size: int) -> None:
    p = tmp_path / "l2.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cs}", str(p), str(size))
    span = cs * cs // 8
    qemu_io(
        p,
        f"write -P 0x5a {span - 3 * cs - 17} {6 * cs + 40}",
        f"write -P 0x6b {2 * span - cs} {cs}" if 2 * span <= size else "write -P 1 0 1",
        f"write -z {span} {cs}",
    )
    assert_reads_match(p, tmp_path, full=size <= (8 << 20))


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcount_widths(tmp_path: Path, bits: int) -> None:
    img = _plain(4096, "2M", f"refcount_bits={bits}")(tmp_path)
    assert_reads_match(img, tmp_path)


def test_compat_010(tmp_path: Path) -> None:
    img = _plain(65536, "8M", "compat=0.10")(tmp_path)
    assert_reads_match(img, tmp_path)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cs", [4096, 65536])
def test_convert_compressed(tmp_path: Path, ctype: str, cs: int) -> None:
    raw = tmp_path / "src.raw"
    _mixed_raw(raw, 80, cs)
    p = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype},cluster_size={cs}",
             str(raw), str(p))
    assert_reads_match(p, tmp_path)
    with qcow2kit.open(str(p)) as q:
        assert q.read(0, q.virtual_size) == raw.read_bytes()
        comp = [r for r in q.runs(0, q.virtual_size) if r.kind == Kind.COMPRESSED]
        hosts = [r.host_offset // cs for r in comp]
        # several compressed clusters share a host cluster, and (seen with 4 KiB clusters)
        # some spill into the next one
        assert len(set(hosts)) < len(hosts)
        assert cs != 4096 or any(r.host_offset // cs != (r.host_offset + r.comp_bytes - 1) // cs for r in comp)


def test_qemu_io_compressed_writes_shared_host_cluster(tmp_path: Path) -> None:
    p = tmp_path / "cw.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "4M")
    qemu_io(p, *(f"write -c -P {i + 1} {i * 65536} 64k" for i in range(6)),
            "write -P 9 100000 5000")
    assert_reads_match(p, tmp_path)


def test_backing_chain_raw_and_relative(tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    base = sub / "base.raw"
    qemu_img("create", "-f", "raw", str(base), "3M")
    qemu_io(base, "write -P 0xa1 0 3M", fmt="raw")
    mid = sub / "mid.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(mid), "6M")
    qemu_io(mid, "write -P 0xb2 100000 200000", "write -z 1M 64k", "write -P 0xb3 4M 10000")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "sub/mid.qcow2", "-F", "qcow2", str(top), "8M")
    qemu_io(top, "write -P 0xc4 150000 1000", "write -z 2M 100k", "write -P 0xc5 7M 4096")
    assert_reads_match(top, tmp_path)
    assert_reads_match(mid, tmp_path)


def test_backing_chain_depth(tmp_path: Path) -> None:
    prev = tmp_path / "l0.qcow2"
    qemu_img("create", "-f", "qcow2", str(prev), "2M")
    qemu_io(prev, "write -P 1 0 2M")
    for i in range(1, 5):
        cur = tmp_path / f"l{i}.qcow2"
        qemu_img("create", "-f", "qcow2", "-b", prev.name, "-F", "qcow2", str(cur))
        qemu_io(cur, f"write -P {i + 1} {i * 300000} 70000")
        prev = cur
    assert_reads_match(prev, tmp_path)


@pytest.mark.parametrize("raw_flag", [False, True])
def test_data_file(tmp_path: Path, raw_flag: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # qemu-img creates the data file relative to the cwd
    p = tmp_path / "d.qcow2"
    opts = "data_file=d.data" + (",data_file_raw=on" if raw_flag else "")
    qemu_img("create", "-f", "qcow2", "-o", opts, str(p), "4M")
    qemu_io(p, "write -P 7 0 70000", "write -z 1M 64k", "write -P 8 3M 1000")
    assert_reads_match(p, tmp_path)


def test_snapshots_active_state(tmp_path: Path) -> None:
    p = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "4M")
    qemu_io(p, "write -P 1 0 1M")
    qemu_img("snapshot", "-c", "one", str(p))
    qemu_io(p, "write -P 2 512k 1M", "write -z 0 64k")
    qemu_img("snapshot", "-c", "two", str(p))
    qemu_io(p, "write -P 3 3M 100k")
    assert_reads_match(p, tmp_path)


def test_bitmaps_present(tmp_path: Path) -> None:
    p = tmp_path / "b.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "4M")
    qemu_img("bitmap", "--add", str(p), "bm0")
    qemu_io(p, "write -P 5 64k 200k")
    assert_reads_match(p, tmp_path)


@pytest.mark.parametrize("with_backing", [False, True])
def test_extended_l2_subclusters(tmp_path: Path, with_backing: bool) -> None:
    p = tmp_path / "e.qcow2"
    args = ["create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k"]
    if with_backing:
        base = tmp_path / "eb.qcow2"
        qemu_img("create", "-f", "qcow2", str(base), "4M")
        qemu_io(base, "write -P 0xee 0 4M")
        args += ["-b", base.name, "-F", "qcow2"]
    qemu_img(*args, str(p), "4M")
    qemu_io(
        p,
        "write -P 1 2048 2048",  # one subcluster of cluster 0
        "write -P 2 6000 5000",  # straddles subclusters
        "write -z 16k 4k",
        "write -P 3 126976 8192",  # straddles a cluster boundary
        "write -c -P 4 1M 64k",
        "write -z -u 2M 64k",
    )
    assert_reads_match(p, tmp_path)


def test_zstd_qemu_io_and_lazy(tmp_path: Path) -> None:
    p = tmp_path / "z.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compression_type=zstd,lazy_refcounts=on",
             str(p), "2M")
    qemu_io(p, "write -c -P 3 0 64k", "write -c -P 4 64k 64k", "write -P 5 200k 10k")
    assert_reads_match(p, tmp_path)


def test_backing_shorter_than_overlay(tmp_path: Path) -> None:
    base = tmp_path / "short.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "1M")
    qemu_io(base, "write -P 0x77 0 1M")
    top = tmp_path / "long.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top), "3M")
    assert_reads_match(top, tmp_path)
    with qcow2kit.open(str(top)) as q:
        assert q.read(1024 * 1024 - 2, 4) == b"\x77\x77\0\0"


def test_metadata_preallocation(tmp_path: Path) -> None:
    p = tmp_path / "pm.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "preallocation=metadata", str(p), "2M")
    qemu_io(p, "write -P 1 100 1000")
    assert_reads_match(p, tmp_path)
