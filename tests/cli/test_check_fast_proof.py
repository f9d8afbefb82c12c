"""The proof of `qcow2kit check`'s fast path (ops/check_plain.py's prove_clean) on its own:
images whose clusters are all scattered cost it too many runs, and it declines; randomly
mutated metadata (header, L1 and L2 tables, refcount table and blocks) is never proven clean
when the full check finds anything; header extensions are accepted and refused as the full
path's header reader accepts and refuses them.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from qcow2kit.ops.check import check_path, to_json
from qcow2kit.ops.check_plain import prove_clean
from tests.cli.check_fast_support import SCATTER, written
from tests.cli.check_fast_support import patch as _patch
from tests.helpers import layout


def test_scattered_clusters_are_left_to_the_full_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cluster its own run costs the fast path Python time per cluster: past its run
    budget (made tiny here) it declines, and the result is the full check's."""
    from qcow2kit.ops import check_plain

    path = written(tmp_path / "scattered.qcow2", "1M",
                   [f"write -q -P {i % 200 + 1} {(255 - i) * 4}k 4k" for i in range(256)], "cluster_size=4k")
    assert prove_clean(str(path)) is not None
    ref = check_path(str(path))
    assert ref.fragmented_clusters == 255
    monkeypatch.setattr(check_plain, "_RUNS_FREE", 0)
    monkeypatch.setattr(check_plain, "_RUNS_EVIDENCE", 0)
    assert prove_clean(str(path)) is None


@pytest.mark.parametrize("cluster", ["512", "4k", "64k"])
def test_mutated_metadata_is_never_proven_clean_wrongly(tmp_path: Path, cluster: str) -> None:
    """Random bytes of the header, L1, L2 tables, refcount table and blocks changed: whenever
    the fast path proves the result clean, the full check agrees, number for number."""
    import random

    base = written(tmp_path / "base.qcow2", "8M", SCATTER[:3] + ["write -q -P 6 5M 100k"],
                   f"cluster_size={cluster}")
    data = base.read_bytes()
    lay = layout(base)
    cs = lay["cluster_size"]
    l2s = [e & 0x00FFFFFFFFFFFE00 for e in lay["l1"] if e]
    blocks = [e & ~0x1FF for e in lay["reftable"] if e]
    areas = [(0, 112), (lay["l1_offset"], lay["l1_size"] * 8), (lay["reftable_offset"], 64),
             *[(o, cs) for o in l2s], *[(o, min(cs, 256)) for o in blocks]]
    r = random.Random(int(cs))
    path = tmp_path / "m.qcow2"
    proven = 0
    for _ in range(120):
        buf = bytearray(data)
        for _ in range(r.randint(1, 3)):
            start, length = r.choice(areas)
            at = start + r.randrange(length)
            buf[at] = r.choice((0, 1, 0x80, r.randrange(256), buf[at] ^ 1 << r.randrange(8)))
        path.write_bytes(bytes(buf))
        fast = prove_clean(str(path))
        if fast is None:
            continue
        proven += 1
        ref = check_path(str(path))
        assert (ref.corruptions, ref.leaks, ref.check_errors, ref.error) == (0, 0, 0, None)
        assert to_json(fast, "x") == to_json(ref, "x")
    assert proven  # some mutations (of unused bytes) leave the image clean


def _ext(kind: int, data: bytes) -> bytes:
    return struct.pack(">II", kind, len(data)) + data + bytes(-len(data) % 8)


@pytest.mark.parametrize(("exts", "opens"), [
    (_ext(0xE2792ACA, b"qcow2") + _ext(0x6803F857, bytes(48)), True),
    (_ext(0xE2792ACA, b"qcow2") + _ext(0xE2792ACA, b"qcow2"), False),  # twice
    (_ext(0x0537BE77, bytes(16)), False),  # crypto header without LUKS
    (_ext(0xE2792ACA, b"x" * 16), False),  # backing format name too long
    (struct.pack(">II", 0x12345678, 1 << 20), False),  # past the header cluster
    (_ext(0x12345678, b"unknown, kept"), True),
], ids=["fmt+features", "twice", "crypto", "long_fmt", "too_long", "unknown"])
def test_plain_header_extensions(tmp_path: Path, exts: bytes, opens: bool) -> None:
    from qcow2kit.io.file import FileStorage
    from qcow2kit.metadata.header_io import read_header
    from qcow2kit.ops.check_plain import plain_header

    path = written(tmp_path / "e.qcow2", "8M", ["write -q 0 64k"])
    _patch(path, 8, bytes(12))  # no backing file name
    _patch(path, 112, exts + bytes(8))
    storage = FileStorage(str(path))
    try:
        if opens:
            read_header(storage)
            plain_header(storage, storage.size())
        else:
            with pytest.raises(Exception):  # noqa: B017, PT011 - any refusal
                read_header(storage)
            with pytest.raises(Exception):  # noqa: B017, PT011
                plain_header(storage, storage.size())
    finally:
        storage.close()
