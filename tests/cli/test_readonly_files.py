"""Read-only guarantee: every read-only command on files whose permissions forbid writing
works and never writes (content hash, mtime, and no new files next to the image).

Tests run as root, whom permission bits do not stop: so the guarantee is checked by what
happened to the files, not by an EACCES that would never come.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import qcow2kit
from qcow2kit import ImageStateError
from qcow2kit.cli.main import main as cli_main
from tests.conftest import qemu_img, qemu_io

READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH  # 0444


def snapshot_dir(d: Path) -> dict[str, tuple[str, int, int]]:
    out = {}
    for p in sorted(d.iterdir()):
        st = p.stat()
        out[p.name] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_mode)
    return out


@pytest.fixture
def images(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """A directory of 0444 images of several kinds; the test's outputs go elsewhere."""
    d = tmp_path / "ro"
    d.mkdir()
    out: dict[str, Path] = {}
    base = d / "base.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(base), "4M")
    qemu_io(base, "write -P 0x11 0 64k", "write -P 0x12 3M 4k")
    out["base"] = base
    top = d / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top), "4M")
    qemu_io(top, "write -P 0x21 4k 4k")
    out["overlay"] = top
    full = d / "full.qcow2"
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.write(b"compressible " * 50_000)
        f.truncate(2 << 20)
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", str(raw),
             str(full))
    qemu_io(full, "write -P 0x31 1M 8k", "write -z 1536k 64k")
    qemu_img("snapshot", "-c", "snap1", str(full))
    qemu_img("bitmap", "--add", str(full), "bm0")
    qemu_io(full, "write -P 0x32 0 4k")
    out["full"] = full
    dirty = d / "dirty.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096", str(dirty), "2M")
    qemu_io(dirty, "write -P 0x41 0 8k")
    buf = bytearray(dirty.read_bytes())
    buf[79] |= 1  # the dirty bit, as a killed lazy-refcount writer leaves it
    dirty.write_bytes(bytes(buf))
    out["dirty"] = dirty
    corrupt = d / "corrupt.qcow2"
    qemu_img("create", "-f", "qcow2", str(corrupt), "2M")
    qemu_io(corrupt, "write -P 0x51 0 8k")
    buf = bytearray(corrupt.read_bytes())
    buf[79] |= 2  # the corrupt bit
    corrupt.write_bytes(bytes(buf))
    out["corrupt"] = corrupt
    v2 = d / "v2.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", str(v2), "2M")
    qemu_io(v2, "write -P 0x61 0 8k")
    out["v2"] = v2
    for p in d.iterdir():
        os.chmod(p, READ_ONLY)
    yield out
    for p in d.iterdir():
        os.chmod(p, 0o644)


def _read_everything(path: Path) -> bytes:
    with qcow2kit.open(str(path), "r") as img:
        data = img.read(0, img.virtual_size)
        img.runs(0, img.virtual_size)
        _ = img.snapshots, img.header.bitmaps
        with img.as_file() as f:
            f.seek(4096)
            f.read(100)
    return data


def test_api_reads_never_write(images: dict[str, Path], tmp_path: Path) -> None:
    d = images["base"].parent
    before = snapshot_dir(d)
    for name, path in images.items():
        data = _read_everything(path)
        raw = tmp_path / f"{name}.raw"
        qemu_img("convert", "-U", "-O", "raw", str(path), str(raw))
        assert data == raw.read_bytes(), name
        with qcow2kit.open(str(path), "r", backing=False, force_share=True) as img:
            img.read(0, img.virtual_size)
    assert snapshot_dir(d) == before


def test_writes_on_a_read_only_image_raise(images: dict[str, Path]) -> None:
    d = images["base"].parent
    before = snapshot_dir(d)
    for path in images.values():
        with qcow2kit.open(str(path), "r") as img:
            with pytest.raises(ImageStateError, match="read-only"):
                img.write(0, b"x")
            with pytest.raises(ImageStateError, match="read-only"):
                img.write_zeroes(0, 4096)
            with pytest.raises(ImageStateError, match="read-only"):
                img.discard(0, 4096)
            if hasattr(img, "resize"):
                with pytest.raises(ImageStateError):
                    img.resize(8 << 20)
            with pytest.raises((ImageStateError, OSError)), img.as_file() as f:
                f.write(b"y")
            img.flush()  # nothing to flush: a no-op, not a write
            assert img.read(0, 1) is not None
    assert snapshot_dir(d) == before


def _verbs(path: Path, out_dir: Path) -> list[list[str]]:
    p = str(path)
    verbs = [
        ["info", p], ["info", "--output=json", p], ["info", "--backing-chain", p],
        ["info", "-U", p],
        ["map", p], ["map", "--output=json", p], ["map", "-U", p],
        ["check", p], ["check", "--output=json", p], ["check", "-U", p],
        ["compare", p, p], ["compare", "-U", p, p],
        ["convert", "-O", "raw", p, str(out_dir / "o.raw")],
        ["convert", "-O", "qcow2", "-c", p, str(out_dir / "o.qcow2")],
    ]
    return verbs


def test_read_only_verbs_never_write(images: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    d = images["base"].parent
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = snapshot_dir(d)
    ran = 0
    for name, path in images.items():
        for argv in _verbs(path, out_dir):
            try:
                rc = cli_main(argv)
            except SystemExit as exc:  # a verb this tree does not have yet
                assert argv[0] not in ("info", "map", "check", "compare", "convert"), (argv, exc)
                continue
            err = capsys.readouterr().err
            assert "Traceback" not in err, (argv, err)
            if argv[0] == "check":
                assert rc in (0, 2, 3), (name, argv, rc, err)  # 3: leaks found (dirty image)
            elif argv[0] == "map" and "compressed clusters" in err:
                assert rc == 1  # qemu-img's human map refuses compressed images the same way
            else:
                assert rc == 0, (name, argv, rc, err)
            ran += 1
            assert snapshot_dir(d) == before, (name, argv)
    assert ran >= 5 * len(images)
    assert snapshot_dir(d) == before


def test_read_only_verbs_in_a_separate_process(images: dict[str, Path], tmp_path: Path) -> None:
    """The installed entry point too: a real process, the image chmod 0444."""
    path = images["full"]
    d = path.parent
    before = snapshot_dir(d)
    for argv in (["info", str(path)], ["map", "--output=json", str(path)], ["check", str(path)]):
        res = subprocess.run([sys.executable, "-m", "qcow2kit", *argv], capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, (argv, res.stderr)
    assert snapshot_dir(d) == before


def test_the_guarantee_can_fail(images: dict[str, Path]) -> None:
    """The oracle sees a write even when the content ends up equal (mtime)."""
    path = images["v2"]
    os.chmod(path, 0o644)
    before = snapshot_dir(path.parent)
    with qcow2kit.open(str(path), "r+") as img:
        img.write(0, img.read(0, 512))
    assert snapshot_dir(path.parent) != before
