"""The daemon's state machine against the real xenstored, with a fake data plane:
the handshake to Connected, reconnect, detach, resize, pickup at start, many devices."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.fixtures.backend import (
    FakeDataplane,
    Harness,
    StepLog,
    backend_config,
    run_daemon,
    wait_for,
    wait_state,
)
from xenblk import toolstack
from xenblk.backend import control
from xenblk.sim.xenstored import Xenstored
from xenblk.xen.vdev import vdev_to_devid
from xenblk.xenstore import XenStore

pytestmark = pytest.mark.uvloop
XVDB = vdev_to_devid("xvdb")


async def test_handshake_reaches_connected_with_the_frontends_keys(harness: Harness) -> None:
    h = harness
    await h.attach(1, "xvdb")
    b = h.b(1, "xvdb")
    await wait_state(h.xs, b, 2)
    assert await h.xs.read(f"{b}/max-ring-page-order") == "4"
    assert await h.xs.read(f"{b}/multi-queue-max-queues") == "4"
    assert await h.xs.read(f"{b}/feature-max-indirect-segments") == "256"
    assert await h.xs.read(f"{b}/feature-persistent") == "1"
    await h.connect(1, "xvdb", queues=2, order=2, wait_initwait=False)
    assert await h.xs.read(f"{b}/sectors") == str((16 << 20) // 512)
    assert await h.xs.read(f"{b}/sector-size") == "512"
    assert await h.xs.read(f"{b}/info") == "0"
    assert await h.xs.read(f"{b}/feature-flush-cache") == "1"
    assert await h.xs.try_read(f"{b}/error") is None
    r = h.dp.running(1, XVDB)
    assert r.fe.protocol == "x86_64-abi" and r.fe.ring_page_order == 2 and len(r.fe.queues) == 2
    assert r.fe.queues[1].ring_refs == tuple(h.ref_base("xvdb") + 16 + i for i in range(4))
    assert r.fe.queues[1].event_channel == 11 and r.fe.persistent and not r.readonly


async def test_frontend_may_skip_initialised_and_legacy_single_ring(harness: Harness) -> None:
    h = harness
    await h.attach(3, "xvdb", mode="r")
    await h.frontend(3, "xvdb", state=4, keys={"protocol": "native"})
    await wait_state(h.xs, h.b(3, "xvdb"), 4)
    r = h.dp.running(3, XVDB)
    assert r.readonly and r.fe.ring_page_order == 0 and r.fe.queues[0].ring_refs == (h.ref_base("xvdb"),)
    assert await h.xs.read(f"{h.b(3, 'xvdb')}/info") == "4"  # VDISK_READONLY


async def test_frontend_close_then_reconnect(harness: Harness, step_log: StepLog) -> None:
    h = harness
    await h.attach(1, "xvdb")
    await h.connect(1, "xvdb")
    first = h.dp.running(1, XVDB)
    f, b = h.f(1, "xvdb"), h.b(1, "xvdb")
    await h.xs.write(f"{f}/state", "5")
    await wait_state(h.xs, b, 6)
    assert first.stopped and first.closed
    assert await h.xs.try_read(f"{b}/error") is None
    await h.xs.write(f"{f}/state", "6")
    await step_log.handled(1, "xvdb", 6)
    assert await h.xs.read(f"{b}/state") == "6"  # stays closed until the frontend restarts
    await h.xs.write(f"{f}/state", "1")
    await h.connect(1, "xvdb", queues=3)
    assert len(h.dp.connects) == 2 and len(h.dp.running(1, XVDB).fe.queues) == 3
    dev = h.daemon.find(1, "xvdb")
    assert dev.connections == 2 and dev.disk_view().reconnects == 1


async def test_frontend_closed_then_connected_again_without_initialising_is_served(harness: Harness) -> None:
    # what a guest's unbind + bind of blkfront does when the bind probes while the backend still
    # says Connected: blkfront grants new rings and goes Initialised, never through Initialising;
    # left unserved, its first read hangs and so does the guest's xenbus (seen on real Xen)
    h = harness
    await h.attach(1, "xvdb")
    await h.connect(1, "xvdb")
    first = h.dp.running(1, XVDB)
    f, b = h.f(1, "xvdb"), h.b(1, "xvdb")
    await h.xs.write(f"{f}/state", "6")
    await wait_state(h.xs, b, 6)
    assert first.stopped and first.closed
    await h.frontend(1, "xvdb", queues=2, wait_initwait=False)
    await wait_state(h.xs, b, 4)
    assert len(h.dp.connects) == 2 and len(h.dp.running(1, XVDB).fe.queues) == 2
    assert await h.xs.try_read(f"{b}/error") is None


async def test_detach_waits_for_the_frontend_and_removes_the_backend(harness: Harness) -> None:
    h = harness
    await h.attach(1, "xvdb")
    await h.connect(1, "xvdb")
    p = toolstack.paths(0, "vbd3", 1, "xvdb")
    detach = asyncio.create_task(toolstack.detach(h.xs, p, force=False, timeout=60))
    await wait_state(h.xs, p.backend, 5)  # Closing: the frontend is asked to close first
    assert not h.dp.running(1, XVDB).stopped
    await h.xs.write(f"{p.frontend}/state", "6")
    assert await detach == (True, "")
    assert await h.xs.try_read(f"{p.backend}/state") is None
    assert await h.xs.try_read(f"{p.frontend}/state") is None
    assert h.dp.running(1, XVDB).closed
    await wait_for(lambda: _gone(h), "device table entry removed")


async def _gone(h: Harness) -> bool:
    return not h.daemon.devices


async def test_online_zero_before_connect_removes_at_once(harness: Harness) -> None:
    h = harness
    await h.attach(2, "xvdc")
    b = h.b(2, "xvdc")
    await wait_state(h.xs, b, 2)
    await h.xs.write(f"{b}/online", "0")
    await wait_for(lambda: _absent(h.xs, f"{b}/state"), "backend removed")


async def _absent(xs: XenStore, path: str) -> bool:
    return await xs.try_read(path) is None


async def test_resize_publishes_sectors_with_a_state_write(harness: Harness) -> None:
    h = harness
    await h.attach(1, "xvdb")
    await h.connect(1, "xvdb")
    b = h.b(1, "xvdb")
    img = h.image("d1-xvdb.raw")
    os.truncate(img, 32 << 20)
    events: list[str] = []

    async def watch_state() -> None:
        async with h.xs.watch(f"{b}/state") as w:
            async for _e in w:
                events.append(await h.xs.read(f"{b}/state") + ":" + await h.xs.read(f"{b}/sectors"))

    watcher = asyncio.create_task(watch_state())
    await wait_for(lambda: _contains(events, "4:32768"), "the watch registered (its first event)")
    loop = asyncio.get_running_loop()
    reply = await loop.run_in_executor(
        None, control.call, h.cfg.daemon.run_dir, {"op": "resize", "domid": 1, "vdev": "xvdb"}
    )
    assert reply == {"ok": True, "old_sectors": 32768, "sectors": 65536, "changed": True}
    assert await h.xs.read(f"{b}/sectors") == "65536"
    await wait_for(lambda: _contains(events, "4:65536"), "state rewritten with the new sectors")
    watcher.cancel()
    assert h.dp.running(1, XVDB).sizes == [32 << 20]
    again = await loop.run_in_executor(
        None, control.call, h.cfg.daemon.run_dir, {"op": "resize", "domid": 1, "vdev": "xvdb"}
    )
    assert again["changed"] is False


async def _contains(items: list[str], want: str) -> bool:
    return want in items


async def test_device_present_before_serve_is_served(xenstored: Xenstored, xs: XenStore, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.raw").write_bytes(b"\0" * (1 << 20))
    await toolstack.attach(
        xs, self_domid=0, domid=4, btype="vbd3", vdev="xvdb", params=str(images / "a.raw"), mode="w", cdrom=False
    )
    dp = FakeDataplane()
    async with run_daemon(xenstored, backend_config(tmp_path, images), dp) as (daemon, _):
        h = Harness(xs, daemon, dp, images, daemon.cfg)
        await h.connect(4, "xvdb")
        assert await xs.read(f"{h.b(4, 'xvdb')}/sectors") == "2048"


async def test_shutdown_closes_devices_keeps_dirs_and_restart_serves_again(
    xenstored: Xenstored, xs: XenStore, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    cfg = backend_config(tmp_path, images)
    dp = FakeDataplane()
    async with run_daemon(xenstored, cfg, dp) as (daemon, task):
        h = Harness(xs, daemon, dp, images, cfg)
        await h.attach(1, "xvdb")
        await h.connect(1, "xvdb")
        daemon.stop()
        assert await asyncio.wait_for(task, 60) == 0
    b, f = h.b(1, "xvdb"), h.f(1, "xvdb")
    assert await xs.read(f"{b}/state") == "6" and await xs.try_read(f"{b}/error") is None
    assert dp.running(1, XVDB).closed and dp.closed
    # The frontend saw Closed and closed; the restarted daemon serves the device again.
    await xs.write(f"{f}/state", "6")
    dp2 = FakeDataplane()
    async with run_daemon(xenstored, cfg, dp2) as (daemon2, _):
        h2 = Harness(xs, daemon2, dp2, images, cfg)
        await wait_state(xs, b, 2)
        await h2.connect(1, "xvdb", wait_initwait=False)


async def test_restart_while_frontend_still_connected_forces_a_clean_reconnect(
    xenstored: Xenstored, xs: XenStore, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    cfg = backend_config(tmp_path, images)
    dp = FakeDataplane()
    async with run_daemon(xenstored, cfg, dp) as (daemon, _task):
        h = Harness(xs, daemon, dp, images, cfg)
        await h.attach(1, "xvdb")
        await h.connect(1, "xvdb")
    b, f = h.b(1, "xvdb"), h.f(1, "xvdb")
    await xs.write(f"{b}/state", "4")  # as if the previous daemon had been killed while connected
    dp2 = FakeDataplane()
    async with run_daemon(xenstored, cfg, dp2) as (daemon2, _):
        await wait_state(xs, b, 6)
        assert not dp2.connects  # the old rings are not reused
        await xs.write(f"{f}/state", "6")
        await wait_state(xs, b, 2)
        await Harness(xs, daemon2, dp2, images, cfg).connect(1, "xvdb", wait_initwait=False)


async def test_two_guests_with_several_disks(harness: Harness) -> None:
    h = harness
    disks = [(d, v) for d in (1, 2) for v in ("xvdb", "xvdc", "xvdd")]
    for d, v in disks:
        await h.attach(d, v)
    await asyncio.gather(*(h.connect(d, v, queues=2) for d, v in disks))
    assert {(r.domid, r.devid) for r in h.dp.connects} == {(d, vdev_to_devid(v)) for d, v in disks}
    rows = await toolstack.list_devices(h.xs, 0, ["vbd3"])
    assert [(r["domid"], r["vdev"], r["state"], r["queues"]) for r in rows] == [(d, v, 4, 2) for d, v in disks]
    described = {(d["domid"], d["vdev"]): d for d in (await h.daemon._control({"op": "list"}))["devices"]}
    assert described[(2, "xvdd")]["state"] == 4 and described[(2, "xvdd")]["queues"] == 2


async def test_daemon_survives_a_xenstored_restart(harness: Harness, xenstored: Xenstored) -> None:
    h = harness
    await h.attach(1, "xvdb")
    await h.connect(1, "xvdb")
    xenstored.restart()  # a crash: the store comes back empty, the devices are gone with it
    await wait_for(lambda: _gone(h), "devices of the lost store dropped")
    assert h.dp.running(1, XVDB).closed
    await h.attach(2, "xvdb")  # the watch is registered again: new devices are served
    await h.connect(2, "xvdb")
    assert h.daemon.ctx is not None and h.daemon.ctx.xs.reconnects >= 1


async def test_a_second_daemon_refuses_to_start(harness: Harness, xenstored: Xenstored) -> None:
    from xenblk.backend.daemon import Daemon
    from xenblk.errors import XenblkError

    second = Daemon(harness.cfg, xenstore_path=str(xenstored.socket_path), dataplane_factory=FakeDataplane,
                    uevents=False)  # fmt: skip
    with pytest.raises(XenblkError, match="another xenblk serve is running"):
        await second.run()
    # the first one's control socket is untouched
    loop = asyncio.get_running_loop()
    assert (await loop.run_in_executor(None, control.call, harness.cfg.daemon.run_dir, {"op": "ping"}))["ok"]


async def test_every_configured_backend_type_is_served(xenstored: Xenstored, xs: XenStore, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.raw").write_bytes(b"\0" * (1 << 20))
    cfg = backend_config(tmp_path, images)
    cfg.daemon.backend_types = ["vbd3", "vbd"]
    dp = FakeDataplane()
    async with run_daemon(xenstored, cfg, dp) as (daemon, _):
        for btype in ("vbd", "vbd3"):
            await toolstack.attach(xs, self_domid=0, domid=1, btype=btype, vdev="xvdb" if btype == "vbd" else "xvdc",
                                   params=str(images / "a.raw"), mode="r", cdrom=False)  # fmt: skip
        await wait_state(xs, f"/local/domain/0/backend/vbd/1/{XVDB}", 2)
        await wait_state(xs, f"/local/domain/0/backend/vbd3/1/{vdev_to_devid('xvdc')}", 2)
        assert {(d.btype, d.vdev) for d in daemon.devices.values()} == {("vbd", "xvdb"), ("vbd3", "xvdc")}


async def test_cdrom_read_only_info_bits(harness: Harness) -> None:
    h = harness
    await toolstack.attach(h.xs, self_domid=0, domid=1, btype="vbd3", vdev="xvdd", params=str(h.image("cd.iso")),
                           mode="r", cdrom=True)  # fmt: skip
    await h.connect(1, "xvdd")
    b = h.b(1, "xvdd")
    assert await h.xs.read(f"{b}/info") == "5"  # VDISK_CDROM | VDISK_READONLY
    assert await h.xs.read(f"{b}/feature-discard") == "0"  # nothing to discard on a read-only disk
