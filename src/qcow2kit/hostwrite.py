"""The storage step of a guest write: one pwrite per contiguous host run.

Owns coalescing the clusters of a planned write (metadata/mapping.WritePlan) with the old
bytes kept around partial clusters (the fills) into as few pwrites as possible; the
caller's buffer is sliced, not copied, unless fills must be joined to it. Knows nothing of
L2 tables or refcounts; the caller orders this write before the plan's commit.
"""

from __future__ import annotations

from .io.storage import Storage
from .metadata.mapping import WritePlan


def write_host_runs(
    target: Storage,
    buf: memoryview,
    pos: int,
    plan: WritePlan,
    fills: dict[int, tuple[bytes, bytes]],
    cs: int,
) -> None:
    """Write guest bytes buf (starting at guest offset pos) as the plan places them, with
    the fills around partial clusters: one pwrite per contiguous host run."""
    first_guest = plan.cluster_guest(0, cs)
    run_host = -1
    parts: list[bytes | memoryview] = []
    run_bytes = 0

    def emit() -> None:
        if parts:
            target.pwrite(run_host, parts[0] if len(parts) == 1 else b"".join(parts))

    host_start = plan.host_start.tolist()
    host_end = plan.host_end.tolist()
    write_start = plan.write_start.tolist()
    host = plan.host_offset.tolist()
    buf_start = buf_end = -1
    for i in range(len(host)):
        a = first_guest + i * cs + write_start[i] - pos  # this cluster's bytes in buf
        wlen = min(cs - write_start[i], len(buf) - a)
        head, tail = fills.get(i, (b"", b""))
        h = host[i] + host_start[i]
        if not (parts and h == run_host + run_bytes and host_start[i] == 0):
            emit()
            parts, run_host, run_bytes = [], h, 0
        if head:
            parts.append(head)
        if not head and parts and buf_end == a and isinstance(parts[-1], memoryview):
            parts[-1] = buf[buf_start : a + wlen]  # the caller's buffer continues
        else:
            buf_start = a
            parts.append(buf[a : a + wlen])
        buf_end = a + wlen
        if tail:
            parts.append(tail)
            buf_end = -1
        run_bytes += host_end[i] - host_start[i]
        if host_end[i] != cs:
            emit()
            parts, run_bytes = [], 0
    emit()


__all__ = ["write_host_runs"]
