"""convert -c compresses clusters in groups on pool threads (ops/convert/compressor.py), with
one zstd context per thread: every cluster's bytes must be exactly what
format.compression.compress makes of it (the compression level semantics, hence the output
size, are qemu-img's), a short last cluster is compressed zero-padded, and a cluster that
does not shrink is reported for a plain write. A raw source is read and compressed before
the image exists (compressor.CompressPump): same result, errors raised, no thread left."""

from __future__ import annotations

import errno
import os
import random
import threading
from pathlib import Path
from typing import Any

import pytest

from qcow2kit.format import constants as C
from qcow2kit.format.compression import compress
from qcow2kit.ops.convert import compressor, convert
from tests.helpers import assert_clean, qemu_compare, qemu_map


@pytest.mark.parametrize("ctype", [C.COMPRESSION_ZLIB, C.COMPRESSION_ZSTD])
def test_group_bytes_are_compress_bytes(ctype: int) -> None:
    cs = 65536
    rng = random.Random(ctype)
    words = [bytes(rng.choices(b"etaoinshrdlu", k=rng.randint(1, 9))) for _ in range(500)]
    text = b" ".join(rng.choices(words, k=60_000))[: 3 * cs]
    data = text + os.urandom(cs) + text[: cs // 3]  # text, random, a short last cluster
    guests = [10 * cs, 11 * cs, 12 * cs, 13 * cs, 14 * cs]
    offsets = [0, cs, 2 * cs, 3 * cs, 4 * cs]
    for _ in range(2):  # the second time with this thread's context reused
        out = compressor.compress_group(data, guests, offsets, cs, ctype)
        assert [g for g, _, _ in out] == guests
        for (_, piece, packed), off in zip(out, offsets, strict=True):
            assert bytes(piece) == data[off : off + cs]
            expected = compress(bytes(piece) + bytes(cs - len(piece)), ctype)
            if off == 3 * cs:
                assert packed is None  # random data does not shrink
            else:
                assert packed == expected


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


@pytest.mark.parametrize(("ctype", "sparse"), [("zlib", 4096), ("zstd", 4096), ("zstd", 0)])
def test_raw_source_compressed_early(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     ctype: str, sparse: int) -> None:
    """A raw source is read and compressed by compressor.CompressPump (small groups and
    few jobs in flight here, so that the reader waits on the writer): the image reads back
    equal, zero clusters stay unallocated (with -S), qemu-img check is clean."""
    monkeypatch.setattr(compressor, "COMPRESS_GROUP_BYTES", 128 << 10)
    monkeypatch.setattr(compressor, "PUMP_INFLIGHT", 3)
    started: list[int] = []
    real = compressor.CompressPump.start

    def spy(self: compressor.CompressPump) -> compressor.CompressPump:
        started.append(1)
        return real(self)

    monkeypatch.setattr(compressor.CompressPump, "start", spy)
    src = tmp_path / "src.raw"
    rng = random.Random(7)
    words = [bytes(rng.choices(b"etaoinshrdlu ", k=rng.randint(1, 9))) for _ in range(300)]
    with open(src, "wb") as f:
        f.write(b" ".join(rng.choices(words, k=300_000))[: 2 << 20])
        f.write(bytes(1 << 20))  # written zeros
        f.write(os.urandom(300_000))  # does not shrink: stored plain
        f.truncate(6 << 20)  # a hole to the end
    out = tmp_path / "out.qcow2"
    before = _threads()
    convert(str(src), str(out), out_fmt="qcow2", compressed=True, sparse_bytes=sparse,
            options={"compression_type": ctype})
    assert started == [1]
    assert _threads() == before
    res = assert_clean(out)
    assert res.get("compressed-clusters", 0) > 0
    qemu_compare(out, src)
    allocated = sum(e["length"] for e in qemu_map(out) if e["data"])
    data = src.read_bytes()
    nonzero = sum(1 for i in range(0, len(data), 65536) if any(data[i : i + 65536]))
    assert allocated == (6 << 20 if not sparse else nonzero * 65536)
    assert 0 < nonzero < 96


def test_read_error_in_the_middle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compressor, "COMPRESS_GROUP_BYTES", 128 << 10)
    calls: list[int] = []
    real = compressor.read_at

    def failing(*args: Any) -> None:
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(*args)

    monkeypatch.setattr(compressor, "read_at", failing)
    src = tmp_path / "src.raw"
    src.write_bytes(b"abc" * (1 << 20))
    before = _threads()
    with pytest.raises(OSError) as info:
        convert(str(src), str(tmp_path / "out.qcow2"), out_fmt="qcow2", compressed=True)
    assert info.value.errno == errno.EIO
    assert _threads() == before
