"""The qcow2 header (v2 and v3) with its extensions and backing file name.

Decoding checks the rules QEMU checks at open time and names field, value and limit.
Unknown trailing header bytes and unknown extensions survive a rewrite.
"""

from __future__ import annotations

import struct

from ..errors import FormatError, UnsupportedFeatureError
from . import constants as C
from .extensions import (
    CRYPT_LUKS,
    CRYPTO_EXTENSION_BYTES,
    MAX_BACKING_FORMAT_BYTES,
    BitmapsExtension,
    Extension,
    encode_extensions,
    feature_names,
    feature_table_bytes,
    parse_extensions,
)
from .features import KNOWN_AUTOCLEAR, KNOWN_INCOMPATIBLE, Autoclear, Compatible, Incompatible

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time
if TYPE_CHECKING:
    from typing import Any, Final

SNAPSHOT_MIN_ENTRY_BYTES = 40


class Header:
    """One decoded header; treat it as immutable (`replace` makes a changed copy). A plain
    slotted class, not a dataclass: importing dataclasses costs the light commands (info, the
    fast map and check) several milliseconds of start-up."""

    __slots__ = (
        "version", "backing_file_offset", "backing_file_size", "cluster_bits", "size",
        "crypt_method", "l1_size", "l1_table_offset", "refcount_table_offset",
        "refcount_table_clusters", "nb_snapshots", "snapshots_offset", "incompatible_features",
        "compatible_features", "autoclear_features", "refcount_order", "header_length",
        "compression_type", "unknown_fields", "extensions", "backing_file",
    )

    V2 = struct.Struct(">IIQIIQIIQQIIQ")
    V3 = struct.Struct(">QQQII")

    def __init__(
        self, version: int, backing_file_offset: int, backing_file_size: int, cluster_bits: int,
        size: int, crypt_method: int, l1_size: int, l1_table_offset: int,
        refcount_table_offset: int, refcount_table_clusters: int, nb_snapshots: int,
        snapshots_offset: int, incompatible_features: int = 0, compatible_features: int = 0,
        autoclear_features: int = 0, refcount_order: int = 4,
        header_length: int = C.V2_HEADER_LENGTH, compression_type: int = 0,
        unknown_fields: bytes = b"", extensions: tuple[Extension, ...] = (),
        backing_file: str | None = None,
    ) -> None:
        self.version: Final = version
        self.backing_file_offset: Final = backing_file_offset
        self.backing_file_size: Final = backing_file_size
        self.cluster_bits: Final = cluster_bits
        self.size: Final = size
        self.crypt_method: Final = crypt_method
        self.l1_size: Final = l1_size
        self.l1_table_offset: Final = l1_table_offset
        self.refcount_table_offset: Final = refcount_table_offset
        self.refcount_table_clusters: Final = refcount_table_clusters
        self.nb_snapshots: Final = nb_snapshots
        self.snapshots_offset: Final = snapshots_offset
        self.incompatible_features: Final = incompatible_features
        self.compatible_features: Final = compatible_features
        self.autoclear_features: Final = autoclear_features
        self.refcount_order: Final = refcount_order
        self.header_length: Final = header_length
        self.compression_type: Final = compression_type
        self.unknown_fields: Final = unknown_fields
        self.extensions: Final = extensions
        self.backing_file: Final = backing_file

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def replace(self, **changes: Any) -> Header:
        """A copy with some fields changed (unknown names are a TypeError)."""
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return Header(**values)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Header):
            return NotImplemented
        return self._values() == other._values()  # noqa: SLF001 (same class)

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"Header({fields})"

    # ---- derived values -------------------------------------------------------------
    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & Incompatible.EXTENDED_L2)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & Incompatible.EXTERNAL_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & Autoclear.DATA_FILE_RAW)

    def extension(self, ext_type: int) -> bytes | None:
        for ext in self.extensions:
            if ext.type == ext_type:
                return ext.data
        return None

    @property
    def backing_format(self) -> str | None:
        data = self.extension(C.EXT_BACKING_FORMAT)
        return None if data is None else data.decode("utf-8", "replace")

    @property
    def data_file(self) -> str | None:
        data = self.extension(C.EXT_DATA_FILE)
        return None if data is None else data.decode("utf-8", "replace")

    @property
    def bitmaps(self) -> BitmapsExtension | None:
        data = self.extension(C.EXT_BITMAPS)
        return None if data is None else BitmapsExtension.from_bytes(data)

    # ---- codec ----------------------------------------------------------------------
    @classmethod
    def from_bytes(cls, buf: bytes) -> Header:
        """Decode a header from the start of cluster 0 (pass at least the whole cluster
        or the whole file if shorter)."""
        if len(buf) < C.V2_HEADER_LENGTH:
            raise FormatError(f"file too short for a qcow2 header ({len(buf)} bytes)")
        (magic, version, bf_off, bf_size, cbits, size, crypt, l1_size, l1_off, rt_off,
         rt_clusters, nb_snap, snap_off) = cls.V2.unpack_from(buf, 0)
        if magic != C.MAGIC:
            raise FormatError("Image is not in qcow2 format (bad magic)")
        if version not in (2, 3):
            raise UnsupportedFeatureError(f"Unsupported qcow2 version {version}")
        if not C.MIN_CLUSTER_BITS <= cbits <= C.MAX_CLUSTER_BITS:
            raise FormatError(
                f"cluster_bits {cbits} outside {C.MIN_CLUSTER_BITS}..{C.MAX_CLUSTER_BITS}"
            )
        cluster_size = 1 << cbits
        incompat = compat = autoclear = 0
        refcount_order = 4
        header_length = C.V2_HEADER_LENGTH
        compression_type = 0
        unknown = b""
        if version == 3:
            if len(buf) < C.V3_MIN_HEADER_LENGTH:
                raise FormatError("qcow2 header too short")
            incompat, compat, autoclear, refcount_order, header_length = cls.V3.unpack_from(
                buf, C.V2_HEADER_LENGTH
            )
            if header_length < C.V3_MIN_HEADER_LENGTH:
                raise FormatError(
                    f"header_length {header_length} below the v3 minimum "
                    f"{C.V3_MIN_HEADER_LENGTH}"
                )
            if header_length > cluster_size:
                raise FormatError(
                    f"header_length {header_length} exceeds the cluster size {cluster_size}"
                )
            if header_length > len(buf):
                raise FormatError(f"header_length {header_length} exceeds the file")
            if header_length > C.V3_MIN_HEADER_LENGTH:
                compression_type = buf[C.V3_MIN_HEADER_LENGTH]
            if header_length > C.V3_HEADER_LENGTH:
                unknown = bytes(buf[C.V3_HEADER_LENGTH:header_length])
        if refcount_order > C.MAX_REFCOUNT_ORDER:
            raise FormatError(
                f"refcount_order {refcount_order} exceeds {C.MAX_REFCOUNT_ORDER} "
                "(refcount entries may not exceed 64 bits)"
            )
        if bf_off > cluster_size:
            raise FormatError(f"backing_file_offset {bf_off} lies outside cluster 0")
        backing: str | None = None
        if bf_off:
            limit = min(C.MAX_BACKING_NAME_BYTES, cluster_size - bf_off)
            if bf_size > limit:
                raise FormatError(f"backing_file_size {bf_size} exceeds the limit {limit}")
            raw = bytes(buf[bf_off : bf_off + bf_size])
            if len(raw) != bf_size:
                raise FormatError("backing file name lies past the end of the file")
            backing = raw.decode("utf-8", "surrogateescape")
        ext_end = bf_off if bf_off else min(cluster_size, len(buf))
        exts = parse_extensions(buf, header_length, ext_end)
        header = cls(
            version, bf_off, bf_size, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
            nb_snap, snap_off, incompat, compat, autoclear, refcount_order, header_length,
            compression_type, unknown, tuple(exts), backing,
        )
        header.validate()
        return header

    def validate(self) -> None:
        cs = self.cluster_size
        if self.crypt_method != C.CRYPT_NONE:
            raise UnsupportedFeatureError(
                f"encryption is not supported (crypt_method {self.crypt_method})"
            )
        unknown = self.incompatible_features & ~KNOWN_INCOMPATIBLE
        if unknown:
            names = feature_names(self.extension(C.EXT_FEATURE_TABLE) or b"")
            parts = []
            for bit in range(64):
                if unknown >> bit & 1:
                    parts.append(names.get((0, bit), f"unknown incompatible feature bit {bit}"))
            raise UnsupportedFeatureError("Unsupported qcow2 feature(s): " + ", ".join(parts))
        if self.compression_type not in C.COMPRESSION_NAMES:
            raise UnsupportedFeatureError(f"unknown compression type {self.compression_type}")
        has_bit = bool(self.incompatible_features & Incompatible.COMPRESSION_TYPE)
        if has_bit != (self.compression_type != C.COMPRESSION_ZLIB):
            raise FormatError(
                f"compression_type {self.compression_type} does not match the "
                "compression type incompatible feature bit"
            )
        if self.extended_l2 and self.cluster_bits < 14:
            raise FormatError(
                f"extended L2 needs clusters of at least 16 KiB (cluster_bits {self.cluster_bits})"
            )
        if self.data_file_raw and not self.has_data_file:
            raise FormatError(
                "autoclear bit 1 (data-file-raw) is set but the image has no external data "
                "file (data-file-raw requires a data file)"
            )
        self._validate_extensions()
        for name, off in (
            ("l1_table_offset", self.l1_table_offset),
            ("refcount_table_offset", self.refcount_table_offset),
            ("snapshots_offset", self.snapshots_offset),
        ):
            if off % cs:
                raise FormatError(f"{name} {off:#x} is not aligned to the cluster size {cs}")
            if off >= C.MAX_HOST_OFFSET:
                raise FormatError(f"{name} {off:#x} is beyond the 2^56 host offset limit")
        if self.l1_size * 8 > C.MAX_L1_BYTES:
            raise FormatError(
                f"l1_size {self.l1_size} exceeds the limit {C.MAX_L1_BYTES // 8} entries"
            )
        if self.refcount_table_clusters * cs > C.MAX_REFTABLE_BYTES:
            raise FormatError(
                f"refcount_table_clusters {self.refcount_table_clusters} exceeds the limit "
                f"{C.MAX_REFTABLE_BYTES // cs} clusters ({C.MAX_REFTABLE_BYTES} bytes)"
            )
        if self.refcount_table_clusters == 0:
            raise FormatError("refcount_table_clusters is 0: no reference count table")
        if self.nb_snapshots > C.MAX_SNAPSHOTS:
            raise FormatError(
                f"nb_snapshots {self.nb_snapshots} exceeds the limit {C.MAX_SNAPSHOTS}"
            )
        l2_entries = cs // (16 if self.extended_l2 else 8)
        span = cs * l2_entries
        needed = -(-self.size // span)
        if needed > 0x7FFFFFFF:
            raise FormatError(f"virtual size {self.size} is too big")
        if self.l1_size < needed:
            raise FormatError(
                f"l1_size {self.l1_size} is smaller than the {needed} entries the virtual size "
                f"{self.size} needs"
            )
        if self.version == 2 and (
            self.incompatible_features or self.compatible_features or self.autoclear_features
        ):
            raise FormatError("version 2 header with feature bits")

    def check_fits(self, file_size: int) -> None:
        """Every table the header points at must lie inside the file: checked before any of
        them is read, so no allocation follows a header field the file cannot back."""
        if self.l1_size and self.l1_table_offset == 0:
            raise FormatError(f"l1_table_offset is 0 but l1_size is {self.l1_size}")
        if self.refcount_table_offset == 0:
            raise FormatError("refcount_table_offset is 0 (it would overlap the header)")
        if self.nb_snapshots and self.snapshots_offset == 0:
            raise FormatError(f"snapshots_offset is 0 but nb_snapshots is {self.nb_snapshots}")
        tables = [
            ("l1_table_offset", self.l1_table_offset, "l1_size", self.l1_size, self.l1_size * 8),
            ("refcount_table_offset", self.refcount_table_offset, "refcount_table_clusters",
             self.refcount_table_clusters, self.refcount_table_clusters * self.cluster_size),
            ("snapshots_offset", self.snapshots_offset, "nb_snapshots", self.nb_snapshots,
             self.nb_snapshots * SNAPSHOT_MIN_ENTRY_BYTES),
        ]
        bitmaps = self.extension(C.EXT_BITMAPS)
        if bitmaps is not None and self.autoclear_features & Autoclear.BITMAPS:
            ext = BitmapsExtension.from_bytes(bitmaps)
            tables.append(("bitmap directory_offset", ext.directory_offset,
                           "directory_size", ext.directory_size, ext.directory_size))
        for off_name, offset, len_name, count, nbytes in tables:
            if count and offset + nbytes > file_size:
                raise FormatError(
                    f"{off_name} {offset:#x} with {len_name} {count} ({nbytes} bytes) ends past "
                    f"the end of the file ({file_size} bytes)"
                )

    def _validate_extensions(self) -> None:
        """The per-extension rules QEMU applies while reading extensions at open."""
        fmt = self.extension(C.EXT_BACKING_FORMAT)
        if fmt is not None and len(fmt) > MAX_BACKING_FORMAT_BYTES:
            raise FormatError(
                f"backing format extension: length {len(fmt)} exceeds the limit "
                f"{MAX_BACKING_FORMAT_BYTES}"
            )
        crypto = self.extension(C.EXT_CRYPTO)
        if crypto is not None:
            if self.crypt_method != CRYPT_LUKS:
                raise FormatError(
                    f"crypto header extension present with crypt_method {self.crypt_method} "
                    f"(it is only expected with LUKS, crypt_method {CRYPT_LUKS})"
                )
            if len(crypto) != CRYPTO_EXTENSION_BYTES:
                raise FormatError(
                    f"crypto header extension: length {len(crypto)}, expected "
                    f"{CRYPTO_EXTENSION_BYTES}"
                )
        bitmaps = self.extension(C.EXT_BITMAPS)
        if bitmaps is not None and self.autoclear_features & Autoclear.BITMAPS:
            # with the autoclear bit clear QEMU ignores the extension (bitmaps inconsistent)
            BitmapsExtension.from_bytes(bitmaps).validate(self.cluster_size)

    def to_bytes(self) -> bytes:
        """Encode the header, its extensions and backing name (not padded to a cluster).
        Unknown autoclear bits are cleared, as the spec asks of writers."""
        head = bytearray(
            self.V2.pack(
                C.MAGIC, self.version, self.backing_file_offset, self.backing_file_size,
                self.cluster_bits, self.size, self.crypt_method, self.l1_size,
                self.l1_table_offset, self.refcount_table_offset, self.refcount_table_clusters,
                self.nb_snapshots, self.snapshots_offset,
            )
        )
        if self.version == 3:
            head += self.V3.pack(
                self.incompatible_features, self.compatible_features,
                self.autoclear_features & KNOWN_AUTOCLEAR, self.refcount_order,
                self.header_length,
            )
            if self.header_length > C.V3_MIN_HEADER_LENGTH:
                head += bytes([self.compression_type]) + b"\0" * 7
            head += self.unknown_fields
            head = head[: self.header_length]
        head += encode_extensions(list(self.extensions))
        if self.backing_file is not None:
            name = self.backing_file.encode("utf-8", "surrogateescape")
            if self.backing_file_offset < len(head):
                raise FormatError("backing file name would overlap the header extensions")
            head += b"\0" * (self.backing_file_offset - len(head))
            head += name
        return bytes(head)

    def relayout(self) -> Header:
        """Recompute backing_file_offset/size after extensions or the name changed."""
        length = self.header_length if self.version == 3 else C.V2_HEADER_LENGTH
        ext_len = len(encode_extensions(list(self.extensions)))
        if self.backing_file is None:
            return self.replace(backing_file_offset=0, backing_file_size=0)
        name = self.backing_file.encode("utf-8", "surrogateescape")
        if len(name) > C.MAX_BACKING_NAME_BYTES:
            raise FormatError(
                f"backing file name is {len(name)} bytes, the limit is {C.MAX_BACKING_NAME_BYTES}"
            )
        off = length + ext_len
        if off + len(name) > self.cluster_size:
            raise FormatError("header, extensions and backing file name do not fit in cluster 0")
        return self.replace(backing_file_offset=off, backing_file_size=len(name))


def new_header(
    *, version: int, cluster_bits: int, size: int, l1_size: int, l1_table_offset: int,
    refcount_table_offset: int, refcount_table_clusters: int, refcount_order: int,
    compression_type: int = C.COMPRESSION_ZLIB, lazy_refcounts: bool = False,
    extended_l2: bool = False, backing_file: str | None = None, backing_fmt: str | None = None,
    data_file: str | None = None, data_file_raw: bool = False,
) -> Header:
    """The header of a new image as QEMU 7.2 writes it for these options: feature bits and
    extensions (backing format, data file, the feature-name table above 4 KiB clusters in
    version 3, dropped when cluster 0 is too small for it) and the backing name laid out.
    The one place create's rules live (ops/create and convert's planned images use it)."""
    incompat = compatible = autoclear = 0
    exts: list[Extension] = []
    if backing_fmt is not None and backing_file is not None:
        exts.append(Extension(C.EXT_BACKING_FORMAT, backing_fmt.encode()))
    if data_file is not None:
        incompat |= Incompatible.EXTERNAL_DATA_FILE
        exts.append(Extension(C.EXT_DATA_FILE, data_file.encode()))
        if data_file_raw:
            autoclear |= Autoclear.DATA_FILE_RAW
    if version == 3 and cluster_bits > 12:
        # QEMU 7.2 writes the optional feature-name table only above 4 KiB clusters
        exts.append(Extension(C.EXT_FEATURE_TABLE, feature_table_bytes()))
    if extended_l2:
        incompat |= Incompatible.EXTENDED_L2
    if compression_type != C.COMPRESSION_ZLIB:
        incompat |= Incompatible.COMPRESSION_TYPE
    if lazy_refcounts:
        compatible |= Compatible.LAZY_REFCOUNTS
    fields = dict(
        version=version, backing_file_offset=0, backing_file_size=0, cluster_bits=cluster_bits,
        size=size, crypt_method=0, l1_size=l1_size,
        l1_table_offset=l1_table_offset if l1_size else 0,
        refcount_table_offset=refcount_table_offset,
        refcount_table_clusters=refcount_table_clusters, nb_snapshots=0, snapshots_offset=0,
        incompatible_features=incompat, compatible_features=compatible,
        autoclear_features=autoclear, refcount_order=refcount_order,
        header_length=C.V3_HEADER_LENGTH if version == 3 else C.V2_HEADER_LENGTH,
        compression_type=compression_type, backing_file=backing_file,
    )
    try:
        return Header(extensions=tuple(exts), **fields).relayout()  # type: ignore[arg-type]
    except FormatError:
        # like QEMU: the optional feature-name table is left out when cluster 0 is too small
        kept = tuple(x for x in exts if x.type != C.EXT_FEATURE_TABLE)
        return Header(extensions=kept, **fields).relayout()  # type: ignore[arg-type]
