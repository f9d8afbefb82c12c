"""qcow2kit compare [-f FMT] [-F FMT] [-s] [-q] [-U] A B

Exit codes as qemu-img: 0 identical, 1 different, 2 error (a Qcow2Error or OSError). Owns the
wording of compare's verdicts; never writes to either image, and never turns an unexpected
exception (a bug) into a verdict: those go on to cli/main.py."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import Qcow2Error


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "compare",
        help="check whether two disk images have the same content",
        description="Compare the virtual disks of two images (qcow2 or raw). Exit code 0: "
        "identical, 1: different, 2: error.",
    )
    p.add_argument("-f", dest="fmt_a", choices=("qcow2", "raw"), help="format of the first image")
    p.add_argument("-F", dest="fmt_b", choices=("qcow2", "raw"), help="format of the second image")
    p.add_argument("-s", dest="strict", action="store_true", help="strict: sizes must match too")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("-U", "--force-share", dest="force_share", action="store_true",
                   help="open the images even if another process has them open for writing")
    p.add_argument("image_a")
    p.add_argument("image_b")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..ops.compare import compare

    def say(text: str) -> None:
        if not args.quiet:
            print(text)

    try:
        res = compare(args.image_a, args.image_b, fmt_a=args.fmt_a, fmt_b=args.fmt_b,
                      force_share=args.force_share)
    except Qcow2Error as exc:
        print(f"qcow2kit: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        name = f" '{exc.filename}'" if exc.filename else ""
        print(f"qcow2kit:{name} {exc.strerror or exc}", file=sys.stderr)
        return 2
    common = min(res.size_a, res.size_b)
    if res.size_mismatch:
        if args.strict:
            say("Strict mode: Image size mismatch!")
            return 1
        if res.identical or (res.mismatch_offset or 0) >= common:
            # like qemu-img: the warning comes when the common part compared equal
            say("Warning: Image size mismatch!")
    if not res.identical:
        say(f"Content mismatch at offset {res.mismatch_offset}!")
        return 1
    say("Images are identical.")
    return 0
