"""qcow2 opened with meta_writethrough (what the daemon does when it journals its rings): a writer
killed with SIGKILL and never flushed loses no write it saw return, including writes that
allocated clusters (and L2 tables); `qemu-img check` finds leaks at most, and none after a clean
close (docs/DESIGN.md, "Restart without guest impact")."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.storage import qemu_check, qemu_raw
from tests.fixtures.wait import proc_alive, wait_until
from xenblk.storage import Image

SIZE = 8 << 20
SLOT = 3000  # unaligned: writes straddle clusters, partial ones copy-on-write from the backing file


def slot_order(nslots: int) -> list[int]:
    # scrambled, so allocations interleave across L2 tables and refcount blocks
    return [(i * 7919) % nslots for i in range(nslots)]


def pattern(s: int) -> bytes:
    return bytes([s % 251 + 1]) * SLOT


def backing_bytes() -> bytes:
    return bytes((i * 37 + 11) % 256 for i in range(4096)) * (SIZE // 4096)


WORKLOAD = r"""
import os, sys
from tests.test_storage_writethrough import SLOT, pattern, slot_order
from xenblk.storage import Image
path, log = sys.argv[1], sys.argv[2]
img = Image.open(path, "qcow2", meta_writethrough=True, backing_dirs=[os.path.dirname(path)])
fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
for i, s in enumerate(slot_order(img.size // SLOT)):
    img.write(s * SLOT, pattern(s))
    # acknowledged: it returned. No fsync: a killed process loses nothing in the page cache.
    os.write(fd, f"{s}\n".encode())
while True:
    pass
"""


def make_image(make_qcow2: Callable[..., Path], tmp_path: Path, cluster_size: int, backed: bool) -> Path:
    if not backed:
        return make_qcow2("w.qcow2", SIZE, cluster_size=cluster_size)
    base = tmp_path / "base.raw"
    base.write_bytes(backing_bytes())
    return make_qcow2("w.qcow2", SIZE, backing=base, backing_fmt="raw", cluster_size=cluster_size)


@pytest.mark.parametrize("backed", [False, True], ids=["plain", "backed"])
@pytest.mark.parametrize("cluster_size", [512, 4096, 65536])
def test_kill9_keeps_acknowledged_allocating_writes(
    make_qcow2: Callable[..., Path], tmp_path: Path, cluster_size: int, backed: bool
) -> None:
    p = make_image(make_qcow2, tmp_path, cluster_size, backed)
    log = tmp_path / "acked.log"
    order = slot_order(SIZE // SLOT)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", WORKLOAD, str(p), str(log)], env=env, stderr=subprocess.PIPE)
    try:
        # kill mid-stream: about half the slots acknowledged, the writer busy allocating
        wait_until(lambda: log.exists() and log.read_text().count("\n") >= len(order) // 2,
                   "half the slots acknowledged", interval=0.01, alive=proc_alive(proc, "the writer"))  # fmt: skip
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    rc, report = qemu_check(p)
    assert rc in (0, 3), report
    assert report.get("corruptions", 0) == 0 and "error" not in report, report
    acked = [int(x) for x in log.read_text().split()]
    assert acked == order[: len(acked)]
    assert len(acked) >= len(order) // 2
    # The write after the last logged one may have returned (or not) before the kill.
    maybe = order[len(acked)] if len(acked) < len(order) else None
    expected = bytearray(backing_bytes() if backed else bytes(SIZE))
    for s in acked:
        expected[s * SLOT : (s + 1) * SLOT] = pattern(s)
    oracle = qemu_raw(p)
    data = bytearray(oracle)
    if maybe is not None:
        data[maybe * SLOT : (maybe + 1) * SLOT] = expected[maybe * SLOT : (maybe + 1) * SLOT]
    assert len(data) == SIZE
    bad = next((i for i in range(0, SIZE, SLOT) if data[i : i + SLOT] != expected[i : i + SLOT]), None)
    assert bad is None, f"slot {bad // SLOT} differs after kill -9 (acknowledged writes lost or damaged)"
    # Our driver reads the same, and can go on allocating on the leaky image.
    img = Image.open(str(p), "qcow2", meta_writethrough=True, backing_dirs=[str(tmp_path)])
    try:
        assert img.read(0, SIZE) == oracle
        img.write(SIZE - SLOT, b"\x5a" * SLOT)
    finally:
        img.close()
    rc, report = qemu_check(p)
    assert rc in (0, 3) and report.get("corruptions", 0) == 0, report


@pytest.mark.parametrize("backed", [False, True], ids=["plain", "backed"])
@pytest.mark.parametrize("cluster_size", [512, 65536])
def test_clean_close_gives_the_reserve_back(
    make_qcow2: Callable[..., Path], tmp_path: Path, cluster_size: int, backed: bool
) -> None:
    p = make_image(make_qcow2, tmp_path, cluster_size, backed)
    order = slot_order(SIZE // SLOT)
    expected = bytearray(backing_bytes() if backed else bytes(SIZE))
    img = Image.open(str(p), "qcow2", meta_writethrough=True, backing_dirs=[str(tmp_path)])
    try:
        for i, s in enumerate(order[: len(order) // 3]):
            img.write(s * SLOT, pattern(s))
            expected[s * SLOT : (s + 1) * SLOT] = pattern(s)
            if i % 97 == 0:
                img.flush()  # gives the reserve back; the next allocation takes a new one
                if i % 2 == 0:
                    img.discard(s * SLOT, 2 * cluster_size)
                    lo = (s * SLOT + cluster_size - 1) // cluster_size * cluster_size
                    hi = (s * SLOT + 2 * cluster_size) // cluster_size * cluster_size
                    expected[lo:hi] = bytes(hi - lo)
        img.flush()
        rc, report = qemu_check(p)  # after a flush, with the image still open
        assert rc == 0 and report.get("leaks", 0) == 0, report
        assert img.read(0, SIZE) == bytes(expected)
    finally:
        img.close()
    rc, report = qemu_check(p)
    assert rc == 0, report
    assert report.get("leaks", 0) == 0 and report.get("corruptions", 0) == 0, report
    assert qemu_raw(p) == bytes(expected)
