"""Write path against QEMU as the oracle: a boundary matrix of offsets and lengths, images with
internal snapshots made by qemu-img, lazy refcounts, as_file(), and read-only refusal."""

from __future__ import annotations

import io
import random
import shutil
from pathlib import Path

import pytest

import qcow2kit
from qcow2kit.errors import ImageStateError
from qcow2kit.testing import DiskModel
from tests.helpers import (
    assert_clean,
    pattern,
    qemu_check,
    qemu_compare,
    qemu_img,
    qemu_io,
    read_incompatible,
    stable_seed,
    to_raw,
)

DIRTY = 1


# ---- boundary matrix --------------------------------------------------------------------------
MATRIX = [
    # cluster_size, extended_l2, compat, backing
    (512, False, "1.1", False),
    (4096, False, "1.1", True),
    (4096, False, "0.10", False),
    (16384, True, "1.1", False),
    (32768, True, "1.1", True),
    (65536, False, "1.1", False),
]


def _points(cs: int, scs: int, span: int, size: int) -> tuple[list[int], list[int]]:
    offsets = {0, 1, cs - 1, cs, cs + 1, 2 * cs - 1, scs - 1, scs, scs + 1, 3 * scs + 7}
    lengths = {1, scs - 1, scs, scs + 1, cs - 1, cs, cs + 1, 2 * cs - 1, 2 * cs + 1}
    if span + 2 * cs < size // 2:
        offsets |= {span - 1, span, span + 1, span - cs, span - scs + 1}
        lengths |= {span - 1, span, span + 1}
    return sorted(o for o in offsets if 0 <= o < size), sorted(n for n in lengths if n > 0)


def _matrix_image(
    tmp_path: Path, cs: int, xl2: bool, compat: str, backing: bool
) -> tuple[Path, DiskModel, int]:
    span = cs * (cs // (16 if xl2 else 8))
    size = max(4 << 20, min(2 * span + 8 * cs, 64 << 20))
    path = tmp_path / "m.qcow2"
    opts = f"cluster_size={cs},compat={compat}" + (",extended_l2=on" if xl2 else "")
    base_data: bytes | None = None
    if backing:
        base = tmp_path / "base.raw"
        base_data = pattern(99, size - 3 * cs)  # shorter than the overlay
        base.write_bytes(base_data)
        qemu_img("create", "-f", "qcow2", "-o", opts, "-b", "base.raw", "-F", "raw", str(path), str(size))
    else:
        qemu_img("create", "-f", "qcow2", "-o", opts, str(path), str(size))
    return path, DiskModel(size, base_data), span


@pytest.mark.slow
@pytest.mark.parametrize(
    "cs,xl2,compat,backing", MATRIX,
    ids=[f"cs{c}{'-xl2' if x else ''}-v{v}{'-bk' if b else ''}" for c, x, v, b in MATRIX],
)
def test_boundary_matrix(tmp_path: Path, cs: int, xl2: bool, compat: str, backing: bool) -> None:
    """Every (offset, length) pair of the matrix: writes first, then zeroes and discards over
    the written data; each result read back at once and QEMU's view compared at the end."""
    path, model, span = _matrix_image(tmp_path, cs, xl2, compat, backing)
    size = model.size
    scs = cs // 32 if xl2 else cs
    offsets, lengths = _points(cs, scs, span, size)
    ops = 0
    with qcow2kit.open(str(path), "r+") as img:
        # the pairs are applied at distinct bases so that each starts from a known state, and
        # sometimes on top of each other so that partial overwrites of written clusters happen
        for phase in ("write", "zero", "zero_unmap", "discard", "rewrite"):
            seed = stable_seed(phase) & 0xFFFF
            for i, off in enumerate(offsets):
                for j, n in enumerate(lengths):
                    if n >= span and off not in (1, cs - 1, span - 1):
                        continue  # whole-L2-span lengths: a few offsets are enough
                    n = min(n, size - off)
                    seed += 1
                    if phase in ("write", "rewrite"):
                        data = pattern(seed, n)
                        img.write(off, data)
                        model.write(off, data)
                    elif phase.startswith("zero"):
                        if (i + j) % 2:
                            continue
                        img.write_zeroes(off, n, unmap=phase == "zero_unmap")
                        model.write_zeroes(off, n)
                    else:
                        if (i + j) % 3:
                            continue
                        img.discard(off, n)
                        model.discard(off, n)
                    ops += 1
                    lo = max(0, off - cs)
                    hi = min(size, off + n + cs)
                    assert img.read(lo, hi - lo) == model.read(lo, hi - lo), (phase, off, n)
            img.flush()
    assert ops > 100
    assert_clean(path)
    raw = tmp_path / "model.raw"
    raw.write_bytes(model.raw())
    qemu_compare(path, raw)
    # QEMU reads back the same through its own write path afterwards
    qemu_io(path, f"write -P 0x77 {cs - 1} {cs + 2}")
    assert_clean(path)


def test_subcluster_writes_allocate_only_touched(tmp_path: Path) -> None:
    """Extended L2: a write into a fresh cluster allocates only the touched subclusters."""
    path = tmp_path / "x.qcow2"
    cs = 65536
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cs},extended_l2=on", str(path), "4M")
    scs = cs // 32
    with qcow2kit.open(str(path), "r+") as img:
        img.write(3 * scs + 10, b"\xab" * (2 * scs))  # touches subclusters 3, 4, 5
    out = qemu_img("map", "--output=json", str(path)).stdout
    import json

    entries = [e for e in json.loads(out) if e["data"]]
    assert entries and entries[0]["start"] == 3 * scs and entries[0]["length"] == 3 * scs, entries
    assert_clean(path)


# ---- internal snapshots ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "opts",
    ["cluster_size=4096", "cluster_size=65536,compat=0.10", "cluster_size=32768,extended_l2=on",
     "cluster_size=512,refcount_bits=64"],
)
def test_writes_keep_internal_snapshots(tmp_path: Path, opts: str) -> None:
    path = tmp_path / "s.qcow2"
    size = 4 << 20
    qemu_img("create", "-f", "qcow2", "-o", opts, str(path), str(size))
    qemu_io(path, "write -P 0x11 0 1M", "write -P 0x12 2M 512k", "write -P 0x13 3M 4k")
    qemu_img("snapshot", "-c", "one", str(path))
    states = {"one": to_raw(path, tmp_path / "one.raw")}
    qemu_io(path, "write -P 0x21 512k 1M", "write -z 2M 64k")
    qemu_img("snapshot", "-c", "two", str(path))
    states["two"] = to_raw(path, tmp_path / "two.raw")
    model = DiskModel(size)
    model.data[:] = states["two"]
    rng = random.Random(5)
    img = qcow2kit.open(str(path), "r+")
    try:
        assert [s.name for s in img.snapshots] == ["one", "two"]
        for k in range(60):
            off = rng.randrange(0, size - 1)
            n = rng.choice([1, 100, 4096, 5000, 65536, 200000])
            n = min(n, size - off)
            what = rng.random()
            if what < 0.6:
                data = pattern(k, n)
                img.write(off, data)
                model.write(off, data)
            elif what < 0.8:
                img.write_zeroes(off, n, unmap=bool(k % 2))
                model.write_zeroes(off, n)
            else:
                img.discard(off, n)
                model.discard(off, n)
            if k % 20 == 19:
                img.close()
                img = qcow2kit.open(str(path), "r+")
        assert img.read(0, size) == model.raw()
    finally:
        img.close()
    assert_clean(path)
    raw = tmp_path / "model.raw"
    raw.write_bytes(model.raw())
    qemu_compare(path, raw)
    for name, content in states.items():
        assert to_raw(path, tmp_path / f"{name}-after.raw", snapshot=name) == content, name
    # reverting to a snapshot with QEMU restores it, and the image stays clean
    qemu_img("snapshot", "-a", "one", str(path))
    assert to_raw(path, tmp_path / "reverted.raw") == states["one"]
    assert_clean(path)


def test_overwrite_compressed_with_snapshot(tmp_path: Path) -> None:
    size = 1 << 20
    src = tmp_path / "src.raw"
    src.write_bytes((b"compressible " * (size // 13 + 1))[:size])
    path = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", str(src), str(path))
    assert qemu_check(path)["compressed-clusters"] > 100
    qemu_img("snapshot", "-c", "s", str(path))
    model = DiskModel(size)
    model.data[:] = src.read_bytes()
    with qcow2kit.open(str(path), "r+") as img:
        for off, n in ((0, 10), (4096, 4096), (10000, 20000), (size - 5, 5)):
            data = pattern(off, n)
            img.write(off, data)
            model.write(off, data)
        img.write_zeroes(100000, 9000)
        model.write_zeroes(100000, 9000)
        img.discard(200000, 50000)
        model.discard(200000, 50000)
    assert_clean(path)
    raw = tmp_path / "model.raw"
    raw.write_bytes(model.raw())
    qemu_compare(path, raw)
    assert to_raw(path, tmp_path / "s.raw", snapshot="s") == src.read_bytes()
    # without the snapshot holding them, compressed clusters overwritten are freed
    qemu_img("snapshot", "-d", "s", str(path))
    assert_clean(path)


# ---- lazy refcounts --------------------------------------------------------------------------
@pytest.mark.parametrize("creator", ["qemu", "ours"])
def test_lazy_refcounts_dirty_bit(tmp_path: Path, creator: str) -> None:
    path = tmp_path / "l.qcow2"
    if creator == "qemu":
        qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096", str(path), "8M")
    else:
        qcow2kit.create(str(path), 8 << 20, cluster_size=4096, lazy_refcounts=True)
    assert not read_incompatible(path) & DIRTY
    img = qcow2kit.open(str(path), "r+")
    assert not read_incompatible(path) & DIRTY  # opening alone does not dirty the image
    img.write(0, b"\x42" * 100000)
    assert read_incompatible(path) & DIRTY, "dirty bit not set on the first write"
    img.flush()
    assert read_incompatible(path) & DIRTY, "flush must not clear the dirty bit"
    # a crash now: a copy of the file as it is on disk
    crashed = tmp_path / "crashed.qcow2"
    shutil.copyfile(path, crashed)
    img.close()
    assert not read_incompatible(path) & DIRTY, "dirty bit not cleared on close"
    assert_clean(path)
    # opening the crashed (dirty) copy read-write repairs it, as QEMU does
    assert read_incompatible(crashed) & DIRTY
    with qcow2kit.open(str(crashed), "r+") as img2:
        assert img2.read(0, 100000) == b"\x42" * 100000
    assert not read_incompatible(crashed) & DIRTY
    assert_clean(crashed)


# ---- as_file ---------------------------------------------------------------------------------
def test_as_file_copyfileobj(tmp_path: Path) -> None:
    path = tmp_path / "f.qcow2"
    size = 3 << 20
    qcow2kit.create(str(path), size, cluster_size=4096)
    payload = pattern(1, size - 12345)
    with qcow2kit.open(str(path), "r+") as img:
        f = img.as_file()
        assert f.seekable() and f.writable() and f.readable()
        f.seek(12345)
        shutil.copyfileobj(io.BytesIO(payload), f, length=100003)
        assert f.tell() == size
        f.flush()
        f.seek(0)
        out = io.BytesIO()
        shutil.copyfileobj(f, out, length=65536)
        assert out.getvalue() == bytes(12345) + payload
        assert f.seek(-10, io.SEEK_END) == size - 10
        assert f.read(100) == payload[-10:]
        assert f.read(1) == b""
        with pytest.raises(OSError):
            f.write(b"past the end")
        # a buffered wrapper works too
        f.seek(0)
        buffered = io.BufferedRandom(img.as_file())
        buffered.write(b"head")
        buffered.flush()
        assert img.read(0, 4) == b"head"
    expect = bytearray(bytes(12345) + payload)
    expect[:4] = b"head"
    raw = tmp_path / "f.raw"
    raw.write_bytes(bytes(expect))
    assert_clean(path)
    qemu_compare(path, raw)


# ---- read-only ------------------------------------------------------------------------------
def test_read_only_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "r.qcow2"
    qcow2kit.create(str(path), 1 << 20)
    qemu_io(path, "write -P 0x61 0 64k")
    before = path.read_bytes()
    with qcow2kit.open(str(path)) as img:
        assert not img.writable
        with pytest.raises(ImageStateError):
            img.write(0, b"x")
        with pytest.raises(ImageStateError):
            img.write_zeroes(0, 4096)
        with pytest.raises(ImageStateError):
            img.discard(0, 65536)
        f = img.as_file()
        assert not f.writable()
        with pytest.raises((ImageStateError, OSError)):
            f.write(b"x")
        assert img.read(0, 4) == b"aaaa"
    assert path.read_bytes() == before
    # and a closed image refuses everything
    with pytest.raises(ImageStateError):
        img.write(0, b"x")
