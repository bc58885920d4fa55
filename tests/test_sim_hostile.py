"""The simulated guest's hostile modes against the real data plane: each misbehaviour is answered or
refused by the backend, never trusted, and a well-behaved guest served next to it keeps its verified
data flowing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.sim import MiniBackend, SimHostProc, guest_cli, run_guest_cli
from tests.fixtures.wait import await_until
from xenblk.xenstore import XenStore

Backends = Callable[..., Awaitable[MiniBackend]]
MiB = 1 << 20


def raw_image(tmp_path: Path, name: str, size: int) -> Path:
    p = tmp_path / name
    with open(p, "wb") as f:
        f.truncate(size)
    return p


async def hostile_next_to_a_good_guest(
    backends: Backends, sim_host: SimHostProc, tmp_path: Path, mode: str, *extra: str
) -> tuple[MiniBackend, dict[str, Any], Any]:
    bad = await backends(1, "xvdb", raw_image(tmp_path, "bad.raw", 4 * MiB))
    good_be = await backends(2, "xvdb", raw_image(tmp_path, "good.raw", 8 * MiB))
    # The good guest runs until told to stop: verified I/O flowing before the hostile guest starts and
    # still flowing after it is done (its backend's request counter is the marker, not a runtime).
    async with guest_cli(sim_host, 2, "--rw", "randrw", "--iodepth", "8", "--verify", "--seed", "4",
                         "--until-stopped", "--queues", "2") as good_guest:  # fmt: skip
        await await_until(lambda: good_be.served() > 100, "the good guest's I/O flowing")
        bad_run = await run_guest_cli(sim_host, 1, "--rw", "randrw", "--iodepth", "8", "--hostile", mode,
                                      "--runtime", "1.5", *extra)  # fmt: skip
        after = good_be.served()
        await await_until(lambda: good_be.served() > after + 100, "the good guest's I/O flowing on")
        good_run = await good_guest.stop()
    assert good_run.rc == 0, good_run.stderr
    good = good_run.disk("xvdb")
    assert good["errors"] == 0 and good["verify_errors"] == 0 and good["verified_reads"] > 0
    assert bad_run.rc == 0, bad_run.stderr
    return bad, bad_run.disk("xvdb"), bad.stats


async def test_overflowed_producer_stops_only_that_ring(
    backends: Backends, sim_host: SimHostProc, host_xs: XenStore, tmp_path: Path
) -> None:
    be, disk, stats = await hostile_next_to_a_good_guest(backends, sim_host, tmp_path, "overflow")
    h = disk["hostile"]
    assert h["mode"] == "overflow" and h["requests"] > 4 * 32 and h["responses"] == 0
    assert stats[0].ring_protocol_errors == 1
    assert sum(o.requests for o in stats[0].op) == 0, "nothing of the bogus ring reached storage"
    assert await host_xs.read(f"{be.b}/state") == "6"


async def test_garbage_requests_are_each_refused(backends: Backends, sim_host: SimHostProc, tmp_path: Path) -> None:
    # a number of requests, not a time: however slow the machine, every one of them is sent
    _be, disk, stats = await hostile_next_to_a_good_guest(
        backends, sim_host, tmp_path, "garbage", "--count", "2000", "--runtime", "600"
    )
    h = disk["hostile"]
    assert h["requests"] == 2000, "the backend kept answering, so the guest kept sending"
    assert h["error_responses"] > 0
    refused = sum(stats[0].refusals)
    assert refused >= h["error_responses"]
    # The only garbage that is a valid request: an empty FLUSH or BARRIER (it names no sectors, so,
    # as in blkback, its random sector_number is not looked at). Each such one is answered OK.
    ok_flushes = sum(stats[0].op[i].requests - stats[0].op[i].errors for i in (2, 4))
    assert h["responses"] - h["error_responses"] <= ok_flushes
    assert sum(stats[0].op[i].requests - stats[0].op[i].errors for i in (0, 1, 3)) == 0
    assert stats[0].ring_protocol_errors == 0
    # Random opcodes, segment counts and sectors are each caught by their own rule.
    for reason in (0, 1, 3):
        assert stats[0].refusals[reason] > 0


async def test_revoked_grants_fail_requests_not_the_backend(
    backends: Backends, sim_host: SimHostProc, tmp_path: Path
) -> None:
    _be, disk, stats = await hostile_next_to_a_good_guest(backends, sim_host, tmp_path, "revoke", "--no-persistent")
    h = disk["hostile"]
    assert h["responses"] == h["error_responses"] == h["requests"] > 0
    assert disk["errors"] == disk["ios"] > 0
    s = stats[0]
    assert s.refusals[8] + s.grant_copy_failures + s.grant_map_failures > 0, "failed on the grants"
    assert s.op[1].bytes == 0, "no write reached storage without its data"


@pytest.mark.parametrize("abi", ["x86_64-abi", "x86_32-abi"])
async def test_guest_that_never_drains_still_detaches(
    backends: Backends, sim_host: SimHostProc, host_xs: XenStore, tmp_path: Path, abi: str
) -> None:
    be, disk, stats = await hostile_next_to_a_good_guest(backends, sim_host, tmp_path, "no-drain", "--abi", abi)
    h = disk["hostile"]
    assert h["requests"] == 8 and h["responses"] == 0
    assert sum(o.requests for o in stats[0].op) == 8, "the backend answered all of them into the ring"
    assert be.device is None and await host_xs.read(f"{be.b}/state") == "6"
