"""Fuzzing harness shared by tests/fuzz and fuzz/long_run.py: the entry point both import.

Seed images are made valid by qemu-img / qemu-io (several option sets, data, snapshots,
compressed clusters, a backing file, a bitmap, an external data file). The seeds are parsed
here with plain `struct` (independently of qcow2kit) into *regions*: header fields, extension
headers, L1 / L2 / reftable / refblock entries, snapshot table fields, bitmap directory,
compressed data. A mutation picks a region, a position in it and an operation; the mutated
image is then put through every public operation. The contract: each operation either
succeeds or raises `qcow2kit.Qcow2Error`; read-only operations leave every file byte-for-byte
unchanged (content hash and mtime); nothing hangs (a per-example alarm).

The parts live in their own modules, and are re-exported here:
- seed_images.py: the seeds (Seed, SEED_NAMES, build_seeds);
- regions.py: the independent reading of a seed (Region, find_regions);
- mutations.py: the mutations (Mutation, N_OPS, mutate);
- this module: running one input against the contract (run_input, guard, time_limit,
  file_state, FuzzFailure, FuzzTimeout).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import qcow2kit
from qcow2kit import Qcow2Error
from tests.fuzz.mutations import N_OPS, Mutation, mutate
from tests.fuzz.regions import HEADER_FIELDS, OFFSET_MASK, Region, find_regions
from tests.fuzz.seed_images import QEMU_IMG, QEMU_IO, SEED_NAMES, Seed, build_seeds

__all__ = [
    "CHUNK",
    "EXAMPLE_TIMEOUT_S",
    "FULL_READ_LIMIT",
    "HEADER_FIELDS",
    "N_OPS",
    "OFFSET_MASK",
    "QEMU_IMG",
    "QEMU_IO",
    "SEED_NAMES",
    "FuzzFailure",
    "FuzzTimeout",
    "Mutation",
    "Region",
    "Seed",
    "build_seeds",
    "file_state",
    "find_regions",
    "guard",
    "mutate",
    "run_input",
    "time_limit",
]

EXAMPLE_TIMEOUT_S = 20.0
FULL_READ_LIMIT = 8 << 20
CHUNK = 1 << 20


class FuzzTimeout(BaseException):
    """An operation ran past EXAMPLE_TIMEOUT_S: treated as a hang."""


class FuzzFailure(AssertionError):  # noqa: N818 - reads better in reports
    pass


# ---- running one input ---------------------------------------------------------------


def file_state(path: Path) -> tuple[str, int]:
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns


_timed_out: list[bool] = [False]


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise FuzzTimeout after `seconds`; the flag also catches a timeout that a cleanup
    handler (an image's close on the way out) replaced with another exception."""
    _timed_out[0] = False

    def on_alarm(signum: int, frame: Any) -> None:
        _timed_out[0] = True
        raise FuzzTimeout(f"operation ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def guard(what: str, fn: Callable[[], object]) -> bool:
    """Run fn; True if it succeeded, False if it raised a Qcow2Error; anything else fails."""
    try:
        fn()
        return True
    except Qcow2Error:
        if _timed_out[0]:
            raise FuzzTimeout(f"{what}: timed out (then a Qcow2Error on the way out)") from None
        return False
    except FuzzTimeout:
        raise
    except Exception as exc:
        raise FuzzFailure(f"{what}: {type(exc).__name__}: {exc}") from exc


def _read_everything(img: Any) -> None:
    size = img.virtual_size
    if size <= FULL_READ_LIMIT:
        pos = 0
        while pos < size:
            n = min(CHUNK, size - pos)
            img.read(pos, n)
            pos += n
    else:
        for off in (0, size // 2, max(0, size - CHUNK)):
            img.read(off, min(CHUNK, size - off))
    img.runs(0, size)
    list(img.snapshots)
    hdr = img.header
    _ = hdr.bitmaps, hdr.backing_format, hdr.data_file


def _write_ops(img: Any, rnd: int) -> None:
    size = img.virtual_size
    if size == 0:
        return
    cs = img.cluster_size
    offs = [0, min(size - 1, 4096 + 100), max(0, size - 3000), (rnd * 512) % size]
    for i, off in enumerate(offs):
        n = min(size - off, 3000 + cs * (i % 3))
        if i % 4 == 0:
            img.write(off, bytes([i + 1]) * n)
        elif i % 4 == 1:
            img.write_zeroes(off, n)
        elif i % 4 == 2:
            img.discard(off, n)
        else:
            img.write(off, b"\x5a" * n)
    img.read(0, min(size, 64 << 10))
    img.flush()


def _find(module: str, *names: str) -> Callable[..., Any] | None:
    """A function of a module other developers may not have written yet."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    for name in names:
        fn = getattr(mod, name, None)
        if callable(fn):
            return fn  # type: ignore[no-any-return]
    return None


def _optional_ops() -> list[tuple[str, Callable[[str], object]]]:
    """Read-only whole-image operations (verbs) that exist in this tree, called through
    their Python functions (the CLI would turn errors into messages and hide bugs)."""
    ops: list[tuple[str, Callable[[str], object]]] = []
    info = _find("qcow2kit.ops.info", "chain_info")
    if info is not None:
        ops.append(("info", lambda p: info(p, force_share=True)))
    mapper = _find("qcow2kit.ops.map", "map_path")
    if mapper is not None:
        ops.append(("map", lambda p: mapper(p, force_share=True)))
    checker = _find("qcow2kit.ops.check", "check_path")
    if checker is not None:
        ops.append(("check", lambda p: checker(p)))
    return ops


def _resize(path: str, rnd: int) -> None:
    with qcow2kit.open(path, "r+") as img:
        size = img.virtual_size
        resize = getattr(img, "resize", None)
        if resize is None or size > 1 << 40:
            return
        resize(size + (1 << 20))
        resize(max(512, (size // 2) & ~511), shrink=True)


def _compact(path: str, rnd: int) -> None:
    with qcow2kit.open(path, "r+") as img:
        compact = getattr(img, "compact", None)
        if compact is not None:
            compact(discard_zeroes=bool(rnd & 1))


def _heavy_ops(rnd: int) -> list[tuple[str, Callable[[str], object]]]:
    """Whole-image writing operations, on the (already mutated and written) copy."""
    ops: list[tuple[str, Callable[[str], object]]] = [
        ("resize", lambda p: _resize(p, rnd)),
        ("compact", lambda p: _compact(p, rnd)),
    ]
    checker = _find("qcow2kit.ops.check", "check_path")
    if checker is not None:
        ops.append(("check -r all", lambda p: checker(p, "all")))
    return ops


def _differential(path: Path, raw: Path) -> bool:
    """QEMU as the oracle: where qemu-img can convert the mutated image too, the guest
    bytes must be the same. False when either side refuses (nothing to compare)."""
    got: list[bytes] = []

    def read() -> None:
        with qcow2kit.open(str(path), "r") as img:
            if img.virtual_size <= FULL_READ_LIMIT:
                got.append(img.read(0, img.virtual_size))

    if not guard("differential read", read) or not got:
        return False
    ours = got[0]
    res = subprocess.run([QEMU_IMG, "convert", "-U", "-f", "qcow2", "-O", "raw", str(path), str(raw)],
                         capture_output=True, text=True, errors="replace", timeout=60)
    if res.returncode != 0:
        return False
    theirs = raw.read_bytes()
    raw.unlink()
    if len(theirs) == len(ours) // 512 * 512:
        ours = ours[: len(theirs)]  # QEMU counts the virtual size in whole 512-byte sectors
    if theirs != ours:
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), -1)
        raise FuzzFailure(
            f"guest data differs from qemu-img's ({len(ours)} vs {len(theirs)} bytes, first "
            f"difference at {first})"
        )
    return True


def run_input(
    work: Path,
    seed: Seed,
    data: bytes,
    rnd: int = 0,
    *,
    writes: bool = True,
    heavy: bool = True,
    differential: bool = False,
    timeout: float = EXAMPLE_TIMEOUT_S,
) -> dict[str, bool]:
    """Exercise one image; raise FuzzFailure/FuzzTimeout on a contract violation."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for name, content in seed.aux.items():
        (work / name).write_bytes(content)
    path = work / "seed.qcow2"
    path.write_bytes(data)
    files = [path, *(work / n for n in seed.aux)]
    before = {f: file_state(f) for f in files}
    outcome: dict[str, bool] = {}
    with time_limit(timeout):

        def read_only() -> None:
            with qcow2kit.open(str(path), "r") as img:
                _read_everything(img)

        outcome["read"] = guard("open r / read", read_only)

        def no_backing() -> None:
            with qcow2kit.open(str(path), "r", backing=False, force_share=True) as img:
                img.read(0, min(img.virtual_size, 1 << 20))

        outcome["no-backing"] = guard("open r backing=False", no_backing)
        for name, op in _optional_ops():
            outcome[name] = guard(name, lambda op=op: op(str(path)))  # type: ignore[misc]
        if differential and outcome["read"]:
            outcome["same-as-qemu"] = _differential(path, work.parent / "qemu-out.raw")
        after = {f: file_state(f) for f in files}
        if after != before:
            changed = [str(f) for f in files if after[f] != before[f]]
            raise FuzzFailure(f"read-only operations changed {changed}")
        if writes:

            def write_path() -> None:
                with qcow2kit.open(str(path), "r+") as img:
                    _write_ops(img, rnd)

            outcome["write"] = guard("open r+ / write", write_path)
            if heavy:
                for name, op in _heavy_ops(rnd):
                    outcome[name] = guard(name, lambda op=op: op(str(path)))  # type: ignore[misc]

            def reopen() -> None:
                with qcow2kit.open(str(path), "r") as img:
                    img.read(0, min(img.virtual_size, 256 << 10))

            outcome["reopen"] = guard("reopen after writes", reopen)
    return outcome
