#!/usr/bin/env python3
"""NBD server benchmark (issue 15): `qcow2kit serve` against qemu-nbd, same image, same run.

    python3 bench/bench_nbd.py [--repeat N] [--keep DIR]

The image: 1 GiB qcow2, 512 MiB of data in 512 extents of 1 MiB (every other MiB), the
rest unallocated (QEMU_FACTS_2 section 4). Both servers run at once with `-r -e 4 -t` on a
unix socket, started before the clock starts; the runs alternate between them. Each case is
a client command:
  nbdcopy URI null:                 (2 connections, 256 KiB reads, holes not read)
  nbdcopy URI out.raw
  qemu-img convert -f raw -O raw URI out.raw
  4 KiB random reads at queue depth 16 (python3-libnbd, 20000 reads, in the data extents)
Prints the median of --repeat runs for both servers and the ratio ours / qemu-nbd (<= 1.0:
qcow2kit is at least as fast; for IOPS the ratio is ours / qemu-nbd, >= 0.5 wanted).
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1 << 20
OURS = [sys.executable, "-m", "qcow2kit", "serve"]

RANDREAD = r"""
import random, sys, time
sys.path.append("/usr/lib/python3/dist-packages")
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
n, depth = int(sys.argv[2]), 16
rng = random.Random(1)
bufs = [nbd.Buffer(4096) for _ in range(depth)]
offs = [2 * MIB * rng.randrange(512) + 4096 * rng.randrange(256) for _ in range(n)]
t0 = time.perf_counter()
inflight, free, done, nxt = {}, list(range(depth)), 0, 0
while done < n:
    while free and nxt < n:
        slot = free.pop()
        inflight[h.aio_pread(bufs[slot], offs[nxt])] = slot
        nxt += 1
    h.poll(-1)
    for c in [c for c in inflight if h.aio_command_completed(c)]:
        free.append(inflight.pop(c))
        done += 1
print(n / (time.perf_counter() - t0))
h.shutdown()
""".replace("MIB", str(MIB))


def make_image(path: Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G"], check=True)
    cmds: list[str] = []
    for i in range(512):
        cmds += ["-c", f"write -q -P {i % 250 + 1} {2 * i}M 1M"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(path)], check=True,
                   stdout=subprocess.DEVNULL)


def start(kind: str, image: Path, sock: Path) -> subprocess.Popen[bytes]:
    if kind == "qemu-nbd":
        argv = ["qemu-nbd", "-r", "-e", "4", "-t", "-f", "qcow2", "-k", str(sock), str(image)]
    else:
        argv = [*OURS, "-r", "-e", "4", "-t", "-f", "qcow2", "-k", str(sock), str(image)]
    proc = subprocess.Popen(argv)
    for _ in range(500):
        if sock.exists():
            return proc
        time.sleep(0.02)
    proc.kill()
    raise SystemExit(f"{kind} did not start")


def timed(argv: list[str], out: Path | None) -> float:
    if out is not None and out.exists():
        out.unlink()
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", help="work directory to use and keep")
    ap.add_argument("--reads", type=int, default=20000)
    args = ap.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_nbd."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        image = work / "big.qcow2"
        if not image.exists():
            make_image(image)
        subprocess.run(["cat", str(image)], check=True, stdout=subprocess.DEVNULL)  # cache it
        out = work / "out.raw"
        results: dict[str, dict[str, list[float]]] = {"qemu-nbd": {}, "qcow2kit": {}}
        # both servers run at once (read-only: shared locks) and the runs alternate, so a
        # change in the machine's load hits both sides alike
        procs = {kind: start(kind, image, work / f"{kind}.sock") for kind in results}
        try:
            for _ in range(args.repeat):
                for kind, r in results.items():
                    uri = f"nbd+unix:///?socket={work / f'{kind}.sock'}"
                    cases = {
                        "nbdcopy -> null:": (["nbdcopy", uri, "null:"], None),
                        "nbdcopy -> out.raw": (["nbdcopy", uri, str(out)], out),
                        "qemu-img convert -> out.raw": (
                            ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)], out),
                    }
                    if not r:
                        timed(["nbdcopy", uri, "null:"], None)  # warm-up
                    for name, (argv, dest) in cases.items():
                        r.setdefault(name, []).append(timed(argv, dest))
                    iops = subprocess.run(["python3", "-c", RANDREAD, uri, str(args.reads)],
                                          check=True, capture_output=True, text=True).stdout
                    r.setdefault("4k randread QD16 (IOPS)", []).append(float(iops))
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(60)
        print(f"{'case':34} {'qemu-nbd':>10} {'qcow2kit':>10} {'ratio':>7}")
        for name in results["qemu-nbd"]:
            q = statistics.median(results["qemu-nbd"][name])
            o = statistics.median(results["qcow2kit"][name])
            fmt = "{:10.0f}" if "IOPS" in name else "{:9.2f}s"
            print(f"{name:34} {fmt.format(q)} {fmt.format(o)} {o / q:7.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
