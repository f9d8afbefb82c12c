"""Option haggling: the fixed-newstyle handshake from the greeting to the start of
transmission (NBD_OPT_GO or NBD_OPT_EXPORT_NAME), as qemu-nbd 7.2 answers it.

Owns the option parser and every option reply: LIST, INFO, GO, EXPORT_NAME, ABORT,
STRUCTURED_REPLY, LIST_META_CONTEXT, SET_META_CONTEXT; everything else is refused with the
error the protocol names. Talks to the peer only through a Channel (recv_exact / send), so
tests can drive it with any bytes; never touches an image and never reads more than
MAX_OPTION_LENGTH bytes of one option.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from . import protocol as P


class Channel(Protocol):
    def recv_exact(self, n: int) -> bytes:
        """Exactly n bytes; raises EOFError when the peer goes away first."""
        ...

    def send(self, data: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class ExportSpec:
    """What the handshake tells a client about the one export."""

    name: str
    description: str
    size: int
    eflags: int
    contexts: tuple[str, ...]  # meta context names; a context's id is its index
    block_sizes: tuple[int, int, int] = (1, 4096, P.MAX_BUFFER)


@dataclass(slots=True)
class Negotiated:
    """The outcome of a handshake that reached transmission."""

    structured: bool = False
    contexts: list[int] = field(default_factory=list)  # selected context ids, ascending


class _RejectError(Exception):
    """An option answered with an error reply; the handshake goes on."""

    def __init__(self, reply: int, message: str) -> None:
        super().__init__(message)
        self.reply = reply


class _Reader:
    """Cursor over one option's payload; running off its end is NBD_REP_ERR_INVALID."""

    def __init__(self, data: bytes, option: str) -> None:
        self.data = data
        self.pos = 0
        self.option = option

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise _RejectError(P.REP_ERR_INVALID, f"{self.option}: option data is too short")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        return int(P.U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(P.U32.unpack(self.take(4))[0])

    def string(self, what: str) -> str:
        n = self.u32()
        if n > P.MAX_STRING:
            raise _RejectError(P.REP_ERR_INVALID, f"{self.option}: {what} is too long")
        raw = self.take(n)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise _RejectError(P.REP_ERR_INVALID, f"{self.option}: {what} is not UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise _RejectError(P.REP_ERR_INVALID, f"{self.option}: unexpected trailing option data")


_OPTION_NAMES = {
    P.OPT_EXPORT_NAME: "NBD_OPT_EXPORT_NAME", P.OPT_ABORT: "NBD_OPT_ABORT",
    P.OPT_LIST: "NBD_OPT_LIST", P.OPT_INFO: "NBD_OPT_INFO", P.OPT_GO: "NBD_OPT_GO",
    P.OPT_STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY",
    P.OPT_LIST_META_CONTEXT: "NBD_OPT_LIST_META_CONTEXT",
    P.OPT_SET_META_CONTEXT: "NBD_OPT_SET_META_CONTEXT",
}


class Handshake:
    """One client's negotiation. run() returns the Negotiated state when transmission
    starts, None when the client aborted; ProtocolError / EOFError drop the connection."""

    def __init__(self, channel: Channel, export: ExportSpec) -> None:
        self.ch = channel
        self.export = export
        self.state = Negotiated()
        self.no_zeroes = False

    def run(self) -> Negotiated | None:
        self.ch.send(P.greeting())
        (flags,) = P.U32.unpack(self.ch.recv_exact(4))
        if flags & ~P.KNOWN_CLIENT_FLAGS:
            raise P.ProtocolError(f"unknown client flags {flags:#x}")
        fixed = bool(flags & P.FLAG_C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & P.FLAG_C_NO_ZEROES)
        while True:
            magic, option, length = P.OPTION_HEADER.unpack(self.ch.recv_exact(P.OPTION_HEADER.size))
            if magic != P.IHAVEOPT:
                raise P.ProtocolError(f"bad option magic {magic:#x}")
            if length > P.MAX_OPTION_LENGTH:
                if fixed:
                    self._reply(option, P.REP_ERR_TOO_BIG, b"option too large")
                raise P.ProtocolError(f"option {option} of {length} bytes is too large")
            data = self.ch.recv_exact(length)
            if option == P.OPT_EXPORT_NAME:
                self._export_name(data)
                return self.state
            if not fixed:
                # a client without fixed newstyle cannot parse error replies
                raise P.ProtocolError(f"option {option} from a client without fixed newstyle")
            if option == P.OPT_ABORT:
                self._reply(option, P.REP_ACK)
                return None
            try:
                if self._option(option, data):
                    return self.state
            except _RejectError as rej:
                self._reply(option, rej.reply, str(rej).encode()[: P.MAX_STRING])

    # ---- replies ------------------------------------------------------------------------
    def _reply(self, option: int, reply: int, payload: bytes = b"") -> None:
        self.ch.send(P.option_reply(option, reply, payload))

    def _eflags(self) -> int:
        """DF (don't fragment) means something only with structured replies: qemu-nbd
        advertises it only once they are negotiated."""
        flags = self.export.eflags
        return flags if self.state.structured else flags & ~P.TF_SEND_DF

    def _check_name(self, name: str) -> None:
        if name != self.export.name:
            raise _RejectError(P.REP_ERR_UNKNOWN, f"export '{name}' not present")

    # ---- options ------------------------------------------------------------------------
    def _option(self, option: int, data: bytes) -> bool:
        """Answer one option; True when transmission starts."""
        name = _OPTION_NAMES.get(option, f"option {option}")
        r = _Reader(data, name)
        if option == P.OPT_LIST:
            r.end()
            ex = self.export
            self._reply(option, P.REP_SERVER,
                        P.server_entry(ex.name.encode(), ex.description.encode()))
            self._reply(option, P.REP_ACK)
        elif option in (P.OPT_INFO, P.OPT_GO):
            return self._info(option, r)
        elif option == P.OPT_STRUCTURED_REPLY:
            r.end()
            if self.state.structured:
                raise _RejectError(P.REP_ERR_INVALID, "structured reply already negotiated")
            self.state.structured = True
            self._reply(option, P.REP_ACK)
        elif option in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
            self._meta_context(option, r)
        elif option == P.OPT_STARTTLS:
            raise _RejectError(P.REP_ERR_POLICY, "TLS not configured")
        else:
            raise _RejectError(P.REP_ERR_UNSUP, f"Unsupported option {option:#x}")
        return False

    def _info(self, option: int, r: _Reader) -> bool:
        name = r.string("export name")
        count = r.u16()
        wanted = [r.u16() for _ in range(count)]
        r.end()
        self._check_name(name)
        ex = self.export
        if P.INFO_NAME in wanted:
            self._reply(option, P.REP_INFO, P.info_string(P.INFO_NAME, ex.name.encode()))
        if ex.description:  # qemu-nbd sends it whether asked or not
            self._reply(option, P.REP_INFO,
                        P.info_string(P.INFO_DESCRIPTION, ex.description.encode()))
        self._reply(option, P.REP_INFO, P.info_block_size(*ex.block_sizes))
        self._reply(option, P.REP_INFO, P.info_export(ex.size, self._eflags()))
        self._reply(option, P.REP_ACK)
        return option == P.OPT_GO

    def _export_name(self, data: bytes) -> None:
        try:
            name = data.decode()
        except UnicodeDecodeError:
            raise P.ProtocolError("export name is not UTF-8") from None
        if name != self.export.name:
            raise P.ProtocolError(f"export '{name}' not present")
        reply = P.EXPORT_NAME_REPLY.pack(self.export.size, self._eflags())
        self.ch.send(reply if self.no_zeroes else reply + bytes(124))

    def _meta_context(self, option: int, r: _Reader) -> None:
        setting = option == P.OPT_SET_META_CONTEXT
        if setting:
            self.state.contexts = []  # a failed SET leaves nothing selected
        if setting and not self.state.structured:
            raise _RejectError(P.REP_ERR_INVALID, "request structured replies first")
        name = r.string("export name")
        count = r.u32()
        queries = [r.string("query") for _ in range(count)]
        r.end()
        self._check_name(name)
        known = self.export.contexts
        if not setting and not queries:
            chosen = set(range(len(known)))
        else:
            chosen = {i for q in queries for i in _matches(known, q, listing=not setting)}
        for i in sorted(chosen):
            # qemu answers LIST with id 0 for every context: ids only mean something after SET
            cid = i if setting else 0
            self._reply(option, P.REP_META_CONTEXT, P.meta_context_entry(cid, known[i].encode()))
        if setting:
            self.state.contexts = sorted(chosen)
        self._reply(option, P.REP_ACK)


def _matches(known: tuple[str, ...], query: str, *, listing: bool) -> list[int]:
    """Context ids a query selects: an exact name, or (only when listing) every context
    under a namespace prefix such as "base:", "qemu:" or "qemu:dirty-bitmap:"."""
    if query in known:
        return [known.index(query)]
    if listing and query.endswith(":") and query.count(":") <= 2:
        return [i for i, k in enumerate(known) if k.startswith(query)]
    return []


__all__ = ["Channel", "ExportSpec", "Negotiated", "Handshake"]
