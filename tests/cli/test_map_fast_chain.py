"""`map`'s fast path through backing chains (ops/map_chain.py) against the full path
(ops/map.py) and qemu-img:

- overlays over qcow2 and raw bases (with holes, a size not a multiple of 512), three
  layers, bases smaller and larger than the overlay, overlay data and zero clusters (with and
  without a host cluster) over base data, small overlay clusters over large base ones: the
  same JSON and human text as the full path and as `qemu-img map`, depths and merging
  included, for the whole disk and for ranges;
- the command really takes it: no numpy in the process;
- a missing backing file, a loop, a chain too deep, a corrupt base or a base it does not map
  (compressed clusters): it declines, and the command gives the same output, error and exit
  code with and without it;
- convert's early path still declines an overlay (its data is not all in one file).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qcow2kit.cli.main import main
from qcow2kit.ops import map_plain
from qcow2kit.ops.map import format_human, format_json, map_path_extents
from tests.helpers import qemu_img, qemu_io

MIB = 1 << 20

Maker = Callable[[Path], Path]


def _qcow2(p: Path, size: str, *cmds: str, backing: Path | None = None,
           backing_fmt: str = "qcow2", cluster: str = "64k") -> Path:
    args = ["create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}"]
    if backing is not None:
        args += ["-b", backing.name, "-F", backing_fmt]
    qemu_img(*args, str(p), size)
    if cmds:
        qemu_io(p, *cmds)
    return p


def _raw(p: Path, size: int, *cmds: str) -> Path:
    with open(p, "wb") as f:
        f.truncate(size)
    if cmds:
        qemu_io(p, *cmds, fmt="raw")
    return p


def _over_qcow2(p: Path) -> Path:
    base = _qcow2(p.with_name("b.qcow2"), "64M", "write -q -P 1 0 8M", "write -q 20M 1M",
                  "write -q -z 30M 1M")
    return _qcow2(p, "64M", "write -q -P 2 4M 1M", "write -q 40M 64k", backing=base)


def _over_raw(p: Path) -> Path:
    # holes between the data, and a size that is not a whole number of sectors
    base = _raw(p.with_name("b.raw"), 10 * MIB + 1000, "write -q -P 1 0 1M",
                "write -q -P 1 3M 2M", "write -q -P 1 10M 1000")
    return _qcow2(p, "16M", "write -q -P 2 512k 1M", "write -q 6M 64k", "write -q 12M 64k",
                  backing=base, backing_fmt="raw")


def _three_layers(p: Path) -> Path:
    raw = _raw(p.with_name("b.raw"), 32 * MIB, "write -q -P 1 0 4M", "write -q -P 1 16M 4M")
    mid = _qcow2(p.with_name("m.qcow2"), "32M", "write -q -P 2 2M 4M", "write -q -z 17M 1M",
                 backing=raw, backing_fmt="raw")
    return _qcow2(p, "48M", "write -q -P 3 3M 64k", "write -q -z -u 18M 1M",
                  "write -q 40M 1M", backing=mid)


def _base_smaller(p: Path) -> Path:
    base = _qcow2(p.with_name("b.qcow2"), "8M", "write -q 0 2M", "write -q 7M 1M")
    return _qcow2(p, "64M", "write -q 1M 64k", "write -q 9M 64k", backing=base)


def _base_larger(p: Path) -> Path:
    base = _qcow2(p.with_name("b.qcow2"), "128M", "write -q 0 2M", "write -q 30M 4M",
                  "write -q 100M 1M")
    return _qcow2(p, "32M", "write -q 1M 64k", backing=base)


def _zero_over_data(p: Path) -> Path:
    base = _qcow2(p.with_name("b.qcow2"), "16M", "write -q -P 1 0 16M")
    return _qcow2(p, "16M", "write -q -z 1M 1M", "write -q -z -u 4M 2M", "write -q 8M 64k",
                  "write -q -z 8M 64k", "write -q -z 9M 4k", backing=base)


def _small_clusters(p: Path) -> Path:
    base = _qcow2(p.with_name("b.qcow2"), "8M", "write -q 0 8M", cluster="2M")
    cmds = [f"write -q {k * 3}k 512" for k in range(0, 2000, 7)]
    return _qcow2(p, "8M", *cmds, backing=base, cluster="512")


def _empty_overlay(p: Path) -> Path:
    base = _qcow2(p.with_name("b.qcow2"), "16M", "write -q 1M 1M")
    return _qcow2(p, "16M", backing=base)


CHAINS: dict[str, Maker] = {
    "over-qcow2": _over_qcow2,
    "over-raw": _over_raw,
    "three-layers": _three_layers,
    "base-smaller": _base_smaller,
    "base-larger": _base_larger,
    "zero-over-data": _zero_over_data,
    "small-clusters": _small_clusters,
    "empty-overlay": _empty_overlay,
}


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = CHAINS[name](tmp_path_factory.mktemp(name) / "top.qcow2")
        return built[name]
    yield get


def _both(path: Path, start: int = 0, length: int | None = None
          ) -> tuple[str, tuple[str, str | None]]:
    """The fast path's answer, asserted equal to the full path's."""
    found = map_plain.plain_map(str(path), start=start, length=length)
    assert not isinstance(found, str), f"fell back: {found}"
    full = map_path_extents(str(path), start=start, length=length)
    assert found.json() == format_json(full)
    assert found.human() == format_human(full)
    return found.json(), found.human()


@pytest.mark.parametrize("name", CHAINS)
def test_chains_same_as_full_path_and_qemu(chains: Callable[[str], Path], name: str) -> None:
    path = chains(name)
    text, human = _both(path)
    assert '"depth": 1' in text  # the chain is really walked
    assert text == qemu_img("map", "--output=json", str(path)).stdout
    assert human == (qemu_img("map", str(path)).stdout, None)


@pytest.mark.parametrize("name", ["over-qcow2", "over-raw", "three-layers", "base-smaller",
                                  "zero-over-data", "small-clusters"])
def test_ranges_same_as_full_path_and_qemu(chains: Callable[[str], Path], name: str) -> None:
    path = chains(name)
    ranges = [(0, 1), (4 * MIB - 1, 2 * MIB + 2), (MIB + 512, 7 * MIB), (8 * MIB - 512, 4096),
              (10 * MIB + 512, MIB), (3000, None), (16 * MIB - 1, 2), (1 << 40, 5), (5, 0)]
    for start, length in ranges:
        text, _ = _both(path, start, length)
        argv = ["map", "--output=json", f"--start-offset={start}", str(path)]
        if length is not None:
            argv.insert(2, f"--max-length={length}")
        assert text == qemu_img(*argv).stdout, (start, length)


_PROBE = (
    "import sys\n"
    "from qcow2kit.cli.main import main\n"
    "rc = main(sys.argv[1:])\n"
    "sys.stdout.flush()\n"
    "print('numpy' in sys.modules, file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


@pytest.mark.parametrize("argv", [["--output=json"], [],
                                  ["--output=json", "--start-offset=3M", "--max-length=20M"]])
@pytest.mark.parametrize("name", ["over-qcow2", "three-layers"])
def test_command_takes_the_fast_path(chains: Callable[[str], Path], name: str,
                                     argv: list[str]) -> None:
    path = str(chains(name))
    res = subprocess.run([sys.executable, "-c", _PROBE, "map", *argv, path],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stderr.split() == ["False"]  # numpy never imported
    assert res.stdout == qemu_img("map", *argv, path).stdout


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _same_without_fast_path(path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str, str]]:
    """map of `path`, JSON and human: the fast path declines, and the command gives the same
    output, error and exit code with it as without it."""
    assert isinstance(map_plain.plain_map(str(path)), str)
    results = []
    for extra in (["--output=json"], []):
        argv = ["map", *extra, str(path)]
        with_fast = _run(argv, capsys)
        with monkeypatch.context() as m:
            m.setattr(map_plain, "plain_map", lambda *a, **k: "disabled by the test")
            without = _run(argv, capsys)
        assert with_fast == without
        assert "internal error" not in with_fast[2]
        results.append(with_fast)
    return results


def _missing(p: Path) -> Path:
    base = _qcow2(p.with_name("b.qcow2"), "16M")
    top = _qcow2(p, "16M", backing=base)
    base.unlink()
    return top


def _loop(p: Path) -> Path:
    a = _qcow2(p.with_name("a.qcow2"), "16M")
    top = _qcow2(p, "16M", backing=a)
    qemu_img("rebase", "-q", "-u", "-b", p.name, "-F", "qcow2", str(a))
    return top


def _too_deep(p: Path) -> Path:
    below = _qcow2(p.with_name("l0.qcow2"), "1M")
    for k in range(1, 70):
        below = _qcow2(p.with_name(f"l{k}.qcow2"), "1M", backing=below)
    return _qcow2(p, "1M", backing=below)


def _corrupt_base(p: Path) -> Path:
    base = _qcow2(p.with_name("b.qcow2"), "16M", "write -q 0 4M")
    top = _qcow2(p, "16M", "write -q 1M 64k", backing=base)
    with open(base, "r+b") as f:
        f.truncate(1024)  # the header names tables past the end of the file
    return top


def _compressed_base(p: Path) -> Path:
    base = _qcow2(p.with_name("b.qcow2"), "16M", "write -q -c 0 128k", "write -q 4M 1M")
    return _qcow2(p, "16M", "write -q 4M 64k", backing=base)


def _raw_backing_format_on_qcow2(p: Path) -> Path:
    # the base is qcow2, the overlay says raw: both paths map the qcow2 file as raw bytes
    base = _qcow2(p.with_name("b.qcow2"), "16M", "write -q 0 1M")
    return _qcow2(p, "16M", backing=base, backing_fmt="raw")


ERRORS: dict[str, tuple[Maker, bool]] = {  # maker, whether map fails
    "missing": (_missing, True),
    "loop": (_loop, True),
    "too-deep": (_too_deep, True),
    "corrupt-base": (_corrupt_base, True),
    "compressed-base": (_compressed_base, False),
}


@pytest.mark.parametrize("name", ERRORS)
def test_declines_and_answers_the_same(tmp_path: Path, name: str,
                                       capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    maker, fails = ERRORS[name]
    path = maker(tmp_path / "top.qcow2")
    results = _same_without_fast_path(path, capsys, monkeypatch)
    for extra, (rc, out, err) in zip((["--output=json"], []), results, strict=True):
        if fails:
            assert rc == 1 and out == "" and err.startswith("qcow2kit: ")
        else:  # the full path's answer, qemu-img's (human: stopped by compressed clusters)
            ref = qemu_img("map", *extra, str(path), check=False)
            assert (rc, out) == ((0 if ref.returncode == 0 else 1), ref.stdout)


def test_raw_backing_format_over_a_qcow2_file(tmp_path: Path) -> None:
    path = _raw_backing_format_on_qcow2(tmp_path / "top.qcow2")
    text, _ = _both(path)
    assert text == qemu_img("map", "--output=json", str(path)).stdout


def test_no_backing_maps_the_overlay_alone(chains: Callable[[str], Path]) -> None:
    path = chains("three-layers")
    found = map_plain.plain_map(str(path), backing=False)
    assert not isinstance(found, str)
    full = map_path_extents(str(path), backing=False)
    assert found.json() == format_json(full) and '"depth": 1' not in found.json()


def test_convert_early_path_declines_an_overlay(chains: Callable[[str], Path]) -> None:
    """ops/convert/early.py copies what plain_map(chain=False) answers from one file: an
    overlay must decline there."""
    for name in ("over-qcow2", "over-raw", "empty-overlay"):
        reason = map_plain.plain_map(str(chains(name)), chain=False)
        assert isinstance(reason, str) and "backing" in reason


def test_convert_of_an_overlay_to_raw(chains: Callable[[str], Path], tmp_path: Path) -> None:
    for name in ("over-qcow2", "over-raw"):
        out = tmp_path / f"{name}.raw"
        assert main(["convert", "-O", "raw", str(chains(name)), str(out)]) == 0
        qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", str(chains(name)), str(out))
