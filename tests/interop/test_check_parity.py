"""check and check -r against qemu-img on the refcount-table edge cases of issue 10:
a missing refcount table, refcount-table entries far outside the image (top bit set, or
overflowing once the cluster size is added) and 64-bit refcounts with the top bit set.

Every case runs qemu-img and qcow2kit on two copies of the same damaged file and requires
the same exit code, the same JSON and the same per-cluster diagnostics; after a repair,
`qemu-img check` must find our copy clean and `qemu-img compare` must find the guest data
unchanged.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

import qcow2kit
from qcow2kit.cli.main import main
from qcow2kit.errors import FormatError
from qcow2kit.io.file import FileStorage
from qcow2kit.metadata.check.opening import read_header_for_check
from qcow2kit.metadata.meta import Metadata
from tests.helpers import assert_clean, qemu_img, qemu_io, read_incompatible

HEADER_REFTABLE = 48  # refcount_table_offset (u64), refcount_table_clusters (u32)


@dataclass
class Run:
    rc: int
    json: dict[str, object] | None
    diag: list[str]


def _parse(rc: int, stdout: str, stderr: str) -> Run:
    data = None
    if stdout.lstrip().startswith("{"):
        data = json.loads(stdout)
        data.pop("filename", None)
    # program-prefixed lines ("qemu-img: Could not resize file: ...") are each tool's own
    diag = [
        line for line in stderr.splitlines()
        if line and not line.startswith(("qemu-img:", "qcow2kit:", "qcow2: "))
    ]
    return Run(rc, data, diag)


def run_ours(path: Path, *args: str) -> Run:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["check", *args, str(path)])
    return _parse(rc, out.getvalue(), err.getvalue())


def run_qemu(path: Path, *args: str) -> Run:
    res = qemu_img("check", *args, str(path), check=False)
    return _parse(res.returncode, res.stdout, res.stderr)


def _base(path: Path, *, cluster_size: str = "64k", refcount_bits: int = 16) -> None:
    qemu_img("create", "-q", "-f", "qcow2", "-o",
             f"cluster_size={cluster_size},refcount_bits={refcount_bits}", str(path), "8M")
    qemu_io(path, "write -P 7 0 300k", "write -P 9 5M 64k")


def _u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int(struct.unpack(">Q", f.read(8))[0])


def _put(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _copies(tmp_path: Path, pristine: Path) -> tuple[Path, Path]:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    shutil.copy(pristine, ours)
    shutil.copy(pristine, theirs)
    return ours, theirs


def _same_data(a: Path, b: Path) -> None:
    res = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(a), str(b), check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def _assert_same(ours: Run, theirs: Run) -> None:
    assert ours.rc == theirs.rc, (ours, theirs)
    assert ours.json == theirs.json
    assert ours.diag == theirs.diag


def _check_and_repair(tmp_path: Path, pristine: Path, damaged: Path) -> None:
    """Plain check and -r all, each on fresh copies, against qemu-img; ours is clean after."""
    ours, theirs = _copies(tmp_path, damaged)
    before = ours.read_bytes()
    _assert_same(run_ours(ours, "--output=json"), run_qemu(theirs, "--output=json"))
    assert ours.read_bytes() == before, "a plain check must not write"
    _assert_same(run_ours(ours, "-r", "all", "--output=json"),
                 run_qemu(theirs, "-r", "all", "--output=json"))
    assert_clean(ours)
    _same_data(pristine, ours)


# ---- a missing refcount table ----------------------------------------------------------------
def _no_reftable(tmp_path: Path, field: str) -> tuple[Path, Path]:
    pristine = tmp_path / "pristine.qcow2"
    _base(pristine)
    damaged = tmp_path / f"no_reftable_{field}.qcow2"
    shutil.copy(pristine, damaged)
    if field == "clusters":
        _put(damaged, HEADER_REFTABLE + 8, struct.pack(">I", 0))
    else:
        _put(damaged, HEADER_REFTABLE, struct.pack(">Q", 0))
    return pristine, damaged


@pytest.mark.parametrize("field", ["clusters", "offset"])
def test_missing_reftable_check_matches_qemu(tmp_path: Path, field: str) -> None:
    _pristine, damaged = _no_reftable(tmp_path, field)
    ours, theirs = _copies(tmp_path, damaged)
    o, q = run_ours(ours, "--output=json"), run_qemu(theirs, "--output=json")
    assert q.rc == 2
    _assert_same(o, q)
    # and the human summary
    o_text = run_ours(ours)
    assert o_text.rc == 2 and o_text.diag == q.diag


def test_missing_reftable_repair_matches_qemu(tmp_path: Path) -> None:
    pristine, damaged = _no_reftable(tmp_path, "clusters")
    ours, theirs = _copies(tmp_path, damaged)
    o = run_ours(ours, "-r", "all", "--output=json")
    q = run_qemu(theirs, "-r", "all", "--output=json")
    assert q.rc == 0
    _assert_same(o, q)
    assert_clean(ours)
    _same_data(pristine, ours)
    # writable again: a write through qcow2kit lands, and QEMU finds the image clean
    with qcow2kit.open(ours, "r+") as img:
        img.write(2 << 20, b"\x5a" * 65536)
    assert_clean(ours)
    qemu_io(ours, "read -P 0x5a 2M 64k", "read -P 7 0 300k", "read -P 9 5M 64k")


def test_reftable_at_offset_zero_repaired(tmp_path: Path) -> None:
    """The header cluster read as the refcount table: QEMU grows the file to 4 GiB for a
    "refcount block" at 4 GiB, we refuse that growth and rebuild instead (the sanity limit
    for hostile offsets); both repairs succeed and keep the data."""
    pristine, damaged = _no_reftable(tmp_path, "offset")
    ours, theirs = _copies(tmp_path, damaged)
    o = run_ours(ours, "-r", "all", "--output=json")
    q = run_qemu(theirs, "-r", "all", "--output=json")
    assert o.rc == q.rc == 0, (o, q)
    assert_clean(ours)
    _same_data(pristine, ours)
    _same_data(theirs, ours)


@pytest.mark.parametrize("field", ["clusters", "offset"])
def test_missing_reftable_refused_elsewhere(tmp_path: Path, field: str) -> None:
    _pristine, damaged = _no_reftable(tmp_path, field)
    before = damaged.read_bytes()
    with pytest.raises(FormatError, match="reference count table|refcount_table_offset is 0"):
        qcow2kit.open(damaged, "r+")
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main(["info", str(damaged)])
    assert rc == 1 and "Traceback" not in err.getvalue()
    assert "reference count table" in err.getvalue() or "refcount_table" in err.getvalue()
    # the header is accepted for a check only; Metadata without for_check still refuses
    storage = FileStorage(str(damaged), False)
    try:
        header = read_header_for_check(storage)
        with pytest.raises(FormatError, match="does not contain a reference count table"):
            Metadata(storage, header)
    finally:
        storage.close()
    assert damaged.read_bytes() == before


# ---- refcount-table entries far outside the image ------------------------------------------------
OUTSIDE = [
    0x8000000000010000,  # top bit: a negative signed offset
    0xFFFFFFFFFFFF0000,
    0x7FFFFFFFFFFF0000,  # overflows once the cluster size is added
    0x7FFFFFFFC0000000,  # past QEMU's largest request offset: unreadable, resize fails (EIO)
    0x00FFFFFFFFFE0000,  # below 2^63 but no file can be that large
]


@pytest.mark.parametrize("value", OUTSIDE, ids=hex)
@pytest.mark.parametrize("cluster_size", ["512", "64k"])
def test_reftable_entry_outside_image(tmp_path: Path, cluster_size: str, value: int) -> None:
    pristine = tmp_path / "pristine.qcow2"
    _base(pristine, cluster_size=cluster_size)
    damaged = tmp_path / "damaged.qcow2"
    shutil.copy(pristine, damaged)
    reftable = _u64(damaged, HEADER_REFTABLE)
    _put(damaged, reftable + 8, struct.pack(">Q", value))  # entry 1
    _check_and_repair(tmp_path, pristine, damaged)


# ---- 64-bit refcounts are unsigned ---------------------------------------------------------------
@pytest.mark.parametrize("repair", [None, "leaks", "all"])
@pytest.mark.parametrize("value", [1 << 63, (1 << 63) + 1, (1 << 64) - 1], ids=hex)
@pytest.mark.parametrize("cluster", [0, 3, 5], ids=["header", "l2", "data"])
def test_refcount64_top_bit_is_a_leak(
    tmp_path: Path, cluster: int, value: int, repair: str | None
) -> None:
    pristine = tmp_path / "pristine.qcow2"
    _base(pristine, refcount_bits=64)
    damaged = tmp_path / "damaged.qcow2"
    shutil.copy(pristine, damaged)
    block = _u64(damaged, _u64(damaged, HEADER_REFTABLE))
    _put(damaged, block + 8 * cluster, struct.pack(">Q", value))
    ours, theirs = _copies(tmp_path, damaged)
    args = ("--output=json",) if repair is None else ("-r", repair, "--output=json")
    o, q = run_ours(ours, *args), run_qemu(theirs, *args)
    _assert_same(o, q)
    if repair is None:
        assert q.rc in (2, 3)
        assert any(line.startswith(f"Leaked cluster {cluster} refcount={value} ") for line in o.diag)
    else:
        assert_clean(ours)
        _same_data(pristine, ours)


# ---- the COPIED repair never writes a table over other metadata ----------------------------------
def test_copied_repair_refuses_write_over_metadata(tmp_path: Path) -> None:
    """L1[0] points at the L1 table itself: fixing its COPIED flag would write the L1
    table, which is now also an active L2 table. QEMU's overlap check refuses, marks the
    image corrupt and fails the check; so must we (issue 11: one registry of metadata ranges,
    used by check)."""
    pristine = tmp_path / "pristine.qcow2"
    _base(pristine)
    damaged = tmp_path / "damaged.qcow2"
    shutil.copy(pristine, damaged)
    l1 = _u64(damaged, 40)
    _put(damaged, l1, struct.pack(">Q", (1 << 63) | l1))
    ours, theirs = _copies(tmp_path, damaged)
    _assert_same(run_ours(ours, "--output=json"), run_qemu(theirs, "--output=json"))
    o = run_ours(ours, "-r", "all", "--output=json")
    q = run_qemu(theirs, "-r", "all", "--output=json")
    assert q.rc == 1
    _assert_same(o, q)
    assert read_incompatible(theirs) & 2
    assert read_incompatible(ours) & 2, "the refused write must mark the image corrupt"
