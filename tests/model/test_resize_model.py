"""The write-path state machine with resize (grow and shrink) and compact mixed in: the model
is truncated or extended with zeros, and QEMU judges the result (qemu-img check clean with no
leaks, qemu-img compare equal to the model, every snapshot still holding its data); after
every step the image reads what the model holds around the last change and at seeded places."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import rule

import qcow2kit
from tests.model.machine import Config, DiskMachine, run_machine

CONFIGS = [
    Config(512, 64, "1.1", creator="ours", size=2 << 20),
    Config(4096, 16, "1.1", backing="qcow2", creator="qemu"),
    Config(4096, 16, "0.10", backing="raw", creator="ours"),
    Config(4096, 16, "1.1", start="compressed", size=4 << 20),
    Config(4096, 16, "1.1", start="snapshot"),
    Config(65536, 16, "0.10", start="snapshot", size=8 << 20),
    Config(65536, 64, "1.1", extended_l2=True, creator="qemu", size=8 << 20),
    Config(65536, 16, "1.1", backing="qcow2", creator="qemu", size=8 << 20, lazy=True),
    Config(4096, 16, "1.1", creator="qemu", data_file=True),
    Config(512, 16, "1.1", start="snapshot", tiny_cache=True, size=2 << 20),
]


class ResizeMachine(DiskMachine):
    def _span(self, data: st.DataObject, max_len: int | None = None) -> tuple[int, int]:
        size = self.model.size
        cs = self.cfg.cluster_size
        offset = data.draw(st.integers(0, size - 1), label="offset")
        if data.draw(st.booleans(), label="aligned"):
            offset -= offset % cs
        length = data.draw(st.integers(1, min(4 * cs, 1 << 20)), label="length")
        return offset, max(0, min(length, size - offset))

    @rule(data=st.data())
    def resize(self, data: st.DataObject) -> None:
        cs = self.cfg.cluster_size
        new = data.draw(
            st.sampled_from([cs, 3 * cs + 512, self.cfg.size // 2, self.cfg.size * 2])
            | st.integers(1, 2 * self.cfg.size // 512).map(lambda n: n * 512),
            label="new_size",
        )
        old = self.model.size
        if self.img.snapshots and self.img.header.version < 3:
            with pytest.raises(qcow2kit.ResizeError):
                self.img.resize(new, shrink=True)
            return
        self.img.resize(new, shrink=new < old)
        if new < old:
            del self.model.data[new:]
        else:
            self.model.data.extend(bytes(new - old))
        self.model.size = new
        # check the old and the new end: a grow reads zeros, a shrink keeps what is left
        lo = min(old, new)
        self.touched = (max(0, lo - cs), min(max(old, new), lo + cs) - max(0, lo - cs))

    @rule()
    def compact(self) -> None:
        self.img.compact()
        self.touched = None  # moves data anywhere: the seeded windows check it


@pytest.mark.slow
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.id for c in CONFIGS])
def test_resize_state_machine(cfg: Config) -> None:
    run_machine(ResizeMachine, cfg, examples=4, steps=12)
