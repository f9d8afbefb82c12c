"""Power cut after every write of a shrink (every prefix of its write log) and sampled
reorderings inside flush epochs: qemu-img check must find no corruption, and the data below
the new size must be unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

import qcow2kit
from qcow2kit.image import Image
from qcow2kit.testing.faults import RecordingStorage, check_crash_states
from tests.helpers import qemu_img, qemu_io

K = 1024
M = 1 << 20


def _record_shrink(path: Path, new_size: int) -> RecordingStorage:
    storage = RecordingStorage.from_file(path)
    with Image(storage) as image:
        image.resize(new_size, shrink=True)
    return storage


def _verifier(tmp_path: Path, expect: bytes):  # type: ignore[no-untyped-def]
    def verify(state: str) -> None:
        out = tmp_path / "state.raw"
        qemu_img("convert", "-O", "raw", state, str(out))
        got = out.read_bytes()[: len(expect)]
        assert got == expect, "data below the new size changed"

    return verify


def _run(tmp_path: Path, img: Path, new_size: int, *, samples: int = 3, max_states: int = 250) -> int:
    raw = tmp_path / "before.raw"
    qemu_img("convert", "-O", "raw", str(img), str(raw))
    expect = raw.read_bytes()[:new_size]
    initial = img.read_bytes()
    storage = _record_shrink(img, new_size)
    n = check_crash_states(
        initial, storage.log, tmp_path / "states", verify=_verifier(tmp_path, expect),
        reorder_samples=samples, max_states=max_states,
    )
    assert n > 5
    return n


def test_crash_new_end_inside_allocated_l2(tmp_path: Path) -> None:
    """QEMU 7.2's hole: the new end falls inside an allocated L2 table whose cut-off clusters
    are counted in the same refcount block; QEMU rewrote the reftable before the L2 reached
    the disk. 4 KiB clusters: one L2 table maps 2 MiB, one refcount block 8 MiB of host."""
    img = tmp_path / "t.qcow2"
    (tmp_path / "states").mkdir()
    qcow2kit.create(str(img), 16 * M, cluster_size=4096)
    with qcow2kit.open(str(img), "r+") as image:
        image.write(0, b"\x11" * M)
        image.write(4 * M, b"\x22" * (2 * M))  # fills the L2 table covering [4M, 6M)
        image.write(10 * M, b"\x33" * M)
    _run(tmp_path, img, 5 * M)


def test_crash_unaligned_end_drops_refblocks(tmp_path: Path) -> None:
    """512-byte clusters and 64-bit refcounts: each refcount block covers 64 clusters, so the
    shrink drops chains of blocks; the new end is not cluster-aligned (tail zeroing)."""
    img = tmp_path / "t.qcow2"
    (tmp_path / "states").mkdir()
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", str(img), "1M")
    qemu_io(img, "write -P 0xaa 0 1M")
    _run(tmp_path, img, 200 * K + 512, samples=2)


def test_crash_sparse_tail_and_snapshot(tmp_path: Path) -> None:
    """Whole L2 tables past the new L1 end, one of them shared with a v3 snapshot."""
    img = tmp_path / "t.qcow2"
    (tmp_path / "states").mkdir()
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "64M")
    qemu_io(img, "write -P 0x01 0 512K", "write -P 0x02 40M 256K")
    qemu_img("snapshot", "-c", "s1", str(img))
    qemu_io(img, "write -P 0x03 60M 128K", "write -P 0x04 100K 8K")
    _run(tmp_path, img, 6 * M)


@pytest.mark.parametrize("compressed", [True])
def test_crash_compressed_tail(tmp_path: Path, compressed: bool) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(b"".join(bytes([i % 7]) * 4096 for i in range(1024)))
    img = tmp_path / "c.qcow2"
    (tmp_path / "states").mkdir()
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", str(src), str(img))
    _run(tmp_path, img, 2 * M + 2048)


def test_crash_grow_moves_l1(tmp_path: Path) -> None:
    """Growing past what the L1 clusters hold: new table, flush, header switch, free old."""
    img = tmp_path / "g.qcow2"
    (tmp_path / "states").mkdir()
    qcow2kit.create(str(img), M, cluster_size=512)
    with qcow2kit.open(str(img), "r+") as image:
        image.write(0, b"\x5a" * (M - 1000))
    raw = tmp_path / "before.raw"
    qemu_img("convert", "-O", "raw", str(img), str(raw))
    expect = raw.read_bytes()
    initial = img.read_bytes()
    storage = RecordingStorage.from_file(img)
    with Image(storage) as image:
        image.resize(3 * M)
    assert any(op[0] == "event" and op[1] == "l1_grow_activate_table" for op in storage.log)
    n = check_crash_states(initial, storage.log, tmp_path / "states",
                           verify=_verifier(tmp_path, expect), reorder_samples=2, max_states=120)
    assert n > 5


def test_crash_after_the_early_discard(tmp_path: Path) -> None:
    """`qcow2kit resize --shrink` first punches the cropped data (ops/shrink_discard, as
    qemu-img's shrink does), then shrinks: a power cut anywhere in that sequence, including
    between the punches and the shrink's first write, leaves a consistent image with the
    data below the new end intact."""
    from qcow2kit.io.file import FileStorage
    from qcow2kit.ops.shrink_discard import EarlyDiscard, cropped_runs

    img = tmp_path / "e.qcow2"
    (tmp_path / "states").mkdir()
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "6M")
    qemu_io(img, "write -P 0x61 3M 3M", "write -P 0x62 0 3M")  # the cropped tail first in the file
    new_size = M + 512
    raw = tmp_path / "before.raw"
    qemu_img("convert", "-O", "raw", str(img), str(raw))
    expect = raw.read_bytes()[:new_size]
    reader = FileStorage(str(img))
    runs = cropped_runs(reader, new_size)
    reader.close()
    assert sum(length for _, length in runs) == 5 * M - 4096
    initial = img.read_bytes()
    storage = RecordingStorage.from_file(img)
    EarlyDiscard(storage, runs).start().wait()
    assert [op[0] for op in storage.log][: len(runs)] == ["punch"] * len(runs)
    with Image(storage) as image:
        image.resize(new_size, shrink=True)
    n = check_crash_states(
        initial, storage.log, tmp_path / "states", verify=_verifier(tmp_path, expect),
        reorder_samples=3, max_states=250,
    )
    assert n > 5


def test_crash_when_the_shrink_reuses_a_punched_cluster(tmp_path: Path) -> None:
    """The L1 table sits at the end of the file (the image grew), so the shrink moves it down
    into a cluster the early discard punched: the punch must be durable before that write
    (EarlyDiscard.wait flushes), or a power cut could leave the punch after the new table."""
    from qcow2kit.io.file import FileStorage
    from qcow2kit.ops.shrink_discard import EarlyDiscard, cropped_runs

    img = tmp_path / "g.qcow2"
    (tmp_path / "states").mkdir()
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", str(img), "1M")
    qemu_io(img, "write -P 0xaa 512K 512K", "write -P 0xbb 0 512K")
    qemu_img("resize", str(img), "4M")  # a new, larger L1 table at the end of the file
    new_size = 200 * K + 512
    raw = tmp_path / "before.raw"
    qemu_img("convert", "-O", "raw", str(img), str(raw))
    expect = raw.read_bytes()[:new_size]
    reader = FileStorage(str(img))
    runs = cropped_runs(reader, new_size)
    reader.close()
    initial = img.read_bytes()
    storage = RecordingStorage.from_file(img)
    EarlyDiscard(storage, runs).start().wait()
    # the punches are durable before the shrink writes anything (the shrink's own first
    # flush also comes before its reuse of a punched cluster here, so the log says it)
    assert storage.log[-1] == ("flush",) and storage.log[-2][0] == "punch"
    with Image(storage) as image:
        image.resize(new_size, shrink=True)
    punched = {c for op in storage.log if op[0] == "punch"
               for c in range(op[1] // 512, (op[1] + op[2]) // 512)}
    assert any(op[0] == "write" and op[1] // 512 in punched for op in storage.log)
    n = check_crash_states(
        initial, storage.log, tmp_path / "states", verify=_verifier(tmp_path, expect),
        reorder_samples=2, max_states=120,
    )
    assert n > 5
