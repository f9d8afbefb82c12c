"""Repair against qemu-img check -r on the damaged images of test_check.py.

For every case, three copies of the same damaged file: qemu-img repairs one, we repair
another. We require: the same exit code and JSON as qemu-img's repair run; afterwards
`qemu-img check` finds the image clean whenever QEMU's own repair got it clean; the guest
data reads the same as before the repair (where QEMU could read the damaged image) and the
same as QEMU's repaired copy.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.conftest import qemu_check, qemu_img
from tests.interop.check_cases import CASES, make_case
from tests.interop.check_poke import Poke
from tests.interop.check_runs import run_ours, run_qemu

# cases where QEMU 7.2's rebuild fails ("ERROR writing refblock", its overlap check refuses
# to reuse the cluster of the invalid refcount block); ours must leave a clean image
QEMU_REBUILD_FAILS = {"refblock_unaligned", "reftable_reserved_bits"}


def _same_data(a: Path, b: Path) -> bool | None:
    """qemu-img compare: True if the guest data is equal, None if either cannot be read."""
    res = qemu_img("compare", "-U", "-f", "qcow2", "-F", "qcow2", str(a), str(b), check=False)
    if res.returncode not in (0, 1):  # 2: open failed, 4: read error
        return None
    return res.returncode == 0


def _readable(path: Path) -> bool:
    return _same_data(path, path) is not None


def _triple(tmp_path: Path, name: str) -> tuple[Path, Path, Path]:
    orig = make_case(tmp_path, name)
    shutil.copy(orig, tmp_path / "pristine.qcow2")
    ours = tmp_path / "ours.qcow2"
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(orig, ours)
    shutil.copy(orig, theirs)
    return orig, ours, theirs


@pytest.mark.parametrize("name", sorted(CASES))
def test_repair_all_matches_qemu(tmp_path: Path, name: str) -> None:
    orig, ours, theirs = _triple(tmp_path, name)
    q = run_qemu(theirs, "-r", "all", "--output=json")
    o = run_ours(ours, "-r", "all", "--output=json")
    readable_before = _readable(orig)
    if name in QEMU_REBUILD_FAILS:
        assert q.rc == 1 and o.rc == 0, (o, q)
        assert qemu_check(ours)["rc"] == 0
        assert _same_data(orig, ours) is not False
        return
    assert o.rc == q.rc, (o, q)
    assert o.json == q.json
    after_q = qemu_check(theirs)
    after_o = qemu_check(ours)
    for key in ("corruptions", "leaks", "check-errors", "rc"):
        assert after_o.get(key, 0) == after_q.get(key, 0), (key, after_o, after_q)
    if after_q["rc"] == 0:
        assert after_o["rc"] == 0
    same = _same_data(ours, theirs)
    assert same is not False, "our repair and QEMU's read differently"
    if readable_before and same:
        assert _same_data(orig, ours), "the repair changed guest data"


@pytest.mark.parametrize("name", sorted(CASES))
def test_repair_leaks_matches_qemu(tmp_path: Path, name: str) -> None:
    orig, ours, theirs = _triple(tmp_path, name)
    q = run_qemu(theirs, "-r", "leaks", "--output=json")
    o = run_ours(ours, "-r", "leaks", "--output=json")
    assert o.rc == q.rc, (o, q)
    assert o.json == q.json
    assert o.stderr == q.stderr
    if q.rc == 0:
        assert qemu_check(ours)["rc"] == 0
    if q.rc in (0, 2, 3) and _readable(orig):
        assert _same_data(orig, ours)


def test_rebuild_needed_without_all(tmp_path: Path) -> None:
    path = make_case(tmp_path, "zero_refcount_data")
    o = run_ours(path, "-r", "leaks")
    assert o.rc == 1
    assert "ERROR need to rebuild refcount structures" in o.stderr
    assert o.stdout == ""


def test_leak_repair_truncates_file(tmp_path: Path) -> None:
    path = make_case(tmp_path, "leak_appended")
    size = path.stat().st_size
    o = run_ours(path, "-r", "leaks", "--output=json")
    assert o.rc == 0 and o.json is not None and o.json["leaks-fixed"] == 2
    assert path.stat().st_size == o.json["image-end-offset"] < size
    assert qemu_check(path)["rc"] == 0


def test_rebuild_layout_same_as_qemu(tmp_path: Path) -> None:
    """The rebuilt refcount structure lands where QEMU puts it."""
    _orig, ours, theirs = _triple(tmp_path, "zero_refcount_data")
    run_qemu(theirs, "-r", "all")
    run_ours(ours, "-r", "all")
    po, pq = Poke(ours), Poke(theirs)
    assert (po.reftable_offset, po.reftable_clusters) == (pq.reftable_offset, pq.reftable_clusters)
    assert po.refblock(0) == pq.refblock(0)


def test_corrupt_bit_cleared_by_repair(tmp_path: Path) -> None:
    import qcow2kit
    from qcow2kit.errors import ImageStateError

    path = make_case(tmp_path, "leak_appended")
    p = Poke(path)
    incompat = p.u64(72)
    p.put64(72, incompat | 2)
    with pytest.raises(ImageStateError):
        qcow2kit.open(str(path), "r+")
    o = run_ours(path, "-r", "all")
    assert o.rc == 0
    assert Poke(path).u64(72) & 2 == 0
    with qcow2kit.open(str(path), "r+") as img:
        img.write(0, b"x")
    assert qemu_check(path)["rc"] == 0


def test_dirty_image_repaired_on_open(tmp_path: Path) -> None:
    import qcow2kit

    path = make_case(tmp_path, "lazy_dirty")
    assert Poke(path).u64(72) & 1
    orig = tmp_path / "orig.qcow2"
    shutil.copy(path, orig)
    with qcow2kit.open(str(path), "r+"):
        pass
    assert Poke(path).u64(72) & 1 == 0
    assert qemu_check(path)["rc"] == 0
    assert _same_data(orig, path)


def test_api_repair(tmp_path: Path) -> None:
    import qcow2kit

    for case in ("doubled_reference", "zero_refcount_data", "leak_appended"):
        path = make_case(tmp_path, case)
        with qcow2kit.open(str(path), "r+") as img:
            res = img.check(repair="all")
            assert res.rechecked and res.corruptions_fixed + res.leaks_fixed >= 1
            assert res.corruptions == 0 and res.leaks == 0 and res.exit_code == 0
            assert img.check().exit_code == 0
            # the open image keeps working on the repaired metadata
            img.write(5 << 20, b"\x5a" * 200_000)
            img.write(0, b"\x5b" * 70_000)
            assert img.read(5 << 20, 200_000) == b"\x5a" * 200_000
            assert img.check().exit_code == 0
        assert qemu_check(path)["rc"] == 0


class _CrashError(Exception):
    pass


def test_repair_crash_states(tmp_path: Path) -> None:
    """A power cut after any write of a rebuild leaves an image a second repair fixes,
    with the guest data intact."""
    from qcow2kit.io.file import FileStorage
    from qcow2kit.metadata import header_io
    from qcow2kit.metadata.check import check_image
    from qcow2kit.metadata.meta import Metadata

    path = make_case(tmp_path, "zero_refcount_data")
    orig = tmp_path / "orig.qcow2"
    shutil.copy(path, orig)

    class Counting(FileStorage):
        left = 0

        def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
            if Counting.left == 0:
                raise _CrashError()
            Counting.left -= 1
            super().pwrite(offset, data)

    writes = 0
    while True:
        copy = tmp_path / f"crash{writes}.qcow2"
        shutil.copy(path, copy)
        Counting.left = writes
        storage = Counting(str(copy), True)
        finished = True
        try:
            check_image(Metadata(storage, header_io.read_header(storage)), "all")
        except _CrashError:
            finished = False
        finally:
            storage.close()
        assert qemu_check(copy)["check-errors"] == 0
        o = run_ours(copy, "-r", "all")
        assert o.rc == 0, (writes, o)
        assert qemu_check(copy)["rc"] == 0
        assert _same_data(orig, copy)
        if finished:
            break
        writes += 1
        assert writes < 50
    assert writes >= 3  # the rebuild did write blocks, table and header


def test_refcount_order_rebuild(tmp_path: Path) -> None:
    """Rebuild writes refcount blocks of every width correctly."""
    for bits in (1, 2, 8, 32, 64):
        path = tmp_path / f"r{bits}.qcow2"
        qemu_img("create", "-f", "qcow2", "-o", f"refcount_bits={bits}", str(path), "16M")
        subprocess.run(["qemu-io", "-c", "write -P 9 0 256k", str(path)], capture_output=True)
        p = Poke(path)
        block = p.refblock(0)
        # zero the first byte(s) of the refblock: clusters 0.. get refcount 0
        p.put(block, b"\0" * 8)
        o = run_ours(path, "-r", "all", "--output=json")
        assert o.rc == 0, (bits, o)
        assert qemu_check(path)["rc"] == 0, bits
        assert struct.unpack(">I", path.read_bytes()[96:100])[0] == {1: 0, 2: 1, 8: 3, 32: 5, 64: 6}[bits]


@pytest.mark.parametrize("opts", ["cluster_size=512", "cluster_size=4096,refcount_bits=64",
                                  "cluster_size=1024,refcount_bits=4"])
def test_rebuild_many_blocks_identical_to_qemu(tmp_path: Path, opts: str) -> None:
    """A rebuild over many refcount blocks writes the same bytes as QEMU's."""
    path = tmp_path / "m.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", opts, str(path), "8M")
    subprocess.run(["qemu-io", "-c", "write -P 5 0 3M", "-c", "write -P 6 6M 1M", str(path)],
                   capture_output=True, check=True)
    p = Poke(path)
    p.put(p.refblock(0) + 16, b"\0" * 8)  # a few clusters get refcount 0
    ours, theirs = tmp_path / "o.qcow2", tmp_path / "t.qcow2"
    shutil.copy(path, ours)
    shutil.copy(path, theirs)
    q = run_qemu(theirs, "-r", "all", "--output=json")
    o = run_ours(ours, "-r", "all", "--output=json")
    assert o.rc == q.rc == 0
    assert o.json == q.json
    assert ours.read_bytes() == theirs.read_bytes()
