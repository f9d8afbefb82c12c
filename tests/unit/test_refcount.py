"""metadata.refcount.Refcounts over images made by qemu-img and by qcow2kit.create.

Two independent oracles: tests.helpers.refcounts_on_disk (the refcount table and blocks decoded
from the file's bytes, written from the spec without qcow2kit code) for what is read, and
`qemu-img check` for what is written: a cluster allocated and referenced by nothing is exactly
one leak, a refcount below the references is a corruption, and growing the refcount table
leaves no leak and no corruption.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import qcow2kit
from qcow2kit.errors import CorruptionError
from qcow2kit.metadata.refcount import Refcounts
from tests.helpers import (
    assert_clean,
    image_in_memory,
    layout,
    qemu_check,
    qemu_compare,
    qemu_img,
    qemu_io,
    qemu_map,
    raw_file,
    refcounts_of,
    refcounts_on_disk,
)

SIZE = 4 << 20

# (creator, cluster_size, refcount_bits): every refcount width, blocks of 64 entries
# (512 B clusters, 64-bit counts) up to 32768 entries
IMAGES = [
    ("qemu", 512, 64),
    ("qemu", 512, 1),
    ("qemu", 4096, 2),
    ("qemu", 4096, 4),
    ("ours", 4096, 8),
    ("qemu", 65536, 16),
    ("ours", 512, 16),
    ("qemu", 16384, 32),
    ("ours", 65536, 64),
]
IDS = [f"{c}-cs{cs}-rc{b}" for c, cs, b in IMAGES]


def build(tmp: Path, creator: str, cs: int, bits: int, *, snapshot: bool = True) -> Path:
    """Data at several places, a compressed cluster, an internal snapshot (shared clusters
    have refcount 2) and freed clusters in the middle of the file (refcount 0 holes)."""
    path = tmp / f"{creator}-{cs}-{bits}.qcow2"
    if creator == "qemu":
        qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cs},refcount_bits={bits}",
                 str(path), str(SIZE))
    else:
        qcow2kit.create(str(path), SIZE, cluster_size=cs, refcount_bits=bits)
    half = SIZE // 2
    qemu_io(path, f"write -P 1 0 {3 * cs}", f"write -P 2 {half} {5 * cs}",
            f"write -c -P 3 {SIZE - 4 * cs} {cs}")
    if snapshot and bits > 1:
        qemu_img("snapshot", "-c", "s1", str(path))
    qemu_io(path, f"write -P 4 {cs} {cs}", f"write -P 5 {SIZE // 4} {6 * cs}",
            f"discard {SIZE // 4 + cs} {2 * cs}", f"write -P 6 {SIZE - cs} {cs}")
    return path


@pytest.fixture(params=IMAGES, ids=IDS)
def image(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    creator, cs, bits = request.param
    return build(tmp_path, creator, cs, bits)


def first_free_run(disk: np.ndarray, count: int, start: int) -> int:
    """Brute force: the first run of `count` zero refcounts at or after start (clusters the
    refcount table does not describe count as zero)."""
    pos = max(1, start)
    while True:
        window = disk[pos : pos + count]
        if not window.any():
            return pos
        pos += int(np.flatnonzero(window)[-1]) + 1


# ---- reading ----------------------------------------------------------------------------------
def test_reads_match_the_bytes_on_disk(image: Path) -> None:
    disk = refcounts_on_disk(image)
    assert (disk == 2).any() or layout(image)["refcount_order"] == 0  # the snapshot shares
    img = image_in_memory(image, writable=False)
    try:
        rc = refcounts_of(img)
        n = len(disk)
        e = rc.entries_per_block
        used = int(np.flatnonzero(disk)[-1]) + 1
        # cluster by cluster over what is used, and a little past it
        span = min(n, used + 70)
        assert [rc.get(c) for c in range(span)] == disk[:span].tolist()
        assert rc.get(n) == 0 and rc.get(n + 12345) == 0  # beyond the last refcount block
        # a range crossing block boundaries (and the end of the table)
        for start, count in [(0, n), (e - 3, 7), (max(0, used - 5), 3 * e), (n - 2, 5)]:
            want = np.zeros(count, dtype=np.uint64)
            part = disk[start : start + count]
            want[: len(part)] = part
            assert rc.get_range(start, count).tolist() == want.tolist(), (start, count)
        rng = np.random.default_rng(7)
        sample = np.unique(np.concatenate([
            rng.integers(0, used + 3 * e, size=200), np.flatnonzero(disk)[:50], [0, n - 1],
        ])).astype(np.int64)
        padded = np.concatenate([disk, np.zeros(int(sample[-1]) + 1, dtype=np.uint64)])
        assert rc.values(sample).tolist() == padded[sample].tolist()
        assert len(rc.values(np.zeros(0, dtype=np.int64))) == 0
        assert rc.last_used_cluster() == used - 1
    finally:
        img.close()


@pytest.mark.parametrize("count", [1, 2, 3, 7, 64, 1000])
def test_find_free_is_the_first_free_run(tmp_path: Path, count: int) -> None:
    path = build(tmp_path, "qemu", 512, 64)  # 64-entry blocks: runs cross blocks
    # more holes: free every third of the clusters the snapshot does not share
    qemu_io(path, *[f"discard {(SIZE // 4) + k * 1024} 512" for k in range(6)])
    disk = refcounts_on_disk(path)
    disk = np.concatenate([disk, np.zeros(4096, dtype=np.uint64)])
    img = image_in_memory(path, writable=False)
    try:
        rc = refcounts_of(img)
        for start in (1, 2, 17, 63, 64, 65, int(np.flatnonzero(disk)[-1])):
            assert rc.find_free(count, start_at=start) == first_free_run(disk, count, start), start
        assert rc.find_free(count) == first_free_run(disk, count, 1)
    finally:
        img.close()


# ---- adjusting ---------------------------------------------------------------------------------
def test_adjust_in_memory(image: Path) -> None:
    disk = refcounts_on_disk(image)
    img = image_in_memory(image)
    try:
        rc = refcounts_of(img)
        limit = rc.geom.refcount_max
        ones = np.flatnonzero(disk == 1)[:5].astype(np.int64)
        if limit > 1:
            assert len(rc.adjust(ones, 1)) == 0
            assert rc.values(ones).tolist() == [2] * len(ones)
            assert len(rc.adjust(ones, -1)) == 0
            # per-cluster deltas
            deltas = np.minimum(np.arange(len(ones), dtype=np.int64) - 1, min(limit, 1 << 62) - 1)
            freed = rc.adjust(ones, deltas)
            assert freed.tolist() == ones[:1].tolist()  # only the one that fell to zero
            assert rc.values(ones).tolist() == (1 + deltas).tolist()
        # the last reference dropped: the cluster is returned as freed
        one = ones[-1:]
        before = int(rc.values(one)[0])
        assert rc.adjust(one, -before).tolist() == one.tolist()
        assert rc.get(int(one[0])) == 0
        # below zero and above the width's maximum are refused
        with pytest.raises(CorruptionError, match="underflow"):
            rc.adjust(one, -1)
        top = np.flatnonzero(disk)[:1].astype(np.int64)
        if limit < 1 << 62:  # 64-bit counts: int64 deltas cannot reach past the maximum
            with pytest.raises(CorruptionError, match="overflow"):
                rc.adjust(top, limit - int(rc.values(top)[0]) + 1)
            rc.adjust(top, limit - int(rc.values(top)[0]))  # the maximum itself is fine
            assert int(rc.values(top)[0]) == limit
        # a cluster no refcount block describes cannot be counted
        nowhere = np.array([len(disk) + 10 * rc.entries_per_block], dtype=np.int64)
        with pytest.raises(CorruptionError):
            rc.adjust(nowhere, 1)
        with pytest.raises(CorruptionError):
            rc.adjust(nowhere, -1)
    finally:
        img.close()


def test_adjust_reaches_the_disk(tmp_path: Path) -> None:
    """QEMU's check sees what adjust wrote: a data cluster counted once less than it is
    referenced is a corruption; counted right again, the image is clean."""
    path = build(tmp_path, "qemu", 4096, 16, snapshot=False)
    assert_clean(path)
    data = [e["offset"] for e in qemu_map(path) if e["data"] and "offset" in e]
    cluster = np.array([data[-1] // 4096], dtype=np.int64)
    assert refcounts_on_disk(path)[cluster[0]] == 1
    checks = []
    for delta in (-1, 1):
        with qcow2kit.open(str(path), "r+") as img:
            refcounts_of(img).adjust(cluster, delta)
        out = qemu_check(path)
        checks.append((out.get("leaks", 0), out.get("corruptions", 0) > 0))
        assert refcounts_on_disk(path)[cluster[0]] == 1 + min(delta, 0)
    assert checks == [(0, True), (0, False)]


# ---- allocation --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cs,bits,count",
    [
        (65536, 16, 1),
        (65536, 16, 40),
        (4096, 1, 300),
        (512, 64, 100),  # needs new refcount blocks (64 clusters each)
        (512, 64, 5000),  # and a bigger refcount table (64 blocks per table cluster)
    ],
)
def test_allocate_counts_a_free_run_once(tmp_path: Path, cs: int, bits: int, count: int) -> None:
    path = build(tmp_path, "qemu", cs, bits)
    before = refcounts_on_disk(path)
    old = layout(path)
    expect = raw_file(path, tmp_path / "before.raw")
    with qcow2kit.open(str(path), "r+") as img:
        rc = refcounts_of(img)
        start = rc.allocate(count)
        assert rc.get_range(start, count).tolist() == [1] * count
        assert not before[start : start + count].any()  # it was free
    after = refcounts_on_disk(path)
    assert after[start : start + count].tolist() == [1] * count
    # allocating writes no data: extend the file over the run, or qemu-img check (which
    # looks at the clusters inside the file only) would not see it
    if path.stat().st_size < (start + count) * cs:
        os.truncate(path, (start + count) * cs)
    # nothing else changed, except that new refcount blocks (and a new refcount table) are
    # counted and an old refcount table is free
    new = layout(path)
    n = min(len(before), len(after))
    changed = np.flatnonzero(after[:n] != before[:n]).tolist()
    changed += [c for c in range(n, len(after)) if after[c]]
    blocks = {e // cs for e in new["reftable"] if e}
    table = set(range(new["reftable_offset"] // cs,
                      new["reftable_offset"] // cs + new["reftable_clusters"]))
    old_table = set(range(old["reftable_offset"] // cs,
                          old["reftable_offset"] // cs + old["reftable_clusters"]))
    for c in changed:
        if start <= c < start + count:
            continue
        if c < len(before) and before[c]:
            assert c in old_table and after[c] == 0, c
        else:
            assert c in blocks | table and after[c] == 1, c
    out = qemu_check(path)
    assert out.get("corruptions", 0) == 0 and out["check-errors"] == 0, out
    assert out.get("leaks", 0) == count, out  # the run, and nothing else, is unreferenced
    qemu_compare(path, expect)
    if count == 5000:
        assert new["reftable_clusters"] > old["reftable_clusters"]


def test_grow_reftable(tmp_path: Path) -> None:
    path = build(tmp_path, "ours", 512, 64)
    expect = raw_file(path, tmp_path / "before.raw")
    old = layout(path)
    with qcow2kit.open(str(path), "r+") as img:
        rc: Refcounts = refcounts_of(img)
        entries = len(rc.reftable)
        rc.grow_reftable(3 * entries)
        assert len(rc.reftable) >= 3 * entries
        new_offset, new_clusters = rc.reftable_offset, rc.reftable_clusters
    new = layout(path)
    assert (new["reftable_offset"], new["reftable_clusters"]) == (new_offset, new_clusters)
    assert new_clusters * 512 // 8 >= 3 * entries
    assert new["reftable"][:entries] == old["reftable"][:entries]
    # the old table is free again, the new one counted: no leak, no corruption
    assert_clean(path)
    qemu_compare(path, expect)
    old_clusters = range(old["reftable_offset"] // 512,
                         old["reftable_offset"] // 512 + old["reftable_clusters"])
    assert not refcounts_on_disk(path)[list(old_clusters)].any()


def test_last_used_cluster_follows_allocation(tmp_path: Path) -> None:
    path = build(tmp_path, "qemu", 4096, 16)
    img = image_in_memory(path)
    try:
        rc = refcounts_of(img)
        last = rc.last_used_cluster()
        assert last == int(np.flatnonzero(refcounts_on_disk(path))[-1])
        start = rc.allocate(3)
        assert rc.last_used_cluster() == max(last, start + 2)
        rc.adjust(np.arange(start, start + 3, dtype=np.int64), -1)
        assert rc.last_used_cluster() == last
    finally:
        img.close()


def test_qemu_and_ours_agree_on_a_fresh_image(tmp_path: Path) -> None:
    """The same creation options give the same refcounts, whoever creates the image."""
    for cs, bits in [(512, 64), (65536, 16), (4096, 1)]:
        q = tmp_path / f"q{cs}.qcow2"
        o = tmp_path / f"o{cs}.qcow2"
        qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cs},refcount_bits={bits}",
                 str(q), "64M")
        qcow2kit.create(str(o), 64 << 20, cluster_size=cs, refcount_bits=bits)
        for p in (q, o):
            img = image_in_memory(p, writable=False)
            try:
                rc = refcounts_of(img)
                disk = refcounts_on_disk(p)
                assert rc.get_range(0, len(disk)).tolist() == disk.tolist()
            finally:
                img.close()
        assert refcounts_on_disk(q).tolist() == refcounts_on_disk(o).tolist()
