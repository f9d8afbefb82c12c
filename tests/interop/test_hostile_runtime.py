"""Hostile images: corruption found at run time. The image is marked corrupt (on disk, as
QEMU does), further writes are refused and reads go on; writes that would land on metadata
(QEMU's overlap check) or far past the end of the file are refused as corruption, leaving
the metadata intact; read-only opens of broken or dirty images never write; the command
line reports such images with `qcow2kit: ...` and a non-zero exit.

Every image starts valid (made by qemu-img) and has one entry broken. Open-time header
limits: test_hostile.py; backing and data file references: test_hostile_references.py.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import qcow2kit
from qcow2kit import CorruptionError, ImageStateError
from qcow2kit.cli.main import main as cli_main
from tests.helpers import qemu_img
from tests.interop.hostile_common import MiB, image_maker
from tests.interop.hostile_common import get as _get
from tests.interop.hostile_common import patch_image as _patch
from tests.interop.hostile_common import put as _u


@pytest.fixture
def make(tmp_path: Path) -> Callable[..., Path]:
    """make(name, *create options, size=..., writes=...) -> a qemu-made image."""
    return image_maker(tmp_path)


# ---- run time: corruption marks the image, further writes refused, reads go on ----------


def _l1_entry_offset(path: Path, index: int) -> int:
    return _get(path.read_bytes(), 40, 8) + 8 * index


def test_corruption_found_at_run_time_marks_the_image(make: Callable[..., Path]) -> None:
    path = make("c.qcow2", "cluster_size=4096", writes=("write -P 0x11 0 8k", "write -P 0x22 2M 8k"))
    e0 = _l1_entry_offset(path, 0)
    _patch(path, lambda b: _u(b, e0, 8, _get(b, e0, 8) | 0x2))  # an L1 reserved bit
    with qcow2kit.open(str(path), "r+") as img:
        assert img.read(2 * MiB, 8192) == b"\x22" * 8192  # the other L1 entry is fine
        with pytest.raises(CorruptionError, match="Marking image as corrupt.*reserved bits"):
            img.write(0, b"x" * 100)
        assert img.header.incompatible_features & 2
        with pytest.raises(ImageStateError, match="corrupt"):
            img.write(2 * MiB, b"y")
        with pytest.raises(ImageStateError, match="corrupt"):
            img.discard(2 * MiB, 4096)
        with pytest.raises(ImageStateError, match="corrupt"):
            img.write_zeroes(2 * MiB, 4096)
        assert img.read(2 * MiB, 8192) == b"\x22" * 8192  # reads go on working
    assert _get(path.read_bytes(), 72, 8) & 2  # the corrupt bit is on disk
    with pytest.raises(ImageStateError, match="Image is corrupt; cannot be opened read/write"):
        qcow2kit.open(str(path), "r+")
    with qcow2kit.open(str(path), "r") as img:
        assert img.read(2 * MiB, 8192) == b"\x22" * 8192
    info = qemu_img("info", "--output=json", "-U", str(path)).stdout
    assert '"corrupt": true' in info


def test_read_only_corruption_does_not_write(make: Callable[..., Path]) -> None:
    path = make("c.qcow2", "cluster_size=4096", writes=("write -P 0x11 0 8k",))
    e0 = _l1_entry_offset(path, 0)
    _patch(path, lambda b: _u(b, e0, 8, _get(b, e0, 8) | 0x4))
    before = (hashlib.sha256(path.read_bytes()).digest(), path.stat().st_mtime_ns)
    with qcow2kit.open(str(path), "r") as img, pytest.raises(CorruptionError):
        img.read(0, 4096)
    assert (hashlib.sha256(path.read_bytes()).digest(), path.stat().st_mtime_ns) == before


def test_allocation_overlapping_metadata_is_refused(make: Callable[..., Path]) -> None:
    """A refcount of 0 on the active L2 table: the next allocation would hand it out and
    overwrite it. Refused like QEMU's overlap check, the image marked corrupt, the table
    left intact."""
    path = make("o.qcow2", "cluster_size=4096", writes=("write -P 0x11 0 8k",))
    buf = bytearray(path.read_bytes())
    l2 = _get(buf, _l1_entry_offset(path, 0), 8) & 0x00FFFFFFFFFFFE00
    refblock = _get(buf, _get(buf, 48, 8), 8)
    _u(buf, refblock + 2 * (l2 // 4096), 2, 0)
    path.write_bytes(bytes(buf))
    with qcow2kit.open(str(path), "r+") as img:
        with pytest.raises(CorruptionError, match="overlaps with an active L2 table"):
            img.write(2 * MiB, b"z" * 4096)  # needs a new L2 table
        assert img.read(0, 8192) == b"\x11" * 8192
    after = path.read_bytes()
    assert after[l2 : l2 + 4096] == buf[l2 : l2 + 4096]
    assert _get(after, 72, 8) & 2


def test_missing_refblock_zero_does_not_hang_or_overwrite_the_header(make: Callable[..., Path]) -> None:
    """Reftable entry 0 cleared: every cluster reads refcount 0, so the next allocation
    would land on the refcount table itself. Refused quickly; header and tables intact
    except for the corrupt bit."""
    path = make("m.qcow2", "cluster_size=4096", writes=("write -P 0x11 0 8k",))
    rt = _get(path.read_bytes(), 48, 8)
    _patch(path, lambda b: _u(b, rt, 8, 0))
    before = path.read_bytes()
    t0 = time.monotonic()
    with qcow2kit.open(str(path), "r+") as img:
        with pytest.raises(CorruptionError, match="overlaps with the refcount table"):
            img.write(2 * MiB, b"q" * 4096)
        assert img.read(0, 8192) == b"\x11" * 8192
    assert time.monotonic() - t0 < 10
    after = path.read_bytes()
    assert _get(after, 72, 8) == _get(before, 72, 8) | 2
    assert after[80:] == before[80:] and after[:72] == before[:72]


def test_in_place_target_past_the_end_is_corruption(make: Callable[..., Path]) -> None:
    """An L2 entry (COPIED) pointing far past the end of the file: a write there would
    make a huge sparse file (or fail with EFBIG); it is corruption instead."""
    path = make("p.qcow2", "cluster_size=4096", writes=("write -P 0x11 0 8k",))
    buf = bytearray(path.read_bytes())
    l2 = _get(buf, _l1_entry_offset(path, 0), 8) & 0x00FFFFFFFFFFFE00
    _u(buf, l2, 8, (1 << 63) | (1 << 50))
    path.write_bytes(bytes(buf))
    size = path.stat().st_size
    with qcow2kit.open(str(path), "r+") as img:
        assert img.read(0, 4096) == bytes(4096)  # reads past the end read zeros
        with pytest.raises(CorruptionError, match="beyond the end of the image file"):
            img.write(0, b"w" * 4096)
    assert path.stat().st_size == size


def test_cli_reports_corruption_and_limits(make: Callable[..., Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = _patch(make(), lambda b: _u(b, 20, 4, 30))
    for verb in (["info"], ["map"], ["check"], ["compare", str(path)], ["convert", "-O", "raw"]):
        argv = [*verb, str(path)]
        if verb[0] == "convert":
            argv.append(str(path.with_suffix(".raw")))
        assert cli_main(argv) in (1, 2), verb  # compare: 2 for errors, as qemu-img
        err = capsys.readouterr().err
        assert err.startswith("qcow2kit: ") and "cluster_bits 30" in err, (verb, err)


def test_read_only_open_of_hostile_images_never_writes(make: Callable[..., Path]) -> None:
    """A dirty image (lazy refcounts, killed writer) opened read-only is not repaired."""
    path = make("z.qcow2", "cluster_size=4096", "lazy_refcounts=on", writes=("write -P 0x11 0 8k",))
    _patch(path, lambda b: _u(b, 72, 8, _get(b, 72, 8) | 1))
    os.chmod(path, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    before = (hashlib.sha256(path.read_bytes()).digest(), path.stat().st_mtime_ns)
    with qcow2kit.open(str(path), "r") as img:
        assert img.read(0, 8192) == b"\x11" * 8192
    assert (hashlib.sha256(path.read_bytes()).digest(), path.stat().st_mtime_ns) == before
    res = subprocess.run(["qemu-img", "check", "-U", str(path)], capture_output=True, text=True)
    assert res.returncode in (0, 3)


@pytest.mark.parametrize("target", ["l1", "reftable", "refblock", "header", "l2"])
def test_in_place_write_onto_metadata_is_refused(make: Callable[..., Path], target: str) -> None:
    """An L2 entry (COPIED) aimed at a metadata cluster: a guest write there would rewrite
    that metadata. Refused like QEMU's overlap check; the image marked corrupt, the
    metadata intact."""
    path = make("w.qcow2", "cluster_size=4096", writes=("write -P 0x11 0 8k",))
    buf = bytearray(path.read_bytes())
    l1 = _get(buf, 40, 8)
    l2 = _get(buf, l1, 8) & 0x00FFFFFFFFFFFE00
    rt = _get(buf, 48, 8)
    where = {"l1": l1, "reftable": rt, "refblock": _get(buf, rt, 8), "header": 0, "l2": l2}[target]
    names = {"l1": "the active L1 table", "reftable": "the refcount table",
             "refblock": "a refcount block", "header": "the image header", "l2": "an active L2 table"}
    if target == "header":
        _u(buf, l2 + 8, 8, (1 << 63) | 1)  # a preallocated zero cluster at host offset 0
    else:
        _u(buf, l2 + 8, 8, (1 << 63) | where)
    path.write_bytes(bytes(buf))
    before = path.read_bytes()
    with qcow2kit.open(str(path), "r+") as img:
        if target != "header":
            with pytest.raises(CorruptionError, match=f"overlaps with {names[target]}"):
                img.write(4096, b"\xee" * 4096)
            assert img.read(0, 4096) == b"\x11" * 4096
        else:  # offset 0 is "unallocated" in a standard L2 entry: written elsewhere, fine
            img.write(4096, b"\xee" * 4096)
            assert img.read(4096, 4096) == b"\xee" * 4096
    after = path.read_bytes()
    if target != "header":
        assert after[where : where + 4096] == before[where : where + 4096]
        assert _get(after, 72, 8) & 2


def test_l2_table_in_place_onto_metadata_is_refused(make: Callable[..., Path]) -> None:
    path = make("t.qcow2", "cluster_size=4096", writes=("write -P 0x11 0 8k",))
    buf = bytearray(path.read_bytes())
    l1, rt = _get(buf, 40, 8), _get(buf, 48, 8)
    _u(buf, l1 + 8, 8, (1 << 63) | rt)  # L1 entry 1 (COPIED): "its L2 table" is the reftable
    path.write_bytes(bytes(buf))
    before = path.read_bytes()
    with qcow2kit.open(str(path), "r+") as img:
        with pytest.raises(CorruptionError, match="L2 table at .* overlaps with the refcount table"):
            img.write(2 * MiB, b"\xee" * 4096)
    after = path.read_bytes()
    assert after[rt : rt + 4096] == before[rt : rt + 4096]
