"""convert -c compresses clusters in groups on pool threads (ops/convert/qcow2out.py), with
one zstd context per thread: every cluster's bytes must be exactly what
format.compression.compress makes of it (the compression level semantics, hence the output
size, are qemu-img's), a short last cluster is compressed zero-padded, and a cluster that
does not shrink is reported for a plain write."""

from __future__ import annotations

import os
import random

import pytest

from qcow2kit.format import constants as C
from qcow2kit.format.compression import compress
from qcow2kit.ops.convert import qcow2out


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
        out = qcow2out.compress_group(data, guests, offsets, cs, ctype)
        assert [g for g, _, _ in out] == guests
        for (_, piece, packed), off in zip(out, offsets, strict=True):
            assert bytes(piece) == data[off : off + cs]
            expected = compress(bytes(piece) + bytes(cs - len(piece)), ctype)
            if off == 3 * cs:
                assert packed is None  # random data does not shrink
            else:
                assert packed == expected
