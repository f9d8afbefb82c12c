#!/usr/bin/env python3
"""Side-by-side benchmark (issue 16): the qcow2kit CLI against qemu-img 7.2 on the same inputs.

    python bench/compare.py [--pairs N] [--only NAME ...] [--quick] [--markdown] [--dir DIR]

Every workload of issue 16's table runs as separate processes (start-up included, as a user
sees it), alternately: qcow2kit then qemu-img in even pairs, qemu-img then qcow2kit in odd
ones, with `os.sync()` before each timed run so that no run pays for the other's write-back.
For each workload it prints both tools' medians, the median of the per-pair ratios
qcow2kit / qemu-img (below 1 means qcow2kit is faster), their range, the issue's target and
whether the median holds it. The start-up workload compares `qcow2kit info small.qcow2` with
the bare interpreter (`python -c pass`) instead of qemu-img.

Inputs are built once per run with qemu-img / qemu-io (and Python for the raw files) under a
temporary directory on the filesystem of /work (ext4; about 9 GiB at the full sizes) and
deleted at the end. Only the inputs of the selected workloads are built. The first pair also
checks that both tools produced the same result (not timed); --no-verify skips that.

--quick: 64 MiB instead of 1 GiB (16 MiB of text instead of 256 MiB; the 1 TiB images stay,
they are sparse), 3 pairs: a smoke run, not a measurement.
--markdown: also print the README table (date, machine, tool versions).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40

VENV = Path(__file__).resolve().parent.parent / ".venv" / "bin"
QCOW2KIT = str(VENV / "qcow2kit")
PYTHON = str(VENV / "python")


def sh(*argv: str, stdin: str | None = None) -> None:
    """Run a set-up command; fail loudly with its output."""
    res = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])}... failed ({res.returncode}): {res.stderr[-2000:]}")


def human(n: int) -> str:
    for unit, size in (("T", TIB), ("G", GIB), ("M", MIB), ("K", KIB)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


class Inputs:
    """The input files, each built on first use and kept for the whole run."""

    def __init__(self, root: Path, size: int, text_size: int) -> None:
        self.root = root
        self.size = size
        self.text_size = text_size
        self._built: dict[str, Path] = {}

    def get(self, name: str) -> Path:
        if name not in self._built:
            t0 = time.perf_counter()
            path = getattr(self, "_make_" + name)(self.root / name)
            self._built[name] = path
            print(f"#   input {name}: {path.stat().st_size / MIB:.1f} MiB, built in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
        return self._built[name]

    # raw sources ------------------------------------------------------------------------
    def _make_random_raw(self, p: Path) -> Path:
        with open(p, "wb") as f:
            for _ in range(self.size // MIB):
                f.write(os.urandom(MIB))
        return p

    def _make_half_raw(self, p: Path) -> Path:
        """Alternate 1 MiB of random data and 1 MiB of written zeros (not holes)."""
        zero = bytes(MIB)
        with open(p, "wb") as f:
            for i in range(self.size // MIB):
                f.write(os.urandom(MIB) if i % 2 else zero)
        return p

    def _make_text_raw(self, p: Path) -> Path:
        """Pseudo English text: words of a 4,000-word vocabulary with Zipf-like frequencies.

        8 MiB are generated and written rotated by a different offset each time (qcow2
        compresses each cluster on its own, so this costs the same as unique text)."""
        r = random.Random(16)
        letters = "etaoinshrdlcumwfgypbvkjxqz"
        vocab = ["".join(r.choices(letters, weights=range(26, 0, -1), k=r.randint(1, 10)))
                 for _ in range(4000)]
        weights = [1 / (i + 1) for i in range(len(vocab))]
        chunk_len = min(8 * MIB, self.text_size)
        words = r.choices(vocab, weights=weights, k=chunk_len // 5)
        for i in range(60, len(words), 97):  # some line breaks and punctuation
            words[i] += ".\n"
        text = (" ".join(words).encode() * 2)[:chunk_len]
        with open(p, "wb") as f:
            for k in range(self.text_size // chunk_len):
                off = (k * 7919) % chunk_len
                f.write(text[off:] + text[:off])
        return p

    # qcow2 images -----------------------------------------------------------------------
    def _dense(self, p: Path, cluster: str) -> Path:
        sh("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={cluster}",
           str(self.get("random_raw")), str(p))
        return p

    def _make_full_qcow2(self, p: Path) -> Path:
        return self._dense(p, "64k")

    def _make_dense4k_qcow2(self, p: Path) -> Path:
        return self._dense(p, "4k")

    def _make_dense512_qcow2(self, p: Path) -> Path:
        return self._dense(p, "512")

    def _make_reverse4k_qcow2(self, p: Path) -> Path:
        """4 KiB clusters, fully written in 64 KiB chunks from the end to the start."""
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(p), str(self.size))
        chunk = 64 * KIB
        script = "".join(f"write -q -P {1 + i % 255} {off} {chunk}\n"
                         for i, off in enumerate(range(self.size - chunk, -1, -chunk)))
        sh("qemu-io", "-f", "qcow2", str(p), stdin=script)
        return p

    def _make_l2x1024_qcow2(self, p: Path) -> Path:
        """1 TiB, 64 KiB clusters (one L2 table maps 512 MiB): one cluster written at the start
        of every GiB, so 1,024 L2 tables."""
        sh("qemu-img", "create", "-q", "-f", "qcow2", str(p), "1T")
        script = "".join(f"write -q -P {1 + i % 255} {i}G 64k\n" for i in range(1024))
        sh("qemu-io", "-f", "qcow2", str(p), stdin=script)
        return p

    def _make_sparse1t_qcow2(self, p: Path) -> Path:
        """1 TiB, a few MiB written at both ends and in the middle (as bench_check.py)."""
        sh("qemu-img", "create", "-q", "-f", "qcow2", str(p), "1T")
        sh("qemu-io", "-f", "qcow2", "-c", "write -q -P 1 0 4M", "-c", "write -q -P 2 1023G 4M",
           "-c", "write -q -P 3 512G 1M", str(p))
        return p

    def _make_shrink_sparse_qcow2(self, p: Path) -> Path:
        """1 TiB with 1 MiB of data, half at each end (as bench_shrink.py)."""
        sh("qemu-img", "create", "-q", "-f", "qcow2", str(p), "1T")
        sh("qemu-io", "-f", "qcow2", "-c", "write -q -P 1 0 512K", "-c", "write -q -P 2 1023G 512K",
           str(p))
        return p

    def _make_shrink_full_qcow2(self, p: Path) -> Path:
        sh("qemu-img", "create", "-q", "-f", "qcow2", str(p), str(self.size))
        sh("qemu-io", "-f", "qcow2", "-c", f"write -q -P 3 0 {self.size}", str(p))
        return p

    def _make_small_qcow2(self, p: Path) -> Path:
        sh("qemu-img", "create", "-q", "-f", "qcow2", str(p), "64M")
        sh("qemu-io", "-f", "qcow2", "-c", "write -q -P 1 0 1M", str(p))
        return p


def label(n: int) -> str:
    return f"{n // GIB} GiB" if n >= GIB else f"{n // MIB} MiB"


@dataclass
class Workload:
    name: str  # for --only
    title: str  # the line of issue 16's table
    target: float  # the median ratio must be at or below this
    target_text: str
    # (inputs, out) -> (qcow2kit argv, reference argv); argv may name `out`
    argv: Callable[[Inputs, Path], tuple[list[str], list[str]]]
    # made fresh before every run (removed first): None, or (input name) to copy to `out`
    fresh_copy: str | None = None
    # how to compare the two results in the first pair: "stdout-json", "convert-raw",
    # "convert-qcow2", "resize" or None
    verify: str | None = None
    reference: str = "qemu-img"
    source: str = ""  # input compared against for the convert verifications
    notes: list[str] = field(default_factory=list)


def workloads(size: int, text_size: int) -> list[Workload]:
    s, t = label(size), label(text_size)
    shrunk = human(size // 4)
    q = QCOW2KIT

    def conv(src: str, *opts: str) -> Callable[[Inputs, Path], tuple[list[str], list[str]]]:
        return lambda i, o: ([q, "convert", "-q", *opts, str(i.get(src)), str(o)],
                             ["qemu-img", "convert", "-q", *opts, str(i.get(src)), str(o)])

    def same(cmd: str, img: str, *opts: str) -> Callable[[Inputs, Path], tuple[list[str], list[str]]]:
        return lambda i, o: ([q, cmd, *opts, str(i.get(img))], ["qemu-img", cmd, *opts, str(i.get(img))])

    def shrink(to: str) -> Callable[[Inputs, Path], tuple[list[str], list[str]]]:
        return lambda i, o: ([q, "resize", "-q", "--shrink", str(o), to],
                             ["qemu-img", "resize", "-q", "--shrink", str(o), to])

    qc = ("-f", "raw", "-O", "qcow2")
    return [
        Workload("convert-random", f"convert -f raw -O qcow2, {s} random data", 1.0, "<= 1.0",
                 conv("random_raw", *qc), verify="convert-qcow2", source="random_raw"),
        Workload("convert-halfzero", f"convert -f raw -O qcow2, {s} half zero blocks", 1.0, "<= 1.0",
                 conv("half_raw", *qc), verify="convert-qcow2", source="half_raw"),
        Workload("convert-to-raw", f"convert -O raw, {s} fully allocated qcow2", 1.0, "<= 1.0",
                 conv("full_qcow2", "-f", "qcow2", "-O", "raw"), verify="convert-raw",
                 source="full_qcow2"),
        Workload("check-l2x1024", "check, 1 TiB image with 1,024 L2 tables", 1.0, "<= 1.0",
                 same("check", "l2x1024_qcow2", "--output=json"), verify="stdout-json"),
        Workload("check-dense4k", f"check, {s} dense, 4 KiB clusters", 1.0, "<= 1.0",
                 same("check", "dense4k_qcow2", "--output=json"), verify="stdout-json"),
        Workload("map-reverse4k", f"map --output=json, {s} dense, 4 KiB clusters written in reverse "
                 "64 KiB chunks", 1.0, "<= 1.0",
                 same("map", "reverse4k_qcow2", "--output=json"), verify="stdout-json"),
        Workload("shrink-full", f"resize --shrink, {s} fully written -> {label(size // 4)}", 1.0, "<= 1.0",
                 shrink(shrunk), fresh_copy="shrink_full_qcow2", verify="resize"),
        Workload("startup", "`info` of a small image vs the bare interpreter (`python -c pass`)",
                 3.0, "<= 3x",
                 lambda i, o: ([q, "info", str(i.get("small_qcow2"))], [PYTHON, "-c", "pass"]),
                 reference="python -c pass"),
        Workload("map-sparse1t", "map --output=json, 1 TiB sparse", 0.55, "keep (<= 0.55)",
                 same("map", "sparse1t_qcow2", "--output=json"), verify="stdout-json"),
        Workload("check-dense512", f"check, {s} dense, 512 B clusters", 0.19, "keep (<= 0.19)",
                 same("check", "dense512_qcow2", "--output=json"), verify="stdout-json"),
        Workload("shrink-sparse1t", "resize --shrink 1 TiB sparse -> 1 GiB", 0.1, "<= 0.1 with margin",
                 shrink("1G"), fresh_copy="shrink_sparse_qcow2", verify="resize"),
        Workload("convert-zlib", f"convert -c zlib, {t} of text", 0.55, "keep (<= 0.55)",
                 conv("text_raw", *qc, "-c"), verify="convert-qcow2", source="text_raw"),
        Workload("convert-zstd", f"convert -c zstd, {t} of text", 0.45, "keep (<= 0.45)",
                 conv("text_raw", *qc, "-c", "-o", "compression_type=zstd"), verify="convert-qcow2",
                 source="text_raw"),
    ]


@dataclass
class Result:
    work: Workload
    ours: list[float]
    ref: list[float]
    verified: str

    @property
    def ratios(self) -> list[float]:
        return [o / r for o, r in zip(self.ours, self.ref, strict=True)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def holds(self) -> bool:
        return self.ratio <= self.work.target


def run_once(argv: list[str], out: Path, fresh: Path | None,
             env: dict[str, str] | None = None) -> tuple[float, str]:
    """One timed run: prepare `out` (remove it, or copy a fresh image there), sync, run."""
    if out.exists():
        out.unlink()
    if fresh is not None:
        shutil.copyfile(fresh, out)
    os.sync()
    t0 = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr[-2000:]}")
    return elapsed, res.stdout


def verify(w: Workload, inputs: Inputs, out: Path, stdout: str, ref_out: Path | None,
           ref_stdout: str) -> str:
    """Compare qcow2kit's result (out, stdout) with qemu-img's (ref_out, ref_stdout)."""
    if w.verify == "stdout-json":
        return "same JSON" if json.loads(stdout) == json.loads(ref_stdout) else "JSON DIFFERS"
    if w.verify in ("convert-qcow2", "convert-raw"):
        fmt = "qcow2" if w.verify == "convert-qcow2" else "raw"
        src = inputs.get(w.source)
        src_fmt = "qcow2" if src.name.endswith("qcow2") else "raw"
        res = subprocess.run(["qemu-img", "compare", "-q", "-f", src_fmt, "-F", fmt, str(src), str(out)])
        same = "same content" if res.returncode == 0 else "CONTENT DIFFERS"
        if fmt == "qcow2" and ref_out is not None:
            return f"{same}; size {out.stat().st_size / ref_out.stat().st_size:.3f}x qemu's"
        return same
    if w.verify == "resize":
        res = subprocess.run(["qemu-img", "check", "-q", str(out)])
        ok = "check ok" if res.returncode == 0 else "CHECK FAILS"
        if ref_out is not None:
            return f"{ok}; size {out.stat().st_size / ref_out.stat().st_size:.3f}x qemu's"
        return ok
    return ""


def run_workload(w: Workload, inputs: Inputs, pairs: int, do_verify: bool,
                 env: dict[str, str]) -> Result:
    out = inputs.root / "out"
    ref_out = inputs.root / "ref_out"
    ours_argv, ref_argv = w.argv(inputs, out)
    fresh = inputs.get(w.fresh_copy) if w.fresh_copy else None
    # qemu-img writes to its own output path so that the first pair can compare the two
    ref_argv = [str(ref_out) if a == str(out) else a for a in ref_argv]
    t_ours: list[float] = []
    t_ref: list[float] = []
    verified = ""
    # untimed warm-up of both: Python writes its bytecode caches, the page cache holds the input
    run_once(ours_argv, out, fresh, env)
    run_once(ref_argv, ref_out, fresh, env)
    for pair in range(pairs):
        order = ("ours", "ref") if pair % 2 == 0 else ("ref", "ours")
        stdout = {}
        for tool in order:
            if tool == "ours":
                t, stdout[tool] = run_once(ours_argv, out, fresh, env)
                t_ours.append(t)
            else:
                t, stdout[tool] = run_once(ref_argv, ref_out, fresh, env)
                t_ref.append(t)
        if pair == 0 and do_verify and w.verify:
            verified = verify(w, inputs, out, stdout["ours"], ref_out if ref_out.exists() else None,
                              stdout["ref"])
        for p in (out, ref_out):
            if p.exists():
                p.unlink()
    return Result(w, t_ours, t_ref, verified)


def fmt_s(t: float) -> str:
    return f"{t:.3f} s" if t < 10 else f"{t:.2f} s"


def machine() -> dict[str, str]:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    qemu = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    py = subprocess.run([PYTHON, "--version"], capture_output=True, text=True).stdout.strip()
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "nproc": str(os.cpu_count()), "cpu": cpu, "python": py, "qemu": qemu,
            "kernel": platform.release()}


def markdown(results: list[Result], info: dict[str, str], pairs: int, quick: bool, code: str) -> str:
    lines = [
        f"Measured with `python bench/compare.py` on {info['date']}: {info['nproc']} cores "
        f"({info['cpu']}), {info['python']}, {info['qemu']}; qcow2kit {code}; one untimed warm-up "
        f"run of each tool, then {pairs} pairs of alternating runs, `os.sync()` before each, "
        "Python bytecode cached; ratio = median of the per-pair ratios qcow2kit / qemu-img "
        "(below 1 means qcow2kit is faster). The machine is shared with other jobs, so timings are "
        "noisy: the range shows the lowest and highest per-pair ratio."
        + (" QUICK RUN (small sizes): not a measurement." if quick else ""),
    ]
    lines = [*textwrap.wrap(lines[0], width=100, break_on_hyphens=False), "",
        "| workload | qemu-img | qcow2kit | ratio | range | target | holds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rs = r.ratios
        lines.append(f"| {r.work.title} | {fmt_s(statistics.median(r.ref))} | "
                     f"{fmt_s(statistics.median(r.ours))} | {r.ratio:.2f} | {min(rs):.2f}-{max(rs):.2f} | "
                     f"{r.work.target_text} | {'yes' if r.holds else 'no'} |")
    if any(r.work.reference != "qemu-img" for r in results):
        lines += ["", "For the start-up line the qemu-img column is `python -c pass` (same interpreter)."]
    return "\n".join(lines)


def code_under_test(rev: str | None, src: str | None, root: Path) -> tuple[dict[str, str], str]:
    """The environment of the runs and which code they measure (also printed).

    Python runs with bytecode caches, as an installed package does: PYTHONDONTWRITEBYTECODE
    (set in some shells) is dropped and the caches go to a directory under `root`
    (PYTHONPYCACHEPREFIX), filled by each workload's warm-up run, so the checkout is not touched.
    Without this every qcow2kit process would compile its modules again."""
    checkout = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
    if rev:
        # a name such as HEAD is recorded as the commit it names
        rev = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", rev], check=True,
                             capture_output=True, text=True).stdout.strip()
        dest = root / "src-rev"
        dest.mkdir()
        archive = subprocess.run(["git", "-C", str(checkout), "archive", rev, "src"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        src = str(dest / "src")
    if src is None:
        head = subprocess.run(["git", "-C", str(checkout), "log", "-1", "--format=%h %s"],
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True).stdout.splitlines()
        code = f"working tree at {head.split()[0]}" + (f" + {len(dirty)} changed paths" if dirty else "")
        print(f"# code: the working tree (HEAD {head[:60]}; {len(dirty)} changed paths under src/)",
              flush=True)
        return env, code
    env["PYTHONPATH"] = src
    where = subprocess.run([PYTHON, "-c", "import qcow2kit; print(qcow2kit.__file__)"], env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not where.startswith(str(Path(src).resolve())) and not where.startswith(src):
        raise SystemExit(f"qcow2kit imports from {where}, not from {src}")
    code = f"revision {rev}" if rev else f"from {src}"
    print(f"# code: {code} ({where})", flush=True)
    return env, code


def default_dir() -> str:
    """The system's temporary directory if it shares the checkout's filesystem (so both
    tools and the inputs see the same disk as real use), else the checkout's parent."""
    checkout = Path(__file__).resolve().parent.parent
    tmp = tempfile.gettempdir()
    return tmp if os.stat(tmp).st_dev == os.stat(checkout).st_dev else str(checkout.parent)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=None, help="pairs of runs (default 7; 3 with --quick)")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run only this workload (repeatable; a prefix selects all it starts)")
    ap.add_argument("--quick", action="store_true", help="small sizes and 3 pairs: a smoke run")
    ap.add_argument("--markdown", action="store_true", help="also print the README table")
    ap.add_argument("--no-verify", action="store_true", help="skip comparing the tools' results")
    ap.add_argument("--dir", default=None,
                    help="where to make the temporary input directory (default: the system's "
                    "temporary directory if it is on the checkout's filesystem, else the "
                    "checkout's parent)")
    ap.add_argument("--rev", help="measure the qcow2kit source of this git revision (extracted with "
                    "git archive into the temporary directory) instead of the working tree")
    ap.add_argument("--src", help="measure the qcow2kit package under this directory (put first on "
                    "PYTHONPATH) instead of the working tree")
    ap.add_argument("--list", action="store_true", help="list the workloads and exit")
    args = ap.parse_args()
    pairs = args.pairs or (3 if args.quick else 7)
    size = 64 * MIB if args.quick else GIB
    text_size = 16 * MIB if args.quick else 256 * MIB
    all_w = workloads(size, text_size)
    if args.list:
        for w in all_w:
            print(f"{w.name:18s} {w.title} (target {w.target_text})")
        return 0
    chosen = [w for w in all_w if not args.only or any(w.name.startswith(o) for o in args.only)]
    if not chosen:
        ap.error(f"no workload matches {args.only}; --list shows the names")
    info = machine()
    print(f"# bench/compare.py, {info['date']}; nproc {info['nproc']}, {info['cpu']}, kernel "
          f"{info['kernel']}, {info['python']}, {info['qemu']}")
    print(f"# {pairs} pairs, alternating order after one untimed warm-up run of each, os.sync() "
          "before each timed run; bytecode cached (PYTHONPYCACHEPREFIX in the temporary directory); "
          f"{'QUICK (small sizes)' if args.quick else 'full sizes'}; load average at start "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    root = Path(tempfile.mkdtemp(prefix="qcow2kit-compare-", dir=args.dir or default_dir()))
    t_start = time.perf_counter()
    results: list[Result] = []
    code = ""
    try:
        env, code = code_under_test(args.rev, args.src, root)
        print(f"{'workload':18s} {'qemu-img':>9s} {'qcow2kit':>9s} {'ratio':>6s} {'range':>11s}  "
              f"{'target':18s} holds  verified", flush=True)
        inputs = Inputs(root, size, text_size)
        for w in chosen:
            r = run_workload(w, inputs, pairs, not args.no_verify, env)
            results.append(r)
            rs = r.ratios
            print(f"{w.name:18s} {statistics.median(r.ref):9.3f} {statistics.median(r.ours):9.3f} "
                  f"{r.ratio:6.2f} {min(rs):5.2f}-{max(rs):<5.2f}  {w.target_text:18s} "
                  f"{'yes' if r.holds else 'NO':5s}  {r.verified}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"# total {time.perf_counter() - t_start:.0f} s; load average at end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{sum(r.holds for r in results)}/{len(results)} targets hold")
    if args.markdown:
        print()
        print(markdown(results, info, pairs, args.quick, code))
    return 0


if __name__ == "__main__":
    sys.exit(main())
