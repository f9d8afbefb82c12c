"""qcow2kit amend [-p] [-q] [-f FMT] [-t CACHE] [--force] -o OPTIONS FILE

Owns the command line of amend: qemu-img's syntax, -o help, its refusals and exit codes, the
progress line. The work (and its crash-safety) is ops/amend.py's.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import PROG, UsageError, parse_bool, parse_option_number, parse_option_size

HELP = """Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size"""


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "amend",
        help="change the options of an existing image",
        description="Change options of a qcow2 image in place: compat=0.10|1.1 (v2|v3), "
        "refcount_bits=1..64, lazy_refcounts=on|off, data_file=NAME, data_file_raw=off, "
        "size=SIZE (exact, shrinking too). Every step is crash-safe; refusals use "
        "qemu-img's words. '-o help' lists the options.",
    )
    p.add_argument("-o", dest="options", action="append", help="options to change")
    p.add_argument("-f", dest="fmt", help="image format (qcow2)")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("-t", dest="cache", help="cache mode (accepted, ignored)")
    p.add_argument("--force", action="store_true", help="accepted (LUKS keyslots only)")
    p.add_argument("filename", nargs="?")
    p.set_defaults(run=run)


def _parse_pairs(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        for part in item.split(","):
            if part:
                key, sep, value = part.partition("=")
                out[key] = value if sep else "on"
    return out


def run(args: argparse.Namespace) -> int:
    from ..errors import Qcow2Error
    from ..ops.amend import amend, parse_options
    from .commit import progress_printer

    if not args.options:
        raise UsageError(f"Must specify options (-o)\nTry '{PROG} --help' for more information")
    raw = _parse_pairs(args.options)
    if "help" in raw or "?" in raw:
        print(HELP)
        return 0
    if args.filename is None:
        raise UsageError(f"Expecting one image file name\nTry '{PROG} --help' for more information")
    try:
        options = parse_options(raw, parse_option_size, parse_option_number, parse_bool)
        show = progress_printer(args.quiet, args.progress)
        amend(args.filename, options, fmt=args.fmt, progress=show)
    except (Qcow2Error, UsageError) as exc:
        # qemu-img prefixes the message once; its hint lines follow unprefixed
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    return 0
