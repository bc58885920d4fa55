"""The simulated guest against the real data plane, with the backend's half of the handshake played
by the test (tests/fixtures/sim.py MiniBackend): verified data through every ring shape, the data
pattern on disk, failures it must report, and what it leaves behind."""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.fixtures.sim import XENBLK, BackendOffer, MiniBackend, SimHostProc, run_guest_cli
from tests.fixtures.wait import GENEROUS, await_until
from xenblk.sim.broker import BrokerClient
from xenblk.sim.guest_native import lib
from xenblk.xenstore import XenStore

Backends = Callable[..., Awaitable[MiniBackend]]
MiB = 1 << 20


async def _state_is(xs: XenStore, path: str, want: str) -> bool:
    return await xs.try_read(f"{path}/state") == want


def _lock_held(lock: Path) -> bool:
    try:
        return lock.read_text().strip().isdigit()
    except OSError:
        return False


def raw_image(tmp_path: Path, name: str, size: int = 16 * MiB) -> Path:
    p = tmp_path / name
    with open(p, "wb") as f:
        f.truncate(size)
    return p


def pattern_ok(data: bytes, off: int, seed: int, gen: int = 1) -> bool:
    return bool(lib.xb_sg_pattern_check(data, off, len(data), seed, gen) == -1)


@pytest.mark.parametrize("abi", ["x86_64-abi", "x86_32-abi"])
@pytest.mark.parametrize(("ring_order", "queues"), [(0, 1), (4, 1), (0, 4), (4, 4)])
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
async def test_verified_io_through_every_ring_shape(
    backends: Backends, sim_host: SimHostProc, tmp_path: Path, abi: str, ring_order: int, queues: int, indirect: bool
) -> None:
    img = raw_image(tmp_path, "d.raw", 8 * MiB)
    be = await backends(1, "xvdb", img)
    shape = ["--abi", abi, "--ring-order", str(ring_order), "--queues", str(queues)] + (
        ["--indirect"] if indirect else []
    )
    # Large blocks so direct requests must be split (64 KiB = 16 pages > 11 segments) and indirect ones are not.
    w = await run_guest_cli(sim_host, 1, "--rw", "write", "--bs", "64k", "--iodepth", "8", "--verify", "--seed", "11",
                            *shape)  # fmt: skip
    assert w.rc == 0, w.stderr
    d = w.disk("xvdb")
    assert d["negotiated"] == {"protocol": abi, "ring_pages": 1 << ring_order, "queues": queues,
                               "indirect_segments": 256 if indirect else 0, "persistent": True, "flush": True,
                               "discard": True}  # fmt: skip
    assert d["writes"] == 128 and d["reads"] == 128 and d["verified_reads"] == 128 and d["errors"] == 0
    # What the backend saw: the frontend's keys, and the requests in the layout asked for.
    keys = be.keys
    assert keys["protocol"] == abi
    assert keys.get("ring-page-order", "0") == str(ring_order)
    assert keys.get("multi-queue-num-queues", "1") == str(queues)
    writes = sum(s.op_named("write").requests for s in be.stats)
    assert writes == (128 if indirect else 256), "64 KiB direct writes are two requests each"
    assert sum(sum(s.refusals) for s in be.stats) == 0
    data = img.read_bytes()
    assert pattern_ok(data, 0, 11), "the image holds the seeded pattern at every offset"
    # And a mixed workload that checks each read against what it last wrote there.
    m = await run_guest_cli(sim_host, 1, "--rw", "randrw", "--bs", "4k", "--iodepth", "16", "--size", "4M", "--verify",
                            "--seed", "12", *shape)  # fmt: skip
    assert m.rc == 0, m.stderr
    md = m.disk("xvdb")
    assert md["ios"] == 1024 and md["verify_errors"] == 0 and md["verified_reads"] > 100


async def test_same_seed_same_bytes_on_any_disk(backends: Backends, sim_host: SimHostProc, tmp_path: Path) -> None:
    a, b = raw_image(tmp_path, "a.raw", 4 * MiB), raw_image(tmp_path, "b.raw", 4 * MiB)
    await backends(2, "xvdb", a)
    await backends(2, "xvdc", b)
    r = await run_guest_cli(sim_host, 2, "--rw", "randwrite", "--bs", "16k", "--iodepth", "4", "--seed", "77")
    assert r.rc == 0, r.stderr
    assert {d["vdev"] for d in r.doc["disks"]} == {"xvdb", "xvdc"}  # type: ignore[index]
    da, db = a.read_bytes(), b.read_bytes()
    assert da == db and pattern_ok(da, 0, 77) and not pattern_ok(da, 0, 78)
    # A read-only verify pass with the same seed on one disk passes; another seed fails, naming the offset.
    ok = await run_guest_cli(sim_host, 2, "--vdev", "xvdc", "--rw", "read", "--bs", "128k", "--verify", "--seed", "77")
    assert ok.rc == 0 and ok.disk("xvdc")["verified_reads"] == 32, ok.stderr
    bad = await run_guest_cli(sim_host, 2, "--vdev", "xvdc", "--rw", "read", "--verify", "--seed", "78")
    assert bad.rc == 1
    assert "xvdc: verify error at byte offset 0" in bad.stderr and "seed 77" in bad.stderr


async def test_corruption_behind_the_guest_is_caught(backends: Backends, sim_host: SimHostProc, tmp_path: Path) -> None:
    img = raw_image(tmp_path, "c.raw", 2 * MiB)
    await backends(3, "xvdb", img)
    assert (await run_guest_cli(sim_host, 3, "--rw", "write", "--seed", "5")).rc == 0
    with open(img, "r+b") as f:
        f.seek(MiB + 4096 + 1000)
        f.write(b"\xff")
    r = await run_guest_cli(sim_host, 3, "--rw", "read", "--verify", "--seed", "5", "--iodepth", "8")
    assert r.rc == 1
    assert r.disk("xvdb")["verify_errors"] == 1
    assert f"verify error at byte offset {MiB + 4096 + 512}" in r.stderr


async def test_flush_and_discard_reach_the_backend(backends: Backends, sim_host: SimHostProc, tmp_path: Path) -> None:
    img = raw_image(tmp_path, "f.raw", 4 * MiB)
    be = await backends(4, "xvdb", img)
    r = await run_guest_cli(sim_host, 4, "--rw", "randrw", "--bs", "8k", "--iodepth", "4", "--verify",
                            "--flush-every", "5", "--discard-every", "7", "--seed", "3")  # fmt: skip
    assert r.rc == 0, r.stderr
    d = r.disk("xvdb")
    assert d["flushes"] > 0 and d["discards"] == 512 // 7
    assert sum(s.op_named("flush").requests for s in be.stats) == d["flushes"]
    assert sum(s.op_named("discard").requests for s in be.stats) == d["discards"]
    # trim: every block discarded; the raw image reads back zeros.
    assert (await run_guest_cli(sim_host, 4, "--rw", "write", "--bs", "1M", "--seed", "1")).rc == 0
    t = await run_guest_cli(sim_host, 4, "--rw", "trim", "--bs", "64k", "--iodepth", "4")
    assert t.rc == 0 and t.disk("xvdb")["discards"] == 64, t.stderr
    assert img.read_bytes() == bytes(4 * MiB)


async def test_no_persistent_grants_and_small_blocks(backends: Backends, sim_host: SimHostProc, tmp_path: Path) -> None:
    img = raw_image(tmp_path, "p.raw", 1 * MiB)
    be = await backends(5, "xvdb", img, BackendOffer(persistent=False))
    r = await run_guest_cli(sim_host, 5, "--rw", "randwrite", "--bs", "512", "--iodepth", "8", "--verify",
                            "--no-persistent", "--abi", "x86_32-abi")  # fmt: skip
    assert r.rc == 0, r.stderr
    assert r.disk("xvdb")["negotiated"]["persistent"] is False
    assert be.keys["feature-persistent"] == "0"
    assert pattern_ok(img.read_bytes(), 0, 0)


async def test_grants_are_revoked_and_frontend_closed_after_a_run(
    backends: Backends, sim_host: SimHostProc, host_xs: XenStore, tmp_path: Path
) -> None:
    be = await backends(6, "xvdb", raw_image(tmp_path, "g.raw", MiB))
    r = await run_guest_cli(sim_host, 6, "--rw", "randread", "--iodepth", "4", "--queues", "2", "--ring-order", "1")
    assert r.rc == 0, r.stderr
    assert await host_xs.read(f"{be.f}/state") == "6"
    assert await host_xs.read(f"{be.b}/state") == "6"
    with BrokerClient(sim_host.broker) as c:
        reply, (mem, gnt) = c.call({"op": "map_domain", "domid": 6})
    try:
        table = mmap.mmap(gnt, reply["gnttab_entries"] * 8)
        flags = [int.from_bytes(table[i * 8 : i * 8 + 2], "little") for i in range(4096)]
        assert not any(flags), "no grant left permitted once the guest has gone"
        table.close()
    finally:
        os.close(mem)
        os.close(gnt)
    # The same guest connects again (state 6 -> 1 -> ... -> 4) with another shape.
    again = await run_guest_cli(sim_host, 6, "--rw", "randread", "--queues", "1")
    assert again.rc == 0 and be.connects == 2, again.stderr
    assert "multi-queue-num-queues" not in be.keys and "ring-page-order" not in be.keys


async def test_backend_refusal_is_reported(backends: Backends, sim_host: SimHostProc, tmp_path: Path) -> None:
    await backends(7, "xvdb", raw_image(tmp_path, "r.raw", MiB), BackendOffer(refuse="params: no such image"))
    r = await run_guest_cli(sim_host, 7, "--rw", "read", "--timeout", "120")
    assert r.rc == 1
    assert r.stderr.strip() == "xenblk sim guest: xvdb: backend refused the device: params: no such image"
    assert r.disk("xvdb")["error"] == "backend refused the device: params: no such image"


async def test_read_only_disk_refuses_a_write_workload(
    backends: Backends, sim_host: SimHostProc, tmp_path: Path
) -> None:
    img = raw_image(tmp_path, "ro.raw", MiB)
    await backends(8, "xvdb", img, BackendOffer(readonly=True))
    w = await run_guest_cli(sim_host, 8, "--rw", "write")
    assert w.rc == 1 and "xvdb is read-only" in w.stderr
    assert (await run_guest_cli(sim_host, 8, "--rw", "read")).rc == 0


async def test_missing_disk_and_silent_backend_fail_clearly(
    backends: Backends, sim_host: SimHostProc, host_xs: XenStore, tmp_path: Path
) -> None:
    r = await run_guest_cli(sim_host, 9, "--vdev", "xvdb")
    assert r.rc == 1 and "xvdb is not attached to domain 9" in r.stderr
    r = await run_guest_cli(sim_host, 10)
    assert r.rc == 1 and "no disks attached to domain 10" in r.stderr
    # Frontend nodes but nobody serving them: the handshake times out, saying where it stuck.
    be = MiniBackend(sim_host, 11, "xvdb", raw_image(tmp_path, "s.raw", MiB))
    await be.attach(host_xs)
    r = await run_guest_cli(sim_host, 11, "--timeout", "1")
    assert r.rc == 1 and "did not reach InitWait (2) within 1s (state 1)" in r.stderr


async def test_idle_guest_holds_its_disks_until_sigterm(
    backends: Backends, sim_host: SimHostProc, host_xs: XenStore, tmp_path: Path
) -> None:
    be = await backends(12, "xvdb", raw_image(tmp_path, "i.raw", MiB))
    proc = await asyncio.create_subprocess_exec(
        *XENBLK, "sim", "guest", "--dir", str(sim_host.dir), "--domid", "12", "--idle", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await await_until(lambda: _state_is(host_xs, be.f, "4"), "the idle guest Connected")
    assert await host_xs.read(f"{be.b}/state") == "4"
    proc.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(proc.communicate(), GENEROUS)
    assert proc.returncode == 0, err
    assert await host_xs.read(f"{be.f}/state") == "6"
    assert b'"ok": true' in out


async def test_backend_leaving_mid_workload_fails_the_run(
    backends: Backends, sim_host: SimHostProc, host_xs: XenStore, tmp_path: Path
) -> None:
    be = await backends(13, "xvdb", raw_image(tmp_path, "l.raw", 4 * MiB))
    task = asyncio.create_task(run_guest_cli(sim_host, 13, "--rw", "randread", "--until-stopped", "--iodepth", "4"))
    await await_until(lambda: be.served() > 50, "the guest's reads flowing")
    await host_xs.write(f"{be.b}/state", "5")
    r = await asyncio.wait_for(task, GENEROUS)
    # Closing with no error is a detach, as blkfront takes it: drained and closed, the workload cut short.
    assert r.rc == 1
    assert "detached by the backend (state 5 Closing, the backend closed it)" in r.stderr
    assert r.disk("xvdb")["detached"] is True and r.disk("xvdb")["errors"] == 0
    assert await host_xs.read(f"{be.f}/state") == "6"


async def test_a_second_guest_of_the_same_domain_is_refused(
    backends: Backends, sim_host: SimHostProc, host_xs: XenStore, tmp_path: Path
) -> None:
    be = await backends(14, "xvdb", raw_image(tmp_path, "two.raw", MiB))
    first = asyncio.create_task(run_guest_cli(sim_host, 14, "--idle", "--until-stopped"))
    await await_until(lambda: _state_is(host_xs, be.f, "4"), "the first guest Connected")
    second = await run_guest_cli(sim_host, 14, "--rw", "read")
    assert second.rc == 1 and "another simulated guest of domain 14 is running" in second.stderr
    assert await host_xs.read(f"{be.f}/state") == "4", "the running guest was not disturbed"
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first


async def test_fewer_ios_than_queues_ends(backends: Backends, sim_host: SimHostProc, tmp_path: Path) -> None:
    await backends(15, "xvdb", raw_image(tmp_path, "few.raw", MiB))
    r = await run_guest_cli(sim_host, 15, "--rw", "randwrite", "--size", "8k", "--queues", "4", "--verify", timeout=60)
    assert r.rc == 0, r.stderr
    assert r.disk("xvdb")["writes"] == 2 and r.disk("xvdb")["verified_reads"] == 2


async def test_detach_during_the_handshake_fails_at_once(
    sim_host: SimHostProc, host_xs: XenStore, tmp_path: Path
) -> None:
    # Attached by the toolstack, but no backend answers: the guest waits for InitWait...
    be = MiniBackend(sim_host, 15, "xvdb", raw_image(tmp_path, "h.raw", MiB))
    await be.attach(host_xs)
    task = asyncio.create_task(run_guest_cli(sim_host, 15, "--rw", "read", "--timeout", "600"))
    # The guest has taken its domain (its lock file names it); whether it is already waiting for InitWait
    # or reads the state only after the detach below, it meets a Closing backend during the handshake.
    await await_until(lambda: _lock_held(sim_host.dir / "guest-15.lock"), "the guest started")
    # ...when the toolstack detaches it: the guest gives up at once instead of timing out,
    # and closes its side so the detach can complete.
    await host_xs.write(f"{be.b}/online", "0")
    await host_xs.write(f"{be.b}/state", "5")
    await await_until(lambda: _state_is(host_xs, be.f, "6"), "the guest closed its side")
    await host_xs.write(f"{be.b}/state", "6")
    r = await asyncio.wait_for(task, GENEROUS)
    assert r.rc == 1 and "is Closing (the disk is being detached)" in r.stderr
