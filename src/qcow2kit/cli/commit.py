"""qcow2kit commit [-q] [-f FMT] [-b BASE] [-d] [-p] FILE

Owns the command line of commit: qemu-img's options, progress line, "Image committed." and
its refusals. The work (and its crash-safety) is ops/commit.py's.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .measure import print_errors


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "commit",
        help="write an overlay's data into its backing file",
        description="Write everything FILE (and the images between it and the base) holds "
        "into the base image: its backing file, or BASE (-b) further down the chain. Zero "
        "clusters stay zero clusters. Then FILE is emptied (it reads through to the base) "
        "unless -d is given; -b implies -d.",
    )
    p.add_argument("-f", dest="fmt", help="format of FILE (qcow2)")
    p.add_argument("-b", dest="base", help="the image in the backing chain to commit into")
    p.add_argument("-d", dest="drop", action="store_true", help="keep FILE's data (do not empty it)")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing on success")
    p.add_argument("-t", dest="cache", help="cache mode (accepted, ignored)")
    p.add_argument("-r", dest="rate", help="rate limit (accepted, ignored)")
    p.add_argument("filename")
    p.set_defaults(run=run)


def progress_printer(quiet: bool, enabled: bool) -> Any:
    """qemu-img's progress line: '    (P/100%)' redrawn with \\r, a newline at 100 %."""
    if quiet or not enabled:
        return None
    last = [-1.0]

    def show(percent: float) -> None:
        if percent == last[0]:
            return
        last[0] = percent
        end = "\r\n" if percent >= 100.0 else "\r"
        sys.stdout.write(f"    ({percent:.2f}/100%){end}")
        sys.stdout.flush()

    show(0.0)
    return show


def run(args: argparse.Namespace) -> int:
    from ..errors import Qcow2Error
    from ..ops.commit import commit

    show = progress_printer(args.quiet, args.progress)
    try:
        commit(args.filename, base=args.base, drop=args.drop, fmt=args.fmt, progress=show)
    except Qcow2Error as exc:
        return print_errors(str(exc))
    if not args.quiet:
        print("Image committed.")
    return 0
