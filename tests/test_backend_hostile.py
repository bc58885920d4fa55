"""Hostile frontends and bad images: the device concerned ends Closed with an `error` node,
while another device of another guest stays Connected and the daemon carries on."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from tests.fixtures.backend import Harness, StepLog, wait_for, wait_state
from xenblk.xen.vdev import vdev_to_devid

pytestmark = pytest.mark.uvloop
XVDB = vdev_to_devid("xvdb")


async def _bystander(h: Harness) -> None:
    await h.attach(9, "xvdb")
    await h.connect(9, "xvdb")


async def _assert_bystander_fine(h: Harness) -> None:
    assert await h.xs.read(f"{h.b(9, 'xvdb')}/state") == "4"
    r = h.dp.running(9, XVDB)
    assert not r.stopped
    # and the daemon still serves new devices
    await h.attach(9, "xvdz")
    await h.connect(9, "xvdz")


async def _closed_with(h: Harness, domid: int, vdev: str, words: str) -> None:
    b = h.b(domid, vdev)
    await wait_state(h.xs, b, 6)
    err = await h.xs.try_read(f"{b}/error")
    assert err is not None and words in err, err


HOSTILE_KEYS = {
    "ring-page-order 9": ({"ring-page-order": "9", "ring-ref0": "1"}, "ring-page-order=9 is out of range 0..4"),
    "1000 queues": ({"multi-queue-num-queues": "1000"}, "multi-queue-num-queues=1000 is out of range 1..4"),
    "zero queues": ({"multi-queue-num-queues": "0"}, "multi-queue-num-queues=0"),
    "unknown protocol": ({"protocol": "sparc64-abi"}, "protocol 'sparc64-abi' is not supported"),
    "non-numeric ring-ref": ({"ring-ref": "12abc"}, "ring-ref is not a number"),
    "negative event channel": ({"event-channel": "-1"}, "event-channel is not a number"),
    "huge ring-ref": ({"ring-ref": "99999999999"}, "ring-ref"),
    "event channel 0": ({"event-channel": "0"}, "event-channel=0 is out of range"),
    "persistent 7": ({"feature-persistent": "7"}, "feature-persistent=7"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_KEYS))
async def test_bad_frontend_keys_close_only_that_device(harness: Harness, case: str) -> None:
    h = harness
    keys, words = HOSTILE_KEYS[case]
    await _bystander(h)
    await h.attach(1, "xvdb")
    await h.frontend(1, "xvdb", keys=keys)
    await _closed_with(h, 1, "xvdb", words)
    assert not [r for r in h.dp.connects if r.domid == 1]
    await _assert_bystander_fine(h)


async def test_ring_ref_not_granted(harness: Harness) -> None:
    h = harness
    await _bystander(h)
    await h.attach(1, "xvdb")
    await h.frontend(1, "xvdb", keys={"ring-ref": "4242"})
    await _closed_with(h, 1, "xvdb", "grant ref 4242 of domain 1 is not granted")
    await _assert_bystander_fine(h)


async def test_missing_per_queue_keys(harness: Harness) -> None:
    h = harness
    await _bystander(h)
    await h.attach(1, "xvdb")
    await wait_state(h.xs, h.b(1, "xvdb"), 2)
    f = h.f(1, "xvdb")
    await h.xs.write(f"{f}/multi-queue-num-queues", "2")
    await h.xs.write(f"{f}/queue-0/ring-ref", "5")
    await h.xs.write(f"{f}/queue-0/event-channel", "5")
    await h.xs.write(f"{f}/state", "3")
    await _closed_with(h, 1, "xvdb", "queue-1/ring-ref is missing")
    await _assert_bystander_fine(h)


async def test_frontend_state_node_deleted_mid_handshake(harness: Harness) -> None:
    h = harness
    await _bystander(h)
    await h.attach(1, "xvdb")
    await wait_state(h.xs, h.b(1, "xvdb"), 2)
    await h.xs.rm(f"{h.f(1, 'xvdb')}/state")
    await _closed_with(h, 1, "xvdb", "frontend state node disappeared")
    await _assert_bystander_fine(h)


async def test_frontend_dir_deleted_while_connected(harness: Harness) -> None:
    h = harness
    await _bystander(h)
    await h.attach(1, "xvdb")
    await h.connect(1, "xvdb")
    await h.xs.rm(h.f(1, "xvdb"))
    await _closed_with(h, 1, "xvdb", "frontend state node disappeared while connected")
    assert h.dp.running(1, XVDB).closed
    await _assert_bystander_fine(h)


@pytest.mark.parametrize("back_to", ["1", "2", "3"])
async def test_state_jumping_backwards_while_connected(harness: Harness, back_to: str) -> None:
    h = harness
    await _bystander(h)
    await h.attach(1, "xvdb")
    await h.connect(1, "xvdb")
    dev = h.daemon.find(1, "xvdb")
    await wait_for(lambda: _true(dev.frontend_connected), "the daemon saw the frontend Connected")
    await h.xs.write(f"{h.f(1, 'xvdb')}/state", back_to)
    await _closed_with(h, 1, "xvdb", "frontend state went back from Connected")
    assert h.dp.running(1, XVDB).closed
    await _assert_bystander_fine(h)


async def _no_device(h: Harness, domid: int, vdev: str) -> bool:
    return all((d.domid, d.vdev) != (domid, vdev) for d in h.daemon.devices.values())


async def _true(v: bool) -> bool:
    return v


@pytest.mark.parametrize("junk", ["x", "99", "", "7"])
async def test_frontend_state_not_a_state(harness: Harness, step_log: StepLog, junk: str) -> None:
    h = harness
    await _bystander(h)
    await h.attach(1, "xvdb")
    await wait_state(h.xs, h.b(1, "xvdb"), 2)
    await h.xs.write(f"{h.f(1, 'xvdb')}/state", junk)
    if junk == "7":  # Reconfiguring is a XenbusState, just not one a blkfront uses: ignored in InitWait
        await step_log.handled(1, "xvdb", 7)
        assert await h.xs.read(f"{h.b(1, 'xvdb')}/state") == "2"
        return
    await _closed_with(h, 1, "xvdb", "frontend state is not a XenbusState")
    await _assert_bystander_fine(h)


async def test_error_closed_device_retries_when_the_frontend_restarts(harness: Harness, step_log: StepLog) -> None:
    h = harness
    await h.attach(1, "xvdb")
    await h.frontend(1, "xvdb", keys={"protocol": "bogus"})
    await _closed_with(h, 1, "xvdb", "bogus")
    f, b = h.f(1, "xvdb"), h.b(1, "xvdb")
    await h.xs.write(f"{f}/state", "6")
    await step_log.handled(1, "xvdb", 6)
    assert await h.xs.read(f"{b}/state") == "6"  # a frontend that only closes is not retried in a loop
    await h.xs.write(f"{f}/protocol", "x86_64-abi")
    await h.xs.write(f"{f}/state", "1")
    await h.connect(1, "xvdb")
    assert await h.xs.try_read(f"{b}/error") is None


async def test_queue_failure_closes_the_device(harness: Harness) -> None:
    h = harness
    await _bystander(h)
    await h.attach(1, "xvdb")
    await h.connect(1, "xvdb")
    h.dp.running(1, XVDB).fail(0, "producer index 4000 is 3900 requests ahead of the consumer")
    await _closed_with(h, 1, "xvdb", "queue 0: producer index")
    await _assert_bystander_fine(h)


async def test_a_crash_in_one_device_task_is_contained(harness: Harness) -> None:
    h = harness
    await _bystander(h)
    h.dp.crash_devids.add(vdev_to_devid("xvdc"))
    await h.attach(1, "xvdc")
    await h.frontend(1, "xvdc")
    await _closed_with(h, 1, "xvdc", "internal error: RuntimeError")
    # not retried in a crash loop: the task ended marked crashed (the daemon serves it again only once
    # it is detached and attached again, below), and left its device Closed
    await wait_for(lambda: _true(h.daemon.find(1, "xvdc").finished), "the crashed task ended")
    assert h.daemon.find(1, "xvdc").crashed
    assert await h.xs.read(f"{h.b(1, 'xvdc')}/state") == "6"
    await _assert_bystander_fine(h)
    # detached and attached again, it is served again
    await h.xs.rm(h.b(1, "xvdc"))
    await h.xs.rm(h.f(1, "xvdc"))
    h.dp.crash_devids.clear()
    await wait_for(lambda: _no_device(h, 1, "xvdc"), "tombstone dropped")
    await h.attach(1, "xvdc")
    await h.connect(1, "xvdc")


ImageCase = Callable[[Harness], Awaitable[str]]


async def _outside(h: Harness) -> str:
    return "/etc/passwd"


async def _symlink_out(h: Harness) -> str:
    link = h.images / "sneaky.raw"
    link.symlink_to("/etc/hostname")
    return str(link)


async def _backing_outside(h: Harness) -> str:
    import subprocess

    outside = h.images.parent / "outside.raw"
    outside.write_bytes(b"\0" * 65536)
    q = h.images / "chain.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(outside), "-F", "raw", str(q)], check=True)
    return f"qcow2:{q}"


async def _unknown_format(h: Harness) -> str:
    return f"qed:{h.image('x.raw')}"


async def _vhd(h: Harness) -> str:
    return f"vhd:{h.image('x.raw')}"


async def _missing(h: Harness) -> str:
    return str(h.images / "nope.raw")


async def _relative(h: Harness) -> str:
    return "images/x.raw"


async def _qcow2_planted_in_raw(h: Harness) -> str:
    # A raw image whose contents look like qcow2 is served raw: the format is never guessed.
    import subprocess

    p = h.images / "looks-like.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), "1M"], check=True)
    return str(p)


IMAGE_CASES: dict[str, tuple[ImageCase, str | None]] = {
    "outside allowed_dirs": (_outside, "outside storage.allowed_dirs"),
    "symlink out of allowed_dirs": (_symlink_out, "symbolic link"),
    "qcow2 backing file outside": (_backing_outside, "backing file"),
    "unknown format": (_unknown_format, "unknown image format 'qed'"),
    "vhd prefix on a raw file": (_vhd, "not a VHD image"),
    "missing file": (_missing, "nope.raw"),
    "relative path": (_relative, "is not absolute"),
    "qcow2 header in a raw image": (_qcow2_planted_in_raw, None),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
async def test_bad_images_are_refused(harness: Harness, case: str) -> None:
    h = harness
    make, words = IMAGE_CASES[case]
    await _bystander(h)
    await h.attach(1, "xvdb", params=await make(h))
    if words is None:
        await wait_state(h.xs, h.b(1, "xvdb"), 2)
        dev = h.daemon.find(1, "xvdb")
        assert dev.image_format == "raw"
        return
    await _closed_with(h, 1, "xvdb", words)
    await _assert_bystander_fine(h)


async def test_unknown_mode_is_refused(harness: Harness) -> None:
    h = harness
    await h.attach(1, "xvdb", mode="x")
    await _closed_with(h, 1, "xvdb", "mode is 'x'")


async def test_junk_frontend_state_while_connected(harness: Harness) -> None:
    h = harness
    await _bystander(h)
    await h.attach(1, "xvdb")
    await h.connect(1, "xvdb")
    await h.xs.write(f"{h.f(1, 'xvdb')}/state", "connected")
    await _closed_with(h, 1, "xvdb", "frontend state is not a XenbusState")
    assert h.dp.running(1, XVDB).closed
    await _assert_bystander_fine(h)


async def test_forced_removal_during_close_leaves_no_ghost_backend(harness: Harness) -> None:
    h = harness
    await h.attach(1, "xvdb")
    await h.connect(1, "xvdb")
    b, f = h.b(1, "xvdb"), h.f(1, "xvdb")
    await h.xs.write(f"{f}/state", "6")
    await h.xs.rm(b)
    await h.xs.rm(f)
    await wait_for(lambda: _no_device(h, 1, "xvdb"), "device task ended")
    assert await h.xs.try_read(b) is None and await h.xs.try_read(f"{b}/state") is None


async def test_frontend_rewriting_its_keys_forever_is_closed_not_crashed(harness: Harness) -> None:
    """Issue 14 item 5: while the backend reads the frontend's keys in a transaction, the guest keeps
    rewriting one of them, so every attempt conflicts. The device is closed with an error saying so;
    its task lives on (it was marked crashed before and never served again), the bystander is fine,
    and once the guest stops and restarts the frontend it connects."""
    h = harness
    await _bystander(h)
    await h.attach(1, "xvdb")
    f = h.f(1, "xvdb")
    stop = asyncio.Event()
    rewrites = 0

    async def rewrite_forever() -> None:
        nonlocal rewrites
        while not stop.is_set():
            await h.xs.write(f"{f}/protocol", "x86_64-abi" if rewrites % 2 else "x86_32-abi")
            rewrites += 1

    await h.frontend(1, "xvdb", state=1)  # keys written, not Initialised yet
    writer = asyncio.create_task(rewrite_forever())
    try:
        await wait_for(lambda: _true(rewrites > 10), "the guest is rewriting its keys")
        await h.xs.write(f"{f}/state", "3")
        await _closed_with(h, 1, "xvdb", "kept changing its keys")
    finally:
        stop.set()
        await writer
    task = h.daemon.find(1, "xvdb")
    assert not task.crashed and not task.finished
    await _assert_bystander_fine(h)
    await h.xs.write(f"{f}/protocol", "x86_64-abi")
    await h.xs.write(f"{f}/state", "1")
    await h.connect(1, "xvdb")
    assert await h.xs.try_read(f"{h.b(1, 'xvdb')}/error") is None
