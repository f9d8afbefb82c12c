"""The qcow2kit exception tree.

Qcow2Error                      root of every error qcow2kit raises on purpose
├── FormatError (ValueError)    bytes that break the qcow2 specification or a sanity limit
├── UnsupportedFeatureError     a valid image using something qcow2kit does not implement
├── CorruptionError             inconsistent metadata found at run time; the image is marked corrupt
├── ImageStateError             wrong state for the request: read-only, closed, corrupt, locked
├── ResizeError                 a resize that qemu-img would refuse too
└── InvalidArgumentError (ValueError)  a bad argument to a library call: an option, a range, a size

OSError raised by storage is never wrapped: its errno matters to callers.
Imports nothing from qcow2kit.
"""

from __future__ import annotations


class Qcow2Error(Exception):
    """Root of every error qcow2kit raises deliberately."""


class FormatError(Qcow2Error, ValueError):
    """The image breaks the qcow2 format or one of QEMU's sanity limits."""


class UnsupportedFeatureError(Qcow2Error):
    """The image is valid but uses a feature qcow2kit cannot handle."""


class CorruptionError(Qcow2Error):
    """Metadata contradicts itself; further writes to the image are refused."""


class ImageStateError(Qcow2Error):
    """The image is in the wrong state for this request (read-only, closed, corrupt, busy)."""


class LockError(ImageStateError):
    """Another process holds a conflicting lock on the image file."""


class ResizeError(Qcow2Error):
    """A resize request that cannot be carried out (qemu-img refuses it too)."""


class InvalidArgumentError(Qcow2Error, ValueError):
    """A library call got an argument it cannot use (unknown option, out-of-range offset)."""


__all__ = [
    "Qcow2Error",
    "FormatError",
    "UnsupportedFeatureError",
    "CorruptionError",
    "ImageStateError",
    "LockError",
    "ResizeError",
    "InvalidArgumentError",
]
