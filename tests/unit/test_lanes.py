"""format/lanes.py against a per-entry reference, on random and edge-case tables."""

from __future__ import annotations

import random
import struct

import pytest

from qcow2kit.format.lanes import Lanes, flag_positions

FMT = {16: "H", 32: "I", 64: "Q"}


def pack(values: list[int], bits: int) -> bytes:
    return struct.pack(f">{len(values)}{FMT[bits]}", *values)


def tables(bits: int) -> list[list[int]]:
    r = random.Random(bits)
    top = (1 << bits) - 1
    out: list[list[int]] = [[0], [1], [top], [0, 0, 0], [top, 0, top, 1, 1 << (bits - 1)]]
    for _ in range(30):
        n = r.randint(1, 300)
        out.append([r.choice((0, 0, 1, top, 1 << (bits - 1), r.getrandbits(bits))) for _ in range(n)])
    return out


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_nonzero_and_round_trip(bits: int) -> None:
    for values in tables(bits):
        lanes = Lanes.from_bytes(pack(values, bits), bits)
        assert lanes.n == len(values)
        assert lanes.value.to_bytes(len(values) * bits // 8, "big") == pack(values, bits)
        assert list(lanes.nonzero()) == [int(v != 0) for v in values]


def naive_breaks(values: list[int], step: int) -> list[int]:
    out = []
    for a, b in zip(values, values[1:], strict=False):
        cont = (a == 0 and b == 0) or (a != 0 and b == a + step)
        out.append(0 if cont else 1)
    return [*out, 1]


@pytest.mark.parametrize("step", [512, 65536, 1 << 21])
def test_breaks_on_offsets(step: int) -> None:
    r = random.Random(step)
    for _ in range(40):
        values: list[int] = []
        while len(values) < 400:
            kind = r.randrange(3)
            length = r.randint(1, 40)
            if kind == 0:
                values += [0] * length
            else:
                start = r.randrange(1, 1 << 40) * step
                values += [start + i * step for i in range(length)]
                if kind == 2:  # a run that jumps back onto itself
                    values.append(start)
        values = [v & ((1 << 56) - 1) for v in values]
        lanes = Lanes.from_bytes(pack(values, 64))
        assert list(lanes.breaks(step)) == naive_breaks(values, step)


def test_breaks_edge_cases() -> None:
    step = 4096
    top = (1 << 56) - step
    for values in ([0], [step], [0, step], [step, 0], [step, 2 * step, 0, 0], [top - step, top],
                   [step, step], [2 * step, step]):
        assert list(Lanes.from_bytes(pack(values, 64)).breaks(step)) == naive_breaks(values, step)


def test_flag_positions() -> None:
    flags = bytes([0, 1, 0, 0, 1, 1, 0, 1])
    assert flag_positions(flags) == [1, 4, 5, 7]
    assert flag_positions(flags, 2, 6) == [4, 5]
    assert flag_positions(bytes(5)) == []


def test_rejects_partial_entries() -> None:
    with pytest.raises(ValueError):
        Lanes.from_bytes(b"\0" * 12)
    with pytest.raises(ValueError):
        Lanes.from_bytes(b"\0" * 3, 16)
