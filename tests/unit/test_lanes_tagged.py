"""format/lanes.py's tagged() and tagged_breaks() against a per-entry reference, on random
tables of L2-like entries (an offset field, a top flag bit, a low flag bit, stray bits)."""

from __future__ import annotations

import random
import struct

import pytest

from qcow2kit.format.lanes import Lanes

TOP = 1 << 63


def pack(values: list[int]) -> bytes:
    return struct.pack(f">{len(values)}Q", *values)


def entries(r: random.Random, step: int, n: int, stray: float) -> list[int]:
    """Runs of contiguous offsets with the top bit, zero runs, lone low bits, and (with
    probability `stray`) an entry with a bit it must not have."""
    out: list[int] = []
    while len(out) < n:
        kind = r.randrange(4)
        length = r.randint(1, 12)
        if kind == 0:
            out += [0] * length
        elif kind == 1:
            out += [1] * length  # the low flag alone
        else:
            start = r.randrange(1, 1 << 20) * step
            out += [TOP | (start + i * step) | (kind == 3) for i in range(length)]
            if r.random() < 0.2:
                out.append(TOP | start)  # jumps back
    out = out[:n]
    if r.random() < stray:
        i = r.randrange(n)
        out[i] ^= r.choice((TOP, 1 << 62, 1 << 57, step >> 1, 2))
    return out


def naive_ok(values: list[int], key: int, zero_mask: int) -> bool:
    return all((v & zero_mask) == 0 and bool(v & TOP) == bool(v & key) for v in values)


def naive_breaks(values: list[int], key: int, step: int) -> list[int]:
    masked = [v & key for v in values] + [0]
    return [0 if (a == 0 and b == 0) or (a != 0 and b == a + step) else 1
            for a, b in zip(masked, masked[1:], strict=False)]


@pytest.mark.parametrize("step", [512, 4096, 65536, 1 << 21])
def test_tagged_breaks_matches_the_reference(step: int) -> None:
    r = random.Random(step)
    key = 0x00FFFFFFFFFFFE00 & ~(step - 1)
    zero_mask = ((1 << 63) - 1) & ~key & ~1
    for _ in range(150):
        values = entries(r, step, r.randint(1, 300), 0.5)
        lanes = Lanes.from_bytes(pack(values))
        got = lanes.tagged_breaks(key, zero_mask, step)
        ok = naive_ok(values, key, zero_mask)
        assert lanes.tagged(key, zero_mask | TOP, TOP) == ok
        if not ok:
            assert got is None
            continue
        assert got is not None
        assert [int(b != 0) for b in got] == naive_breaks(values, key, step)
        assert set(got) <= {0, 0x80}


def test_tagged_with_other_tags() -> None:
    values = [0, 0x1005, 0, 0x2005]
    lanes = Lanes.from_bytes(pack(values))
    assert lanes.tagged(0xF000, 0x0FFF, 0x0005)
    assert not lanes.tagged(0xF000, 0x0FFF, 0x0004)
    assert not Lanes.from_bytes(pack([0x0005])).tagged(0xF000, 0x0FFF, 0x0005)
    with pytest.raises(ValueError):
        lanes.tagged(0xF000, 0x0FF0, 0x0005)


def test_tagged_breaks_refuses_bad_arguments() -> None:
    lanes = Lanes.from_bytes(pack([0]))
    for key, zero_mask, step in ((0xF000, 0x0FFF, 3), (0xF000, 0x1000, 4096), (TOP, 0, 4096),
                                 (0xF000, 0, 0)):
        with pytest.raises(ValueError):
            lanes.tagged_breaks(key, zero_mask, step)


def test_progression() -> None:
    step = 4096
    for n in (1, 2, 5, 512):
        run = [TOP | (7 * step + i * step) for i in range(n)]
        assert Lanes.from_bytes(pack(run)).progression(step)
        if n == 1:
            continue  # one entry is always a progression
        assert not Lanes.from_bytes(pack(run)).progression(2 * step)
        for k in range(n):
            for delta in (1, step, -step, 1 << 62):
                bad = list(run)
                bad[k] = (bad[k] + delta) % (1 << 64)
                assert not Lanes.from_bytes(pack(bad)).progression(step)
    # the last entry would not fit: never a progression, even where the carries would agree
    top = (1 << 64) - step
    assert not Lanes.from_bytes(pack([top, 0])).progression(step)
    assert Lanes.from_bytes(pack([top - step, top])).progression(step)
