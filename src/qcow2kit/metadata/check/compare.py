"""Comparing the in-memory refcount table with the refcounts on disk (qemu's
compare_refcounts), with qemu-img check's per-cluster messages, and the repairs of that
comparison: too-high refcounts lowered (`leaks`), too-low non-zero ones raised (`all`).

A refcount of 0 where references exist is never patched here: it marks the refcount
structure for a rebuild. Refcounts are compared as unsigned numbers (64-bit refcounts may
use the top bit). Must not import qcow2kit.image.
"""

from __future__ import annotations

import numpy as np

from .result import FIX_ERRORS, FIX_LEAKS, hx
from .state import REFT_OFFSET_MASK, CheckState


def compare(st: CheckState, fix: int) -> int:
    n = len(st.imrt)
    disk, bad = st.disk_refcounts(n)
    ok = np.ones(n, dtype=bool)
    for lo, hi, _b in bad:
        ok[lo:hi] = False
    want = st.imrt.astype(np.uint64)
    used = np.flatnonzero(ok & ((disk > 0) | (want > 0)))
    highest = int(used[-1]) if len(used) else 0
    mism = np.flatnonzero(ok & (disk != want))
    lines: list[tuple[int, str]] = []
    cs = st.cs
    reftable = st.meta.refcounts.reftable
    unaligned = [b for _lo, _hi, b in bad if int(reftable[b]) & REFT_OFFSET_MASK & (cs - 1)]
    if unaligned:
        # QEMU flags the image corrupt on the first unaligned block it tries to load; a block
        # beyond any possible file offset just fails to read
        off = int(reftable[unaligned[0]]) & REFT_OFFSET_MASK
        lines.append(
            (
                -1,
                (
                    f"qcow2: Image is corrupt: Refblock offset {hx(off)} unaligned (reftable index: "
                    f"{hx(unaligned[0])}); further non-fatal corruption events will be suppressed"
                ),
            )
        )
    for lo, hi, _b in bad:
        for k in range(lo, hi):
            lines.append((k, f"Can't get refcount for cluster {k}: Input/output error"))
        st.res.check_errors += hi - lo
    # unsigned: a 64-bit refcount with the top bit set is a very large refcount
    r1 = disk[mism]
    r2 = want[mism]
    zero = r1 == 0
    if zero.any():
        st.rebuild = True
    leak_fix = ~zero & (r1 > r2) & bool(fix & FIX_LEAKS)
    err_fix = ~zero & (r1 < r2) & bool(fix & FIX_ERRORS)
    fixing = leak_fix | err_fix
    if fixing.any():
        clusters = mism[fixing].astype(np.int64)
        st.forget_disk_refcounts()
        freed = st.meta.refcounts.set_values(clusters, r2[fixing])
        st.meta.refcounts.sync()
        st.meta.forget_freed(freed, punch=True)
    st.res.leaks_fixed += int(np.count_nonzero(leak_fix))
    st.res.corruptions_fixed += int(np.count_nonzero(err_fix))
    st.res.corruptions += int(np.count_nonzero(~fixing & (r1 < r2)))
    st.res.leaks += int(np.count_nonzero(~fixing & (r1 > r2)))
    for k, a, b, f in zip(mism.tolist(), r1.tolist(), r2.tolist(), fixing.tolist(), strict=True):
        word = "Repairing" if f else ("ERROR" if a < b else "Leaked")
        lines.append((k, f"{word} cluster {k} refcount={a} reference={b}"))
    if bad:
        lines.sort(key=lambda t: t[0])
    st.msgs.extend(text for _k, text in lines)
    return highest
