"""Crash ordering of the write path (DESIGN.md section 3): power cuts.

Each test records the storage operations of a write / discard / write_zeroes workload with
RecordingStorage, then rebuilds every image a power cut could leave (every prefix of the log,
plus sampled subsets of the unflushed writes of each flush epoch) and requires:
- `qemu-img check` reports no corruption and no check error (leaks are allowed);
- every guest sector the workload never touched still reads what was flushed before it;
- in prefix states (writes landed in order) every touched sector reads one of the values it
  held at some point (old data, any written data, or zeros where zeroed / discarded);
- internal snapshots keep their content throughout.
Covered here: allocation (L2 tables, refcount blocks, refcount table growth), copy on write
with internal snapshots, overwritten compressed clusters, lazy refcounts, compat 0.10 with a
backing file, seeded random workloads, and an external data file. The driver (History,
Workload, run_crash_test) is in crash_workload.py; I/O errors during writes are in
test_write_io_errors.py, the crash harness's own tests in test_crash_harness.py.
"""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest

import qcow2kit
from qcow2kit.image import Image
from qcow2kit.testing import (
    RecordingStorage,
    check_crash_states,
    crash_images,
)
from qcow2kit.testing.faults import is_dirty, qemu_check_json
from tests.crash.crash_workload import MAX_STATES, Workload, run_crash_test
from tests.crash.crash_workload import prefill as _prefill
from tests.helpers import assert_clean, pattern, qemu_img, qemu_io, to_raw


# ---- allocation: L2 tables, refcount blocks, refcount table growth --------------------------
@pytest.mark.slow
def test_allocation_grows_reftable(tmp_path: Path) -> None:
    """512 B clusters with 64-bit refcounts: a refcount block covers 64 clusters and one
    reftable cluster 4096 clusters (2 MiB), so ~2.5 MiB of new data forces refcount blocks,
    L2 tables and a refcount table switch."""
    path = tmp_path / "disk.qcow2"
    size = 8 << 20
    qcow2kit.create(str(path), size, cluster_size=512, refcount_bits=64)
    _prefill(path, 1 << 20, 128 << 10)
    reftable_before = struct.unpack(">Q", path.read_bytes()[48:56])[0]

    def work(w: Workload) -> None:
        w.write(4 << 20, 300)  # partial cluster in a fresh L2 table
        w.flush()
        for i in range(10):  # large sequential writes: many refcount blocks
            w.write((5 << 20) + i * (256 << 10) + 100, 256 << 10)
        w.write(3000, 5000)  # over prefilled data, crossing clusters
        w.discard(64 << 10, 16 << 10)
        w.zero(200 << 10, 40000)
        w.flush()
        w.write(7 << 20, 20 << 10)

    storage = run_crash_test(
        tmp_path, path, work, max_states=max(300, MAX_STATES),
        expect_events=("reftable_grow", "refblock_alloc_hookup", "l2_update", "l1_update"),
    )
    reftable_after = struct.unpack(">Q", storage.contents()[48:56])[0]
    assert reftable_after != reftable_before, "the refcount table never moved"


def test_small_writes_every_prefix(tmp_path: Path) -> None:
    """A short workload checked exhaustively: every prefix and many re-orderings."""
    path = tmp_path / "disk.qcow2"
    qcow2kit.create(str(path), 4 << 20, cluster_size=4096, refcount_bits=16)
    _prefill(path, 2 << 20, 64 << 10)

    def work(w: Workload) -> None:
        w.write(1000, 10000)
        w.write(3 << 20, 4096)
        w.flush()
        w.discard(0, 64 << 10)
        w.zero(128 << 10, 8192, unmap=True)
        w.zero(192 << 10, 12288, unmap=False)
        w.write(129 << 10, 100)

    run_crash_test(tmp_path, path, work, reorder_samples=8, max_states=max(400, MAX_STATES))


# ---- copy on write: internal snapshots -----------------------------------------------------
@pytest.mark.parametrize("extended_l2", [False, True], ids=["std", "xl2"])
def test_cow_with_internal_snapshot(tmp_path: Path, extended_l2: bool) -> None:
    path = tmp_path / "disk.qcow2"
    size = 4 << 20
    cs = 32768 if extended_l2 else 4096
    opts = f"cluster_size={cs}" + (",extended_l2=on" if extended_l2 else "")
    qemu_img("create", "-f", "qcow2", "-o", opts, str(path), str(size))
    _prefill(path, size, 256 << 10)
    qemu_img("snapshot", "-c", "snap1", str(path))
    snap1 = to_raw(path, tmp_path / "snap1.raw", snapshot="snap1")

    def work(w: Workload) -> None:
        w.write(100, 300)  # partial write into a shared cluster and a shared L2 table
        w.write(cs * 3, cs * 2)  # whole shared clusters
        w.flush()
        w.discard(256 << 10, 64 << 10)  # drop shared clusters
        w.zero(512 << 10, cs + 700)  # zero flag over shared clusters, partial tail
        w.write((2 << 20) - 100, 5000)  # crosses an L2-table boundary for 4 KiB clusters
        w.write(3 << 20, 3 * cs)  # fresh area

    run_crash_test(tmp_path, path, work, snapshots={"snap1": snap1})


# ---- compressed clusters being overwritten --------------------------------------------------
def test_overwrite_compressed_clusters(tmp_path: Path) -> None:
    size = 2 << 20
    src = tmp_path / "src.raw"
    rng = random.Random(7)
    # compressible but not trivial: words from a small vocabulary
    words = [bytes(rng.choice(b"abcdefgh") for _ in range(rng.randint(2, 9))) for _ in range(50)]
    text = b" ".join(rng.choice(words) for _ in range(size // 4))[:size]
    src.write_bytes(text.ljust(size, b"\0"))
    path = tmp_path / "disk.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", str(src), str(path))
    info = qemu_check_json(str(path))
    assert info["compressed-clusters"] > 400, info

    def work(w: Workload) -> None:
        w.write(10, 100)  # partial: decompress, rewrite as a normal cluster
        w.write(8192, 4096)  # whole cluster
        w.write(20000, 30000)  # several clusters, partial at both ends
        w.flush()
        w.discard(64 << 10, 8192)
        w.zero(128 << 10, 10000)
        w.zero(192 << 10, 8192, unmap=True)

    run_crash_test(tmp_path, path, work)


# ---- lazy refcounts: dirty bit, repaired on open ------------------------------------------
def test_lazy_refcounts(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    qcow2kit.create(str(path), 4 << 20, cluster_size=4096, lazy_refcounts=True)
    _prefill(path, 1 << 20, 64 << 10)

    def work(w: Workload) -> None:
        w.write(5000, 20000)
        w.flush()
        w.write(2 << 20, 64 << 10)
        w.discard(0, 32 << 10)

    storage = run_crash_test(tmp_path, path, work)
    # qcow2kit's own repair: opening a dirty crash state read-write rebuilds the refcounts,
    # after which QEMU finds it clean, leaks included, and the flushed data intact
    state = tmp_path / "ours.qcow2"
    before = to_raw(path, tmp_path / "before.raw")
    dirty = 0
    for label, image in crash_images(storage.initial, storage.log, reorder_samples=2,
                                     max_states=min(MAX_STATES, 60)):
        if not is_dirty(image):
            continue
        dirty += 1
        state.write_bytes(image)
        qcow2kit.open(str(state), "r+").close()
        assert not is_dirty(state.read_bytes()), label
        assert_clean(state)
        got = to_raw(state, tmp_path / "state.raw")
        assert got[64 << 10 : 2 << 20] == before[64 << 10 : 2 << 20], label
    assert dirty > 5


# ---- compat 0.10 and a backing file ----------------------------------------------------------
def test_v2_with_backing(tmp_path: Path) -> None:
    size = 4 << 20
    base = tmp_path / "base.raw"
    base.write_bytes(pattern(3, size))
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096", "-b", "base.raw",
             "-F", "raw", str(path))
    qemu_io(path, "write -P 0x33 0 64k")

    def work(w: Workload) -> None:
        w.write(100, 5000)  # partial: copies backing data around it
        w.zero(64 << 10, 10000)  # v2 with backing: zero bytes are written
        w.flush()
        w.discard(0, 8192)  # backing data shows through again
        w.write(1 << 20, 4096 * 5 + 1)

    run_crash_test(tmp_path, path, work, backing=base.read_bytes())

# ---- random workloads on random images ----------------------------------------------------
_RANDOM_SETUPS = [
    ("cluster_size=512,refcount_bits=64", None),
    ("cluster_size=4096,refcount_bits=1", None),
    ("cluster_size=4096", "snapshot"),
    ("cluster_size=65536,extended_l2=on", "snapshot"),
    ("cluster_size=16384,extended_l2=on,refcount_bits=64", "compressed"),
    ("cluster_size=4096,compat=0.10", "compressed"),
    ("cluster_size=4096,lazy_refcounts=on", "snapshot"),
    ("cluster_size=32768,extended_l2=on", "backing"),
    ("cluster_size=4096,compat=0.10", "backing"),
    ("cluster_size=512,refcount_bits=64", "snapshot"),
]


_SEEDS = int(os.environ.get("QK_CRASH_SEEDS", "1"))  # more seeds for a long hunt


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(_SEEDS))
@pytest.mark.parametrize("setup", range(len(_RANDOM_SETUPS)), ids=[o for o, _ in _RANDOM_SETUPS])
def test_random_workload_crash(tmp_path: Path, setup: int, seed: int) -> None:
    """Seeded random write / zero / discard / flush workloads on images QEMU made (with an
    internal snapshot, or compressed clusters): every state checked is consistent."""
    opts, start = _RANDOM_SETUPS[setup]
    size = 2 << 20
    path = tmp_path / "disk.qcow2"
    snapshots: dict[str, bytes] = {}
    base_data: bytes | None = None
    if start == "compressed":
        src = tmp_path / "src.raw"
        src.write_bytes((b"qcow2kit random crash " * (size // 22 + 1))[:size])
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, str(src), str(path))
    else:
        if start == "backing":
            base = tmp_path / "base.raw"
            base_data = pattern(setup, size - 4096)  # shorter than the overlay
            base.write_bytes(base_data)
            opts += ",backing_file=base.raw,backing_fmt=raw"
        qemu_img("create", "-f", "qcow2", "-o", opts, str(path), str(size))
        _prefill(path, size, 128 << 10)
        if start == "snapshot":
            qemu_img("snapshot", "-c", "s", str(path))
            snapshots["s"] = to_raw(path, tmp_path / "s.raw", snapshot="s")
    rng = random.Random(setup + 1000 * seed)
    cs = int(opts.split(",")[0].split("=")[1])

    def work(w: Workload) -> None:
        for _ in range(12):
            off = rng.randrange(0, size // cs) * cs + rng.choice([0, 0, 1, 512, cs // 2, cs - 1])
            off = min(off, size - 1)
            n = min(size - off, rng.choice([1, 512, cs - 1, cs, cs + 1, 3 * cs, 100_000]))
            what = rng.random()
            if what < 0.55:
                w.write(off, n)
            elif what < 0.7:
                w.zero(off, n, unmap=rng.random() < 0.5)
            elif what < 0.85:
                w.discard(off, n)
            else:
                w.flush()

    run_crash_test(tmp_path, path, work, snapshots=snapshots, max_states=min(MAX_STATES, 60),
                   min_states=3, backing=base_data)



@pytest.mark.parametrize("xl2", [False, True], ids=["std", "xl2"])
def test_data_file_metadata_crash(tmp_path: Path, xl2: bool) -> None:
    """External data file: the qcow2 file holds only metadata. Its crash states (with the data
    file as it ended up) are consistent and the data written before reads back."""
    from qcow2kit.io.memory import MemoryStorage

    path = tmp_path / "disk.qcow2"
    data_path = tmp_path / "disk.data"
    size = 4 << 20
    cs = 32768 if xl2 else 4096
    qcow2kit.create(str(path), size, cluster_size=cs, extended_l2=xl2, data_file=str(data_path))
    qemu_io(path, "write -P 0x21 0 1M")
    before = to_raw(path, tmp_path / "before.raw")
    meta = RecordingStorage.from_file(path)
    data = MemoryStorage(data_path.read_bytes(), name=str(data_path))
    img = Image(meta, data_storage=data)
    meta.restart()
    img.write(100, pattern(1, 5000))
    img.write(2 << 20, pattern(2, 3 * cs + 1))
    img.flush()
    img.discard(64 << 10, 2 * cs)
    img.write_zeroes(512 << 10, cs + 100, unmap=True)
    img.write(3 << 20, pattern(3, cs))
    img.close()
    data_path.write_bytes(bytes(data.buf))
    final = tmp_path / "final.qcow2"
    final.write_bytes(meta.contents())
    assert_clean(final)
    untouched = [(1 << 20, 2 << 20)]

    def verify(p: str) -> None:
        got = to_raw(Path(p), tmp_path / "state.raw")
        for lo, hi in untouched:
            assert got[lo:hi] == before[lo:hi]
        assert got[8192:64 << 10] == before[8192:64 << 10]

    n = check_crash_states(meta.initial, meta.log, tmp_path, verify=verify, reorder_samples=3,
                           max_states=MAX_STATES, drop_one=True)
    assert n >= 3
