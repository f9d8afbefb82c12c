#!/usr/bin/env python3
"""Before/after of qcow2kit itself on compare.py's workloads: two versions of the qcow2kit
CLI run alternately on the same inputs, so that a change can be judged on a noisy, shared
machine (compare.py measures one version against qemu-img; two separate compare.py runs
minutes apart see different loads).

    python bench/ab.py --before REV [--after REV] [--only NAME ...] [--pairs N] [--quick]

--after defaults to the working tree. Each workload: one untimed warm-up run of each version
(bytecode caches, page cache), then N pairs in alternating order with `os.sync()` before each
run (compare.py's run_once). Prints both medians and the median of the per-pair ratios
after / before (below 1 means the change made it faster). qemu-img is not run, and the
workloads' outputs are not compared (compare.py does that).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # noqa: E402  (the sibling script: its inputs, workloads and timed run)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="git revision measured as 'before'")
    ap.add_argument("--after", help="git revision measured as 'after' (default: the working tree)")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run only this workload (repeatable; a prefix selects all it starts)")
    ap.add_argument("--pairs", type=int, default=None, help="pairs of runs (default 7; 3 with --quick)")
    ap.add_argument("--quick", action="store_true", help="compare.py's small sizes")
    ap.add_argument("--dir", default=None, help="where to make the temporary directory")
    args = ap.parse_args()
    pairs = args.pairs or (3 if args.quick else 7)
    size = 64 * compare.MIB if args.quick else compare.GIB
    text_size = 16 * compare.MIB if args.quick else 256 * compare.MIB
    chosen = [w for w in compare.workloads(size, text_size)
              if not args.only or any(w.name.startswith(o) for o in args.only)]
    if not chosen:
        ap.error(f"no workload matches {args.only}; bench/compare.py --list shows the names")
    root = Path(tempfile.mkdtemp(prefix="qcow2kit-ab-", dir=args.dir or compare.default_dir()))
    print(f"# bench/ab.py: {pairs} pairs, alternating, os.sync() before each run; load average "
          f"at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    try:
        (root / "before").mkdir()
        (root / "after").mkdir()
        (root / "inputs").mkdir()
        env_b, code_b = compare.code_under_test(args.before, None, root / "before")
        env_a, code_a = compare.code_under_test(args.after, None, root / "after")
        print(f"# before: {code_b}; after: {code_a}")
        print(f"{'workload':18s} {'before':>9s} {'after':>9s} {'after/before':>12s} {'range':>11s}",
              flush=True)
        inputs = compare.Inputs(root / "inputs", size, text_size)
        out = root / "inputs" / "out"
        for w in chosen:
            argv, _ = w.argv(inputs, out)
            fresh = inputs.get(w.fresh_copy) if w.fresh_copy else None
            times: dict[str, list[float]] = {"before": [], "after": []}
            envs = {"before": env_b, "after": env_a}
            for which in ("before", "after"):  # untimed warm-up
                compare.run_once(argv, out, fresh, envs[which])
            for pair in range(pairs):
                order = ("before", "after") if pair % 2 == 0 else ("after", "before")
                for which in order:
                    t, _ = compare.run_once(argv, out, fresh, envs[which])
                    times[which].append(t)
            if out.exists():
                out.unlink()
            ratios = [a / b for a, b in zip(times["after"], times["before"], strict=True)]
            print(f"{w.name:18s} {statistics.median(times['before']):9.3f} "
                  f"{statistics.median(times['after']):9.3f} {statistics.median(ratios):12.2f} "
                  f"{min(ratios):5.2f}-{max(ratios):<5.2f}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"# load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{time.strftime('%H:%M UTC', time.gmtime())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
