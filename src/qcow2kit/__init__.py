"""qcow2kit: read, write, resize, shrink, check and compact qcow2 images without QEMU.

Public surface: open(), create(), Image, CheckResult and the exception tree. Importing the
package stays light (no numpy) until an image is opened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    CorruptionError,
    FormatError,
    ImageStateError,
    LockError,
    Qcow2Error,
    ResizeError,
    UnsupportedFeatureError,
)

if TYPE_CHECKING:
    from .image import Image
    from .metadata.check import CheckResult

__version__ = "0.1.0"


def open(  # noqa: A001 - mirrors the built-in on purpose, like gzip.open
    path: str,
    mode: str = "r",
    *,
    backing: bool = True,
    force_share: bool = False,
) -> Image:
    """Open a qcow2 image: mode "r" (read-only) or "r+" (read-write)."""
    if mode not in ("r", "r+"):
        raise ValueError(f"mode must be 'r' or 'r+', not {mode!r}")
    from .image import Image

    return Image.open_path(
        path, writable=mode == "r+", force_share=force_share, backing=backing
    )


def create(path: str, size: int | None, **options: Any) -> None:
    """Create a qcow2 image; options as in qemu-img (see ops.create.create)."""
    from .ops.create import create as _create

    _create(path, size, **options)


def __getattr__(name: str) -> Any:
    if name == "Image":
        from .image import Image

        return Image
    if name == "CheckResult":
        from .metadata.check import CheckResult

        return CheckResult
    raise AttributeError(name)


__all__ = [
    "open",
    "create",
    "Image",
    "CheckResult",
    "Qcow2Error",
    "FormatError",
    "UnsupportedFeatureError",
    "CorruptionError",
    "ImageStateError",
    "LockError",
    "ResizeError",
]
