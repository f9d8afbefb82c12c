#!/usr/bin/env python3
"""Long-running fuzzer for nightly use: the tests/fuzz harness with a large hypothesis budget.

    python fuzz/long_run.py --seconds 3600            # an hour, random seeds, heavy ops on
    python fuzz/long_run.py --examples 20000 --no-heavy
    python fuzz/long_run.py --seconds 600 --seed 42   # reproducible

Seed images are made by qemu-img (see tests/fuzz/harness.py), mutated (header fields,
extension lengths, L1/L2/refcount entries, snapshot table, random bytes in metadata), then
put through open / read / runs / info / map / check and, on copies, write / write_zeroes /
discard / resize / compact / check -r all. Each operation must succeed or raise a
qcow2kit.Qcow2Error, leave files untouched when read-only, and finish within the per-input
timeout and address-space limit. On the first failure hypothesis shrinks the input; the
script prints it, saves the image under --out, and exits 1. Otherwise it prints how many
inputs ran without failure.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import seed as seed_fn  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from tests.fuzz import harness as H  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600.0, help="time budget (default 600)")
    ap.add_argument("--examples", type=int, default=0, help="stop after this many inputs (0: no limit)")
    ap.add_argument("--batch", type=int, default=1000, help="hypothesis examples per batch")
    ap.add_argument("--no-heavy", dest="heavy", action="store_false",
                    help="skip resize / compact / check -r all on the copies")
    ap.add_argument("--differential", action="store_true",
                    help="also compare the guest data with qemu-img convert's where both read it")
    ap.add_argument("--seed", type=int, default=None, help="random seed of the first batch")
    ap.add_argument("--skip-batches", type=int, default=0,
                    help="with --seed: start at this batch of that run (to replay a failure)")
    ap.add_argument("--timeout", type=float, default=H.EXAMPLE_TIMEOUT_S, help="per-input timeout (s)")
    ap.add_argument("--out", type=Path, default=Path("fuzz-failures"), help="where failing inputs go")
    ap.add_argument("--max-memory-mb", type=int, default=2048,
                    help="address-space limit: an input that needs more fails with MemoryError")
    args = ap.parse_args(argv)
    if args.max_memory_mb:
        import resource

        limit = args.max_memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="qcow2kit-fuzz-", dir=shm))
    try:
        return _run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run(args: argparse.Namespace, root: Path) -> int:
    t0 = time.monotonic()
    seeds = H.build_seeds(root / "seeds")
    print(f"{len(seeds)} seed images built in {time.monotonic() - t0:.1f} s", flush=True)
    work = root / "w"
    count = [0]
    outcomes: collections.Counter[tuple[str, bool]] = collections.Counter()
    last: list[bytes] = [b""]

    mutation = st.tuples(
        st.integers(0, 255), st.integers(0, 1 << 16), st.integers(0, 1 << 32),
        st.integers(0, H.N_OPS - 1), st.integers(0, (1 << 64) - 1),
    )

    def body(seed_index: int, muts: list[H.Mutation], rnd: int) -> None:
        seed = seeds[seed_index]
        data = H.mutate(seed, muts)
        last[0] = data
        count[0] += 1
        try:
            out = H.run_input(work, seed, data, rnd, heavy=args.heavy,
                              differential=args.differential, timeout=args.timeout)
        except H.FuzzTimeout as exc:  # a BaseException: made an assertion so hypothesis shrinks it
            raise H.FuzzFailure(f"hang: {exc}") from None
        for k, v in out.items():
            outcomes[(k, v)] += 1

    def batch_test(batch: int, batch_seed: int) -> Callable[[], None]:
        """A fresh @given function per batch (a settings object binds only once)."""
        test = given(
            seed_index=st.integers(0, len(seeds) - 1),
            muts=st.lists(mutation, min_size=1, max_size=6),
            rnd=st.integers(0, 1 << 32),
        )(lambda seed_index, muts, rnd: body(seed_index, muts, rnd))
        test = settings(
            max_examples=batch, deadline=None, database=None, derandomize=False,
            suppress_health_check=list(HealthCheck), print_blob=True,
            # no explain phase: it traces every example, which costs time and memory
            phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
        )(test)
        return seed_fn(batch_seed)(test)  # type: ignore[no-any-return]

    rng = random.Random(args.seed)
    deadline = t0 + args.seconds
    batches = 0
    while time.monotonic() < deadline and (not args.examples or count[0] < args.examples):
        batch = args.batch if not args.examples else min(args.batch, args.examples - count[0])
        seed = rng.getrandbits(64)
        if batches < args.skip_batches:  # replay a later batch of a logged run
            batches += 1
            continue
        try:
            batch_test(batch, seed)()
        except H.FuzzFailure as exc:
            args.out.mkdir(parents=True, exist_ok=True)
            dest = args.out / f"failure-{int(time.time())}.qcow2"
            dest.write_bytes(last[0])
            print(f"FAILURE after {count[0]} inputs (batch seed {seed}): {exc}", flush=True)
            print(f"last (shrunk) input saved to {dest}", flush=True)
            return 1
        batches += 1
        elapsed = time.monotonic() - t0
        print(f"batch {batches}: {count[0]} inputs without failure, {elapsed:.0f} s", flush=True)
    print("outcomes (operation, succeeded): " + ", ".join(
        f"{k[0]}={'ok' if k[1] else 'refused'}:{v}" for k, v in sorted(outcomes.items())))
    print(f"{count[0]} inputs ran without failure in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
