"""Fault injection for crash and error-path tests.

RecordingStorage and FaultyStorage live in storages.py (re-exported here).
crash_images
    Rebuilds the images a power cut could leave behind: every prefix of the log, sampled
    subsets of the writes of each flush epoch (unflushed writes may be lost, or torn at sector
    granularity) on top of the state at that epoch's start, and (drop_one) each metadata write
    lost alone.
check_crash_states
    Writes each such image to a file and asks ``qemu-img check`` that it has no corruption
    (leaks are allowed), then calls a caller's verify(path).
This module is test support: nothing under src/ outside qcow2kit.testing imports it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .storages import FaultyStorage, LogEntry, RecordingStorage, apply_op

SECTOR = 512
_HEADER_INCOMPAT_OFFSET = 72
_DIRTY_BIT = 1



def _describe(op: LogEntry, event: str | None) -> str:
    kind = op[0]
    if kind == "write":
        what = f"write {len(op[2])}@{op[1]:#x}"
    elif kind == "truncate":
        what = f"truncate {op[1]:#x}"
    elif kind in ("punch", "allocate"):
        what = f"{kind} {op[2]}@{op[1]:#x}"
    else:
        what = kind
    return f"{what} ({event})" if event else what


# ---------------------------------------------------------------------------------------------
# crash states
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Prefix:
    k: int  # number of ops applied


@dataclass(frozen=True)
class _Sample:
    epoch: int
    start: int  # ops[start:end] are the epoch's state-changing ops; state at start is the base
    end: int
    keep: tuple[int, ...]  # indices (into ops) of the ops that reached the disk, program order
    torn: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (op index, sectors that reached disk)
    index: int = 0
    dropped: int = -1  # a drop-one state: every op of the epoch but this one landed


@dataclass
class _Plan:
    ops: list[LogEntry]
    events: list[str | None]
    states: list[_Prefix | _Sample] = field(default_factory=list)


def _split_log(log: Sequence[LogEntry]) -> tuple[list[LogEntry], list[str | None]]:
    ops: list[LogEntry] = []
    events: list[str | None] = []
    last_event: str | None = None
    for entry in log:
        if entry[0] == "event":
            last_event = str(entry[1])
            continue
        ops.append(entry)
        events.append(last_event if entry[0] != "flush" else None)
        if entry[0] != "flush":
            last_event = None
    return ops, events


def _epochs(ops: Sequence[LogEntry]) -> list[tuple[int, int]]:
    """[start, end) ranges of ops between flushes (flush ops excluded)."""
    out: list[tuple[int, int]] = []
    start = 0
    for i, op in enumerate(ops):
        if op[0] == "flush":
            if i > start:
                out.append((start, i))
            start = i + 1
    if len(ops) > start:
        out.append((start, len(ops)))
    return out


def _plan(
    log: Sequence[LogEntry], reorder_samples: int, seed: int, drop_one: bool = False
) -> _Plan:
    ops, events = _split_log(log)
    plan = _Plan(ops, events)
    # every prefix whose state differs from the previous one (a flush changes no bytes)
    plan.states.append(_Prefix(0))
    for k in range(1, len(ops) + 1):
        if ops[k - 1][0] != "flush":
            plan.states.append(_Prefix(k))
    if drop_one:
        # every metadata write of an epoch lost while everything else of the epoch landed:
        # finds each "B must not land without A" ordering systematically
        for e, (start, end) in enumerate(_epochs(ops)):
            meta = [i for i in range(start, end) if events[i] is not None]
            # losing the last metadata write of an epoch only leaves data writes after it
            # (data goes to clusters nothing references yet): the prefixes cover that
            for i in meta[:-1]:
                keep = tuple(k for k in range(start, end) if k != i)
                plan.states.append(_Sample(e, start, end, keep, (), 0, dropped=i))
    if reorder_samples <= 0:
        return plan
    rng = random.Random(seed)
    for e, (start, end) in enumerate(_epochs(ops)):
        n = end - start
        if n < 2:
            continue
        seen: set[tuple[tuple[int, ...], tuple[tuple[int, tuple[int, ...]], ...]]] = set()
        for j in range(reorder_samples):
            p = rng.random()
            keep = tuple(i for i in range(start, end) if rng.random() < p)
            torn: list[tuple[int, tuple[int, ...]]] = []
            # sometimes tear one multi-sector write: only some of its sectors made it
            multi = [i for i in keep if ops[i][0] == "write" and len(ops[i][2]) > SECTOR]
            if multi and rng.random() < 0.5:
                i = rng.choice(multi)
                nsec = -(-len(ops[i][2]) // SECTOR)
                sectors = tuple(s for s in range(nsec) if rng.random() < 0.5)
                torn.append((i, sectors))
            key = (keep, tuple(torn))
            # a sample equal to a prefix adds nothing; nor does a repeat
            is_prefix = not torn and keep == tuple(range(start, start + len(keep)))
            if key in seen or is_prefix:
                continue
            seen.add(key)
            plan.states.append(_Sample(e, start, end, keep, tuple(torn), j))
    return plan


def _apply_torn(buf: bytearray, op: LogEntry, sectors: tuple[int, ...]) -> None:
    offset, data = op[1], op[2]
    for s in sectors:
        piece = data[s * SECTOR : (s + 1) * SECTOR]
        apply_op(buf, ("write", offset + s * SECTOR, piece))


def _materialise(
    initial: bytes, plan: _Plan, selected: Sequence[_Prefix | _Sample]
) -> Iterator[tuple[str, bytes]]:
    ops, events = plan.ops, plan.events
    prefixes = sorted({s.k for s in selected if isinstance(s, _Prefix)})
    samples: dict[int, list[_Sample]] = {}
    for s in selected:
        if isinstance(s, _Sample):
            samples.setdefault(s.start, []).append(s)
    total = len(ops)
    buf = bytearray(initial)
    pi = 0
    for k in range(total + 1):
        # state after ops[:k]
        if k in samples:
            base = bytes(buf)
            for s in samples[k]:
                state = bytearray(base)
                torn = dict(s.torn)
                for i in s.keep:
                    if i in torn:
                        _apply_torn(state, ops[i], torn[i])
                    else:
                        apply_op(state, ops[i])
                tear = f", torn {len(s.torn)}" if s.torn else ""
                if s.dropped >= 0:
                    what = _describe(ops[s.dropped], events[s.dropped])
                    label = f"epoch {s.epoch} (ops {s.start}..{s.end - 1}) lost op {s.dropped}: {what}"
                else:
                    label = (
                        f"epoch {s.epoch} (ops {s.start}..{s.end - 1}) sample {s.index}: "
                        f"kept {len(s.keep)}/{s.end - s.start}{tear}"
                    )
                yield label, bytes(state)
        if pi < len(prefixes) and prefixes[pi] == k:
            last = f" after {_describe(ops[k - 1], events[k - 1])}" if k else ""
            yield f"prefix {k}/{total}{last}", bytes(buf)
            pi += 1
        if k < total:
            apply_op(buf, ops[k])


def crash_images(
    initial: bytes,
    log: Sequence[LogEntry],
    *,
    reorder_samples: int = 0,
    seed: int = 0,
    max_states: int | None = None,
    drop_one: bool = False,
) -> Iterator[tuple[str, bytes]]:
    """Yield (label, image bytes) for every state a power cut during `log` could leave.

    Every prefix: the power went out after op k (flushes change no bytes, so the state after a
    flush is not repeated). With reorder_samples > 0, for every flush epoch (the ops between two
    flushes, or after the last one), that many random subsets of the epoch's writes (truncates
    and punches count as writes) applied in program order on top of the state at the epoch's
    start; sometimes one multi-sector write is torn at 512-byte sectors. Overlapping writes keep
    their program order (a device never lets an older write overtake a newer one to the same
    sector), so a subset stands for every order of the kept writes.

    With drop_one, also, for every metadata write (an op preceded by storage.event) except the
    last metadata write of its epoch, the state where just that write was lost and the rest of
    its epoch landed: each "B must not reach the disk without A" rule is tried systematically.

    With max_states, a seeded sample of at most that many states is yielded (always including
    the empty and the full prefix; the budget is shared between prefixes, drop-one states and
    random subsets).
    """
    plan = _plan(log, reorder_samples, seed, drop_one)
    states = plan.states
    if max_states is not None and len(states) > max_states:
        states = _sample_states(states, max_states, seed)
    yield from _materialise(initial, plan, states)


def _sample_states(
    states: list[_Prefix | _Sample], max_states: int, seed: int
) -> list[_Prefix | _Sample]:
    prefixes = [s for s in states if isinstance(s, _Prefix)]
    drops = [s for s in states if isinstance(s, _Sample) and s.dropped >= 0]
    others = [s for s in states if isinstance(s, _Sample) and s.dropped < 0]
    rng = random.Random(seed ^ 0x5EED)
    groups = [g for g in (prefixes[1:-1], drops, others) if g]
    chosen: list[_Prefix | _Sample] = [prefixes[0]]
    if len(prefixes) > 1:
        chosen.append(prefixes[-1])
    budget = max(0, max_states - len(chosen))
    # share the budget evenly; what a small group does not use goes to the others
    for k, group in enumerate(sorted(groups, key=len)):
        share = budget // (len(groups) - k)
        take = min(len(group), share)
        chosen += rng.sample(group, take)
        budget -= take
    return chosen


def is_prefix_label(label: str) -> bool:
    """True for a crash_images label of a prefix state (every op up to k, in order)."""
    return label.startswith("prefix ")


def count_states(
    log: Sequence[LogEntry], *, reorder_samples: int = 0, seed: int = 0, drop_one: bool = False
) -> int:
    """How many states crash_images would yield without max_states."""
    return len(_plan(log, reorder_samples, seed, drop_one).states)


# ---------------------------------------------------------------------------------------------
# checking
# ---------------------------------------------------------------------------------------------
class CrashStateError(AssertionError):
    """A crash state that qemu-img check does not accept."""


def _qemu_img() -> str:
    exe = shutil.which("qemu-img")
    if exe is None:
        raise RuntimeError("qemu-img is required for crash checks (Debian package qemu-utils)")
    return exe


def qemu_check_json(path: str, *, repair: str | None = None) -> dict[str, Any]:
    """Run `qemu-img check --output=json [-r repair]`; the JSON plus 'rc' and 'stderr'."""
    argv = [_qemu_img(), "check", "--output=json"]
    if repair:
        argv += ["-r", repair]
    argv.append(path)
    res = subprocess.run(argv, capture_output=True, text=True)
    try:
        out: dict[str, Any] = json.loads(res.stdout) if res.stdout.strip() else {}
    except json.JSONDecodeError:
        out = {}
    out["rc"] = res.returncode
    out["stderr"] = res.stderr
    out["stdout_raw"] = res.stdout
    return out


def is_dirty(image: bytes) -> bool:
    """The qcow2 v3 dirty bit (lazy refcounts: refcounts may lag behind the tables)."""
    if len(image) < 80 or struct.unpack_from(">I", image, 4)[0] < 3:
        return False
    return bool(struct.unpack_from(">Q", image, _HEADER_INCOMPAT_OFFSET)[0] & _DIRTY_BIT)


def check_crash_states(
    initial: bytes,
    log: Sequence[LogEntry],
    tmp_path: str | os.PathLike[str],
    *,
    verify: Callable[[str], None] | None = None,
    verify_state: Callable[[str, str], None] | None = None,
    reorder_samples: int = 4,
    max_states: int | None = 300,
    seed: int = 0,
    filename: str = "crash-state.qcow2",
    allow_leaks: bool = True,
    drop_one: bool = False,
) -> int:
    """Check every crash state of `log` with qemu-img check; returns how many were checked.

    Each state is written to tmp_path/filename (put backing files next to it when the image
    names one by a relative path). Requirements: qemu-img check produces its JSON, reports 0
    corruptions and 0 check errors (leaks allowed unless allow_leaks=False). A state with the
    dirty bit set (lazy refcounts) is first repaired with `check -r all`, as QEMU does on open,
    and must then be clean. Then verify(path) runs, e.g. to read back data that was flushed
    before the workload; verify_state(path, label) likewise, for checks that depend on the
    kind of state (`is_prefix_label(label)`: the writes reached the disk in program order).
    drop_one adds the states where one metadata write of an epoch was lost (see
    crash_images). Failures raise CrashStateError naming the state.
    """
    path = os.path.join(os.fspath(tmp_path), filename)
    count = 0
    for label, image in crash_images(
        initial, log, reorder_samples=reorder_samples, seed=seed, max_states=max_states,
        drop_one=drop_one,
    ):
        with open(path, "wb") as f:
            f.write(image)
        repair = "all" if is_dirty(image) else None
        out = qemu_check_json(path, repair=repair)
        if repair:
            out = qemu_check_json(path)
        problems = []
        if "check-errors" not in out:
            problems.append("no JSON from qemu-img check")
        else:
            if out.get("corruptions", 0):
                problems.append(f"{out['corruptions']} corruptions")
            if out.get("check-errors", 0):
                problems.append(f"{out['check-errors']} check errors")
            if not allow_leaks and out.get("leaks", 0):
                problems.append(f"{out['leaks']} leaks")
        if problems:
            detail = out.get("stderr", "") or out.get("stdout_raw", "")
            raise CrashStateError(f"crash state {label}: {', '.join(problems)}\n{detail}")
        try:
            if verify is not None:
                verify(path)
            if verify_state is not None:
                verify_state(path, label)
        except AssertionError as exc:
            raise CrashStateError(f"crash state {label}: verify failed: {exc}") from exc
        count += 1
    return count



__all__ = [
    "CrashStateError",
    "FaultyStorage",
    "LogEntry",
    "RecordingStorage",
    "check_crash_states",
    "count_states",
    "crash_images",
    "is_dirty",
    "is_prefix_label",
    "qemu_check_json",
]
