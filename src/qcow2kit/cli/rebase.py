"""qcow2kit rebase [-U] [-q] [-f FMT] [-p] [-u] -b BACKING [-F FMT] FILE

Owns the command line of rebase: qemu-img's options and refusals (-u without -b unlinks the
backing file, as in qemu-img). The work (and its crash-safety) is ops/rebase.py's.
"""

from __future__ import annotations

import argparse
from typing import Any

from .commit import progress_printer
from .common import PROG, UsageError
from .measure import print_errors


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "rebase",
        help="change the backing file of an image",
        description="Make BACKING the backing file of FILE. Safe mode (the default) first "
        "copies into FILE every range whose content would change, so FILE's disk reads the "
        "same afterwards; -u (unsafe) only rewrites the header. -b \"\" removes the backing "
        "file (safe mode: flattens FILE). A relative BACKING is opened relative to FILE's "
        "directory and stored as given; -F names its format and is required with a backing "
        "file.",
    )
    p.add_argument("-b", dest="backing", help="the new backing file (\"\": none)")
    p.add_argument("-F", dest="backing_fmt", help="format of the new backing file")
    p.add_argument("-f", dest="fmt", help="format of FILE (qcow2)")
    p.add_argument("-u", dest="unsafe", action="store_true", help="unsafe: header only")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("-U", "--force-share", dest="force_share", action="store_true",
                   help="open the backing files even if another process writes them")
    p.add_argument("-t", dest="cache", help="cache mode (accepted, ignored)")
    p.add_argument("-T", dest="src_cache", help="source cache mode (accepted, ignored)")
    p.add_argument("filename")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import Qcow2Error
    from ..ops.rebase import rebase

    if args.backing is None and not args.unsafe:
        raise UsageError("Must specify backing file (-b) or use unsafe mode (-u)\n"
                         f"Try '{PROG} --help' for more information")
    show = progress_printer(args.quiet, args.progress)
    try:
        rebase(args.filename, args.backing, backing_fmt=args.backing_fmt, unsafe=args.unsafe,
               fmt=args.fmt, progress=show)
    except Qcow2Error as exc:
        return print_errors(str(exc))
    return 0
