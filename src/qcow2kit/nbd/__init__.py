"""qcow2kit.nbd: serve a qcow2 image over the NBD protocol, as qemu-nbd does.

Owns the package's public surface: NBDServer (server.py) and serve(), which opens an image,
serves it until the last client leaves (or forever with persistent=True, or until
shutdown()), then flushes and closes it. Holds no logic of its own.

Modules: protocol (pure wire format), handshake (option haggling), connection
(transmission), export (commands over an Image), server (sockets and lifecycle).
"""

from __future__ import annotations

from collections.abc import Callable

from ..image import Image
from .server import NBDServer


def serve(
    path: str,
    *,
    socket_path: str | None = None,
    port: int | None = None,
    bind: str = "127.0.0.1",
    readonly: bool = False,
    ready: Callable[[NBDServer], None] | None = None,
    **options: object,
) -> None:
    """Open the qcow2 image at path and serve it on a unix socket (socket_path) or on TCP
    (bind:port, loopback by default) until the server stops; `options` are NBDServer's.
    `ready` is called once the server listens (e.g. to write a pid file)."""
    image = Image.open_path(path, writable=not readonly)
    try:
        server = NBDServer(image, readonly=readonly, **options)  # type: ignore[arg-type]
        if socket_path is not None:
            server.listen_unix(socket_path)
        else:
            server.listen_tcp(bind, 10809 if port is None else port)
        if ready is not None:
            ready(server)
        server.serve_forever()
    finally:
        image.close()


__all__ = ["NBDServer", "serve"]
