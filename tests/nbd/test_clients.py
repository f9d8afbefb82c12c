"""qcow2kit serve against the real clients, with qemu-nbd 7.2 as the oracle: nbdinfo (JSON and
every map context), nbdcopy, qemu-img convert / map / compare / info and qemu-io over
nbd+unix://, then qemu-img check of the served image."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import QEMU_IO, assert_clean, qemu_compare, qemu_img, qemu_io
from tests.nbd.nbdtools import NBDCOPY, NBDINFO, QCOW2KIT, cli_serve, our_server, qemu_nbd, run, uri


def _chain(tmp_path: Path) -> Path:
    """QEMU_FACTS_2 section 4's image: 8M overlay, backing data 0-2M, top data 1-2M, top zero
    cluster 4-5M; plus a compressed cluster and data past a shorter backing file's end."""
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "7M")
    qemu_io(base, "write -P 1 0 2M", "write -P 3 6M 64k")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top), "8M")
    qemu_io(top, "write -P 2 1M 1M", "write -z 4M 1M", "write -c -P 4 3M 64k", "write -P 5 7680k 4k")
    return top


def _prealloc(tmp_path: Path) -> Path:
    img = tmp_path / "pre.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "preallocation=metadata", str(img), "4M")
    qemu_io(img, "write -P 9 1M 128k")
    return img


def _raw_backing(tmp_path: Path) -> Path:
    raw = tmp_path / "base.raw"
    with open(raw, "wb") as f:
        f.truncate(3 << 20)
        f.seek(1 << 20)
        f.write(b"\x07" * 65536)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(top), "4M")
    qemu_io(top, "write -P 2 2M 64k")
    return top


IMAGES = {"chain": _chain, "prealloc": _prealloc, "rawback": _raw_backing}


def _both(
    image: Path, tmp_path: Path, args: tuple[str, ...], *commands: list[str]
) -> tuple[list[str], list[str]]:
    """Run the commands (URI placeholder "{uri}") against qemu-nbd, then our server, on the
    same image; the outputs of each."""
    outs: list[list[str]] = []
    for which in ("qemu", "ours"):
        sock = tmp_path / f"{which}.sock"
        start = qemu_nbd if which == "qemu" else cli_serve
        name = args[args.index("-x") + 1] if "-x" in args else ""
        with start(image, sock, *args, *(("-t",) if which == "ours" else ())):
            outs.append([run(*[a.replace("{uri}", uri(sock, name)) for a in c]) for c in commands])
    return outs[0], outs[1]


def _json(text: str, sock_name: str) -> dict[str, object]:
    data = json.loads(text)
    for ex in data["exports"]:
        ex.pop("uri")
    return data  # type: ignore[no-any-return]


@pytest.mark.parametrize("args", [
    (),
    ("-r",),
    ("-r", "-e", "4", "-A", "-x", "exp1", "-D", "my desc"),
    ("-e", "2", "-A", "--discard=unmap", "--detect-zeroes=unmap"),
])
def test_nbdinfo_json_matches_qemu_nbd(tmp_path: Path, args: tuple[str, ...]) -> None:
    image = _chain(tmp_path)
    theirs, ours = _both(image, tmp_path, args, [str(NBDINFO), "--json", "{uri}"])
    assert _json(ours[0], "ours") == _json(theirs[0], "qemu")


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_nbdinfo_maps_match_qemu_nbd(tmp_path: Path, kind: str) -> None:
    image = IMAGES[kind](tmp_path)
    theirs, ours = _both(
        image, tmp_path, ("-r", "-A"),
        [str(NBDINFO), "--map", "{uri}"],
        [str(NBDINFO), "--map=qemu:allocation-depth", "{uri}"],
        [str(NBDINFO), "--map", "--totals", "{uri}"],
    )
    assert ours == theirs
    assert len(ours[0].splitlines()) > 1


@pytest.mark.parametrize("readonly", [True, False])
def test_dirty_bitmap_context_matches_qemu_nbd(tmp_path: Path, readonly: bool) -> None:
    image = _chain(tmp_path)
    qemu_img("bitmap", "--add", "-g", "64k", str(image), "bm0")
    qemu_img("bitmap", "--add", "--disable", "-g", "512", str(image), "bm1")
    qemu_io(image, "write -P 9 1M 100k", "write -z 5M 64k", "discard 7M 4k")
    qemu_img("bitmap", "--merge", "bm0", str(image), "bm1")
    args = ("-B", "bm0") if readonly else ("-B", "bm1")
    commands = [
        [str(NBDINFO), "--json", "{uri}"],
        [str(NBDINFO), f"--map=qemu:dirty-bitmap:{args[1]}", "{uri}"],
        [str(NBDINFO), "--map", "{uri}"],
    ]
    theirs, ours = _both(image, tmp_path, (("-r",) if readonly else ()) + args, *commands)
    assert _json(ours[0], "ours") == _json(theirs[0], "qemu")
    assert ours[1:] == theirs[1:]
    assert "dirty" in ours[1]


def test_dirty_bitmap_context_shows_writes_through_the_export(tmp_path: Path) -> None:
    image = _chain(tmp_path)
    qemu_img("bitmap", "--add", str(image), "live")
    sock = tmp_path / "w.sock"
    with cli_serve(image, sock, "-B", "live", "-t"):
        run(str(QEMU_IO), "-f", "raw", "-c", "write -P 3 2M 4k", uri(sock))
        live = run(str(NBDINFO), "--map=qemu:dirty-bitmap:live", uri(sock))
    assert [line.split()[:3] for line in live.splitlines()] == [
        ["0", str(2 << 20), "0"], [str(2 << 20), "65536", "1"],
        [str((2 << 20) + 65536), str((8 << 20) - (2 << 20) - 65536), "0"]]
    assert_clean(image)
    # and it was stored: qemu-nbd reads the same after the server closed the image
    theirs, _ = _both(image, tmp_path, ("-r", "-B", "live"),
                      [str(NBDINFO), "--map=qemu:dirty-bitmap:live", "{uri}"])
    assert theirs[0] == live


def test_nbdcopy_and_convert_give_the_same_raw(tmp_path: Path) -> None:
    image = _chain(tmp_path)
    want = tmp_path / "want.raw"
    qemu_img("convert", "-O", "raw", str(image), str(want))
    sock = tmp_path / "s.sock"
    copy = tmp_path / "copy.raw"
    conv = tmp_path / "conv.raw"
    with cli_serve(image, sock, "-r", "-e", "4", "-t"):
        run(str(NBDCOPY), uri(sock), str(copy))
        qemu_img("convert", "-f", "raw", "-O", "raw", uri(sock), str(conv))
        qemu_img("convert", "-O", "raw", uri(sock), str(tmp_path / "probed.raw"))
        # qemu-img over NBD agrees with the direct answers
        res = qemu_img("compare", "-f", "raw", uri(sock), str(image))
        assert res.returncode == 0
        info = json.loads(qemu_img("info", "--output=json", uri(sock)).stdout)
        direct = json.loads(qemu_img("info", "--output=json", str(image)).stdout)
        assert info["virtual-size"] == direct["virtual-size"]
        nbd_map = json.loads(qemu_img("map", "--output=json", "-f", "raw", uri(sock)).stdout)
    # systemd-style socket activation, as nbdcopy starts a server itself
    activated = tmp_path / "activated.raw"
    run(str(NBDCOPY), "--", "[", *QCOW2KIT, "serve", "-r", "-f", "qcow2", str(image), "]", str(activated))
    for out in (copy, conv, tmp_path / "probed.raw", activated):
        assert out.read_bytes() == want.read_bytes()
    direct_map = json.loads(qemu_img("map", "--output=json", str(image)).stdout)
    assert _zero_data(nbd_map) == _zero_data(direct_map)


def _zero_data(entries: list[dict[str, object]]) -> list[tuple[object, ...]]:
    """(start, end, zero, data) merged: what block status over NBD can say. Over data the
    zero flag is only a hint (QEMU's metadata-preallocation guess from the file's allocated
    blocks, which writeback changes), so it is left out there."""
    out: list[list[object]] = []
    for e in entries:
        start, length = int(str(e["start"])), int(str(e["length"]))
        key = (e["zero"] if not e["data"] else None, e["data"])
        if out and tuple(out[-1][2:]) == key and out[-1][1] == start:
            out[-1][1] = start + length
        else:
            out.append([start, start + length, *key])
    return [tuple(x) for x in out]


WORKLOAD = (
    "write -P 5 1000 200k",
    "write -z 300k 500k",
    "write -P 7 1M 2M",
    "discard 1536k 1M",
    "write -z -u 2M 512k",
    "aio_write -P 9 5M 64k",
    "aio_write -P 10 5200k 64k",
    "aio_flush",
    "write -z 6000000 1000",
    "write -f -P 11 7M 3000",
    "write -P 0 6M 192k",
    "write -P 0 6400k 1000",
    "flush",
    "read -P 7 1M 512k",
)


@pytest.mark.parametrize("compat, options, layout", [
    ("1.1", ("--discard=unmap",), "plain"),
    ("0.10", ("--discard=unmap",), "plain"),
    ("1.1", ("--discard=unmap", "--detect-zeroes=unmap"), "plain"),
    ("1.1", ("--detect-zeroes=on",), "plain"),
    ("0.10", ("--detect-zeroes=on",), "plain"),
    ("1.1", ("--discard=unmap",), "overlay"),
    ("0.10", ("--discard=unmap",), "overlay"),
    ("1.1", (), "compressed"),
    ("1.1", ("--discard=unmap",), "xl2"),
])
def test_qemu_io_writes_match_qemu_nbd(
    tmp_path: Path, compat: str, options: tuple[str, ...], layout: str
) -> None:
    """The same writes, zeroes and discards through qemu-nbd and through us: the images are
    clean, identical in content and mapping, and equal to a raw mirror. Over a plain image,
    an overlay of a backing file, and compressed clusters."""
    base = tmp_path / "base.qcow2"
    if layout == "overlay":
        below = tmp_path / "below.qcow2"
        qemu_img("create", "-f", "qcow2", "-o", f"compat={compat}", str(below), "8M")
        qemu_io(below, "write -P 1 0 3M", "write -P 3 4M 2M")
        qemu_img("create", "-f", "qcow2", "-o", f"compat={compat}", "-b", "below.qcow2", "-F", "qcow2",
                 str(base))
        qemu_io(base, "write -P 4 512k 1M")
    else:
        xl2 = ",extended_l2=on" if layout == "xl2" else ""
        qemu_img("create", "-f", "qcow2", "-o", f"compat={compat}{xl2}", str(base), "8M")
        if layout == "compressed":
            qemu_io(base, "write -c -P 6 0 1M", "write -c -P 7 5M 128k", "write -P 1 1M 2M")
        else:
            qemu_io(base, "write -P 1 0 3M")
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    shutil.copy(base, ours)
    shutil.copy(base, theirs)
    mirror = tmp_path / "mirror.raw"
    qemu_img("convert", "-O", "raw", str(base), str(mirror))
    qemu_io(mirror, *WORKLOAD, fmt="raw")
    for image, start in ((theirs, qemu_nbd), (ours, cli_serve)):
        sock = tmp_path / f"{image.stem}.sock"
        with start(image, sock, *options, *(("-t",) if start is cli_serve else ())):
            qemu_io(uri(sock), *WORKLOAD, fmt="raw")
    assert_clean(ours)
    qemu_compare(ours, theirs, "qcow2", "qcow2")
    # with discards ignored (or a no-op: v2 over a backing file) the mirror differs
    if "--discard=unmap" in options and not (compat == "0.10" and layout == "overlay"):
        qemu_compare(ours, mirror)
    # the same mapping; where freed clusters are reused is the allocator's business. With
    # extended L2 qemu zeroes single subclusters, Image.write_zeroes whole clusters only
    # (partial ones get zero bytes): same content, different mapping
    if layout != "xl2":
        assert _without_offsets(ours) == _without_offsets(theirs)


def _without_offsets(image: Path) -> list[tuple[object, ...]]:
    out: list[list[object]] = []
    for e in json.loads(qemu_img("map", "--output=json", str(image)).stdout):
        key = (e["depth"], e["present"], e["zero"], e["data"], "offset" in e)
        if out and tuple(out[-1][2:]) == key and out[-1][1] == e["start"]:
            out[-1][1] = e["start"] + e["length"]
        else:
            out.append([e["start"], e["start"] + e["length"], *key])
    return [tuple(x) for x in out]


def test_default_discard_ignores_trim(tmp_path: Path) -> None:
    image = tmp_path / "i.qcow2"
    qemu_img("create", "-f", "qcow2", str(image), "4M")
    qemu_io(image, "write -P 1 0 1M")
    before = qemu_img("map", "--output=json", str(image)).stdout
    sock = tmp_path / "s.sock"
    with our_server(image, sock):
        qemu_io(uri(sock), "discard 0 1M", fmt="raw")
    assert qemu_img("map", "--output=json", str(image)).stdout == before
    assert_clean(image)


def test_served_image_is_locked(tmp_path: Path) -> None:
    image = tmp_path / "i.qcow2"
    qemu_img("create", "-f", "qcow2", str(image), "1M")
    sock = tmp_path / "s.sock"
    with our_server(image, sock):
        res = qemu_img("info", str(image), check=False)
        assert res.returncode != 0 and "lock" in res.stderr
        assert qemu_img("info", "-U", str(image)).returncode == 0
    assert not os.path.exists(sock)


def test_clients_write_into_the_server(tmp_path: Path) -> None:
    """qemu-img convert -n (which first zeroes the target with FAST_ZERO) and nbdcopy write
    an image into a served one: same content, clean image."""
    source = _chain(tmp_path)
    target = tmp_path / "target.qcow2"
    qemu_img("create", "-f", "qcow2", str(target), "8M")
    qemu_io(target, "write -P 9 0 8M")
    sock = tmp_path / "t.sock"
    with our_server(target, sock, max_clients=4):
        qemu_img("convert", "-n", "-f", "qcow2", "-O", "raw", str(source), uri(sock))
        assert qemu_img("compare", str(source), str(target), "-U").returncode == 0
        qemu_io(uri(sock), "write -P 3 0 8M", fmt="raw")
        flat = tmp_path / "flat.raw"  # nbdcopy reads local files as raw
        qemu_img("convert", "-O", "raw", str(source), str(flat))
        run(str(NBDCOPY), str(flat), uri(sock))
    assert_clean(target)
    qemu_compare(target, source, "qcow2", "qcow2")
