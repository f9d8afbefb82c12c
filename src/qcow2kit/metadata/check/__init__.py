"""Consistency check and repair of one open image, with qemu-img check's verdicts.

What it owns: computing the reference count every host cluster should have (header, L1,
L2 and data clusters, compressed clusters by byte range, snapshot table and each
snapshot's tables, refcount table and blocks, bitmap directory and tables, the LUKS
header area) as one numpy array, comparing it with the on-disk refcounts, and the
repairs: lowering too-high refcounts (`leaks`), raising too-low ones and fixing COPIED
flags (`all`), and rebuilding the whole refcount structure when it is broken.

Counts, per-cluster diagnostics and their wording follow `qemu-img check` (QEMU 7.2), so
that `qcow2kit check --output=json` and `qemu-img check --output=json` agree.

Modules: `result` (CheckResult, counters), `state` (one pass's in-memory refcount table,
L2 reads, on-disk refcounts), `walk` (reference counting and the L1/L2 walk), `bitmaps`,
`snapshots`, `compare` (compare and repair), `rebuild`, `copied` (the COPIED flags),
`opening` (opening an image whose refcount table is missing), `driver` (check_image).

Must not import qcow2kit.image (layering: image > metadata).
"""

from __future__ import annotations

from .driver import check_image
from .result import FIX_ERRORS, FIX_LEAKS, CheckResult

__all__ = ["FIX_ERRORS", "FIX_LEAKS", "CheckResult", "check_image"]
