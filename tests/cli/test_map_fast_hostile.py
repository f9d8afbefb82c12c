"""Hostile images and `map`'s numpy-free fast path (ops/map_plain.py, issue 16):

- hostile images (bad L1, L2 and refcount table entries, huge sizes, a truncated file, bad
  refcount blocks where the metadata-preallocation heuristic needs them) give the same
  output, errors and exit codes with and without the fast path, never a traceback, and the
  fast path answers exactly where it should; files that are not images give the same errors;
- the byte-column test of L2 entries (map_plain.plain_entries) is the rule, entry by entry.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from qcow2kit.ops import map_plain
from tests.cli.map_fast_support import COPIED
from tests.cli.map_fast_support import create as _create
from tests.cli.map_fast_support import patch_u64 as _patch_u64
from tests.cli.map_fast_support import raw as _raw
from tests.cli.map_fast_support import run as _run
from tests.cli.map_fast_support import u64 as _u64
from tests.helpers import layout, qemu_io


# ---- hostile images: the same answer with and without the fast path -------------------------
def _l2_entry(path: Path, index: int) -> int:
    """The file offset of L2 entry `index` of the first L2 table."""
    return (layout(path)["l1"][0] & 0x00FFFFFFFFFFFE00) + 8 * index


def _hostile_base(p: Path) -> Path:
    # the disk ends inside the first L2 table: entries past it are never looked at
    _create(p, "100M", "cluster_size=64k")
    qemu_io(p, "write -q 0 256k", "write -q 50M 64k")
    return p


def _set_l1(value: Callable[[int], int]) -> Callable[[Path], None]:
    def patch(p: Path) -> None:
        off = layout(p)["l1_offset"]
        _patch_u64(p, off, value(_u64(p, off)))
    return patch


def _set_l2(index: int, value: Callable[[int], int]) -> Callable[[Path], None]:
    def patch(p: Path) -> None:
        off = _l2_entry(p, index)
        _patch_u64(p, off, value(_u64(p, off)))
    return patch


def _set_reftable(value: Callable[[int], int]) -> Callable[[Path], None]:
    def patch(p: Path) -> None:
        off = layout(p)["reftable_offset"]
        _patch_u64(p, off, value(_u64(p, off)))
    return patch


def _set_header(offset: int, value: int) -> Callable[[Path], None]:
    def patch(p: Path) -> None:
        _patch_u64(p, offset, value)
    return patch


def _set_u32(offset: int, value: int) -> Callable[[Path], None]:
    def patch(p: Path) -> None:
        with open(p, "r+b") as f:
            f.seek(offset)
            f.write(struct.pack(">I", value))
    return patch


def _truncate(p: Path) -> None:
    os.truncate(p, 100)


def _l1_to_itself(p: Path) -> None:
    """L1 entry 0 names the L1 table as its L2 table: its entries read as data clusters."""
    off = layout(p)["l1_offset"]
    _patch_u64(p, off, COPIED | off)


HOSTILE: dict[str, tuple[Callable[[Path], None], bool]] = {
    # name: (patch, whether the fast path still answers)
    "l1-past-eof": (_set_l1(lambda v: COPIED | 1 << 40), False),
    "l1-reserved-bit": (_set_l1(lambda v: v | 1), False),
    "l1-unaligned": (_set_l1(lambda v: v + 512), False),
    "l1-only-reserved-bits": (_set_l1(lambda v: 1 << 56), False),
    "l2-reserved-bit": (_set_l2(0, lambda v: v | 2), False),
    "l2-unaligned": (_set_l2(1, lambda v: v + 512), False),
    "l2-data-past-eof": (_set_l2(2, lambda v: COPIED | 1 << 40), False),
    "l2-compressed-past-the-disk": (_set_l2(8191, lambda v: 1 << 62 | 12345), True),
    "l2-zero-flag-on-data": (_set_l2(1, lambda v: v | 1), True),  # an allocated zero cluster
    "l2-plain-zero": (_set_l2(6, lambda v: 1), True),
    "l2-zero-with-copied-only": (_set_l2(7, lambda v: COPIED | 1), True),
    "l2-zero-unaligned": (_set_l2(1, lambda v: v + 512 | 1), False),
    "l2-zero-past-eof": (_set_l2(2, lambda v: COPIED | 1 << 40 | 1), False),
    "l2-zero-reserved-bit": (_set_l2(2, lambda v: v | 3), False),
    "l2-garbage-past-the-disk": (_set_l2(1700, lambda v: (1 << 64) - 1), True),
    "l1-points-at-itself": (_l1_to_itself, True),
    "reftable-reserved-bit": (_set_reftable(lambda v: v | 1), False),
    "reftable-unaligned": (_set_reftable(lambda v: v + 512), False),
    "reftable-past-eof": (_set_reftable(lambda v: 1 << 40), False),
    "huge-l1-size": (_set_u32(36, 0x7FFFFFFF), False),
    "l1-size-past-eof": (_set_u32(36, 1 << 20), False),
    "size-too-big": (_set_header(24, 1 << 62), False),
    "truncated": (_truncate, False),
}


def _sparse_base(p: Path) -> Path:
    # data and a punched hole: the host file is sparse enough that the fast path reads the
    # refcounts for the metadata-preallocation heuristic (which does not hold here)
    _create(p, "16M", "cluster_size=64k")
    qemu_io(p, "write -q -P 3 0 8M", "write -q -z -u 1M 2M")
    return p


def _set_refblock(fill: bytes) -> Callable[[Path], None]:
    def patch(p: Path) -> None:
        block = _u64(p, layout(p)["reftable_offset"])
        with open(p, "r+b") as f:
            f.seek(block)
            f.write(fill * (65536 // len(fill)))
    return patch


SPARSE_HOSTILE: dict[str, tuple[Callable[[Path], None], bool]] = {
    "untouched": (lambda p: None, True),
    "reftable-reserved-bit": (_set_reftable(lambda v: v | 1), False),
    "reftable-past-eof": (_set_reftable(lambda v: 1 << 40), False),
    "refblock-past-eof": (_set_reftable(lambda v: 1 << 30), False),
    "refblock-all-set": (_set_refblock(b"\xff"), False),  # the heuristic holds now
    "refblock-all-zero": (_set_refblock(b"\0"), True),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_images_same_answer(tmp_path: Path, name: str,
                                    capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = _hostile_base(tmp_path / "h.qcow2")
    patch, fast_answers = HOSTILE[name]
    patch(path)
    _same_answer(path, fast_answers, capsys, monkeypatch)


@pytest.mark.parametrize("name", SPARSE_HOSTILE)
def test_hostile_sparse_images_same_answer(tmp_path: Path, name: str,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = _sparse_base(tmp_path / "s.qcow2")
    patch, fast_answers = SPARSE_HOSTILE[name]
    patch(path)
    _same_answer(path, fast_answers, capsys, monkeypatch)


def _same_answer(path: Path, fast_answers: bool, capsys: pytest.CaptureFixture[str],
                 monkeypatch: pytest.MonkeyPatch) -> None:
    """map of `path` with and without the fast path: the same output, error and exit code;
    whether the fast path answered as expected; the image never written."""
    before = path.read_bytes()
    answers = []
    real = map_plain.plain_map

    def spy(*args: object, **kwargs: object) -> object:
        found = real(*args, **kwargs)  # type: ignore[arg-type]
        answers.append(found)
        return found

    monkeypatch.setattr(map_plain, "plain_map", spy)
    for extra in (["--output=json"], []):
        argv = ["map", *extra, str(path)]
        with_fast = _run(argv, capsys)
        assert (not isinstance(answers[-1], str)) == fast_answers, answers[-1]
        monkeypatch.setattr(map_plain, "plain_map", lambda *a, **k: "disabled by the test")
        without = _run(argv, capsys)
        monkeypatch.setattr(map_plain, "plain_map", spy)
        assert with_fast == without
        assert with_fast[0] in (0, 1) and "internal error" not in with_fast[2]
    assert path.read_bytes() == before  # never written


def test_errors_of_files_that_are_not_images(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    raw = _raw(tmp_path / "r.raw")
    cases = [["map", str(tmp_path / "missing")], ["map", "-f", "qcow2", str(raw)],
             ["map", "-f", "qcow2", str(empty)], ["map", str(tmp_path)]]
    for argv in cases:
        with_fast = _run(argv, capsys)
        monkeypatch.setattr(map_plain, "plain_map", lambda *a, **k: "disabled by the test")
        without = _run(argv, capsys)
        monkeypatch.undo()
        assert with_fast == without
        assert with_fast[0] == 1 and with_fast[2].startswith("qcow2kit: "), with_fast


# ---- the byte-column test of plain entries against the rule, entry by entry ----------------
OFFSET_MASK = 0x00FFFFFFFFFFFE00


@pytest.mark.parametrize("zero_flags", [False, True])
@pytest.mark.parametrize("cluster_bits", range(9, 22))
def test_plain_entries_is_the_rule(cluster_bits: int, zero_flags: bool) -> None:
    cs = 1 << cluster_bits
    allowed = COPIED | (OFFSET_MASK & ~(cs - 1)) | (1 if zero_flags else 0)
    r = random.Random(cluster_bits)
    entries = []
    for _ in range(3000):
        e = r.getrandbits(47) << cluster_bits & OFFSET_MASK | (COPIED if r.random() < 0.5 else 0)
        if r.random() < 0.3:
            e |= 1  # the zero flag
        if r.random() < 0.3:
            e ^= 1 << r.randrange(64)  # one bit anywhere: often one the rule forbids
        entries.append(e)
    for e in entries:
        assert map_plain.plain_entries(struct.pack(">Q", e), cs, zero_flags) == (
            e & ~allowed == 0), hex(e)
    good = [e for e in entries if e & ~allowed == 0]
    bad = [e for e in entries if e & ~allowed]
    assert map_plain.plain_entries(struct.pack(f">{len(good)}Q", *good), cs, zero_flags)
    for e in bad[:50]:
        mixed = good[:100] + [e] + good[100:200]
        assert not map_plain.plain_entries(struct.pack(f">{len(mixed)}Q", *mixed), cs,
                                           zero_flags)
