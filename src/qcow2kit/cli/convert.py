"""qcow2kit convert [-f FMT] [-O qcow2|raw] [-c] [-o key=value,...] [-p] [-S SIZE]
[-B BACKING [-F FMT]] [-U] [-l SNAPSHOT | -s NAME] SRC DST"""

from __future__ import annotations

from types import SimpleNamespace

from .common import UsageError, parse_options, parse_size, plain_command_line

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time
if TYPE_CHECKING:
    import argparse
    from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "convert",
        help="copy a disk image to a raw file or a new qcow2 image",
        description="Convert SRC (qcow2 or raw) to DST. Raw output is sparse; qcow2 output "
        "takes the options of 'create' (-o) and leaves all-zero clusters unallocated.",
    )
    p.add_argument("-f", dest="fmt", choices=("qcow2", "raw"), help="source format (probed if omitted)")
    p.add_argument("-O", dest="out_fmt", default="raw", choices=("qcow2", "raw"),
                   help="output format (default raw)")
    p.add_argument("-c", dest="compressed", action="store_true",
                   help="compress the output clusters (qcow2 only)")
    p.add_argument("-o", dest="options", action="append", help="output options key=value[,...]")
    p.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
    p.add_argument("-B", dest="backing", help="backing file of the output: write only what differs")
    p.add_argument("-F", dest="backing_fmt", choices=("qcow2", "raw"), help="format of -B's file")
    p.add_argument("-U", "--force-share", dest="force_share", action="store_true",
                   help="open the source even if another process has it open for writing")
    p.add_argument("-S", dest="sparse", default="4k",
                   help="zero blocks of this size stay holes / unallocated (0: write everything)")
    p.add_argument("-t", dest="cache", default="unsafe", choices=("unsafe", "writeback"),
                   help="cache mode of the output: unsafe (default, as qemu-img convert) "
                   "never waits for the disk; writeback flushes in crash-safe order")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("-l", dest="snapshot_param", metavar="SNAPSHOT",
                   help="copy an internal snapshot: snapshot.id=ID[,snapshot.name=NAME], "
                   "snapshot.name=NAME, or NAME (an ID, else a name)")
    p.add_argument("-s", dest="snapshot_name", metavar="NAME",
                   help="copy an internal snapshot (old spelling of -l NAME)")
    p.add_argument("source")
    p.add_argument("target")
    p.set_defaults(run=run)


_FLAGS = {"-c": ("compressed", True), "-p": ("progress", True), "-q": ("quiet", True),
          "-U": ("force_share", True), "--force-share": ("force_share", True)}
_FORMATS = ("qcow2", "raw")
# option -> (dest, allowed values or None for any value not starting with '-')
_VALUED: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "-f": ("fmt", _FORMATS), "-O": ("out_fmt", _FORMATS), "-F": ("backing_fmt", _FORMATS),
    "-t": ("cache", ("unsafe", "writeback")), "-B": ("backing", None), "-S": ("sparse", None),
    "-l": ("snapshot_param", None), "-s": ("snapshot_name", None), "-o": ("options", None),
}


def fast_args(rest: list[str]) -> SimpleNamespace | None:
    """Plain command lines without argparse (cli/common.plain_command_line): start-up time,
    which a convert of a small disk mostly is."""
    args = SimpleNamespace(verb="convert", fmt=None, out_fmt="raw", compressed=False,
                           options=None, progress=False, backing=None, backing_fmt=None,
                           force_share=False, sparse="4k", cache="unsafe", quiet=False,
                           snapshot_param=None, snapshot_name=None, source=None, target=None,
                           run=run)
    return plain_command_line(rest, args, ("source", "target"), _FLAGS, _VALUED, repeated=("options",))


def _snapshot(args: argparse.Namespace) -> tuple[str | None, str | None] | None:
    if args.snapshot_param is not None and args.snapshot_name is not None:
        raise UsageError("-l and -s name the snapshot twice")
    text = args.snapshot_param if args.snapshot_param is not None else args.snapshot_name
    if text is None:
        return None
    from ..ops.snapshot import parse_snapshot_option  # imports the image code

    return parse_snapshot_option(text)


def run(args: argparse.Namespace) -> int:
    from ..ops.convert import convert

    opts = parse_options(args.options)
    if args.out_fmt == "raw" and opts:
        raise UsageError(f"Invalid parameter '{next(iter(opts))}' for output format 'raw'")
    kwargs: dict[str, Any] = {}
    if opts:
        from .create import options_to_kwargs  # imports argparse

        kwargs = options_to_kwargs(opts)
    backing = args.backing or kwargs.pop("backing_file", None)
    backing_fmt = args.backing_fmt or kwargs.pop("backing_fmt", None)
    if args.compressed and kwargs.get("preallocation", "off") != "off":
        raise UsageError("Compression and preallocation not supported at the same time")
    if args.compressed and args.out_fmt != "qcow2":
        raise UsageError("Compression not supported for file format 'raw'")
    bar: Any = None
    progress = None
    if args.progress and not args.quiet:
        from tqdm import tqdm

        bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="convert")

        def progress(n: int) -> None:
            bar.update(n)

    try:
        if bar is not None:
            from ..ops.info import image_info

            bar.total = image_info(args.source, args.fmt, force_share=True)["virtual-size"]
        convert(
            args.source, args.target, src_fmt=args.fmt, out_fmt=args.out_fmt,
            snapshot=_snapshot(args),
            options=kwargs, compressed=args.compressed, backing=backing,
            backing_fmt=backing_fmt, force_share=args.force_share, progress=progress,
            sparse_bytes=parse_size(args.sparse), cache=args.cache,
        )
    finally:
        if bar is not None:
            bar.close()
    return 0
