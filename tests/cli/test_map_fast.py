"""`map`'s numpy-free fast path (ops/map_plain.py, issue 16) against the full path
(ops/map.py) and qemu-img, called directly:

- on plain images of every cluster size and shape it answers, with exactly the text of the
  full path and of `qemu-img map` (JSON and human), also when every L2 table is its own batch
  or runs are cut into chunks of 3 entries (the joins between batches and chunks), and for
  ranges (--start-offset, --max-length) around clusters, tables and the end of the disk;
  among them zero clusters: plain (no host cluster) and allocated (a host cluster whose offset
  qemu-img prints), with and without the unmap that punches holes in the host file (where
  ops/map.py's metadata-preallocation heuristic must be computed), mixed with data at every
  cluster size, whole L2 tables of them, and preallocated images;
- on everything it does not handle it declines (and says why).

The images are in map_fast_support.py; the command (the process, the fallback, the command
line, locks) is tested in test_map_fast_command.py, hostile images and the byte-column test of
L2 entries in test_map_fast_hostile.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from qcow2kit.ops import map_plain
from qcow2kit.ops.map import format_human, format_json, map_path_extents
from tests.cli.map_fast_support import FALLBACK, GIB, KIB, MIB, PLAIN, QEMU_ROUNDS_SIZE
from tests.cli.map_fast_support import images as images  # the module-scoped fixture
from tests.cli.map_fast_support import patch_u64 as _patch_u64
from tests.cli.map_fast_support import run as _run
from tests.cli.map_fast_support import u64 as _u64
from tests.cli.map_fast_support import v2 as _v2
from tests.helpers import layout, qemu_img


def _full(path: Path, backing: bool = True) -> tuple[str, tuple[str, str | None]]:
    ext = map_path_extents(str(path), backing=backing)
    return format_json(ext), format_human(ext)


def _fast(path: Path, backing: bool = True) -> tuple[str, tuple[str, str | None]]:
    found = map_plain.plain_map(str(path), backing=backing)
    assert not isinstance(found, str), f"fell back: {found}"
    return found.json(), found.human()


@pytest.mark.parametrize("name", PLAIN)
@pytest.mark.parametrize("batch", ["default", "one-table", "tiny-chunks"])
def test_plain_images_same_as_full_path_and_qemu(images: Callable[[str], Path], name: str,
                                                 batch: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = images(name)
    if batch == "one-table":
        monkeypatch.setattr(map_plain, "_BATCH_ENTRIES", 1)  # every L2 table its own batch
    if batch == "tiny-chunks":
        monkeypatch.setattr(map_plain, "_CHUNK_ENTRIES", 3)  # runs split across chunks
    fast_json, fast_human = _fast(path)
    full_json, full_human = _full(path)
    assert fast_json == full_json
    assert fast_human == full_human
    if name in QEMU_ROUNDS_SIZE:
        return
    assert fast_json == qemu_img("map", "--output=json", str(path)).stdout
    assert fast_human == (qemu_img("map", str(path)).stdout, None)


@pytest.mark.parametrize("name", FALLBACK)
def test_declines_what_it_does_not_handle(images: Callable[[str], Path], name: str) -> None:
    reason = map_plain.plain_map(str(images(name)))
    assert isinstance(reason, str)
    assert FALLBACK[name][1] in reason


def test_declines_zero_clusters_of_a_version_2_image(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """qemu refuses the zero flag in a version 2 image ("Zero cluster entry found in pre-v3
    image"): the fast path leaves such an entry to the full path, which refuses it too."""
    path = _v2(tmp_path / "v2.qcow2")
    table = layout(path)["l1"][0] & 0x00FFFFFFFFFFFE00
    _patch_u64(path, table + 8 * 20, _u64(path, table + 8 * 20) | 1)
    reason = map_plain.plain_map(str(path))
    assert isinstance(reason, str) and "version 2" in reason
    rc, out, err = _run(["map", "--output=json", str(path)], capsys)
    assert (rc, out) == (1, "") and "Zero cluster entry found in pre-v3 image" in err


def test_no_backing_is_plain(images: Callable[[str], Path]) -> None:
    path = images("backing")
    assert _fast(path, backing=False) == _full(path, backing=False)


def _ranges(size: int) -> list[tuple[int, int | None]]:
    """Ranges around clusters of every size, L2 tables, the middle and the end of the disk."""
    ranges: list[tuple[int, int | None]] = [
        (0, 0), (1, None), (511, 1000), (4095, 8193), (65535, 65537), (100_000, 3_000_000),
        (size // 2 + 777, None), (size // 3, size // 3), (size - 1, None), (size, None),
        (size + 4096, 100), (12345, 0)]
    return [(start, length) for start, length in ranges if start >= 0]


@pytest.mark.parametrize("name", PLAIN)
def test_ranges_same_as_full_path_and_qemu(images: Callable[[str], Path], name: str) -> None:
    path = images(name)
    size = int(layout(path)["size"])
    for start, length in _ranges(size):
        found = map_plain.plain_map(str(path), start=start, length=length)
        assert not isinstance(found, str), found
        full = map_path_extents(str(path), start=start, length=length)
        assert found.json() == format_json(full), (start, length)
        assert found.human() == format_human(full), (start, length)
        if name in QEMU_ROUNDS_SIZE:
            continue
        extra = ["--start-offset", str(start)]
        if length is not None:
            extra += ["--max-length", str(length)]
        assert found.json() == qemu_img("map", "--output=json", *extra, str(path)).stdout, \
            (start, length)


# ranges whose ends cut zero extents: inside an allocated zero cluster (its offset moves with
# the start), inside plain ones, across the borders of zero and data extents
ZERO_RANGES: dict[str, list[tuple[int, int | None]]] = {
    "zero-alloc": [(256 * KIB + 1000, 100 * KIB), (300 * KIB, None), (1 * MIB + 12345, 5000),
                   (200 * KIB, 3 * MIB), (2 * MIB - 1, 2)],
    "zero-unmapped": [(1 * MIB + 777, 2 * MIB), (4 * MIB + 65536 + 3, 10), (3 * MIB - 5, 10),
                      (12 * MIB + 1, 65535)],
    "zero-plain-1t": [(800 * GIB + 1, 512 * MIB), (800 * GIB - 5, 10), (801 * GIB - 1, None)],
    "metadata-prealloc-zeroed": [(65537, 3 * 65536), (0, 1)],
    "falloc-zeroed": [(1536 * KIB - 1, 2), (1 * MIB + 3, 600 * KIB), (6 * MIB + 9, 2 * MIB)],
}


@pytest.mark.parametrize("name", ZERO_RANGES)
def test_ranges_cutting_zero_extents(images: Callable[[str], Path], name: str) -> None:
    path = images(name)
    for start, length in ZERO_RANGES[name]:
        found = map_plain.plain_map(str(path), start=start, length=length)
        assert not isinstance(found, str), found
        assert map_plain.ZERO in found.codes, (start, length)  # a zero extent is cut
        full = map_path_extents(str(path), start=start, length=length)
        assert found.json() == format_json(full), (start, length)
        assert found.human() == format_human(full), (start, length)
        extra = ["--start-offset", str(start)]
        if length is not None:
            extra += ["--max-length", str(length)]
        assert found.json() == qemu_img("map", "--output=json", *extra, str(path)).stdout, \
            (start, length)
        assert found.human() == (qemu_img("map", *extra, str(path)).stdout, None)


# images with data whose host file has holes, so that whether ops/map.py's (and qemu's)
# metadata-preallocation heuristic holds needs the refcounts: the fast path computes it itself
SPARSE_HOSTS = ["zero-unmapped", "metadata-prealloc-part-zeroed", "metadata-prealloc"]


@pytest.mark.parametrize("name", SPARSE_HOSTS)
def test_preallocation_heuristic_same_as_qemu(images: Callable[[str], Path], name: str) -> None:
    from qcow2kit.io.file import FileStorage
    from qcow2kit.metadata.header_io import read_header
    from tests.helpers import qemu_map

    path = str(images(name))
    storage = FileStorage(path, False)
    try:
        header = read_header(storage)
        size = storage.size()
        assert map_plain.may_look_preallocated(storage, header.cluster_size, size)
        holds = map_plain.looks_preallocated(storage, header, size)
    finally:
        storage.close()
    # where it holds, qemu splits data clusters by the host file's holes: zero and data
    assert holds == any(e["zero"] and e["data"] for e in qemu_map(path))
    assert holds == (name != "zero-unmapped")
    assert isinstance(map_plain.plain_map(path), str) == holds
