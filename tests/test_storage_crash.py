"""Crash safety: a writer is kill -9'd mid-workload; afterwards qemu-img check may
report leaked clusters but no corruption, and every write acknowledged before a
completed flush is on disk."""

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

SLOT = 3000  # unaligned, so writes straddle clusters and need copy-on-write of partial ones

WORKLOAD = r"""
import os, sys
from xenblk.storage import Image
path, log = sys.argv[1], sys.argv[2]
img = Image.open(path, "qcow2")
fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
nslots = img.size // {slot}
done = []
for i in range(nslots):
    # slots in a scrambled order so allocations interleave across L2 tables and refcount blocks
    s = (i * 7919) % nslots
    img.write(s * {slot}, bytes([s % 251 + 1]) * {slot})
    done.append(s)
    if i % 40 == 0:
        img.discard(((s * {slot}) // 4096 + 1) * 4096, 4096)
        done.append(-s)
    if len(done) >= 13:
        img.flush()
        os.write(fd, "".join(f"{{d}}\n" for d in done).encode())
        os.fsync(fd)
        done = []
while True:
    pass
"""


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536])
def test_kill9_leaks_at_most(make_qcow2: Callable[..., Path], tmp_path: Path, cluster_size: int) -> None:
    p = make_qcow2("c.qcow2", "8M", cluster_size=cluster_size)
    log = tmp_path / "acked.log"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKLOAD.format(slot=SLOT), str(p), str(log)], env=env, stderr=subprocess.PIPE
    )
    try:
        # kill somewhere in the middle: once some flushes are acknowledged
        wait_until(lambda: log.exists() and log.stat().st_size > 4000, "some flushes acknowledged", interval=0.01,
                   alive=proc_alive(proc, "the writer"))  # fmt: skip
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    rc, report = qemu_check(p)
    assert rc in (0, 3), report
    assert report.get("corruptions", 0) == 0
    data = qemu_raw(p)
    entries = [int(x) for x in log.read_text().split()]
    assert entries
    discarded: set[int] = set()
    for d in entries:
        if d < 0:
            discarded.add(-d)
    for s in entries:
        if s < 0:
            continue
        got = data[s * SLOT : (s + 1) * SLOT]
        if any(d in discarded for d in (s, s - 1, s + 1, s - 2, s + 2)):
            continue  # a later discard may have zeroed a cluster of this slot
        assert got == bytes([s % 251 + 1]) * SLOT, f"acknowledged slot {s} lost"
