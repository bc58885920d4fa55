"""Online resize of a block device learnt from the kernel's uevent (as after `lvextend`): a loop
device over a file grows with `losetup -c`, the daemon publishes the new size by itself."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.backend import FakeDataplane, Harness, backend_config, run_daemon, wait_for
from xenblk.backend.uevents import parse_block_resize
from xenblk.sim.xenstored import Xenstored
from xenblk.xen.vdev import vdev_to_devid
from xenblk.xenstore import XenStore

pytestmark = pytest.mark.uvloop


def test_parse_block_resize() -> None:
    ev = {"ACTION": "change", "SUBSYSTEM": "block", "MAJOR": "7", "MINOR": "3", "RESIZE": "1"}
    assert parse_block_resize(ev) == (7, 3)
    assert parse_block_resize({**ev, "RESIZE": None}) is None
    assert parse_block_resize({**ev, "ACTION": "add"}) is None
    assert parse_block_resize({**ev, "SUBSYSTEM": "net"}) is None
    assert parse_block_resize({**ev, "MAJOR": "x"}) is None


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    backing = tmp_path / "lv.img"
    with open(backing, "wb") as f:
        f.truncate(16 << 20)
    r = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"losetup failed (root and /dev/loop-control needed): {r.stderr}")
    dev = r.stdout.strip()
    try:
        yield dev, backing
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


async def test_block_device_growth_is_published_from_the_uevent(
    xenstored: Xenstored, xs: XenStore, tmp_path: Path, loop_device: tuple[str, Path]
) -> None:
    dev, backing = loop_device
    images = tmp_path / "images"
    images.mkdir()
    cfg = backend_config(tmp_path, images)
    cfg.storage.allowed_devices = [dev]
    dp = FakeDataplane()
    async with run_daemon(xenstored, cfg, dp, uevents=True) as (daemon, _):
        h = Harness(xs, daemon, dp, images, cfg)
        await h.attach(1, "xvdb", params=f"phy:{dev}")
        await h.connect(1, "xvdb")
        b = h.b(1, "xvdb")
        assert await xs.read(f"{b}/sectors") == str(16 << 11)
        assert daemon.find(1, "xvdb").image_format == "block"
        os.truncate(backing, 40 << 20)
        subprocess.run(["losetup", "-c", dev], check=True)

        async def grown() -> bool:
            return await xs.read(f"{b}/sectors") == str(40 << 11)

        await wait_for(grown, "new size published")
        assert await xs.read(f"{b}/state") == "4"
        assert dp.running(1, vdev_to_devid("xvdb")).sizes == [40 << 20]
