"""The NBD wire format (doc/proto.md of NetworkBlockDevice/nbd): magic numbers, option,
command, flag and error values, and the encoders/decoders of every header this server sends
or receives.

Pure: bytes <-> values only. Never touches a socket, a file or an image, and keeps no state.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# ---- handshake ------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9  # option replies

FLAG_FIXED_NEWSTYLE = 1 << 0  # server handshake flags
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0  # client flags
FLAG_C_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

MAX_STRING = 4096  # export names, descriptions, context names
MAX_OPTION_LENGTH = 1 << 20  # larger options are refused (NBD_REP_ERR_TOO_BIG) and dropped

# ---- transmission flags (export flags) -----------------------------------------------------
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# ---- commands --------------------------------------------------------------------------------
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# errno values on the wire are the protocol's, not the host's
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

STATE_HOLE = 1 << 0  # base:allocation
STATE_ZERO = 1 << 1

MAX_BUFFER = 32 << 20  # the largest READ / WRITE payload (qemu-nbd's NBD_MAX_BUFFER_SIZE)
MAX_EXTENTS = (1 << 20) // 8  # block status descriptors per context in one reply

CTX_BASE_ALLOCATION = "base:allocation"
CTX_ALLOCATION_DEPTH = "qemu:allocation-depth"
CTX_DIRTY_BITMAP = "qemu:dirty-bitmap:"

# ---- structs ---------------------------------------------------------------------------------
SERVER_GREETING = struct.Struct(">QQH")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

COMMAND_NAMES = {
    CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM", CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
}


class ProtocolError(Exception):
    """The peer broke the protocol; the connection is dropped."""


@dataclass(frozen=True, slots=True)
class Request:
    flags: int
    type: int
    cookie: int
    offset: int
    length: int


def greeting() -> bytes:
    return SERVER_GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def option_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(REPLY_MAGIC, option, reply, len(payload)) + payload


def info_export(size: int, eflags: int) -> bytes:
    return U16.pack(INFO_EXPORT) + EXPORT_NAME_REPLY.pack(size, eflags)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return U16.pack(INFO_BLOCK_SIZE) + struct.pack(">III", minimum, preferred, maximum)


def info_string(kind: int, text: bytes) -> bytes:
    return U16.pack(kind) + text


def server_entry(name: bytes, description: bytes) -> bytes:
    return U32.pack(len(name)) + name + description


def meta_context_entry(context_id: int, name: bytes) -> bytes:
    return U32.pack(context_id) + name


def decode_request(header: bytes) -> Request:
    magic, flags, kind, cookie, offset, length = REQUEST.unpack(header)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#x}")
    return Request(flags, kind, cookie, offset, length)


def simple_reply(error: int, cookie: int) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk(flags: int, kind: int, cookie: int, length: int) -> bytes:
    """A structured reply chunk header announcing `length` payload bytes."""
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, length)


def data_chunk_header(cookie: int, offset: int, length: int, *, done: bool) -> bytes:
    """OFFSET_DATA: the header and offset; `length` data bytes follow."""
    flags = REPLY_FLAG_DONE if done else 0
    return chunk(flags, REPLY_TYPE_OFFSET_DATA, cookie, 8 + length) + U64.pack(offset)


def hole_chunk(cookie: int, offset: int, length: int, *, done: bool) -> bytes:
    flags = REPLY_FLAG_DONE if done else 0
    return chunk(flags, REPLY_TYPE_OFFSET_HOLE, cookie, 12) + struct.pack(">QI", offset, length)


def error_chunk(cookie: int, error: int, message: str) -> bytes:
    text = message.encode()[:MAX_STRING]
    payload = struct.pack(">IH", error, len(text)) + text
    return chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, len(payload)) + payload


def block_status_chunk(
    cookie: int, context_id: int, extents: list[tuple[int, int]], *, done: bool
) -> bytes:
    body = b"".join(struct.pack(">II", n, f) for n, f in extents)
    flags = REPLY_FLAG_DONE if done else 0
    return chunk(flags, REPLY_TYPE_BLOCK_STATUS, cookie, 4 + len(body)) + U32.pack(context_id) + body


def done_chunk(cookie: int) -> bytes:
    return chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)
