"""Internal snapshots against qemu-img 7.2: the -l table byte for byte, info, QEMU's lookup
orders / IDs / names, and snapshots made, applied and deleted by either tool in any mix,
judged by `qemu-img check` (clean, no leaks) and `qemu-img convert -l` of every snapshot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import assert_clean, qemu_img, qemu_io, to_raw

M = 1 << 20


def ours(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "qcow2kit", *args], capture_output=True)


def theirs(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["qemu-img", *args], capture_output=True)


def snap(tool: str, action: str, name: str, path: Path) -> None:
    res = (ours if tool == "ours" else theirs)("snapshot", action, name, str(path))
    assert res.returncode == 0, res.stderr


def make(tmp_path: Path, opts: str = "cluster_size=4096", size: str = "8M") -> Path:
    p = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", opts, str(p), size)
    qemu_io(p, "write -P 1 0 1M", "write -c -P 2 2M 64k", "write -z 3M 64k", "write -P 3 6M 8k")
    return p


def listing_equal(p: Path) -> bytes:
    a, b = ours("snapshot", "-l", str(p)), theirs("snapshot", "-l", str(p))
    assert a.returncode == b.returncode == 0, (a.stderr, b.stderr)
    assert a.stdout == b.stdout
    return a.stdout


def test_list_matches_qemu(tmp_path: Path) -> None:
    p = make(tmp_path)
    assert listing_equal(p) == b""
    names = ("s1", "a-name-longer-than-sixteen-bytes", "", "1", "x" * 300, "caf\u00e9",
             "raw\udcffbyte")  # the last one is the byte 0xff, not UTF-8
    for name in names:
        qemu_img("snapshot", "-c", name, str(p))
    out = listing_equal(p)
    assert out.startswith(b"Snapshot list:\nID        TAG")
    for args in (["info"], ["info", "--output=json"]):
        a, b = ours(*args, str(p)), theirs(*args, str(p))
        assert a.stdout == b.stdout


def test_ours_listed_and_read_by_qemu(tmp_path: Path) -> None:
    p = make(tmp_path, "cluster_size=65536")
    before = to_raw(p, tmp_path / "a.raw")
    snap("ours", "-c", "first", p)
    assert_clean(p)
    qemu_io(p, "write -P 9 0 64k", "write -P 8 7M 64k")
    after = to_raw(p, tmp_path / "b.raw")
    snap("ours", "-c", "second", p)
    assert_clean(p)
    listing_equal(p)
    a, b = ours("info", "--output=json", str(p)), theirs("info", "--output=json", str(p))
    assert a.stdout == b.stdout
    entries = json.loads(b.stdout)["snapshots"]
    assert [(e["id"], e["name"], e["icount"], e["vm-state-size"]) for e in entries] == [
        ("1", "first", 0, 0), ("2", "second", 0, 0)]
    assert entries[0]["date-nsec"] % 1000 == 0
    assert to_raw(p, tmp_path / "c.raw", snapshot="first") == before
    assert to_raw(p, tmp_path / "d.raw", snapshot="second") == after


@pytest.mark.parametrize("opts", [
    "cluster_size=4096",
    "cluster_size=512,refcount_bits=64",
    "cluster_size=65536,refcount_bits=8,lazy_refcounts=on",
    "cluster_size=65536,extended_l2=on",
    "compat=0.10,cluster_size=4096",
])
@pytest.mark.parametrize("order", ["ours-first", "qemu-first"])
def test_mixed_create_apply_delete(tmp_path: Path, opts: str, order: str) -> None:
    """Snapshots made by one tool, applied and deleted by the other, and back."""
    p = make(tmp_path, opts)
    a, b = ("ours", "qemu") if order == "ours-first" else ("qemu", "ours")
    saved: dict[str, bytes] = {}
    saved["s1"] = to_raw(p, tmp_path / "x.raw")
    snap(a, "-c", "s1", p)
    qemu_io(p, "write -P 5 512k 1M", "write -c -P 6 5M 64k")
    saved["s2"] = to_raw(p, tmp_path / "x.raw")
    snap(b, "-c", "s2", p)
    qemu_io(p, "write -P 7 0 64k", "discard 6M 8k")
    current = to_raw(p, tmp_path / "x.raw")
    snap(a, "-c", "s3", p)
    assert_clean(p)
    for name, data in saved.items():
        assert to_raw(p, tmp_path / "x.raw", snapshot=name) == data, name
    snap(b, "-a", "s1", p)
    assert_clean(p)
    assert to_raw(p, tmp_path / "x.raw") == saved["s1"]
    qemu_io(p, "write -P 11 1M 256k")
    snap(a, "-a", "s2", p)
    assert to_raw(p, tmp_path / "x.raw") == saved["s2"]
    snap(b, "-d", "s2", p)
    assert_clean(p)
    assert to_raw(p, tmp_path / "x.raw") == saved["s2"]
    snap(a, "-d", "s1", p)
    assert_clean(p)
    assert to_raw(p, tmp_path / "x.raw", snapshot="s3") == current
    snap(b, "-a", "s3", p)
    snap(a, "-d", "s3", p)
    assert_clean(p)
    assert to_raw(p, tmp_path / "x.raw") == current
    assert listing_equal(p) == b""


def test_lookup_orders_and_ids(tmp_path: Path) -> None:
    """ID1 named "A", ID2 named "1": -a 1 restores ID1, -d 1 deletes ID2 (QEMU's orders)."""
    p = make(tmp_path)
    one = to_raw(p, tmp_path / "x.raw")
    snap("ours", "-c", "A", p)
    qemu_io(p, "write -P 4 0 64k")
    snap("ours", "-c", "1", p)
    qemu_io(p, "write -P 5 0 64k")
    snap("ours", "-a", "1", p)
    assert to_raw(p, tmp_path / "x.raw") == one
    snap("ours", "-d", "1", p)
    out = theirs("snapshot", "-l", str(p)).stdout.decode()
    assert out.splitlines()[2].split()[:2] == ["1", "A"] and len(out.splitlines()) == 3
    # IDs: one more than the largest number any ID reads as
    qemu_img("snapshot", "-c", "B", str(p))  # ID 2
    snap("ours", "-d", "A", p)
    snap("ours", "-c", "C", p)
    ids = [json_snap["id"] for json_snap in json.loads(
        theirs("info", "--output=json", str(p)).stdout)["snapshots"]]
    assert ids == ["2", "3"]
    assert_clean(p)


def test_name_truncation_like_qemu(tmp_path: Path) -> None:
    p = make(tmp_path)
    long = "n" * 254 + "\u00e9" + "tail"  # the cut falls inside a two-byte character
    snap("ours", "-c", long, p)
    q = tmp_path / "q.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(q), "8M")
    qemu_img("snapshot", "-c", long, str(q))
    names = [theirs("snapshot", "-l", str(x)).stdout.splitlines()[2][10:] for x in (p, q)]
    assert names[0].split(b" ")[0] == names[1].split(b" ")[0]
    assert len(names[0].split(b" ")[0]) == 255
    assert_clean(p)


def test_apply_restores_the_snapshot_size(tmp_path: Path) -> None:
    p = make(tmp_path)
    small = to_raw(p, tmp_path / "x.raw")
    snap("ours", "-c", "small", p)
    qemu_img("resize", str(p), "40M")
    qemu_io(p, "write -P 9 30M 1M")
    big = to_raw(p, tmp_path / "x.raw")
    snap("ours", "-c", "big", p)
    snap("ours", "-a", "small", p)
    assert_clean(p)
    assert to_raw(p, tmp_path / "x.raw") == small
    snap("qemu", "-a", "big", p)
    snap("ours", "-a", "small", p)
    snap("ours", "-a", "big", p)
    assert_clean(p)
    assert to_raw(p, tmp_path / "x.raw") == big


def test_refcount_overflow_refused_before_writing(tmp_path: Path) -> None:
    p = tmp_path / "r1.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "refcount_bits=1", str(p), "4M")
    snap("ours", "-c", "empty", p)  # nothing to share: allowed
    qemu_io(p, "write -P 1 0 64k")
    before = p.read_bytes()
    res = ours("snapshot", "-c", "s1", str(p))
    assert res.returncode == 1
    assert res.stderr == b"qcow2kit: Could not create snapshot 's1': -22 (Invalid argument)\n"
    assert p.read_bytes() == before
    assert_clean(p)


def test_messages_and_usage(tmp_path: Path) -> None:
    p = make(tmp_path)
    r = tmp_path / "r.raw"
    r.write_bytes(bytes(M))
    cases = [
        (["-a", "nope", str(p)], "Could not apply snapshot 'nope': Failed to load snapshot: "
         "No such file or directory"),
        (["-d", "nope", str(p)], "Could not delete snapshot 'nope': snapshot not found"),
        (["-c", "x", str(r)], "Could not create snapshot 'x': -95 (Operation not supported)"),
        (["-a", "x", str(r)], "Could not apply snapshot 'x': Block driver does not support "
         "snapshots"),
        (["-d", "x", str(r)], "Could not delete snapshot 'x': snapshot not found"),
    ]
    for args, msg in cases:
        res = ours("snapshot", *args)
        assert res.returncode == 1
        assert res.stderr.decode() == f"qcow2kit: {msg}\n"
        assert msg in theirs("snapshot", *args).stderr.decode()
    for args, msg in [(["-l", "-c", "x", str(p)], "Cannot mix '-l', '-a', '-c', '-d'"),
                      (["-l"], "Expecting one image file name"),
                      (["-l", str(p), str(p)], "Expecting one image file name")]:
        res = ours("snapshot", *args)
        assert res.returncode == 1 and msg in res.stderr.decode()
    res = ours("snapshot", str(p))
    assert res.returncode == 0 and res.stdout == b""
    assert ours("snapshot", str(tmp_path / "missing")).returncode == 1  # opened all the same
    assert ours("snapshot", "-l", str(r)).stdout == b""


def test_apply_refused_with_persistent_bitmap(tmp_path: Path) -> None:
    p = make(tmp_path)
    qemu_img("snapshot", "-c", "s", str(p))
    qemu_img("bitmap", "--add", "--disable", str(p), "b0")
    before = p.read_bytes()
    res = ours("snapshot", "-a", "s", str(p))
    assert res.returncode == 1
    msg = "Could not apply snapshot 's': Device has active dirty bitmaps"
    assert res.stderr.decode() == f"qcow2kit: {msg}\n"
    assert p.read_bytes() == before
    assert msg in theirs("snapshot", "-a", "s", str(p)).stderr.decode()
    snap("ours", "-c", "t", p)
    snap("ours", "-d", "t", p)
    assert_clean(p)


def test_shrink_and_compact_after_our_snapshots(tmp_path: Path) -> None:
    p = make(tmp_path)
    snap("ours", "-c", "a", p)
    qemu_io(p, "write -P 4 0 2M")
    snap("ours", "-c", "b", p)
    qemu_io(p, "write -P 5 4M 1M")
    saved = {n: to_raw(p, tmp_path / "x.raw", snapshot=n) for n in ("a", "b")}
    snap("ours", "-d", "a", p)
    assert ours("resize", "--shrink", str(p), "5M").returncode == 0
    assert_clean(p)
    assert ours("compact", str(p)).returncode == 0
    assert_clean(p)
    # qemu-img convert -l reads a snapshot at the image's current size
    assert to_raw(p, tmp_path / "x.raw", snapshot="b") == saved["b"][: 5 * M]
    snap("ours", "-a", "b", p)
    assert to_raw(p, tmp_path / "x.raw") == saved["b"]
    assert_clean(p)
