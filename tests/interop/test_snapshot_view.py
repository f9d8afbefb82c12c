"""Read-only views of a snapshot's disk (qcow2kit.ops.snapshot.open_snapshot / view_snapshot)
and `convert -l / -s`, against `qemu-img convert -l` of the same snapshot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qcow2kit.errors import ImageStateError
from qcow2kit.image import Image
from qcow2kit.ops.snapshot import SnapshotCommandError, open_snapshot, view_snapshot
from tests.helpers import qemu_img, qemu_io, to_raw

M = 1 << 20


def ours(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "qcow2kit", *args], capture_output=True)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "v.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(p), "4M")
    qemu_io(p, "write -P 1 0 1M", "write -c -P 2 2M 64k")
    qemu_img("snapshot", "-c", "first", str(p))
    qemu_io(p, "write -P 3 512k 1M", "write -z 2M 4k")
    assert ours("snapshot", "-c", "2", str(p)).returncode == 0  # ID 2 named "2"
    qemu_io(p, "write -P 4 0 64k")
    assert ours("snapshot", "-c", "1", str(p)).returncode == 0  # ID 3 named "1"
    qemu_io(p, "write -P 5 3M 64k")
    return p


@pytest.mark.parametrize("spec", ["first", "snapshot.name=first", "snapshot.id=2",
                                  "snapshot.id=3,snapshot.name=1", "1", "snapshot.name=1"])
def test_convert_l_matches_qemu(tmp_path: Path, image: Path, spec: str) -> None:
    theirs = tmp_path / "theirs.raw"
    qemu_img("convert", "-l", spec, "-O", "raw", str(image), str(theirs))
    for fmt in ("raw", "qcow2"):
        out = tmp_path / f"ours.{fmt}"
        res = ours("convert", "-l", spec, "-O", fmt, str(image), str(out))
        assert res.returncode == 0, res.stderr
        assert to_raw(out, tmp_path / "x.raw") == theirs.read_bytes()


def test_convert_s_and_errors(tmp_path: Path, image: Path) -> None:
    out = tmp_path / "o.raw"
    assert ours("convert", "-s", "first", "-O", "raw", str(image), str(out)).returncode == 0
    assert out.read_bytes() == to_raw(image, tmp_path / "x.raw", snapshot="first")
    out.unlink()
    for spec, msg in [("nope", "Failed to load snapshot: Can't find snapshot"),
                      ("snapshot.id=2,snapshot.name=first",
                       "Failed to load snapshot: Can't find snapshot"),
                      ("snapshot.foo=1", "Failed in parsing snapshot param 'snapshot.foo=1'")]:
        res = ours("convert", "-l", spec, "-O", "raw", str(image), str(out))
        assert res.returncode == 1 and msg in res.stderr.decode()
        theirs = subprocess.run(["qemu-img", "convert", "-l", spec, "-O", "raw", str(image),
                                 str(out)], capture_output=True)
        assert theirs.returncode == 1 and msg in theirs.stderr.decode()
        assert not out.exists()
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(M))
    res = ours("convert", "-l", "x", "-O", "raw", str(raw), str(out))
    assert res.returncode == 1 and b"does not support temporarily loading" in res.stderr


def test_open_snapshot_reads_its_own_size(tmp_path: Path, image: Path) -> None:
    expect = to_raw(image, tmp_path / "x.raw", snapshot="first")
    qemu_img("resize", str(image), "9M")
    qemu_io(image, "write -P 6 8M 64k")
    with open_snapshot(str(image), "first") as view:
        assert view.virtual_size == 4 * M
        assert view.read(0, 4 * M) == expect
        f = view.as_file()
        f.seek(2 * M)
        assert f.read(64 * 1024) == expect[2 * M : 2 * M + 64 * 1024]
        with pytest.raises(ImageStateError):
            view.write(0, b"x")
    # the active disk is untouched by the view
    with Image.open_path(str(image)) as img:
        assert img.virtual_size == 9 * M


def test_view_refused_on_writable_image(image: Path) -> None:
    with Image.open_path(str(image), writable=True) as img:
        with pytest.raises(ImageStateError):
            view_snapshot(img, "first", "first")
    with Image.open_path(str(image)) as img, pytest.raises(SnapshotCommandError):
        view_snapshot(img, "missing", "missing")


def test_snapshot_fields_and_map_of_a_view(tmp_path: Path, image: Path) -> None:
    import json
    import time

    from qcow2kit.ops.map import map_image

    info = json.loads(qemu_img("info", "--output=json", str(image)).stdout)["snapshots"]
    with Image.open_path(str(image)) as img:
        got = [(s.id, s.name, s.date_sec, s.vm_clock, s.vm_state_size, s.disk_size, s.icount)
               for s in img.snapshots]
        assert abs(img.snapshots[-1].date - time.time()) < 3600
    assert got == [(e["id"], e["name"], e["date-sec"], 0.0, 0, 4 * M, 0) for e in info]
    expect = to_raw(image, tmp_path / "x.raw", snapshot="first")
    with open_snapshot(str(image), "first") as view:
        entries = map_image(view)
    assert sum(e.length for e in entries) == 4 * M
    for e in entries:
        if not e.data:
            assert expect[e.start : e.start + e.length] == bytes(e.length)


def test_image_snapshot_methods_and_open_snapshot(tmp_path: Path) -> None:
    """The Python surface: img.create_snapshot / apply_snapshot / delete_snapshot and
    qcow2kit.open(path, snapshot=...), judged by qemu-img."""
    import qcow2kit
    from tests.helpers import assert_clean as _clean
    from tests.helpers import qemu_img as _qimg

    img_path = tmp_path / "api.qcow2"
    qcow2kit.create(str(img_path), 4 << 20, cluster_size=4096)
    with qcow2kit.open(str(img_path), "r+") as img:
        img.write(0, b"A" * 8192)
        img.create_snapshot("one")
        img.write(0, b"B" * 4096)
        # a compressed cluster read, discarded, and its space reused: no stale cache
        img.write_compressed(65536, b"c" * 4096)
        assert img.read(65536, 4) == b"cccc"
        img.discard(65536, 4096)
        img.write_compressed(69632, b"d" * 4096)
        assert img.read(69632, 4) == b"dddd"
    _clean(img_path)
    listed = _qimg("snapshot", "-l", str(img_path)).stdout
    assert "one" in listed
    with qcow2kit.open(str(img_path), snapshot="one") as view:
        assert view.read(0, 8192) == b"A" * 8192
    with qcow2kit.open(str(img_path), "r+") as img:
        img.apply_snapshot("one")
        assert img.read(0, 4096) == b"A" * 4096
        img.delete_snapshot("one")
    _clean(img_path)
    assert "one" not in _qimg("snapshot", "-l", str(img_path)).stdout
