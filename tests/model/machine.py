"""The state machine the model tests share: a qcow2 image (made by qemu-img or by
qcow2kit.create, in many configurations) driven by random write / write_zeroes / discard /
flush / reopen steps, mirrored on a bytearray model (qcow2kit.testing.DiskModel).

Invariants after every step: the image reads what the model holds around the range the last
step changed and at a few seeded places elsewhere, and its virtual size is the model's.
Teardown: QEMU judges, independently of qcow2kit: `qemu-img check` finds no corruption and no
leak, `qemu-img compare` finds the image equal to the model, each internal snapshot still holds
its content, and a write through qemu-io leaves the image clean.

Test modules subclass DiskMachine (adding rules) and set `cfg` per parametrised case."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import qcow2kit
from qcow2kit.testing import DiskModel
from tests.helpers import (
    assert_clean,
    pattern,
    qemu_check,
    qemu_compare,
    qemu_img,
    qemu_io,
    set_cache_capacity,
    stable_seed,
    to_raw,
)


@dataclass(frozen=True)
class Config:
    cluster_size: int
    refcount_bits: int = 16
    compat: str = "1.1"
    extended_l2: bool = False
    backing: str | None = None  # None, "qcow2" or "raw"
    creator: str = "qemu"  # "qemu" or "ours"
    size: int = 8 << 20
    lazy: bool = False
    data_file: bool = False  # external data file (qemu-img / qcow2kit create data_file=)
    start: str = "empty"  # "empty", "compressed" (qemu-img convert -c), "snapshot" (data + snapshot)
    tiny_cache: bool = False  # L2 and refcount caches of 2 tables: evictions all the time
    data_file_raw: bool = False
    zstd: bool = False

    @property
    def id(self) -> str:
        parts = [
            f"cs{self.cluster_size // 1024}k" if self.cluster_size >= 1024 else f"cs{self.cluster_size}",
            f"rc{self.refcount_bits}",
            f"v{self.compat}",
            self.creator,
        ]
        if self.extended_l2:
            parts.append("xl2")
        if self.backing:
            parts.append(f"bk-{self.backing}")
        if self.lazy:
            parts.append("lazy")
        if self.data_file:
            parts.append("datafile")
        if self.start != "empty":
            parts.append(self.start)
        if self.tiny_cache:
            parts.append("tinycache")
        if self.data_file_raw:
            parts.append("raw")
        if self.zstd:
            parts.append("zstd")
        if self.size % self.cluster_size:
            parts.append(f"size{self.size}")
        return "-".join(parts)



def _compressible(seed: int, n: int) -> bytes:
    rng = np.random.default_rng(seed)
    words = rng.integers(97, 105, size=n, dtype=np.uint8)
    words[rng.random(n) < 0.3] = 32
    out = words.tobytes()
    # some all-zero and some incompressible stretches too
    cut = n // 4
    return bytes(cut) + out[cut : 2 * cut] + rng.bytes(cut // 4) + out[2 * cut + cut // 4 :]


def make_image(cfg: Config, d: Path) -> tuple[Path, bytes | None, bytes | None, dict[str, bytes]]:
    """Create the image (and backing file). Returns its path, the backing file's content,
    the guest content to start from (None: all backing/zeros) and snapshot contents."""
    img = d / "disk.qcow2"
    backing: bytes | None = None
    opts: list[str] = [
        f"cluster_size={cfg.cluster_size}",
        f"compat={cfg.compat}",
    ]
    if cfg.compat != "0.10":
        opts.append(f"refcount_bits={cfg.refcount_bits}")
    if cfg.extended_l2:
        opts.append("extended_l2=on")
    if cfg.lazy:
        opts.append("lazy_refcounts=on")
    if cfg.zstd:
        opts.append("compression_type=zstd")
    kwargs: dict[str, object] = {}
    if cfg.backing:
        # the backing file is shorter than the overlay: the tail reads zeros
        bsize = cfg.size // 2 + cfg.cluster_size // 2 // 512 * 512 + 512
        backing = pattern(cfg.size, bsize)
        bpath = d / ("base.raw" if cfg.backing == "raw" else "base.qcow2")
        if cfg.backing == "raw":
            bpath.write_bytes(backing)
        else:
            tmp_raw = d / "base-src.raw"
            tmp_raw.write_bytes(backing)
            qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096",
                     str(tmp_raw), str(bpath))
            tmp_raw.unlink()
        opts += [f"backing_file={bpath.name}", f"backing_fmt={cfg.backing}"]
        kwargs = {"backing_file": bpath.name, "backing_fmt": cfg.backing}
    if cfg.data_file:
        opts.append(f"data_file={d / 'disk.data'}")
        kwargs["data_file"] = str(d / "disk.data")
        if cfg.data_file_raw:
            opts.append("data_file_raw=on")
            kwargs["data_file_raw"] = True
    initial: bytes | None = None
    snapshots: dict[str, bytes] = {}
    if cfg.start == "compressed":
        assert not cfg.backing and not cfg.data_file
        src = d / "src.raw"
        initial = _compressible(cfg.size, cfg.size)
        src.write_bytes(initial)
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", ",".join(opts), str(src), str(img))
        src.unlink()
        assert qemu_check(img)["compressed-clusters"] > 0
        return img, backing, initial, snapshots
    if cfg.creator == "qemu":
        qemu_img("create", "-f", "qcow2", "-o", ",".join(opts), str(img), str(cfg.size))
    else:
        qcow2kit.create(
            str(img),
            cfg.size,
            cluster_size=cfg.cluster_size,
            compat=cfg.compat,
            refcount_bits=cfg.refcount_bits,
            extended_l2=cfg.extended_l2,
            lazy_refcounts=cfg.lazy,
            **kwargs,  # type: ignore[arg-type]
        )
    if cfg.start == "snapshot":
        half = cfg.size // 2
        qemu_io(img, f"write -P 0x11 0 {half}", f"write -P 0x22 {half + half // 2} {half // 4}")
        qemu_img("snapshot", "-c", "s1", str(img))
        qemu_io(img, f"write -P 0x33 {half // 2} {half}")
        initial = to_raw(img, d / "s.raw", keep=False)
        snapshots["s1"] = to_raw(img, d / "s.raw", snapshot="s1", keep=False)
    return img, backing, initial, snapshots


class DiskMachine(RuleBasedStateMachine):
    cfg: Config

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="qk-sm-"))
        self.path, backing, initial, self.snapshots = make_image(self.cfg, self.dir)
        self.model = DiskModel(self.cfg.size, backing)
        if initial is not None:
            self.model.data[:] = initial
        self.seed = 0
        self.steps = 0
        # the guest range the last step changed (None: none, or nothing to single out)
        self.touched: tuple[int, int] | None = None
        self._open()

    def _open(self) -> None:
        self.img = qcow2kit.open(str(self.path), "r+")
        if self.cfg.tiny_cache:
            set_cache_capacity(self.img, 2)

    # ---- strategies built from the config ------------------------------------------------
    @initialize()
    def start(self) -> None:
        pass

    def _span(self, data: st.DataObject, max_len: int | None = None) -> tuple[int, int]:
        cs = self.cfg.cluster_size
        size = self.cfg.size
        unit = cs // 32 if self.cfg.extended_l2 else 512
        n_clusters = -(-size // cs)
        cluster = data.draw(st.integers(0, n_clusters - 1), label="cluster")
        delta = data.draw(
            st.sampled_from([0, 1, 511, 512, unit - 1, unit, unit + 1, cs // 2, cs - 1])
            | st.integers(0, cs - 1),
            label="delta",
        )
        offset = min(size - 1, cluster * cs + delta)
        limit = max_len or min(4 * cs, 1 << 20) + 1
        length = data.draw(
            st.sampled_from([1, 511, 512, unit, cs - 1, cs, cs + 1, 2 * cs - 1, 3 * cs])
            | st.integers(1, limit),
            label="length",
        )
        length = max(0, min(length, size - offset))
        return offset, length

    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        offset, length = self._span(data)
        self.seed += 1
        payload = pattern(self.seed, length)
        self.img.write(offset, payload)
        self.model.write(offset, payload)
        self.touched = (offset, length)

    @rule(data=st.data(), unmap=st.booleans())
    def write_zeroes(self, data: st.DataObject, unmap: bool) -> None:
        offset, length = self._span(data)
        self.img.write_zeroes(offset, length, unmap=unmap)
        self.model.write_zeroes(offset, length)
        self.touched = (offset, length)

    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        offset, length = self._span(data)
        self.img.discard(offset, length)
        self.model.discard(offset, length)
        self.touched = (offset, length)

    @rule()
    def flush(self) -> None:
        self.img.flush()

    @rule()
    def reopen(self) -> None:
        self.img.close()
        self._open()

    @precondition(lambda self: self.seed > 0)
    @rule(data=st.data())
    def read_back(self, data: st.DataObject) -> None:
        offset, length = self._span(data)
        assert self.img.read(offset, length) == self.model.read(offset, length)

    # ---- invariants: checked after every step ---------------------------------------------
    def probes(self) -> list[tuple[int, int]]:
        """Guest ranges to compare after a step: the clusters the last step touched (with a
        sector on either side: a partial-cluster write copies the rest of its cluster) and two
        seeded windows elsewhere."""
        size = self.model.size
        cs = self.cfg.cluster_size
        out: list[tuple[int, int]] = []
        if self.touched is not None:
            offset, length = self.touched
            lo = max(0, offset - offset % cs - 512)
            hi = min(size, -(-(offset + length) // cs) * cs + 512)
            if hi > lo:
                out.append((lo, hi - lo))
        rng = random.Random(stable_seed(self.cfg.id, self.steps))
        window = min(cs, 64 << 10)
        for _ in range(2):
            start = rng.randrange(size)
            out.append((start, min(window, size - start)))
        return out

    @invariant()
    def reads_match_model(self) -> None:
        self.steps += 1
        assert self.img.virtual_size == self.model.size
        for offset, length in self.probes():
            got = self.img.read(offset, length)
            want = self.model.read(offset, length)
            if got != want:
                i = next(k for k in range(length) if got[k] != want[k])
                raise AssertionError(
                    f"guest byte {offset + i:#x} reads {got[i]:#04x}, the model holds {want[i]:#04x}"
                    f" (after step {self.steps}, last change {self.touched})"
                )

    def teardown(self) -> None:
        try:
            self.img.close()
            assert_clean(self.path)
            raw = self.dir / "model.raw"
            raw.write_bytes(self.model.raw())
            qemu_compare(self.path, raw)
            for name, content in self.snapshots.items():
                # apply it to a copy: convert -l would read it at the active (maybe resized) size
                copy = self.dir / "applied.qcow2"
                shutil.copyfile(self.path, copy)
                qemu_img("snapshot", "-a", name, str(copy))
                assert to_raw(copy, self.dir / "snap.raw", keep=False) == content, name
            # and QEMU can still write to it: a write through qemu-io keeps it clean
            qemu_io(self.path, f"write -P 0x5a 0 {min(self.model.size, 65536)}")
            assert_clean(self.path)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def run_machine(base: type[DiskMachine], cfg: Config, examples: int, steps: int) -> None:
    """Run the machine class `base` on one configuration; QK_SM_EXAMPLES / QK_SM_STEPS
    override the number of runs and of steps per run."""
    name = f"{base.__name__}_{cfg.id.replace('-', '_').replace('.', '_')}"
    machine = type(name, (base,), {"cfg": cfg})
    test_case = machine.TestCase
    test_case.settings = settings(
        max_examples=int(os.environ.get("QK_SM_EXAMPLES", str(examples))),
        stateful_step_count=int(os.environ.get("QK_SM_STEPS", str(steps))),
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=False,
    )
    test_case().runTest()
