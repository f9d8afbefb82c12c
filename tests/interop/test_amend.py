"""amend against qemu-img amend on copies of the same images: the same exit code and words
for every refusal (and the image left byte for byte as it was), and for every change an image
that qemu-img check finds clean, compare finds equal to QEMU's result, and info describes
the same way; where the layouts agree (most refcount-width changes, compat both ways, lazy
refcounts, header-only changes) the very bytes are QEMU's."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from qcow2kit.cli.main import main
from tests.helpers import QEMU_IMG, assert_clean, qemu_img, qemu_io

Build = Callable[[Path], None]


def ours(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["amend", *args])
    out, err = capsys.readouterr()
    return rc, out, err.replace("qcow2kit", "qemu-img")


def theirs(*args: str) -> tuple[int, str, str]:
    assert QEMU_IMG is not None
    res = subprocess.run([QEMU_IMG, "amend", *args], capture_output=True, text=True)
    return res.returncode, res.stdout, res.stderr


def info(path: Path) -> dict[str, object]:
    out: dict[str, object] = json.loads(qemu_img("info", "--output=json", str(path)).stdout)
    for key in ("filename", "actual-size", "dirty-flag", "full-backing-filename"):
        out.pop(key, None)
    return out


def plain(p: Path) -> None:
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", str(p), "8M")
    qemu_io(p, "write -P 1 0 1M", "write -z 2M 1M", "write -c -P 2 4M 64k")


def v2(p: Path) -> None:
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", str(p), "8M")
    qemu_io(p, "write -P 1 0 1M", "write -P 3 5M 4k")


def snaps(p: Path) -> None:
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", str(p), "8M")
    qemu_io(p, "write -P 1 0 1M")
    qemu_img("snapshot", "-c", "s1", str(p))
    qemu_img("snapshot", "-c", "s2", str(p))
    qemu_io(p, "write -P 2 512k 64k")


def lazy(p: Path) -> None:
    qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=512", str(p), "3M")
    qemu_io(p, "write -P 1 0 100k", "write -z 1M 64k")


def backed(p: Path) -> None:
    base = p.with_name("base.qcow2")
    qemu_img("create", "-f", "qcow2", str(base), "4M")
    qemu_io(base, "write -P 9 0 4M")
    qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", str(p), "4M")
    qemu_io(p, "write -z 1M 128k", "write -P 1 3M 4k")


def ext_l2(p: Path) -> None:
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on", str(p), "4M")


def zstd(p: Path) -> None:
    qemu_img("create", "-f", "qcow2", "-o", "compression_type=zstd", str(p), "4M")
    qemu_io(p, "write -c -P 1 0 64k")


def zstd_plain(p: Path) -> None:
    qemu_img("create", "-f", "qcow2", "-o", "compression_type=zstd", str(p), "4M")
    qemu_io(p, "write -P 1 0 64k")


def data_file(p: Path) -> None:
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={p.with_suffix('.data')}", str(p), "4M")


def v2snap(p: Path) -> None:
    v2(p)
    qemu_img("snapshot", "-c", "old", str(p))
    qemu_io(p, "write -P 4 0 64k")


def snapzero(p: Path) -> None:
    """A snapshot holding zero clusters with and without a host cluster (the host reached
    only through the snapshot's table once the active disk wrote over it)."""
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", str(p), "8M")
    qemu_io(p, "write -P 1 0 1M", "write -z 2M 64k", "write -P 2 1M 64k", "write -z 1M 64k")
    qemu_img("snapshot", "-c", "s1", str(p))
    qemu_io(p, "write -P 5 1M 64k", "write -P 6 3M 4k")


def v2short(p: Path) -> None:
    """A v2 image whose snapshot entries carry no extra data (as old QEMUs wrote them)."""
    from dataclasses import replace

    from qcow2kit.format.snapshot import Snapshot
    from qcow2kit.image import Image

    v2snap(p)
    with Image.open_path(str(p)) as img:
        snaps = img.snapshots
        offset = img.header.snapshots_offset
    table = b"".join(replace(sn, extra_data=b"").to_bytes() for sn in snaps)
    assert all(isinstance(sn, Snapshot) for sn in snaps)
    with open(p, "r+b") as f:
        f.seek(offset)
        f.write(table)


def bitmaps(p: Path) -> None:
    plain(p)
    qemu_img("bitmap", "--add", str(p), "b1")
    qemu_img("bitmap", "--add", "-g", "512", str(p), "b2")
    qemu_io(p, "write -P 2 2M 1M")


BUILDS: dict[str, Build] = {"v2snap": v2snap, "v2short": v2short, "snapzero": snapzero,
                            "bitmaps": bitmaps, "plain": plain, "v2": v2,
                            "snaps": snaps, "lazy": lazy,
                            "backed": backed, "ext_l2": ext_l2, "zstd": zstd,
                            "zstd_plain": zstd_plain, "data_file": data_file}

CASES = [
    ("plain", "refcount_bits=64"), ("plain", "refcount_bits=1"), ("plain", "refcount_bits=8"),
    ("plain", "refcount_bits=32,lazy_refcounts=on"), ("plain", "compat=0.10"),
    ("plain", "compat=v2,size=4M"), ("plain", "lazy_refcounts=on"), ("plain", "size=16M"),
    ("plain", "size=2M"), ("plain", "compat=0.10,refcount_bits=16"), ("plain", "size=0"),
    ("plain", "data_file_raw=off"), ("plain", "compat=1.1"),
    ("v2", "compat=1.1"), ("v2", "compat=v3,refcount_bits=2"),
    ("v2", "compat=1.1,lazy_refcounts=on"), ("v2", "refcount_bits=8"),
    ("v2", "lazy_refcounts=on"), ("v2", "size=12M"), ("v2snap", "compat=1.1"),
    ("v2snap", "compat=1.1,refcount_bits=64"), ("v2short", "compat=1.1"),
    ("v2short", "compat=1.1,refcount_bits=8"),
    ("snaps", "refcount_bits=1"), ("snaps", "refcount_bits=2"), ("snaps", "refcount_bits=64"),
    ("snaps", "compat=0.10"), ("snaps", "compat=0.10,size=16M"), ("snapzero", "compat=0.10"),
    ("lazy", "lazy_refcounts=off"), ("lazy", "compat=0.10"), ("lazy", "refcount_bits=4"),
    ("backed", "compat=0.10"), ("backed", "backing_file=base.qcow2,backing_fmt=qcow2"),
    ("backed", "backing_fmt=raw"), ("backed", "backing_file=other"),
    ("ext_l2", "compat=0.10"), ("zstd", "compat=0.10"), ("zstd_plain", "compat=0.10"),
    ("data_file", "compat=0.10"), ("data_file", "data_file_raw=on"),
    ("plain", "data_file=x"), ("plain", "nosuch=1"), ("plain", "cluster_size=4k"),
    ("plain", "compat=2.0"), ("plain", "refcount_bits=3"), ("plain", "refcount_bits=128"),
    ("plain", "compat=v2,refcount_bits=8"), ("plain", "compat=0.10,lazy_refcounts=on"),
    ("plain", "lazy_refcounts=maybe"), ("plain", "size=abc"), ("plain", "encrypt.keyslot=1"),
    ("plain", "compat=0.10,backing_file=x"), ("plain", "size=9223372036854775807"),
    ("snaps", "size=16M"), ("snaps", "size=4M"), ("plain", "size=1000"),
    ("plain", "refcount_bits=64,compat=0.10"),
    ("bitmaps", "lazy_refcounts=on"), ("bitmaps", "refcount_bits=64"), ("bitmaps", "size=16M"),
    ("bitmaps", "refcount_bits=2,lazy_refcounts=on"),
]


@pytest.mark.parametrize(("build", "opts"), CASES)
def test_amend_like_qemu(tmp_path: Path, capsys: pytest.CaptureFixture[str], build: str,
                         opts: str) -> None:
    a_dir, b_dir = tmp_path / "qemu", tmp_path / "ours"
    a_dir.mkdir()
    BUILDS[build](a_dir / "img.qcow2")
    shutil.copytree(a_dir, b_dir)
    a, b = a_dir / "img.qcow2", b_dir / "img.qcow2"
    before = b.read_bytes()
    want = theirs("-o", opts, str(a))
    got = ours(capsys, "-o", opts, str(b))
    assert (got[0], got[1], got[2].replace(str(b), str(a))) == want
    if got[0]:
        assert b.read_bytes() == before  # a refusal writes nothing
        return
    if build != "data_file":
        assert_clean(b)
    assert info(a) == info(b)
    res = qemu_img("compare", str(a), str(b), check=False)
    assert res.returncode == 0, res.stdout
    for sn in json.loads(qemu_img("info", "--output=json", str(b)).stdout).get("snapshots", []):
        for d, p in (("a", a), ("b", b)):
            qemu_img("convert", "-l", f"snapshot.id={sn['id']}", "-O", "raw", str(p),
                     str(tmp_path / f"{d}.raw"))
        assert (tmp_path / "a.raw").read_bytes() == (tmp_path / "b.raw").read_bytes()


def test_progress_help_and_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "img.qcow2"
    plain(img)
    assert ours(capsys, "-p", "-o", "refcount_bits=32", str(img)) == (
        0, "    (0.00/100%)\r    (100.00/100%)\r\n", "")
    assert_clean(img)
    want = theirs("-o", "help", str(img))
    assert ours(capsys, "-o", "help", str(img))[:2] == (0, want[1].replace(
        "  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds\n", "").replace(
        "  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly\n", "").replace(
        "  encrypt.new-secret=<str> - New secret to set in the matching keyslots. Empty string "
        "to erase\n", "").replace(
        "  encrypt.old-secret=<str> - Select all keyslots that match this password\n", "").replace(
        "  encrypt.state=<str>    - Select new state of affected keyslots (active/inactive)\n",
        ""))
    assert ours(capsys, str(img)) == theirs(str(img))
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(4096))
    want = theirs("-o", "size=8k", str(raw))
    assert ours(capsys, "-o", "size=8k", str(raw))[0] == want[0] == 1
    assert ours(capsys, "-f", "raw", "-o", "size=8k", str(raw)) == theirs(
        "-f", "raw", "-o", "size=8k", str(raw))


def test_data_file_renamed_like_qemu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """data_file=NEW only rewrites the extension (the file is not checked): QEMU's bytes."""
    a_dir, b_dir = tmp_path / "qemu", tmp_path / "ours"
    for d in (a_dir, b_dir):
        d.mkdir()
        qemu_img("create", "-f", "qcow2", "-o", f"data_file={d / 'd.raw'}", str(d / "img.qcow2"),
                 "1M")
    want = theirs("-o", "data_file=elsewhere.raw", str(a_dir / "img.qcow2"))
    got = ours(capsys, "-o", "data_file=elsewhere.raw", str(b_dir / "img.qcow2"))
    assert got == want == (0, "", "")
    a, b = (a_dir / "img.qcow2").read_bytes(), (b_dir / "img.qcow2").read_bytes()
    assert a == b.replace(str(b_dir).encode(), str(a_dir).encode())
    assert b"elsewhere.raw" in b


def test_downgrade_refused_when_snapshots_share_zeroed_hosts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two snapshots reaching one zero cluster's host through different tables: QEMU's
    downgrade leaves 18 corruptions (COPIED on shared clusters); ours refuses with the image
    clean and reading the same (its active zero clusters already expanded)."""
    img = tmp_path / "img.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", str(img), "8M")
    qemu_io(img, "write -P 1 0 1M", "write -z 64k 64k", "write -P 2 2M 64k")
    qemu_img("snapshot", "-c", "s1", str(img))
    qemu_io(img, "write -z 2M 8k", "write -z 4M 16k")
    qemu_img("snapshot", "-c", "s2", str(img))
    qemu_io(img, "write -P 3 2M 4k", "write -z 0 4k")
    view = tmp_path / "v.raw"
    qemu_img("convert", "-O", "raw", str(img), str(view))
    before = view.read_bytes()
    rc, _, err = ours(capsys, "-o", "compat=0.10", str(img))
    assert rc == 1 and "not supported" in err
    assert_clean(img)
    qemu_img("convert", "-O", "raw", str(img), str(view))
    assert view.read_bytes() == before
