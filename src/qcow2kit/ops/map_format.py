"""The text `map` prints, in one place for both of its paths (ops/map.py's numpy walk and
ops/map_plain.py's fast path): qemu-img 7.2's JSON layout byte for byte, and its human table
with the error that stops it.

Extents come as columns (equal-length sequences, one row per merged extent), the four flags
of a row packed into one small integer by `flag_code`. Owns only the formatting of extents:
no I/O, no knowledge of images. Must not import numpy (the fast path imports this module,
and start-up time is its whole point) nor json.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time
if TYPE_CHECKING:
    from collections.abc import Sequence

HUMAN_ERROR = "File contains external, encrypted or compressed clusters."

_TF = ("false", "true")
# qemu-img's JSON for one combination of (depth, present, zero, data), up to "offset"
_FLAGS_JSON = '"depth": %d, "present": %s, "zero": %s, "data": %s'


def flag_code(depth: int, present: bool, zero: bool, data: bool) -> int:
    """The flags of an extent as one integer (depth in the high bits, data in bit 0)."""
    return ((depth * 2 + present) * 2 + zero) * 2 + data


def _flags_json(code: int) -> str:
    return _FLAGS_JSON % (code >> 3, _TF[(code >> 2) & 1], _TF[(code >> 1) & 1], _TF[code & 1])


def json_text(starts: Sequence[int], lengths: Sequence[int], codes: Sequence[int],
              offsets: Sequence[int]) -> str:
    """`qemu-img map --output=json`: one line per extent; an offset below 0 is left out."""
    if not starts:
        return "[]\n"
    # the JSON text of each distinct flag combination, made once
    mid = {c: _flags_json(c) for c in set(codes)}
    lines = [
        f'{{ "start": {s}, "length": {n}, {mid[c]}, "offset": {o}}}' if o >= 0
        else f'{{ "start": {s}, "length": {n}, {mid[c]}}}'
        for s, n, c, o in zip(starts, lengths, codes, offsets, strict=True)
    ]
    return "[" + ",\n".join(lines) + "]\n"


def human_text(starts: Sequence[int], lengths: Sequence[int], codes: Sequence[int],
               offsets: Sequence[int], names: Sequence[str]) -> tuple[str, str | None]:
    """qemu-img's human table (data extents that are not zero, numbers in hex, 0 as "0");
    the error message (if any) stops it where qemu-img stops: at the first data extent
    without a host offset."""
    stop = len(starts)
    for i, (c, o) in enumerate(zip(codes, offsets, strict=True)):
        if c & 1 and o < 0:
            stop = i
            break
    rows = zip(starts[:stop], lengths[:stop], codes[:stop], offsets[:stop], names[:stop],
               strict=True)
    out = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    out += [f"{hex(s) if s else '0':<16}{hex(n) if n else '0':<16}{hex(o) if o else '0':<16}{name}"
            for s, n, c, o, name in rows if c & 3 == 1]  # data, not zero
    return "\n".join(out) + "\n", (HUMAN_ERROR if stop < len(starts) else None)


__all__ = ["HUMAN_ERROR", "flag_code", "json_text", "human_text"]
