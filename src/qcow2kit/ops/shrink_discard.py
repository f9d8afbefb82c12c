"""shrink_discard: the early discard of `qcow2kit resize --shrink`. Before the heavy modules
load, it proves the image clean (ops/check_plain), finds the host runs of the data clusters
that only the cropped range maps, and discards them on two background threads: one drops
their page cache a chunk ahead, the other punches the holes. The shrink itself
(resizing.shrink_to) runs as always once wait() has returned: it finds holes where the data
was, and its truncate has little left to free.

Why: the kernel's work of freeing a fully written tail (dropping the page cache, freeing the
extents, and on a file system mounted with `discard` waiting for the device) is most of a
shrink's time: about 150 ms for 768 MiB here, against 8 ms of our own work. Started here it
overlaps the interpreter's and numpy's start-up instead of following them; split in two
threads, the CPU-bound cache drop overlaps the punch's wait for the device. qemu-img's shrink
also discards the cropped data first, before its metadata reaches the disk (QEMU_FACTS 1.4,
step A, "benign").

Crash safety: the punched clusters are referenced by nothing but L2 entries past the new end
(proven before anything is done: every reference counted once, refcounts equal to the
references, the COPIED flags right), and no metadata is written here. A crash, or a shrink
that fails afterwards, leaves a consistent image, unchanged below the new end, whose cropped
range reads as zeros: the data the user asked to delete. Declines (does nothing) on anything
check_plain does not prove, a version 2 image, or a size that does not shrink.

Owns the plan (cropped_runs) and the threads (EarlyDiscard); never writes metadata. Must not
import numpy or qcow2kit.image: the point is to run before them.
"""

from __future__ import annotations

import _thread
import os
import sys

from ..format import constants as C
from ..format.lanes import Lanes
from ..io.file import FileStorage
from ..metadata.header_io import read_header
from .check_plain import prove

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time
if TYPE_CHECKING:
    from collections.abc import Callable

    from ..io.storage import Storage

# the page cache is dropped and holes punched this many bytes at a time: small enough that
# the punch starts soon after the first drop, large enough to keep the calls few (measured:
# 48-96 MiB pieces of 768 MiB beat both one call and 32 pieces)
CHUNK_BYTES = 64 << 20
# while the threads run, the main thread (importing modules, pure Python) is made to hand over
# the interpreter this often instead of every 5 ms, so that each thread goes on as soon as its
# system call returns (measured: up to 5 ms lost per chunk and thread otherwise)
SWITCH_INTERVAL = 0.0002
# the proof (check_plain) costs about 15-30 ns per L2 entry of the image; the early discard
# saves the start-up (~60 ms) plus the dropping of the cache it overlaps (~3 us per 64 KiB
# cluster). Entries beyond this many, plus 64 per cropped cluster, are not worth proving.
PROOF_ENTRIES = 1 << 20
# below this much cropped data the threads are not worth starting: the shrink's own truncate
# frees it in a few milliseconds
MIN_BYTES = 8 << 20


def cropped_runs(storage: FileStorage, new_size: int, min_bytes: int = 0) -> list[tuple[int, int]]:
    """The (host offset, length) runs, sorted and merged, of the data clusters that a shrink
    to new_size unreferences and that nothing else references: those of guest clusters from
    the first one wholly past new_size to the last one below the current size. Empty when
    they add up to less than min_bytes, when proving the image clean would cost more than
    the early discard can save (PROOF_ENTRIES), when the image is not proven clean
    (check_plain), is version 2, or when new_size does not shrink it to a positive multiple
    of 512. Reads only; the proof comes last, being the costly part."""
    header = read_header(storage)
    if header.version < 3 or not 0 < new_size < header.size or new_size % 512:
        return []
    cs = header.cluster_size
    per_table = cs // 8
    first = -(-new_size // cs)  # the first guest cluster a shrink unmaps
    end = -(-header.size // cs)
    aligned = C.OFFSET_MASK & ~(cs - 1)
    l1 = storage.pread(header.l1_table_offset, -(-end // per_table) * 8)
    tables = [int.from_bytes(l1[k : k + 8], "big") & aligned for k in range(0, len(l1), 8)]
    runs: list[tuple[int, int]] = []
    for index in range(first // per_table, len(tables)):
        if tables[index]:
            base = index * per_table
            a, b = max(first, base) - base, min(end, base + per_table) - base
            if not _add_runs(runs, storage.pread(tables[index] + a * 8, (b - a) * 8), cs, aligned):
                return []
    cropped = sum(length for _, length in runs)
    live = len(tables) - tables.count(0)
    if not cropped or cropped < min_bytes or live * per_table > PROOF_ENTRIES + (cropped // cs) * 64:
        return []
    if prove(storage) is None:
        return []
    return _merged(runs)


def _add_runs(runs: list[tuple[int, int]], entries: bytes, cs: int, aligned: int) -> bool:
    """Append the runs of contiguous host clusters that these L2 entries map; False when an
    entry is not as a clean plain image has it (COPIED exactly where an offset is)."""
    breaks = Lanes.from_bytes(entries).tagged_breaks(aligned, 0, cs)
    if breaks is None:
        return False
    start = 0
    stop = breaks.find(0x80)
    while stop >= 0:
        host = int.from_bytes(entries[start * 8 : start * 8 + 8], "big") & aligned
        if host:
            runs.append((host, (stop - start + 1) * cs))
        start = stop + 1
        stop = breaks.find(0x80, start)
    return True


def _merged(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for offset, length in sorted(runs):
        if out and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((offset, length))
    return out


def _chunks(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(offset + a, min(CHUNK_BYTES, length - a))
            for offset, length in runs for a in range(0, length, CHUNK_BYTES)]


class EarlyDiscard:
    """Punches `runs` into storage on a background thread; with `fd`, another thread drops
    their page cache first, a chunk ahead. Punching is only an optimisation: an error stops
    it quietly (the shrink frees the clusters anyway) and is kept in `error`. wait() before
    the shrink writes anything.

    The threads are _thread's, not threading's: importing threading (with functools and
    collections) costs ~3.5 ms, spent before the first punch could begin."""

    def __init__(self, storage: Storage, runs: list[tuple[int, int]], fd: int | None = None) -> None:
        self.storage = storage
        self.chunks = _chunks(runs)
        self.fd = fd
        # dropped[i] is held until chunk i's cache is dropped
        self.dropped = [_thread.allocate_lock() for _ in self.chunks]
        for lock in self.dropped:
            lock.acquire()
        self.running: list[_thread.LockType] = []  # each held until its thread is done
        self.error: BaseException | None = None
        self.interval = sys.getswitchinterval()

    def start(self) -> EarlyDiscard:
        sys.setswitchinterval(min(self.interval, SWITCH_INTERVAL))
        if self.fd is not None:
            self._spawn(self._drop_cache)
        else:
            for lock in self.dropped:
                lock.release()
        self._spawn(self._punch)
        return self

    def _spawn(self, work: Callable[[], None]) -> None:
        done = _thread.allocate_lock()
        done.acquire()

        def run() -> None:
            try:
                work()
            finally:
                done.release()

        self.running.append(done)
        _thread.start_new_thread(run, ())

    def _drop_cache(self) -> None:
        assert self.fd is not None
        released = 0
        try:
            for offset, length in self.chunks:
                os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)
                self.dropped[released].release()
                released += 1
        except BaseException:
            pass  # only the cache: the punch drops it too
        finally:
            for lock in self.dropped[released:]:
                lock.release()

    def _punch(self) -> None:
        try:
            for (offset, length), lock in zip(self.chunks, self.dropped, strict=True):
                lock.acquire()
                self.storage.punch_hole(offset, length)
        except BaseException as exc:
            self.error = exc

    def wait(self) -> None:
        """Return once no thread of this discard is left running and its holes are durable:
        the shrink may reuse a punched cluster, and its write must not be undone by a punch
        that reaches the disk after it."""
        if not self.running:
            return
        while self.running:  # one at a time: an interrupted wait can be called again
            self.running[0].acquire()
            del self.running[0]
        sys.setswitchinterval(self.interval)
        self.storage.flush()


def start(storage: FileStorage, new_size: int) -> EarlyDiscard | None:
    """Begin discarding what a shrink of the image in storage (open read-write and locked)
    to new_size frees, if that is provably safe and worth it; None otherwise. Never raises
    for the image's sake: anything unexpected declines, and the shrink reports it."""
    if not storage.writable:
        return None
    try:
        runs = cropped_runs(storage, new_size, MIN_BYTES)
    except Exception:
        return None
    if not runs:
        return None
    return EarlyDiscard(storage, runs, storage.fd).start()


__all__ = ["CHUNK_BYTES", "MIN_BYTES", "PROOF_ENTRIES", "EarlyDiscard", "cropped_runs", "start"]
