"""Mutations for the fuzzer (see harness.py): a mutation picks a region kind, a region of
that kind, a position in it and an operation (an interesting value for a field, or a byte
set, flipped, zeroed or filled with 0xff in a blob) and applies it to a copy of the seed.
"""

from __future__ import annotations

import struct

from tests.fuzz.seed_images import Seed

# (region kind selector, region selector, position, operation, random value): the kind is
# chosen first so that the many header fields do not crowd out tables and snapshots
Mutation = tuple[int, int, int, int, int]
N_OPS = 16


def _interesting(orig: int, width: int, op: int, rnd: int, file_size: int, cs: int) -> int:
    bits = 8 * width
    top = (1 << bits) - 1
    choices = (
        0,
        1,
        top,
        1 << (bits - 1),
        orig + 1,
        orig - 1,
        orig ^ (1 << (rnd % bits)),
        rnd,
        orig + cs,
        file_size,
        file_size - cs + (rnd % 8) * 8,
        orig * 2 + 1,
        orig | (1 << 63) if bits == 64 else orig * 4,
        orig | (1 << 62) if bits == 64 else orig >> 1,
        (1 << 56) - cs if bits == 64 else 1 << (rnd % bits),
        orig | 1,
    )
    return choices[op % len(choices)] & top


def mutate(seed: Seed, mutations: list[Mutation]) -> bytes:
    buf = bytearray(seed.image)
    cs = 1 << struct.unpack_from(">I", seed.image, 20)[0]
    kinds = sorted({r.kind for r in seed.regions})
    for kind_sel, sel, position, op, rnd in mutations:
        kind = kinds[kind_sel % len(kinds)]
        of_kind = [r for r in seed.regions if r.kind == kind]
        region = of_kind[sel % len(of_kind)]
        index = position % region.count
        if region.width <= 1:
            off = region.offset + index
            if off >= len(buf):
                continue
            if op % 4 == 0:
                buf[off] = rnd & 0xFF
            elif op % 4 == 1:
                buf[off] ^= 1 << (rnd % 8)
            elif op % 4 == 2:
                n = 1 + rnd % 16
                buf[off : off + n] = bytes(min(n, len(buf) - off))
            else:
                n = 1 + rnd % 16
                buf[off : off + n] = b"\xff" * min(n, len(buf) - off)
            continue
        off = region.offset + index * region.stride
        w = region.width
        if off + w > len(buf):
            continue
        orig = int.from_bytes(buf[off : off + w], "big")
        new = _interesting(orig, w, op, rnd, len(buf), cs)
        buf[off : off + w] = new.to_bytes(w, "big")
    return bytes(buf)
