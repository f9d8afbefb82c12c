"""qcow2kit check [-r leaks|all] [--output=human|json] [-q] [-U] [-f FMT] FILE

Exit codes as qemu-img check: 0 consistent (or repaired), 1 the check could not complete,
2 corruptions, 3 leaked clusters only, 63 the format has no checks (raw).

Owns the command line and what is printed where (diagnostics on stderr, summary or JSON on
stdout); must never open or judge an image itself: ops.check (and, for a plain check, its
numpy-free fast path ops.check_plain) does."""

from __future__ import annotations

import sys
from types import SimpleNamespace

from .common import UsageError, add_output, plain_command_line

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time
if TYPE_CHECKING:
    import argparse
    from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "check",
        help="check (and repair) an image's consistency, like qemu-img check",
        description="Check a qcow2 image for refcount and metadata errors. With -r leaks, "
        "too-high refcounts are lowered; with -r all, every repairable error is fixed, "
        "rebuilding the refcount structure if needed.",
    )
    p.add_argument("-r", dest="repair", choices=("leaks", "all"), help="repair mode")
    p.add_argument("-f", dest="fmt", help="image format (qcow2; raw has no checks)")
    p.add_argument("-q", dest="quiet", action="store_true", help="no summary on stdout")
    p.add_argument("-U", "--force-share", dest="force_share", action="store_true",
                   help="open the image even if another process holds it")
    add_output(p)
    p.add_argument("filename")
    p.set_defaults(run=run)


_FLAGS = {"-q": ("quiet", True), "-U": ("force_share", True), "--force-share": ("force_share", True)}
_VALUED = {"--output": ("output", ("human", "json")), "-f": ("fmt", None),
           "-r": ("repair", ("leaks", "all"))}


def fast_args(rest: list[str]) -> SimpleNamespace | None:
    """Plain command lines without argparse (cli/common.plain_command_line)."""
    args = SimpleNamespace(verb="check", repair=None, fmt=None, quiet=False, force_share=False,
                           output="human", filename=None, run=run)
    return plain_command_line(rest, args, ("filename",), _FLAGS, _VALUED)


def run(args: argparse.Namespace) -> int:
    if args.repair and args.force_share:
        raise UsageError("-U (force share) cannot be used with -r: a repair needs exclusive access")
    if args.fmt in (None, "qcow2"):
        # most images are clean: proven so without numpy (declines anything unusual); a
        # repair of a clean image prints what the check prints, as qemu-img's does
        from ..ops.check_plain import prove_clean

        clean = prove_clean(args.filename, force_share=args.force_share,
                            repair=args.repair is not None)
        if clean is not None:
            if not args.quiet:
                from ..ops.check import to_human, to_json

                sys.stdout.write(to_json(clean, args.filename) if args.output == "json" else to_human(clean))
            return 0
    from ..chain import probe_format
    from ..errors import UnsupportedFeatureError
    from ..ops.check import check_path, repair_banner, to_human, to_json

    fmt = args.fmt or probe_format(args.filename)
    if fmt != "qcow2":
        print("qcow2kit: This image format does not support checks", file=sys.stderr)
        return 63
    try:
        result = check_path(args.filename, args.repair, force_share=args.force_share)
    except UnsupportedFeatureError as exc:
        print(f"qcow2kit: {exc}", file=sys.stderr)
        return 63 if "does not support checks" in str(exc) else 1
    for line in result.messages:
        print(line, file=sys.stderr)
    if result.rechecked:
        if args.output == "human" and not args.quiet:
            sys.stdout.write(repair_banner(result))
            sys.stdout.flush()
        for line in result.recheck_messages:
            print(line, file=sys.stderr)
    if result.error is not None:
        print(f"qcow2kit: Check failed: {result.error}", file=sys.stderr)
        return 1
    if not args.quiet:
        if args.output == "json":
            sys.stdout.write(to_json(result, args.filename))
        else:
            sys.stdout.write(to_human(result))
    if result.check_errors:
        print("qcow2kit: Check failed", file=sys.stderr)
        return 1
    return result.exit_code
