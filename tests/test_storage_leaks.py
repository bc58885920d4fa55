"""Leaked qcow2 clusters (a refcount with no reference: what a kill between the refcount update and
the L2 entry leaves, since refcount-first is the crash-safe order) are given back: by `xenblk image
check --repair-leaks` offline, and by the daemon when it resumes a device a killed daemon left."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.fixtures.backend import FakeDataplane, Harness, backend_config, run_daemon, wait_for
from tests.fixtures.storage import qemu_check, qemu_io, qemu_raw
from xenblk.sim.xenstored import Xenstored
from xenblk.storage import Image, StorageError
from xenblk.xen.vdev import vdev_to_devid
from xenblk.xenstore import XenStore


def plant_leaks(path: Path, count: int) -> None:
    """Counts `count` clusters past the end of the file, as a killed allocator leaves them: refcount 1,
    nothing references them (16-bit refcounts, in the first refcount block)."""
    with path.open("r+b") as f:
        hdr = f.read(104)
        cluster_bits = struct.unpack(">I", hdr[20:24])[0]
        rt_off = struct.unpack(">Q", hdr[48:56])[0]
        assert struct.unpack(">I", hdr[96:100])[0] == 4, "the test writes 16-bit refcounts"
        cs = 1 << cluster_bits
        f.seek(rt_off)
        rb_off = struct.unpack(">Q", f.read(8))[0]
        end = f.seek(0, 2)
        first = (end + cs - 1) // cs
        assert first + count < cs // 2, "the leaks must land in the first refcount block"
        for i in range(count):
            f.seek(rb_off + (first + i) * 2)
            f.write(struct.pack(">H", 1))
        f.truncate((first + count) * cs)


def _seeded(make_qcow2: Callable[..., Path], name: str) -> Path:
    p = make_qcow2(name, "8M", cluster_size=65536)
    qemu_io(p, "qcow2", "write -P 0x5a 0 192k", "write -P 0xa5 1M 64k")
    plant_leaks(p, 3)
    rc, report = qemu_check(p)
    assert (rc, report.get("leaks")) == (3, 3), report
    return p


def test_repair_gives_leaks_back_and_keeps_the_data(make_qcow2: Callable[..., Path]) -> None:
    p = _seeded(make_qcow2, "leaky.qcow2")
    before = qemu_raw(p)
    with Image.open(str(p), "qcow2") as img:
        assert img.check()["leaks"] == 3
        assert img.repair_leaks() == 3
        assert img.check()["leaks"] == 0
        img.write(2 << 20, b"\x33" * 65536)  # an allocation after the repair reuses a freed cluster
    rc, report = qemu_check(p)
    assert rc == 0, report
    after = qemu_raw(p)
    assert after[: 2 << 20] == before[: 2 << 20] and after[2 << 20 : (2 << 20) + 65536] == b"\x33" * 65536


def test_repair_refuses_a_read_only_image(make_qcow2: Callable[..., Path]) -> None:
    p = _seeded(make_qcow2, "ro.qcow2")
    with Image.open(str(p), "qcow2", readonly=True) as img:
        try:
            img.repair_leaks()
        except StorageError as e:
            assert "read-only" in str(e)
        else:
            raise AssertionError("a read-only image was repaired")
    assert qemu_check(p)[1].get("leaks") == 3


def test_cli_check_repair_leaks(make_qcow2: Callable[..., Path]) -> None:
    p = _seeded(make_qcow2, "cli.qcow2")
    run = [sys.executable, "-m", "xenblk", "image", "check", "-f", "qcow2", "--json", str(p)]
    plain = subprocess.run(run, capture_output=True, text=True)
    assert plain.returncode == 3 and json.loads(plain.stdout)["leaks"] == 3, plain.stderr
    fixed = subprocess.run([*run, "--repair-leaks"], capture_output=True, text=True)
    res = json.loads(fixed.stdout)
    assert fixed.returncode == 0 and (res["repaired_leaks"], res["leaks"]) == (3, 0), fixed.stderr
    assert qemu_check(p)[0] == 0


async def test_a_resumed_device_gives_back_what_the_killed_daemon_leaked(
    xenstored: Xenstored, xs: XenStore, tmp_path: Path, make_qcow2: Callable[..., Path]
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    cfg = backend_config(tmp_path, images)
    img = make_qcow2("images/d1.qcow2", "8M", cluster_size=65536)
    qemu_io(img, "qcow2", "write -P 0x5a 0 128k")
    dp = FakeDataplane()
    async with run_daemon(xenstored, cfg, dp) as (daemon, _task):
        h = Harness(xs, daemon, dp, images, cfg)
        await h.attach(1, "xvdb", params=f"qcow2:{img}")
        await h.connect(1, "xvdb", queues=1)
    b = h.b(1, "xvdb")
    await xs.write(f"{b}/state", "4")  # killed while connected: nothing was closed
    plant_leaks(img, 2)  # ... in the middle of two allocations
    dp2 = FakeDataplane()
    dp2.granted = dp.granted
    dp2.journals.add((1, vdev_to_devid("xvdb")))
    async with run_daemon(xenstored, cfg, dp2) as (_daemon2, _):
        await wait_for(lambda: _connected(dp2), "resumed")
        assert dp2.running(1, vdev_to_devid("xvdb")).resumed
    rc, report = qemu_check(img)
    assert rc == 0, report


async def _connected(dp: FakeDataplane) -> bool:
    return bool(dp.connects)
