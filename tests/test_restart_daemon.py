"""The daemon's pick-up of a device a killed daemon left Connected (fake data plane): with a
journal it resumes the rings and writes nothing the guest could see; without one it falls back
to the safe close-and-reconnect path."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.fixtures.backend import FakeDataplane, Harness, backend_config, run_daemon, wait_for, wait_state
from xenblk.sim.xenstored import Xenstored
from xenblk.xen.vdev import vdev_to_devid
from xenblk.xenstore import XenStore

XVDB = vdev_to_devid("xvdb")


async def _connected_then_killed(xenstored: Xenstored, xs: XenStore, tmp_path: Path) -> tuple[Harness, str, str]:
    images = tmp_path / "images"
    images.mkdir()
    cfg = backend_config(tmp_path, images)
    dp = FakeDataplane()
    async with run_daemon(xenstored, cfg, dp) as (daemon, _task):
        h = Harness(xs, daemon, dp, images, cfg)
        await h.attach(1, "xvdb")
        await h.connect(1, "xvdb", queues=2)
    b, f = h.b(1, "xvdb"), h.f(1, "xvdb")
    await xs.write(f"{b}/state", "4")  # the daemon was killed while connected: nothing was closed
    return h, b, f


async def test_a_journaled_device_is_resumed_without_a_state_change(
    xenstored: Xenstored, xs: XenStore, tmp_path: Path
) -> None:
    h, b, _f = await _connected_then_killed(xenstored, xs, tmp_path)
    dp2 = FakeDataplane()
    dp2.granted = h.dp.granted
    dp2.journals.add((1, XVDB))
    async with xs.watch(b) as watch:
        events = aiter(watch)
        await anext(events)  # the registration event
        async with run_daemon(xenstored, h.cfg, dp2) as (daemon2, _):
            await wait_for(lambda: _connected(dp2), "resumed")
            r = dp2.running(1, XVDB)
            assert r.resumed and len(r.fe.queues) == 2
            described = (await daemon2._control({"op": "list"}))["devices"][0]
            assert (described["state"], described["phase"], described["queues"]) == (4, "connected", 2)
            # xenstored delivers watch events in order: everything written under B before the sentinel is seen.
            await xs.write(f"{b}/zz-sentinel", "1")
            seen = []
            async with asyncio.timeout(60):
                async for ev in events:
                    seen.append(ev.path)
                    if ev.path.endswith("/zz-sentinel"):
                        break
            assert not [p for p in seen if p.endswith(("/state", "/error"))], seen
            await xs.rm(f"{b}/zz-sentinel")


async def _connected(dp: FakeDataplane) -> bool:
    return bool(dp.connects)


async def test_without_a_journal_the_device_is_closed_and_served_again(
    xenstored: Xenstored, xs: XenStore, tmp_path: Path
) -> None:
    h, b, f = await _connected_then_killed(xenstored, xs, tmp_path)
    dp2 = FakeDataplane()  # no journal for the device
    async with run_daemon(xenstored, h.cfg, dp2) as (daemon2, _):
        await wait_state(xs, b, 6)
        assert not dp2.connects
        await xs.write(f"{f}/state", "6")
        await wait_state(xs, b, 2)
        await Harness(xs, daemon2, dp2, h.images, h.cfg).connect(1, "xvdb", queues=2, wait_initwait=False)
        assert not dp2.running(1, XVDB).resumed
