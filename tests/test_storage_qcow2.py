"""qcow2 through xenblk.storage.Image, with QEMU as the oracle."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.storage import qemu_check, qemu_img, qemu_io, qemu_raw
from xenblk.storage import Image

KiB = 1 << 10
MiB = 1 << 20

COMBOS = [
    {"cluster_size": 512, "compat": "1.1", "refcount_bits": 16},
    {"cluster_size": 4096, "compat": "0.10", "refcount_bits": 16},
    {"cluster_size": 65536, "compat": "1.1", "refcount_bits": 1},
    {"cluster_size": 65536, "compat": "1.1", "refcount_bits": 64},
    {"cluster_size": 2 * MiB, "compat": "1.1", "refcount_bits": 16},
    {"cluster_size": 4096, "compat": "1.1", "refcount_bits": 2},
]


def _ids(c: dict[str, object]) -> str:
    return f"cs{c['cluster_size']}-v{c['compat']}-rc{c['refcount_bits']}"


def _qemu_writes(path: Path) -> None:
    qemu_io(path, "qcow2", "write -P 0xab 0 64k", "write -P 0xcd 1M 3k", "write -P 0x11 5000 700", "write -z 96k 8k")


@pytest.mark.parametrize("opts", COMBOS, ids=_ids)
def test_read_matches_qemu(make_qcow2: Callable[..., Path], opts: dict[str, object]) -> None:
    p = make_qcow2("a.qcow2", "4M", **opts)
    _qemu_writes(p)
    with Image.open(str(p), "qcow2", readonly=True) as img:
        assert img.size == 4 * MiB and img.readonly
        assert img.read(0, img.size) == qemu_raw(p)
        info = img.info()
        assert info["cluster_size"] == opts["cluster_size"]
        assert info["qcow2_version"] == (2 if opts["compat"] == "0.10" else 3)
        assert info["refcount_bits"] == opts["refcount_bits"]


def _workload(img: Image, ref: bytearray, seed: int, n: int, cs: int, wmax: int) -> None:
    rnd = random.Random(seed)
    size = len(ref)
    for k in range(n):
        off = rnd.randrange(0, size)
        ln = min(rnd.randrange(1, 3 * wmax + 100), size - off)
        data = bytes([rnd.randrange(1, 256)]) * ln
        img.write(off, data)
        ref[off : off + ln] = data
        if k % 17 == 0:
            img.flush()
        if k % 23 == 0:
            o = rnd.randrange(0, size // cs) * cs
            ln = min(cs, size - o)
            img.discard(o, ln)
            ref[o : o + ln] = bytes(ln)


@pytest.mark.parametrize("opts", COMBOS, ids=_ids)
def test_workload_check_and_compare(make_qcow2: Callable[..., Path], tmp_path: Path, opts: dict[str, object]) -> None:
    p = make_qcow2("w.qcow2", "4M", **opts)
    _qemu_writes(p)
    ref = bytearray(qemu_raw(p))
    cs = int(str(opts["cluster_size"]))
    with Image.open(str(p), "qcow2") as img:
        _workload(img, ref, seed=cs, n=150, cs=cs, wmax=min(cs, 64 * KiB))
        assert img.read(0, img.size) == bytes(ref)
        res = img.check()
        assert res["corruptions"] == 0 and res["leaks"] == 0
    rc, report = qemu_check(p)
    assert rc == 0, report
    raw = tmp_path / "ref.raw"
    raw.write_bytes(ref)
    assert qemu_img("compare", "-f", "qcow2", "-F", "raw", str(p), str(raw), check=False).returncode == 0


def test_refcount_table_growth(make_qcow2: Callable[..., Path], tmp_path: Path) -> None:
    # 512-byte clusters with 64-bit refcounts: one refcount block covers 64 clusters,
    # and the initial one-cluster reftable 64 blocks, so 2 MiB of data must grow it.
    p = make_qcow2("g.qcow2", "4M", cluster_size=512, refcount_bits=64)
    data = random.Random(7).randbytes(3 * MiB)
    with Image.open(str(p), "qcow2") as img:
        for off in range(0, len(data), 64 * KiB):
            img.write(off, data[off : off + 64 * KiB])
        img.flush()
    rc, report = qemu_check(p)
    assert rc == 0, report
    assert qemu_raw(p)[: len(data)] == data


def test_backing_chain_cow(make_qcow2: Callable[..., Path], tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(random.Random(1).randbytes(4 * MiB))
    mid = make_qcow2("mid.qcow2", "", backing=base, backing_fmt="raw", cluster_size=4096)
    qemu_io(mid, "qcow2", "write -P 0x22 64k 64k")
    top = make_qcow2("top.qcow2", "", backing=Path("mid.qcow2"), cluster_size=65536)  # relative name
    ref = bytearray(qemu_raw(top))
    with Image.open(str(top), "qcow2", backing_dirs=[str(tmp_path)]) as img:
        info = img.info()
        assert info["backing_format"] == "qcow2" and info["backing"]["backing_format"] == "raw"
        assert img.read(0, img.size) == bytes(ref)
        for off, ln in ((100, 10), (70 * KiB, 5), (3 * MiB + 1, 70000)):  # partial clusters: COW from backing
            img.write(off, b"\x99" * ln)
            ref[off : off + ln] = b"\x99" * ln
        img.discard(2 * MiB, 128 * KiB)  # must read zeros afterwards, not the backing's data
        ref[2 * MiB : 2 * MiB + 128 * KiB] = bytes(128 * KiB)
        assert img.read(0, img.size) == bytes(ref)
    rc, report = qemu_check(top)
    assert rc == 0, report
    assert qemu_raw(top) == bytes(ref)
    assert base.read_bytes() == random.Random(1).randbytes(4 * MiB)  # backing untouched


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_clusters(make_qcow2: Callable[..., Path], tmp_path: Path, ctype: str) -> None:
    src = tmp_path / "src.raw"
    rnd = random.Random(3)
    src.write_bytes(b"".join(bytes([rnd.randrange(4)]) * 4096 + rnd.randbytes(512) for _ in range(400)))
    p = tmp_path / "c.qcow2"
    r = qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", str(src), str(p), check=False)
    if r.returncode:
        pytest.skip(f"qemu-img cannot write {ctype}: {r.stderr}")
    ref = bytearray(src.read_bytes())
    with Image.open(str(p), "qcow2") as img:
        assert img.info()["compression_type"] == ctype
        assert img.read(0, img.size) == bytes(ref)
        img.write(70000, b"\x55" * 3000)  # COW out of a compressed cluster
        ref[70000:73000] = b"\x55" * 3000
        img.discard(0, 128 * KiB)
        ref[0 : 128 * KiB] = bytes(128 * KiB)
        assert img.read(0, img.size) == bytes(ref)
    rc, report = qemu_check(p)
    assert rc == 0, report
    assert qemu_raw(p) == bytes(ref)


def test_concurrent_writers(make_qcow2: Callable[..., Path], tmp_path: Path) -> None:
    p = make_qcow2("t.qcow2", "8M", cluster_size=4096)
    ref = bytearray(8 * MiB)
    errors: list[BaseException] = []
    with Image.open(str(p), "qcow2") as img:

        def worker(t: int) -> None:
            try:
                rnd = random.Random(t)
                base = t * 2 * MiB  # disjoint regions, so the reference is order-independent
                for k in range(120):
                    off = base + rnd.randrange(0, 2 * MiB - 20000)
                    data = bytes([t * 16 + k % 16 + 1]) * rnd.randrange(1, 20000)
                    img.write(off, data)
                    ref[off : off + len(data)] = data
                    if k % 10 == 0:
                        img.flush()
                    if k % 15 == 0:
                        o = base + rnd.randrange(0, 500) * 4096
                        img.discard(o, 4096)
                        ref[o : o + 4096] = bytes(4096)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors
        assert img.read(0, img.size) == bytes(ref)
    rc, report = qemu_check(p)
    assert rc == 0, report
    raw = tmp_path / "ref.raw"
    raw.write_bytes(ref)
    assert qemu_img("compare", "-f", "qcow2", "-F", "raw", str(p), str(raw), check=False).returncode == 0


def test_reftable_grows_twice_between_flushes(make_qcow2: Callable[..., Path]) -> None:
    # 512-byte clusters with 64-bit refcounts, no flush until the end: the
    # reftable is relocated more than once before any of it reaches the disk.
    p = make_qcow2("g2.qcow2", "16M", cluster_size=512, refcount_bits=64)
    data = random.Random(9).randbytes(12 * MiB)
    with Image.open(str(p), "qcow2") as img:
        img.write(0, data)
        assert img.read(0, len(data)) == data
    rc, report = qemu_check(p)
    assert rc == 0, report
    assert qemu_raw(p)[: len(data)] == data
