"""Tiny independent parser of the on-disk layout, for assertions about what a shrink left."""

from __future__ import annotations

import struct
from pathlib import Path


def layout(path: str | Path) -> dict[str, object]:
    data = Path(path).read_bytes()
    (_, version, _, _, cbits, size, _, l1_size, l1_off, rt_off, rt_clusters, _,
     _) = struct.unpack_from(">IIQIIQIIQQIIQ", data, 0)
    order = struct.unpack_from(">I", data, 96)[0] if version >= 3 else 4
    cs = 1 << cbits
    l1 = [struct.unpack_from(">Q", data, l1_off + 8 * i)[0] for i in range(l1_size)]
    reftable = [
        struct.unpack_from(">Q", data, rt_off + 8 * i)[0] for i in range(rt_clusters * cs // 8)
    ]
    empty_blocks = []
    for i, entry in enumerate(reftable):
        off = entry & ~0x1FF
        if off and not any(data[off : off + cs]):
            empty_blocks.append(i)
        elif off:
            # a block that counts only itself is empty too
            bits = 1 << order
            per = cs * 8 // bits
            own = off // cs - i * per
            if 0 <= own < per:
                blk = bytearray(data[off : off + cs])
                if bits >= 8:
                    nb = bits // 8
                    blk[own * nb : own * nb + nb] = bytes(nb)
                else:
                    byte, shift = divmod(own * bits, 8)
                    blk[byte] &= ~(((1 << bits) - 1) << shift) & 0xFF
                if not any(blk):
                    empty_blocks.append(i)
    return {"cluster_size": cs, "size": size, "l1": l1, "l1_size": l1_size,
            "reftable": reftable, "empty_refblocks": empty_blocks, "file_size": len(data)}


def used_clusters(path: str | Path) -> int:
    """Host clusters with a non-zero refcount, read straight from the refcount blocks."""
    data = Path(path).read_bytes()
    lay = layout(path)
    cs = int(lay["cluster_size"])  # type: ignore[call-overload]
    version = struct.unpack_from(">I", data, 4)[0]
    order = struct.unpack_from(">I", data, 96)[0] if version >= 3 else 4
    bits = 1 << order
    total = 0
    for entry in lay["reftable"]:  # type: ignore[attr-defined]
        off = entry & ~0x1FF
        if not off:
            continue
        block = data[off : off + cs]
        if bits >= 8:
            nb = bits // 8
            vals = [block[i : i + nb] for i in range(0, cs, nb)]
            total += sum(1 for v in vals if any(v))
        else:
            per = 8 // bits
            mask = (1 << bits) - 1
            total += sum(1 for b in block for k in range(per) if (b >> (k * bits)) & mask)
    return total
