"""Random bytes against the handshake parser (pure, through a fake channel) and against the
request parser of a running server: the handshake only ever ends in transmission, an abort,
or a dropped connection; every reply it sends is a well-formed option reply; the server
survives every request stream and the image stays consistent."""

from __future__ import annotations

import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcow2kit.nbd import protocol as P
from qcow2kit.nbd.handshake import ExportSpec, Handshake, Negotiated
from tests.helpers import assert_clean, qemu_img
from tests.nbd.nbdtools import NBDINFO, RawClient, our_server, run, uri

SPEC = ExportSpec("", "desc", 1 << 20, 0xCED, ("base:allocation", "qemu:allocation-depth"))


class FakeChannel:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.sent: list[bytes] = []

    def recv_exact(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise EOFError("end of input")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def send(self, data: bytes) -> None:
        self.sent.append(data)


def _option(opt: int, body: bytes) -> bytes:
    return P.OPTION_HEADER.pack(P.IHAVEOPT, opt, len(body)) + body


_strings = st.binary(max_size=12) | st.sampled_from([b"", b"base:", b"qemu:", b"base:allocation",
                                                     b"qemu:allocation-depth", b"qemu:dirty-bitmap:"])


@st.composite
def option_stream(draw: st.DrawFn) -> bytes:
    """Client flags, then options that are mostly well framed with random contents."""
    out = struct.pack(">I", draw(st.sampled_from([3, 1, 0, 2, 0xFFFFFFFF])))
    for _ in range(draw(st.integers(0, 6))):
        opt = draw(st.integers(0, 12))
        if draw(st.booleans()):
            name = draw(_strings)
            queries = draw(st.lists(_strings, max_size=3))
            count = draw(st.sampled_from([len(queries), len(queries) + 1, 0xFFFFFFFF]))
            body = struct.pack(">I", len(name)) + name + struct.pack(">I", count)
            body += b"".join(struct.pack(">I", len(q)) + q for q in queries)
            if opt in (P.OPT_INFO, P.OPT_GO):
                body = struct.pack(">I", len(name)) + name + struct.pack(">H", len(queries))
                body += b"".join(struct.pack(">H", len(q)) for q in queries)
        else:
            body = draw(st.binary(max_size=40))
        out += _option(opt, body)
    return out + draw(st.binary(max_size=40))


@settings(max_examples=300, deadline=None)
@given(data=option_stream() | st.binary(max_size=200))
def test_handshake_parser_on_random_bytes(data: bytes) -> None:
    ch = FakeChannel(data)
    try:
        result = Handshake(ch, SPEC).run()
    except (EOFError, P.ProtocolError):
        result = None
    assert result is None or isinstance(result, Negotiated)
    for msg in ch.sent[1:]:
        magic, _opt, kind, n = P.OPTION_REPLY.unpack(msg[:20]) if len(msg) >= 20 else (0, 0, 0, 0)
        if magic != P.REPLY_MAGIC:  # only the EXPORT_NAME reply has no header
            assert len(msg) in (10, 134)
            continue
        assert len(msg) == 20 + n
        assert kind in (P.REP_ACK, P.REP_SERVER, P.REP_INFO, P.REP_META_CONTEXT) or kind & P.REP_FLAG_ERROR
    if result is not None:
        assert result.contexts == sorted(set(result.contexts))
        assert all(0 <= c < len(SPEC.contexts) for c in result.contexts)


@st.composite
def request_stream(draw: st.DrawFn) -> bytes:
    out = b""
    size = 1 << 20
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.integers(0, 9))
        flags = draw(st.sampled_from([0, 1, 2, 4, 8, 16, 0xFFFF]))
        offset = draw(st.sampled_from([0, 512, size - 512, size, size + 1, 1 << 63]))
        length = draw(st.sampled_from([0, 1, 512, 4096, 65536, 1 << 25, 0xFFFFFFFF]))
        magic = draw(st.sampled_from([P.REQUEST_MAGIC] * 6 + [0, 0x12345678]))
        out += P.REQUEST.pack(magic, flags, kind, draw(st.integers(0, 9)), offset % (1 << 64), length)
        if kind == P.CMD_WRITE and length <= 65536:
            out += bytes([draw(st.integers(0, 255))]) * draw(st.sampled_from([length, length // 2]))
    return out + draw(st.binary(max_size=30))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=request_stream())
def test_request_parser_on_random_streams(tmp_path: Path, stream: bytes) -> None:
    image = tmp_path / "f.qcow2"
    sock = tmp_path / "f.sock"
    if image.exists():
        image.unlink()
    qemu_img("create", "-f", "qcow2", str(image), "1M")
    with our_server(image, sock, max_clients=4, handshake_timeout=5.0, stop_grace=2.0):
        c = RawClient(sock, timeout=5.0)
        c.greet()
        c.go(contexts=("base:allocation",))
        try:
            c.sock.sendall(stream)
        except OSError:
            pass  # the server may already have dropped us
        c.close()
        assert int(run(str(NBDINFO), "--size", uri(sock), timeout=60)) == 1 << 20
    assert_clean(image)
