"""The registry of metadata ranges (metadata/overlap.py) and the guard before every metadata
write: a table aimed at another structure is refused, the image marked corrupt, and the
bytes of the other structure stay untouched. The expected ranges come from an independent
parse of the file (tests/helpers.layout), not from qcow2kit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qcow2kit.errors import CorruptionError
from qcow2kit.metadata import overlap
from tests.helpers import image_in_memory, layout, qemu_img, qemu_io


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    img = tmp_path / "o.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "16M")
    qemu_io(img, "write -P 1 0 64k", "write -P 2 8M 4k")
    qemu_img("snapshot", "-c", "s1", str(img))
    return img


def test_regions_match_an_independent_parse(image_file: Path) -> None:
    lay = layout(image_file)
    cs = lay["cluster_size"]
    img = image_in_memory(image_file, writable=False)
    found = {}
    for name, clusters in overlap.regions(img.meta):
        found.setdefault(name, set()).update(clusters.tolist())
    assert found[overlap.HEADER] == {0}
    assert found[overlap.ACTIVE_L1] == {lay["l1_offset"] // cs}
    assert found[overlap.REFTABLE] == {
        lay["reftable_offset"] // cs + i for i in range(lay["reftable_clusters"])
    }
    l2 = {int(e) & 0x00FFFFFFFFFFFE00 for e in lay["l1"] if int(e)}
    assert found[overlap.ACTIVE_L2] == {o // cs for o in l2}
    assert overlap.SNAPSHOT_TABLE in found and overlap.INACTIVE_L1 in found


def test_first_overlap_names_the_structure(image_file: Path) -> None:
    lay = layout(image_file)
    cs = lay["cluster_size"]
    img = image_in_memory(image_file, writable=False)
    reftable = lay["reftable_offset"] // cs
    hit = overlap.first_overlap(img.meta, np.array([10_000, reftable], dtype=np.int64))
    assert hit == (overlap.REFTABLE, reftable)
    assert overlap.first_overlap(img.meta, np.array([10_000], dtype=np.int64)) is None


def test_l2_table_write_over_the_refcount_table_is_refused(image_file: Path) -> None:
    lay = layout(image_file)
    img = image_in_memory(image_file)
    reftable_at = lay["reftable_offset"]
    before = img.storage.pread(reftable_at, 4096)
    # a cached L2 table whose key (its host offset) is the refcount table: what a corrupt
    # L1 entry would lead to
    table = np.zeros(img.meta.geom.l2_entries, dtype=np.uint64)
    img.meta.l2.cache.put(reftable_at, table, dirty=True)
    with pytest.raises(CorruptionError, match="refcount table"):
        img.meta.flush()
    assert img.storage.pread(reftable_at, 4096) == before


def test_refblock_write_over_the_l1_table_is_refused(image_file: Path) -> None:
    lay = layout(image_file)
    img = image_in_memory(image_file)
    l1_at = lay["l1_offset"]
    before = img.storage.pread(l1_at, 4096)
    refs = img.meta.refcounts
    refs.reftable[0] = np.uint64(l1_at)  # the reftable now claims the L1 table is a block
    refs.cache.discard(0)
    refs.cache.put(0, np.zeros(refs.entries_per_block, dtype=np.uint16), dirty=True)
    with pytest.raises(CorruptionError, match="active L1"):
        refs.sync()
    assert img.storage.pread(l1_at, 4096) == before


def test_guest_write_through_a_corrupt_l1_marks_corrupt(tmp_path: Path) -> None:
    img_path = tmp_path / "c.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(img_path), "16M")
    qemu_io(img_path, "write -P 1 0 4k")
    lay = layout(img_path)
    # point L1 entry 1 (COPIED) at the refcount table
    with open(img_path, "r+b") as f:
        f.seek(lay["l1_offset"] + 8)
        f.write(((1 << 63) | lay["reftable_offset"]).to_bytes(8, "big"))
    img = image_in_memory(img_path)
    span = img.meta.geom.l2_span_bytes
    with pytest.raises(CorruptionError, match="Preventing invalid write on metadata"):
        img.write(span, b"x" * 512)
    assert img.meta.corrupt
