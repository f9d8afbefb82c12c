"""Write planning (metadata/mapping.py) on its own: which clusters a write reuses in place, which
get new clusters, which old bytes are kept around a partial write (the fills), and, with
extended L2, which subclusters become allocated. Expectations are worked out from the layout
qemu-io made (independent of the code under test); the images written through the plan are
then judged by qemu-img."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qcow2kit.image import Image
from qcow2kit.metadata import mapping
from qcow2kit.testing.storages import RecordingStorage
from tests.helpers import assert_clean, image_in_memory, qemu_compare, qemu_img, qemu_io

K = 1024


def _image(tmp_path: Path, *opts: str) -> Path:
    img = tmp_path / "m.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", ",".join(("cluster_size=65536",) + opts), str(img), "8M")
    qemu_io(img, "write -P 7 0 64k", "write -P 8 192k 64k")
    return img


def test_in_place_vs_new_clusters(tmp_path: Path) -> None:
    img = image_in_memory(_image(tmp_path))
    # clusters 0..3: 0 and 3 allocated (COPIED), 1 and 2 not
    plan = mapping.plan_write(img.meta, 100, 4 * 65536 - 100)
    assert plan.needs_new.tolist() == [False, True, True, False]
    assert plan.write_start.tolist() == [100, 0, 0, 0]
    assert plan.write_end.tolist() == [65536, 65536, 65536, 65536 - 100]
    # new clusters are written whole; in-place ones only where the write lands
    assert plan.host_start.tolist() == [100, 0, 0, 0]
    assert plan.host_end.tolist() == [65536, 65536, 65536, 65536 - 100]
    assert list(plan.fills(65536)) == []


def test_partial_write_to_a_new_cluster_keeps_the_old_bytes(tmp_path: Path) -> None:
    img = image_in_memory(_image(tmp_path))
    plan = mapping.plan_write(img.meta, 65536 + 1000, 65536 + 3000)
    assert plan.needs_new.tolist() == [True]
    fills = list(plan.fills(65536))
    assert fills == [(0, (65536, 1000), (65536 + 3000, 65536 - 3000))]


def test_extended_l2_allocates_only_the_written_subclusters(tmp_path: Path) -> None:
    img = image_in_memory(_image(tmp_path, "extended_l2=on"))
    sub = 65536 // 32
    # cluster 1 is unallocated: a write of subclusters 3..4 (partly) needs no copy of anything
    plan = mapping.plan_write(img.meta, 65536 + 3 * sub + 10, 65536 + 5 * sub - 10)
    assert plan.host_start.tolist() == [3 * sub] and plan.host_end.tolist() == [5 * sub]
    assert plan.new_bitmap is not None
    assert int(plan.new_bitmap[0]) == (1 << 3) | (1 << 4)
    fills = list(plan.fills(65536))
    assert fills == [(0, (65536 + 3 * sub, 10), (65536 + 5 * sub - 10, 10))]


@pytest.mark.parametrize("opts", [(), ("extended_l2=on",), ("compat=0.10",)])
def test_a_planned_write_reads_back(tmp_path: Path, opts: tuple[str, ...]) -> None:
    path = _image(tmp_path, *opts)
    storage = RecordingStorage.from_file(path)
    img = Image(storage)
    data = bytes(range(256)) * 40
    pos = 65536 - 500
    img.write(pos, data)
    img.close()
    out = tmp_path / "out.qcow2"
    out.write_bytes(storage.contents())
    mirror = bytearray(8 << 20)
    mirror[0:65536] = b"\x07" * 65536
    mirror[192 * K : 256 * K] = b"\x08" * 65536
    mirror[pos : pos + len(data)] = data
    raw = tmp_path / "m.raw"
    raw.write_bytes(bytes(mirror))
    assert_clean(out)
    qemu_compare(out, raw)


def test_l2_chunks_split_at_table_boundaries() -> None:
    from qcow2kit.format.geometry import Geometry

    g = Geometry(16)  # 64 KiB clusters: one L2 table maps 512 MiB
    span = g.l2_span_bytes
    assert list(mapping.l2_chunks(g, span - 10, 30)) == [(span - 10, span), (span, span + 20)]
    assert list(mapping.l2_chunks(g, 0, 0)) == []
    assert np.array_equal(np.array(list(mapping.l2_chunks(g, 5, 10))), np.array([(5, 15)]))
