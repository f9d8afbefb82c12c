"""qcow2kit compact [-p] [--discard-zeroes] [-q] FILE

Owns the command-line side of compact: the progress bar and the summary line. Never moves a
cluster itself: Image.compact does, crash-safely.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "compact",
        help="move clusters into free holes so the file shrinks to what it uses",
        description="Relocate data clusters, L2 tables, refcount blocks and tables from the end "
        "of the file into free space nearer the start, then truncate the file. Works in place "
        "(no second copy of the image) and is crash-safe: a power cut leaves a consistent image "
        "that at worst leaks clusters (a second compact or 'check -r leaks' reclaims them).",
    )
    p.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
    p.add_argument("--discard-zeroes", action="store_true",
                   help="first turn data clusters that read as all zeros into zero clusters "
                   "(v3) or unallocated ones (v2 without a backing file)")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing on success")
    p.add_argument("filename")
    p.set_defaults(run=run)


def compact_file(path: str, *, progress: bool, discard_zeroes: bool, quiet: bool) -> int:
    import qcow2kit

    with qcow2kit.open(path, "r+") as img:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(unit="cluster", desc="compact")
        try:
            result = img.compact(
                discard_zeroes=discard_zeroes, progress=bar.update if bar else None
            )
        finally:
            if bar is not None:
                bar.close()
    if not quiet:
        saved = result.old_file_bytes - result.new_file_bytes
        print(
            f"Image compacted: {result.old_file_bytes} -> {result.new_file_bytes} bytes "
            f"({saved} bytes freed, {result.moved_clusters} clusters moved)."
        )
    return 0


def run(args: argparse.Namespace) -> int:
    return compact_file(
        args.filename, progress=args.progress, discard_zeroes=args.discard_zeroes,
        quiet=args.quiet,
    )
