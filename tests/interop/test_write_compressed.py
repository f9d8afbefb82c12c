"""Image.write_compressed / write_compressed_clusters, the public compressed-write path that
convert uses: qemu-img map sees compressed clusters, qemu-img compare sees the data, and
qemu-img check finds no leak, also when compressed clusters are overwritten."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import qcow2kit
from qcow2kit.errors import InvalidArgumentError
from tests.helpers import assert_clean, qemu_compare


def _text(n: int, seed: int) -> bytes:
    words = [f"word{seed}-{i % 97} ".encode() for i in range(n // 8 + 1)]
    return b"".join(words)[:n]


@pytest.mark.parametrize(
    ("cluster_size", "refcount_bits", "ctype"),
    [(65536, 16, "zlib"), (4096, 1, "zlib"), (512, 64, "zstd")],
)
def test_compressed_writes_read_back(
    tmp_path: Path, cluster_size: int, refcount_bits: int, ctype: str
) -> None:
    img = tmp_path / "c.qcow2"
    size = 64 * cluster_size
    qcow2kit.create(str(img), size, cluster_size=cluster_size, refcount_bits=refcount_bits,
                    compression_type=ctype)
    mirror = bytearray(size)
    with qcow2kit.open(str(img), "r+") as disk:
        data = _text(8 * cluster_size, 1)
        disk.write_compressed(4 * cluster_size, data)
        mirror[4 * cluster_size : 12 * cluster_size] = data
        # incompressible: stored as a plain cluster
        noise = random.Random(cluster_size).randbytes(cluster_size)
        disk.write_compressed(20 * cluster_size, noise)
        mirror[20 * cluster_size : 21 * cluster_size] = noise
        # overwrite compressed clusters, compressed again: the old bytes lose their refs
        again = _text(2 * cluster_size, 2)
        disk.write_compressed(6 * cluster_size, again)
        mirror[6 * cluster_size : 8 * cluster_size] = again
        # and a plain write over a compressed cluster
        disk.write(10 * cluster_size + 100, b"P" * 300)
        mirror[10 * cluster_size + 100 : 10 * cluster_size + 400] = b"P" * 300
    raw = tmp_path / "m.raw"
    raw.write_bytes(bytes(mirror))
    out = assert_clean(img)
    qemu_compare(img, raw)
    # 8 compressed, 2 of them rewritten compressed, 1 turned plain by the partial write;
    # the noise cluster is plain
    assert out.get("compressed-clusters") == 7, out
    assert out.get("allocated-clusters") == 9, out


def test_misaligned_compressed_write_is_refused(tmp_path: Path) -> None:
    img = tmp_path / "c.qcow2"
    qcow2kit.create(str(img), 1 << 20, cluster_size=65536)
    with qcow2kit.open(str(img), "r+") as disk:
        with pytest.raises(InvalidArgumentError):
            disk.write_compressed(512, bytes(65536))
        with pytest.raises(InvalidArgumentError):
            disk.write_compressed(0, bytes(1000))
    assert_clean(img)
