"""qcow2kit serve [-r] [-x NAME] [-D DESC] [-k SOCKET | -p PORT [-b ADDRESS]] [-e N] [-t] [-A]
[-B BITMAP] [--discard=ignore|unmap] [--detect-zeroes=off|on|unmap] [-f FMT] [--pid-file F] FILE

Owns the command line of the NBD server: qemu-nbd 7.2's options, defaults and wording for bad
ones, the signal handling (SIGTERM / SIGINT stop the server cleanly), the pid file and the
stderr log. Serving itself is qcow2kit.nbd's; this module never speaks the protocol.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import stat
import sys
from types import FrameType
from typing import TYPE_CHECKING, Any

from .common import UsageError

if TYPE_CHECKING:
    from ..image import Image

MAX_STRING = 4096


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="export an image over NBD (like qemu-nbd)",
        description="Serve a qcow2 image over the NBD protocol, as qemu-nbd does: in the "
        "foreground, on a unix socket (-k) or on TCP (127.0.0.1:10809 unless -b/-p say "
        "otherwise). Without -t it exits once the last client has disconnected; SIGTERM or "
        "SIGINT stop it after the requests in flight, and the image is flushed and closed.",
    )
    p.add_argument("-r", "--read-only", dest="readonly", action="store_true",
                   help="export read-only")
    p.add_argument("-x", "--export-name", dest="name", default="", help='export name (default "")')
    p.add_argument("-D", "--description", default="", help="export description")
    p.add_argument("-k", "--socket", dest="socket", help="listen on this unix socket")
    p.add_argument("-p", "--port", help="TCP port to listen on (default 10809)")
    p.add_argument("-b", "--bind", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, loopback only)")
    p.add_argument("-e", "--shared", default="1",
                   help="serve up to N clients at once (default 1; 0: no limit)")
    p.add_argument("-t", "--persistent", action="store_true",
                   help="keep serving after the last client disconnects")
    p.add_argument("-A", "--allocation-depth", dest="depth", action="store_true",
                   help="expose the qemu:allocation-depth meta context")
    p.add_argument("-B", "--bitmap", help="expose a persistent dirty bitmap (qemu:dirty-bitmap:NAME)")
    p.add_argument("--discard", default="ignore", help="ignore (default) or unmap guest discards")
    p.add_argument("--detect-zeroes", dest="detect_zeroes", default="off",
                   help="off (default), on or unmap: turn writes of zeros into zero writes")
    p.add_argument("-f", "--format", dest="fmt", help="image format (only qcow2 is served)")
    p.add_argument("--pid-file", dest="pid_file", help="write the server's pid to this file")
    p.add_argument("-v", "--verbose", action="store_true", help="log every connection to stderr")
    p.add_argument("filename")
    p.set_defaults(run=run)


def _check(args: argparse.Namespace) -> int:
    """qemu-nbd's checks and wording; returns the client limit."""
    if args.discard not in ("ignore", "unmap", "off", "on"):
        raise UsageError(f"Invalid discard mode `{args.discard}'")
    args.discard = "unmap" if args.discard in ("unmap", "on") else "ignore"
    if args.detect_zeroes not in ("off", "on", "unmap"):
        raise UsageError(
            f"Failed to parse detect_zeroes mode: invalid parameter value: {args.detect_zeroes}"
        )
    if args.detect_zeroes == "unmap" and args.discard != "unmap":
        raise UsageError("setting detect-zeroes to unmap is not allowed without setting discard "
                         "operation to unmap")
    try:
        shared = int(args.shared, 0)
    except ValueError:
        shared = -1
    if shared < 0:
        raise UsageError(f"Invalid shared device number '{args.shared}'")
    if len(args.name.encode()) > MAX_STRING:
        raise UsageError(f"export name '{args.name}' too long")
    if len(args.description.encode()) > MAX_STRING:
        raise UsageError(f"export description '{args.description}' too long")
    if args.socket is not None and args.port is not None:
        raise UsageError("-k and -p cannot be used together")
    if args.port is not None and not (args.port.isdigit() and int(args.port) <= 65535):
        raise UsageError(f"Invalid port number '{args.port}'")
    if args.fmt not in (None, "qcow2"):
        raise UsageError(f"Failed to blk_new_open '{args.filename}': only qcow2 images are served "
                         f"(got -f {args.fmt})")
    return shared or (1 << 30)


def _check_bitmap(image: Image, name: str) -> None:
    """qemu-nbd's answers for a bitmap that cannot be exported."""
    from ..errors import Qcow2Error

    if name not in image.bitmaps:
        raise UsageError(f"Bitmap '{name}' is not found")
    try:
        image.bitmaps.loaded_bits(name)
    except Qcow2Error as exc:
        raise UsageError(str(exc)) from None


def _activation_socket(args: argparse.Namespace) -> socket.socket | None:
    """The listening socket systemd-style socket activation hands over (LISTEN_PID is us,
    LISTEN_FDS=1: fd 3), as qemu-nbd accepts it, e.g. from `nbdcopy -- [ qcow2kit serve
    ... ] null:`. Only without -k / -p."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        return None
    if args.socket is not None or args.port is not None:
        raise UsageError("-k or -p cannot be used with socket activation")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    return socket.socket(fileno=3)


def _remove_stale_socket(path: str) -> None:
    """Like qemu-nbd, a socket file left behind is replaced; any other file is not."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def run(args: argparse.Namespace) -> int:
    from ..errors import Qcow2Error
    from ..image import Image
    from ..nbd import NBDServer

    shared = _check(args)
    path = args.filename
    if not os.path.exists(path):
        raise UsageError(f"Failed to blk_new_open '{path}': Could not open '{path}': "
                         "No such file or directory")
    logger = logging.getLogger("qcow2kit.nbd")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("qcow2kit serve: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        image = Image.open_path(path, writable=not args.readonly)
    except (Qcow2Error, OSError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(f"Failed to blk_new_open '{path}': {reason}") from None
    try:
        if args.bitmap is not None:
            _check_bitmap(image, args.bitmap)
        server = NBDServer(
            image, name=args.name, bitmap=args.bitmap, description=args.description, readonly=args.readonly,
            max_clients=shared, persistent=args.persistent, allocation_depth=args.depth,
            discard=args.discard, detect_zeroes=args.detect_zeroes,
        )
        where = args.socket if args.socket is not None else f"{args.bind}:{args.port or 10809}"
        activated = _activation_socket(args)
        try:
            if activated is not None:
                server.listen_socket(activated)
            elif args.socket is not None:
                _remove_stale_socket(args.socket)
                server.listen_unix(args.socket)
            else:
                server.listen_tcp(args.bind, int(args.port or 10809))
        except OSError as exc:
            raise UsageError(f"Failed to bind socket to {where}: {exc.strerror or exc}") from None

        def stop(signum: int, frame: FrameType | None) -> None:
            server.shutdown()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        if args.pid_file:
            with open(args.pid_file, "w") as f:
                f.write(f"{os.getpid()}\n")
        try:
            server.serve_forever()
        finally:
            if args.pid_file:
                try:
                    os.unlink(args.pid_file)
                except OSError:
                    pass
    finally:
        image.close()
    return 0
