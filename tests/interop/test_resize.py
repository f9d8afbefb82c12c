"""resize / shrink against QEMU as the oracle: qemu-img check clean with no leaks, data equal to
a raw mirror, nothing left past the new end, and the refusals qemu-img makes."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest

import qcow2kit
from tests.helpers import assert_clean, layout, qemu_compare, qemu_img, qemu_io, raw_file

M = 1 << 20


def _assert_shrunk(path: Path, new_size: int) -> None:
    info = assert_clean(path)
    lay = layout(path)
    assert lay["size"] == new_size
    span = lay["cluster_size"] * lay["cluster_size"] // 8  # type: ignore[operator]
    needed = -(-new_size // span)
    assert all(e == 0 for e in lay["l1"][needed:]), "L1 entries past the new size"  # type: ignore[index]
    assert lay["empty_refblocks"] == [], f"reftable points at empty blocks {lay['empty_refblocks']}"
    end = info.get("image-end-offset", 0)
    cs = lay["cluster_size"]
    assert end - cs < lay["file_size"] <= end, (lay["file_size"], end)  # type: ignore[operator]


# iotest 163's three classes (image lengths halved to keep test I/O small)
CASES = [
    pytest.param(512, 64, 3 * M, 1 * M, 256 * 1024, id="512-rc64"),
    pytest.param(65536, 16, 64 * M, 10 * M, 8 * M, id="64k-rc16"),
    pytest.param(M, 1, 64 * M, 10 * M, 8 * M, id="1m-rc1"),
]


@pytest.mark.parametrize("order", ["empty", "sequential", "random"])
@pytest.mark.parametrize("cs,rbits,length,new,chunk", CASES)
def test_shrink_163(tmp_path: Path, cs: int, rbits: int, length: int, new: int, chunk: int,
                    order: str) -> None:
    img = tmp_path / "t.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cs},refcount_bits={rbits}",
             str(img), str(length))
    offsets = list(range(0, length, chunk))
    if order == "random":
        random.Random(163).shuffle(offsets)
    if order != "empty":
        with qcow2kit.open(str(img), "r+") as image:
            for off in offsets:
                image.write(off, b"\xff" * chunk)
    before = img.stat().st_size
    with qcow2kit.open(str(img), "r+") as image:
        image.resize(new, shrink=True)
    assert img.stat().st_size <= before, "a shrink must never grow the file"
    _assert_shrunk(img, new)
    mirror = tmp_path / "m.raw"
    mirror.write_bytes((b"\xff" if order != "empty" else b"\0") * new)
    qemu_compare(img, mirror)


def test_unaligned_shrink_then_grow_reads_zeros(tmp_path: Path) -> None:
    img = tmp_path / "t.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "1M")
    qemu_io(img, "write -P 0xaa 0 1M")
    with qcow2kit.open(str(img), "r+") as image:
        image.resize(32 * 1024 + 512, shrink=True)
        image.resize(M)
        assert image.read(0, 32 * 1024 + 512) == b"\xaa" * (32 * 1024 + 512)
        assert image.read(32 * 1024 + 512, M - 32 * 1024 - 512) == bytes(M - 32 * 1024 - 512)
    assert_clean(img)
    qemu_io(img, f"read -P 0 33280 {M - 33280}", "read -P 0xaa 0 33280")


def test_grow_zeroes_stale_tail_left_by_qemu(tmp_path: Path) -> None:
    img = tmp_path / "t.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "1M")
    qemu_io(img, "write -P 0xaa 0 1M")
    qemu_img("resize", "--shrink", str(img), "32K")  # QEMU keeps the stale bytes
    with qcow2kit.open(str(img), "r+") as image:
        image.resize(M)
    qemu_io(img, "read -P 0 32K 992K", "read -P 0xaa 0 32K")
    assert_clean(img)


def _shrink_and_compare(tmp_path: Path, img: Path, new: int, **kw: object) -> None:
    expect = raw_file(img, tmp_path / "expect.raw", size=new)
    with qcow2kit.open(str(img), "r+") as image:
        image.resize(new, shrink=True)
    assert_clean(img)
    qemu_compare(img, expect)


def test_shrink_compressed(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    rnd = random.Random(1)
    src.write_bytes(b"".join(bytes([rnd.randrange(4)]) * 4096 for _ in range(2048)))
    img = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", str(src), str(img))
    _shrink_and_compare(tmp_path, img, 3 * M + 4096 + 512)


@pytest.mark.parametrize("new", [3 * M, 3 * M + 8192, 3 * M + 12800])
def test_shrink_extended_l2(tmp_path: Path, new: int) -> None:
    img = tmp_path / "x.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=65536", str(img), "8M")
    qemu_io(img, "write -P 0x11 0 2M", "write -P 0x22 3M 6K", "write -P 0x33 3080K 2K",
            "write -P 0x44 7M 100K", "write -z 5M 64K")
    _shrink_and_compare(tmp_path, img, new)


def test_shrink_with_backing(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "16M")
    qemu_io(base, "write -P 0x55 0 16M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    qemu_io(top, "write -P 0x66 1M 1M", "write -P 0x77 9M 3M")
    _shrink_and_compare(tmp_path, top, 10 * M + 512)


def test_shrink_lazy_refcounts(tmp_path: Path) -> None:
    img = tmp_path / "l.qcow2"
    qcow2kit.create(str(img), 32 * M, lazy_refcounts=True)
    with qcow2kit.open(str(img), "r+") as image:
        image.write(0, b"\x01" * (4 * M))
        image.write(20 * M, b"\x02" * (4 * M))
    _shrink_and_compare(tmp_path, img, 21 * M)


def test_shrink_data_file(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'd.raw'}", str(img), "16M")
    qemu_io(img, "write -P 0x12 0 2M", "write -P 0x34 12M 2M")
    _shrink_and_compare(tmp_path, img, 13 * M)
    assert (tmp_path / "d.raw").stat().st_size == 13 * M


def test_shrink_keeps_v3_snapshot(tmp_path: Path) -> None:
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "16M")
    qemu_io(img, "write -P 0x10 0 16M")
    before = raw_file(img, tmp_path / "before.raw")
    qemu_img("snapshot", "-c", "snap1", str(img))
    qemu_io(img, "write -P 0x20 2M 2M", "write -P 0x30 12M 1M")
    _shrink_and_compare(tmp_path, img, 6 * M)
    qemu_img("snapshot", "-a", "snap1", str(img))
    assert_clean(img)
    qemu_compare(img, before)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "kwargs,new,message",
    [
        ({}, 8 * M, "pass shrink=True"),
        ({"shrink": True}, 0, "must be positive"),
        ({"shrink": True}, 8 * M + 100, "multiple of 512"),
        ({"shrink": True, "preallocation": "full"}, 8 * M, "Preallocation can only be used"),
    ],
)
def test_refusals_leave_file_unchanged(tmp_path: Path, kwargs: dict[str, object], new: int,
                                       message: str) -> None:
    img = tmp_path / "r.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "16M")
    qemu_io(img, "write -P 0x10 0 16M")
    digest = _sha(img)
    with qcow2kit.open(str(img), "r+") as image:
        with pytest.raises(qcow2kit.ResizeError, match=message):
            image.resize(new, **kwargs)  # type: ignore[arg-type]
    assert _sha(img) == digest


def test_v2_with_snapshot_refused(tmp_path: Path) -> None:
    img = tmp_path / "v2.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", str(img), "16M")
    qemu_io(img, "write -P 0x10 0 1M")
    qemu_img("snapshot", "-c", "s", str(img))
    digest = _sha(img)
    with qcow2kit.open(str(img), "r+") as image:
        with pytest.raises(qcow2kit.ResizeError, match="v2 image which has snapshots"):
            image.resize(8 * M, shrink=True)
    assert _sha(img) == digest


@pytest.mark.parametrize("prealloc", ["off", "metadata", "falloc", "full"])
def test_grow_across_l1_clusters(tmp_path: Path, prealloc: str) -> None:
    img = tmp_path / "g.qcow2"
    qcow2kit.create(str(img), M, cluster_size=512)
    with qcow2kit.open(str(img), "r+") as image:
        image.write(0, b"\x42" * M)
        image.resize(6 * M, preallocation=prealloc)
        image.write(5 * M, b"\x43" * 4096)
    assert_clean(img)
    mirror = tmp_path / "m.raw"
    data = bytearray(6 * M)
    data[:M] = b"\x42" * M
    data[5 * M : 5 * M + 4096] = b"\x43" * 4096
    mirror.write_bytes(bytes(data))
    qemu_compare(img, mirror)


def test_sparse_shrink_allocates_nothing(tmp_path: Path) -> None:
    from qcow2kit.image import Image
    from qcow2kit.testing.faults import RecordingStorage

    img = tmp_path / "big.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "256G")
    qemu_io(img, "write -P 0x01 0 1M", "write -P 0x02 255G 1M", "write -P 0x03 100G 64K")
    before = img.stat().st_size
    storage = RecordingStorage.from_file(img)
    with Image(storage) as image:
        image.resize(1 << 30, shrink=True)
    flushes = sum(1 for op in storage.log if op[0] == "flush")
    high = max((op[1] + len(op[2]) for op in storage.log if op[0] == "write"), default=0)
    assert flushes <= 8, flushes
    assert high <= before, "the shrink wrote past the old end of the file"
    img.write_bytes(storage.contents())
    _assert_shrunk(img, 1 << 30)
    qemu_io(img, "read -P 0x01 0 1M")


def test_cli_resize(tmp_path: Path) -> None:
    img = tmp_path / "c.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "1G")
    run = lambda *a: subprocess.run(  # noqa: E731
        ["python3", "-m", "qcow2kit", *a], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")},
    )
    res = run("resize", str(img), "512M")
    assert res.returncode == 1 and "Use the --shrink option" in res.stderr
    res = run("resize", "--shrink", str(img), "-512M")
    assert res.returncode == 0 and res.stdout.strip() == "Image resized."
    res = run("resize", "-q", str(img), "+1G")
    assert res.returncode == 0 and res.stdout == ""
    info = qemu_img("info", "--output=json", str(img)).stdout
    assert '"virtual-size": 1610612736' in info
    assert_clean(img)


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_grow_over_longer_backing_reads_zeros(tmp_path: Path, compat: str) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "16M")
    qemu_io(base, "write -P 0x55 0 16M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"compat={compat}", "-b", "base.qcow2", "-F",
             "qcow2", str(top), "16M")
    with qcow2kit.open(str(top), "r+") as image:
        image.resize(4 * M + 1536, shrink=True)
        image.resize(20 * M)
    assert_clean(top)
    qemu_io(top, "read -P 0x55 0 4097K", f"read -P 0 {4 * M + 1536} {16 * M - 1536}")


def test_shrink_from_unaligned_size_frees_the_old_partial_cluster(tmp_path: Path) -> None:
    img = tmp_path / "u.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "1259520")
    qemu_io(img, "write -P 0x11 0 1259520")
    with qcow2kit.open(str(img), "r+") as image:
        image.resize(4096, shrink=True)
        image.resize(2 * M)
        assert image.read(4096, 2 * M - 4096) == bytes(2 * M - 4096)
    assert_clean(img)
    qemu_io(img, f"read -P 0 4096 {2 * M - 4096}")
