"""Whole tables of big-endian unsigned entries held as one Python integer ("lanes"), so that
a mask, a test or a comparison of every entry with its neighbour runs at C speed without
numpy.

Why this exists: `import numpy` costs a process ~45 ms, more than qemu-img's whole `map` or
`check` of a 1 GiB image. The numpy-free fast paths of those commands read their L2 tables and
refcount blocks through this module. A Python int of a few MiB is added, shifted and masked in
a millisecond or two, and entries never carry into each other as long as every operation keeps
each lane's value below 2**bits (each method says what it needs).

Owns: packing bytes into lanes and back, per-lane masks, "is this lane nonzero" and "does the
next lane continue this one" as one flag byte per lane (for bytes.find / count). Knows nothing
of what a bit of an L2 entry means (format/constants.py and format/entries.py do); no I/O.
Must not import numpy.
"""

from __future__ import annotations

# (n, bits, v) -> v in each of n lanes; a plain dict, not functools.lru_cache: importing
# functools costs a light command half a millisecond of start-up. Emptied when it grows.
_FILLS: dict[tuple[int, int, int], int] = {}
_MAX_FILLS = 48


def _fill(n: int, bits: int, v: int) -> int:
    """v in each of n lanes of `bits` bits (v < 2**bits)."""
    key = (n, bits, v)
    value = _FILLS.get(key)
    if value is None:
        if len(_FILLS) >= _MAX_FILLS:
            _FILLS.clear()
        # from bytes: a long division of 2**(n*bits) - 1 would be ten times slower
        value = _FILLS[key] = int.from_bytes(v.to_bytes(bits // 8, "big") * n, "big")
    return value


def _ones(n: int, bits: int) -> int:
    """The value 1 in each of n lanes of `bits` bits."""
    return _fill(n, bits, 1)


def _nonzero_lanes(value: int, n: int, bits: int) -> int:
    """1 in each lane whose entry is nonzero, else 0 (entries may use every bit)."""
    top = bits - 1
    below_top = _ones(n, bits) * ((1 << top) - 1)
    # (low bits) + (2**top - 1) stays below 2**bits per lane: its top bit is set iff the low
    # bits are not all 0; OR-ing the entry adds its own top bit
    spread = ((value & below_top) + below_top) | value
    return (spread >> top) & _ones(n, bits)


class Lanes:
    """n entries of `bits` bits; entry 0 is the most significant lane, as in the bytes."""

    __slots__ = ("n", "bits", "value")

    def __init__(self, n: int, bits: int, value: int) -> None:
        self.n = n
        self.bits = bits
        self.value = value

    @classmethod
    def from_bytes(cls, raw: bytes | bytearray | memoryview, bits: int = 64) -> Lanes:
        width = bits // 8
        if bits % 8 or len(raw) % width:
            raise ValueError(f"{len(raw)} bytes are not whole {bits}-bit entries")
        return cls(len(raw) // width, bits, int.from_bytes(raw, "big"))

    def tagged(self, key: int, tag_mask: int, tag: int) -> bool:
        """Whether every entry's bits under tag_mask equal `tag` where its bits under `key`
        are not all zero, and are all zero where they are ("the COPIED flag is set exactly on
        the entries that hold an offset, and no other flag bit is set"). Bits outside
        key | tag_mask are ignored. Needs tag within tag_mask."""
        if tag & ~tag_mask:
            raise ValueError(f"tag {tag:#x} is not within tag_mask {tag_mask:#x}")
        ones = _ones(self.n, self.bits)
        keyed = _nonzero_lanes(self.value & ones * key, self.n, self.bits)
        return self.value & ones * tag_mask == keyed * tag

    def tagged_breaks(self, key: int, zero_mask: int, step: int) -> bytes | None:
        """For entries that hold a value under `key` and flags: None unless every entry's top
        bit is set exactly where its bits under key are not all zero, and its bits under
        zero_mask are all zero; else one byte per entry, nonzero (0x80) where entry i + 1
        does not continue entry i in the sense of breaks(step) of the entries masked with
        key, the last entry counting as followed by a zero entry. All in one pass of a dozen
        operations on the whole integer. Needs every masked entry + step below
        2**(bits - 1), step a power of two and key, zero_mask and the top bit disjoint."""
        bits = self.bits
        top = bits - 1
        if step <= 0 or step & (step - 1) or step >= 1 << top or key & zero_mask or (key | zero_mask) >> top:
            raise ValueError("step must be a power of two; key, zero_mask and the top bit disjoint")
        n, value = self.n, self.value
        below_top = _fill(n, bits, (1 << top) - 1)
        top_bits = _fill(n, bits, 1 << top)
        keyed = value & _fill(n, bits, key)
        # masked entries are below 2**top: adding 2**top - 1 sets bit top exactly where nonzero
        nonzero_top = (keyed + below_top) & top_bits
        if value & _fill(n, bits, zero_mask | 1 << top) != nonzero_top:
            return None
        expected = keyed + (nonzero_top >> (top - step.bit_length() + 1))
        # lane i of (keyed << bits) is entry i + 1 (a zero enters the last lane); the first
        # entry moves past the n lanes, which `& top_bits` drops, and no lane carries into
        # its neighbour (every lane stays below 2**bits)
        differ = ((((keyed << bits) ^ expected) + below_top) & top_bits).to_bytes(n * bits // 8, "big")
        return differ[:: bits // 8]

    def progression(self, step: int) -> bool:
        """Whether entry i == entry 0 + i * step for every i (False when the last of those
        would not fit in an entry). A handful of operations: cheaper than breaks() where a
        whole table is one run, as in a dense image."""
        n, bits, value = self.n, self.bits, self.value
        first = value >> ((n - 1) * bits)
        if step < 0 or first + (n - 1) * step >> bits:
            return False
        key = (n, bits, -1 - step)  # ramps share _FILLS with fills (negative keys: no clash)
        ramp = _FILLS.get(key)
        if ramp is None:
            width = bits // 8
            ramp = int.from_bytes(b"".join((i * step).to_bytes(width, "big") for i in range(n)), "big")
            if len(_FILLS) >= _MAX_FILLS:
                _FILLS.clear()
            _FILLS[key] = ramp
        return value == first * _fill(n, bits, 1) + ramp

    def _flags(self, lanes01: int) -> bytes:
        """One byte per lane (0 or 1) from lanes that hold 0 or 1."""
        width = self.bits // 8
        return lanes01.to_bytes(self.n * width, "big")[width - 1 :: width]

    def nonzero(self) -> bytes:
        """One byte per entry: 1 where the entry is nonzero."""
        return self._flags(_nonzero_lanes(self.value, self.n, self.bits))

    def breaks(self, step: int) -> bytes:
        """One byte per entry: 0 where entry i+1 continues entry i, else 1 (always 1 for the
        last). Entry i+1 continues entry i when both are 0, or when entry i is nonzero and
        entry i+1 == entry i + step. Needs every entry + step below 2**(bits - 1) (offset
        fields are far below that)."""
        n, bits, value = self.n, self.bits, self.value
        top = bits - 1
        ones = _ones(n, bits)
        below_top = ones * ((1 << top) - 1)
        # entries are below 2**top: adding 2**top - 1 sets bit top exactly where nonzero
        nonzero = ((value + below_top) >> top) & ones
        expected = value + nonzero * step
        first = value >> ((n - 1) * bits)
        following = (value << bits) ^ (first << (n * bits))
        differ = (((following ^ expected) + below_top) >> top) & ones
        return self._flags(differ | 1)


def flag_positions(flags: bytes, start: int = 0, end: int | None = None) -> list[int]:
    """The indices of the nonzero bytes of a flag string (one per lane) in [start, end)."""
    out: list[int] = []
    stop = len(flags) if end is None else end
    find = flags.find
    i = find(1, start, stop)
    while i >= 0:
        out.append(i)
        i = find(1, i + 1, stop)
    return out


__all__ = ["Lanes", "flag_positions"]
