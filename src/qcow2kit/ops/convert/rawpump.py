"""The data pump of convert's early paths: copies the data of a source file into the
target on threads of its own, without numpy or the image code in the process.

Owns `plan_layout` (where header, refcount table, refcount blocks, L1, L2 tables and the
data go in a fresh qcow2 image, from the source's size and data ranges alone: worst-case
room for the metadata in front, data clusters packed in guest order behind it) and
`RawPump`: a reader thread (preadv into a small pool of buffers, zero test of each block
by bytes.find and comparison with a zero buffer: `data_pieces`) and a writer thread that
either places each chunk's data clusters at the next host clusters of that layout and
writes them with one pwritev (qcow2 output: planned.py writes the metadata once the pump
is joined), or writes each run of data blocks at its guest offset (raw output). The
calling thread meanwhile does the rest.

Pure Python: must not import numpy, qcow2kit.image or anything that imports them. Only
reads the source; the target's bytes are this module's (and the caller's, once joined).
"""

from __future__ import annotations

import errno
import os
import queue
import sys
import threading
from array import array
from collections.abc import Iterator

from ...io.file import FileStorage

# bytes per read and per hand-over between the threads: small enough that a buffer is
# still in the cache when the writer copies it out
PUMP_CHUNK_BYTES = 2 << 20
PUMP_READERS = 1
PUMP_BUFFERS = 6
# while the pump runs, a thread coming back from a syscall gets the GIL back this soon
# (the default 5 ms would stall it behind the importing thread)
PUMP_SWITCH_INTERVAL = 0.0002

# the zero search looks for this many zero bytes (fewer for smaller blocks) first
_NEEDLE_BYTES = 4096

# array typecodes of the refcount widths the early path takes (refcount_order 3..6)
_REFCOUNT_CODES = {3: "B", 4: "H", 5: "I", 6: "Q"}

Run = tuple[int, int, int]  # (first guest cluster, clusters, first host cluster)
Copy = tuple[int, int, int]  # (guest offset, source offset, bytes)
Chunk = tuple[int, int, bytearray, list[tuple[int, int]]]
# at most this many buffers per pwritev (Linux's IOV_MAX is 1024)
_IOV_MAX = 1024


class Layout:
    """Cluster indices of a fresh image's structures, room for the worst case."""

    __slots__ = ("cluster_bits", "size", "refcount_order", "reftable_clusters",
                 "refblock_clusters", "l1_entries", "l1_clusters", "l2_slots", "data_cluster")

    def __init__(self, cluster_bits: int, size: int, refcount_order: int, reftable_clusters: int,
                 refblock_clusters: int, l1_entries: int, l1_clusters: int) -> None:
        self.cluster_bits = cluster_bits
        self.size = size
        self.refcount_order = refcount_order
        self.reftable_clusters = reftable_clusters
        self.refblock_clusters = refblock_clusters
        self.l1_entries = l1_entries
        self.l1_clusters = l1_clusters
        self.l2_slots: dict[int, int] = {}  # L1 index -> reserved cluster
        self.data_cluster = 0  # the first data cluster

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refblock_cluster(self) -> int:
        return 1 + self.reftable_clusters

    @property
    def l1_cluster(self) -> int:
        return self.refblock_cluster + self.refblock_clusters


def refcount_code(order: int) -> str | None:
    """The array typecode of this refcount width, None where the early path has none."""
    code = _REFCOUNT_CODES.get(order)
    return code if code is not None and array(code).itemsize == 1 << (order - 3) else None


def data_ranges(fd: int, size: int, cs: int) -> list[tuple[int, int]]:
    """Cluster-aligned [lo, hi) byte ranges (hi capped at size) holding every byte of the
    file that is not a hole, merged; the whole file where holes cannot be asked for."""
    spans: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            if start >= size:
                break
            end = min(size, os.lseek(fd, start, os.SEEK_HOLE))
            spans.append((start, end))
            pos = end
    except (OSError, AttributeError):
        spans = [(0, size)] if size else []
    out: list[tuple[int, int]] = []
    for a, b in spans:
        lo, hi = a // cs * cs, min(size, -(-b // cs) * cs)
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def plan_layout(
    size: int, cluster_bits: int, refcount_order: int, ranges: list[tuple[int, int]]
) -> Layout:
    """Header, refcount table, refcount blocks, L1 and one L2 slot per L1 entry the data
    ranges touch, in that order from cluster 0; then the data. Sized for every cluster of
    the ranges being data: what zero clusters leave unused stays free (a hole)."""
    cs = 1 << cluster_bits
    l2_entries = cs // 8
    span = cs * l2_entries
    l1_entries = -(-size // span)
    l1_clusters = -(-l1_entries * 8 // cs)
    touched: list[int] = []
    n_data = 0
    for lo, hi in ranges:
        n_data += -(-(hi - lo) // cs)
        for i in range(lo // span, (hi - 1) // span + 1):
            if not touched or touched[-1] < i:
                touched.append(i)
    per_block = (cs * 8) >> refcount_order
    tables, blocks = 1, 1
    while True:
        total = 1 + tables + blocks + l1_clusters + len(touched) + n_data
        need_blocks = -(-total // per_block)
        need_tables = max(1, -(-need_blocks * 8 // cs))
        if (need_blocks, need_tables) == (blocks, tables):
            break
        blocks, tables = need_blocks, need_tables
    layout = Layout(cluster_bits, size, refcount_order, tables, blocks, l1_entries, l1_clusters)
    first_l2 = layout.l1_cluster + l1_clusters
    layout.l2_slots = {i: first_l2 + k for k, i in enumerate(touched)}
    layout.data_cluster = first_l2 + len(touched)
    return layout


class RawPump:
    """Copy ranges of a source file into `target`: PUMP_READERS threads read and zero-test
    chunks, one writer writes them in guest order. With a `layout` (qcow2 output) each
    chunk's data clusters take the next free host clusters of the layout and are written
    with one pwritev; without (raw output) each run of data blocks is written at its guest
    offset. `join()` waits and returns the data runs (qcow2 output), or raises what went
    wrong on any thread (the others stop too); `abort()` stops them all."""

    def __init__(
        self,
        source: FileStorage,
        target: FileStorage,
        copies: list[Copy],
        *,
        block: int,
        sparse: bool,
        layout: Layout | None = None,
    ) -> None:
        """block: the zero test's unit (and, with a layout, its cluster size: a chunk that
        ends inside a cluster is padded with zeros to the cluster's end)."""
        self.source = source
        self.target = target
        self.layout = layout
        self.sparse = sparse
        self.runs: list[Run] = []
        self.error: BaseException | None = None
        self._stop = False
        self._block = block
        self._chunk = max(PUMP_CHUNK_BYTES // block, 1) * block
        self._zero = bytes(block)
        self._zeros = bytes(self._chunk)
        self._chunks = _chunks(copies, self._chunk)
        self._lock = threading.Lock()
        # buffers for the readers; None: one still to be made (by the reader, whose first
        # reads then fault its pages in, not the starting thread)
        self._free: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
        for _ in range(PUMP_BUFFERS):
            self._free.put(None)
        # read chunks (sequence number, guest offset, buffer, data pieces), None when a
        # reader is done
        self._ready: queue.SimpleQueue[Chunk | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._guard, args=(self._read,), daemon=True,
                             name=f"qcow2kit-convert-reader{i}")
            for i in range(PUMP_READERS)
        ]
        self._threads.append(threading.Thread(target=self._guard, args=(self._write,),
                                              daemon=True, name="qcow2kit-convert-writer"))
        self._interval = sys.getswitchinterval()

    def start(self) -> RawPump:
        sys.setswitchinterval(min(self._interval, PUMP_SWITCH_INTERVAL))
        for t in self._threads:
            t.start()
        return self

    def _guard(self, body: object) -> None:
        try:
            body()  # type: ignore[operator]
        except BaseException as exc:  # handed to join()
            if self.error is None:
                self.error = exc
            self._wake()

    def _wake(self) -> None:
        """Stop every thread, wherever it waits."""
        self._stop = True
        self._ready.put(None)
        for _ in range(PUMP_READERS):
            self._free.put(bytearray(0))

    def _read(self) -> None:
        block = self._block
        fd = self.source.fd
        zero = self._zero
        zeros = self._zeros
        needle = zero[:_NEEDLE_BYTES]
        sparse = self.sparse
        pad = self.layout is not None
        while True:
            buf = self._free.get()  # a buffer first: the writer never waits for a
            if self._stop:          # chunk whose reader waits for a buffer
                return
            if buf is None:
                buf = bytearray(self._chunk)
            with self._lock:
                item = next(self._chunks, None)
            if item is None:
                self._ready.put(None)
                return
            seq, guest, pos, n = item
            mv = memoryview(buf)
            read_at(fd, mv[:n], pos)
            tail = -n % block
            if tail and pad:  # the disk ends inside this cluster: the rest reads as zeros
                mv[n : n + tail] = zero[:tail]
                n += tail
            if sparse:
                pieces = data_pieces(buf, n, block, needle, zeros)
            else:
                pieces = [(0, n)] if n else []
            self._ready.put((seq, guest, buf, pieces))

    def _write(self) -> None:
        target = self.target
        runs = self.runs
        layout = self.layout
        cs = layout.cluster_size if layout is not None else 0
        host = layout.data_cluster if layout is not None else 0
        pending: dict[int, Chunk] = {}
        expected = 0
        done = 0
        while done < PUMP_READERS or pending:
            item = self._ready.get()
            if self._stop:
                return
            if item is None:
                done += 1
                continue
            pending[item[0]] = item
            while expected in pending:
                _, pos, buf, pieces = pending.pop(expected)
                expected += 1
                if not cs:  # raw output: each run of data blocks at its guest offset
                    mv = memoryview(buf)
                    for lo, hi in pieces:
                        target.allocate(pos + lo, hi - lo)
                        write_at(target.fd, [mv[lo:hi]], pos + lo)
                elif pieces:
                    # the chunk's data clusters take the next host clusters, in order
                    length = 0
                    for lo, hi in pieces:
                        guest, count = (pos + lo) // cs, (hi - lo) // cs
                        last = runs[-1] if runs else (0, 0, -1)
                        if last[0] + last[1] == guest and last[2] + last[1] == host:
                            runs[-1] = (last[0], last[1] + count, last[2])
                        else:
                            runs.append((guest, count, host))
                        host += count
                        length += hi - lo
                    # blocks allocated just before they are written: ext4 then skips its
                    # delayed allocation page by page (see FileStorage._extend)
                    start = (host * cs) - length
                    target.allocate(start, length)
                    mv = memoryview(buf)
                    write_at(target.fd, [mv[lo:hi] for lo, hi in pieces], start)
                self._free.put(buf)

    def join(self) -> list[Run]:
        """Wait for every thread; the data runs, or the first error of any thread."""
        try:
            for t in self._threads:
                t.join()
        except BaseException:
            self.abort()
            raise
        finally:
            sys.setswitchinterval(self._interval)
        if self.error is not None:
            raise self.error
        return self.runs

    def abort(self) -> None:
        """Stop every thread and wait for them (an error they hit is dropped)."""
        self._wake()
        for t in self._threads:
            if t.is_alive():
                t.join()
        sys.setswitchinterval(self._interval)


def data_pieces(
    buf: bytearray, n: int, block: int, needle: bytes, zeros: bytes
) -> list[tuple[int, int]]:
    """The [lo, hi) runs of buf[:n] left when every all-zero block (block-aligned, the last
    one may be short) is taken out. `needle`: zero bytes, at most `block` of them; `zeros`:
    at least n zero bytes. C-speed searches, not a Python step per block: bytes.find of
    the needle skips data, and a zero run grows by spans that double."""
    mv = memoryview(buf)
    pieces: list[tuple[int, int]] = []
    cur = start = 0  # the current data run starts at cur; search on from start
    while True:
        # an all-zero block starting at or after `start` holds the needle: found at or
        # before it
        p = buf.find(needle, start, n)
        if p < 0:
            break
        q = -(-p // block) * block
        if q >= n:
            break
        end = min(n, q + block)
        if not zeros.startswith(mv[q:end]):
            start = q + 1
            continue
        step = block
        while end < n:
            hi = min(n, end + step)
            if zeros.startswith(mv[end:hi]):
                end = hi
                step *= 2
            elif step > block:
                step = block
            else:
                break
        if q > cur:
            pieces.append((cur, q))
        cur = start = end
    if cur < n:
        # a short last block holds no needle: tested on its own
        last = (n - 1) // block * block
        if n - last < len(needle) and last >= cur and zeros.startswith(mv[last:n]):
            n = last
        if cur < n:
            pieces.append((cur, n))
    return pieces


def _chunks(copies: list[Copy], chunk: int) -> Iterator[tuple[int, int, int, int]]:
    """(sequence number, guest offset, source offset, bytes) of every chunk of the copies,
    in order."""
    seq = 0
    for guest, pos, length in copies:
        for done in range(0, length, chunk):
            yield seq, guest + done, pos + done, min(chunk, length - done)
            seq += 1


def write_at(fd: int, views: list[memoryview], offset: int) -> None:
    """Write the views one after the other from offset: one pwritev per IOV_MAX of them,
    continued after a short write."""
    while views:
        batch = views[:_IOV_MAX]
        n = os.pwritev(fd, batch, offset)
        if n <= 0:
            raise OSError(errno.EIO, "a write wrote nothing")
        offset += n
        done = 0
        while done < len(batch) and n >= len(batch[done]):
            n -= len(batch[done])
            done += 1
        views = views[done:]
        if n:
            views[0] = views[0][n:]


def read_at(fd: int, mv: memoryview, offset: int) -> None:
    """Fill mv from fd at offset; past the end of the file reads as zeros (a raw source
    that shrank under us)."""
    done = 0
    while done < len(mv):
        n = os.preadv(fd, [mv[done:]], offset + done)
        if n <= 0:
            mv[done:] = bytes(len(mv) - done)
            return
        done += n


__all__ = ["Copy", "Layout", "PUMP_CHUNK_BYTES", "RawPump", "Run", "data_ranges", "plan_layout",
           "data_pieces", "read_at", "refcount_code", "write_at"]
