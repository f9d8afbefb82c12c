"""qcow2kit: read, write, resize, shrink, check and compact qcow2 images without QEMU.

Owns the public surface: open(), create(), measure(), Image, CheckResult, the map types Run and Kind, and
the exception tree; `__all__` lists exactly these names. Importing the package must stay light
(no numpy, no image code) until an image is opened or one of the lazy names is used, and this
module must never hold logic of its own beyond checking and forwarding arguments.
"""

import os as _os

from .errors import (
    CorruptionError,
    FormatError,
    ImageStateError,
    InvalidArgumentError,
    LockError,
    Qcow2Error,
    ResizeError,
    UnsupportedFeatureError,
)

# typing's own TYPE_CHECKING would import typing (a third of this import's time); type
# checkers honour any constant of this name, and it is deleted so it does not leak
TYPE_CHECKING = False
if TYPE_CHECKING:
    from .image import Image
    from .metadata.check import CheckResult
    from .metadata.l2map import Kind, Run
    from .ops.measure import measure
del TYPE_CHECKING

__version__ = "0.1.0"

# name -> module that defines it; imported on first use so `import qcow2kit` stays cheap
_LAZY = {
    "Image": "qcow2kit.image",
    "CheckResult": "qcow2kit.metadata.check",
    "Run": "qcow2kit.metadata.l2map",
    "Kind": "qcow2kit.metadata.l2map",
    "measure": "qcow2kit.ops.measure",
}


def open(  # noqa: A001 - mirrors the built-in on purpose, like gzip.open
    path: "str | _os.PathLike[str]",
    mode: str = "r",
    *,
    backing: bool = True,
    force_share: bool = False,
    snapshot: "str | None" = None,
) -> "Image":
    """Open a qcow2 image: mode "r" (read-only) or "r+" (read-write).

    backing=False leaves the backing file unopened (reads of unallocated ranges then fail);
    force_share=True opens an image another process holds (read-only only, as qemu-img -U);
    snapshot="ID or name" opens a read-only view of that internal snapshot's disk.
    Raises InvalidArgumentError for a bad mode, another Qcow2Error for an image qcow2kit
    cannot use, OSError when the file cannot be opened."""
    if mode not in ("r", "r+"):
        raise InvalidArgumentError(f"mode must be 'r' or 'r+', not {mode!r}")
    if snapshot is not None:
        if mode != "r":
            raise InvalidArgumentError("a snapshot is opened read-only (mode 'r')")
        from .ops.snapshot import open_snapshot

        return open_snapshot(_os.fspath(path), snapshot, force_share=force_share, backing=backing)
    from .image import Image

    return Image.open_path(
        _os.fspath(path), writable=mode == "r+", force_share=force_share, backing=backing
    )


def create(
    path: "str | _os.PathLike[str]",
    size: "int | None",
    *,
    cluster_size: int = 65536,
    compat: str = "1.1",
    refcount_bits: int = 16,
    lazy_refcounts: bool = False,
    extended_l2: bool = False,
    compression_type: str = "zlib",
    preallocation: str = "off",
    backing_file: "str | _os.PathLike[str] | None" = None,
    backing_fmt: "str | None" = None,
    data_file: "str | _os.PathLike[str] | None" = None,
    data_file_raw: bool = False,
) -> None:
    """Create a qcow2 image at path, with the options of `qemu-img create -f qcow2 -o ...`.

    size is in bytes and must be a multiple of 512 (the command line rounds up for you); None
    takes the size of backing_file. compat "1.1" (v3) or "0.10" (v2); preallocation "off",
    "metadata", "falloc" or "full"; compression_type "zlib" or "zstd". Raises
    InvalidArgumentError (a ValueError) for a bad option, OSError when the file cannot be
    written; an existing file at path is replaced unless another process holds it."""
    from .ops.create import create as _create

    _create(
        _os.fspath(path), size, cluster_size=cluster_size, compat=compat,
        refcount_bits=refcount_bits, lazy_refcounts=lazy_refcounts, extended_l2=extended_l2,
        compression_type=compression_type, preallocation=preallocation,
        backing_file=backing_file, backing_fmt=backing_fmt, data_file=data_file,
        data_file_raw=data_file_raw,
    )


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qcow2kit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    # submodules and private helpers are not part of the surface
    return sorted(set(__all__) | {"__version__", "__doc__", "__name__", "__path__"})


__all__ = [
    "open",
    "create",
    "measure",
    "Image",
    "CheckResult",
    "Run",
    "Kind",
    "Qcow2Error",
    "FormatError",
    "UnsupportedFeatureError",
    "CorruptionError",
    "ImageStateError",
    "LockError",
    "ResizeError",
    "InvalidArgumentError",
]
