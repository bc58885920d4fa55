"""The simulated guest against a backend that answers wrongly (played here in Python on the shared
ring): like a hardened blkfront, the guest refuses each wrong answer with a clear reason and exits
non-zero instead of trusting it or hanging."""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fixtures.sim import BackendOffer, MiniBackend, SimHostProc, run_guest_cli
from tests.fixtures.wait import GENEROUS
from xenblk.sim.broker import BrokerClient
from xenblk.xenstore import XenStore

RING_HEADER = 64
ENTRY = 112  # x86_64-abi
RING_SIZE = 32  # one page


class BadBackend:
    """Plays the backend's handshake, then answers each request as `mode` says."""

    def __init__(self, host: SimHostProc, xs: XenStore, be: MiniBackend, mode: str) -> None:
        self.host, self.xs, self.be, self.mode = host, xs, be, mode
        self.answered = 0

    async def _close_when_asked(self) -> None:
        async with self.xs.watch(f"{self.be.f}/state") as w:
            async for _ in w:
                if await self.xs.try_read(f"{self.be.f}/state") in ("5", "6"):
                    await self.xs.write(f"{self.be.b}/state", "6")
                    return

    async def run(self) -> None:
        xs, b, f = self.xs, self.be.b, self.be.f
        await xs.write(f"{b}/state", "2")
        while await xs.try_read(f"{f}/state") != "3":
            await asyncio.sleep(0.02)
        ref = int(await xs.read(f"{f}/ring-ref"))
        port = int(await xs.read(f"{f}/event-channel"))
        with BrokerClient(self.host.broker) as c:
            info, (mem_fd, gnt_fd) = c.call({"op": "map_domain", "domid": self.be.domid})
            _, (recv_fd, send_fd) = c.call(
                {"op": "evtchn_bind_interdomain", "domid": 0, "remote_domid": self.be.domid, "remote_port": port}
            )
        mem = mmap.mmap(mem_fd, info["mem_pages"] * 4096)
        gnt = mmap.mmap(gnt_fd, info["gnttab_entries"] * 8)
        _flags, _domid, frame = struct.unpack_from("<HHI", gnt, ref * 8)
        ring = frame * 4096
        for k, v in {"sectors": "2048", "sector-size": "512", "info": "0", "state": "4"}.items():
            await xs.write(f"{b}/{k}", v)
        req_cons = rsp_prod = 0
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(recv_fd, wake.set)
        closer = asyncio.create_task(self._close_when_asked())
        try:
            while True:
                await wake.wait()
                wake.clear()
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(recv_fd)
                req_prod = struct.unpack_from("<I", mem, ring)[0]
                while req_cons != req_prod:
                    e = ring + RING_HEADER + (req_cons % RING_SIZE) * ENTRY
                    op, _nseg, _handle = struct.unpack_from("<BBH", mem, e)
                    (rid,) = struct.unpack_from("<Q", mem, e + 8)
                    req_cons += 1
                    if self.mode == "silent":
                        continue
                    status = -1 if self.mode == "error" else 0
                    if self.mode == "wrong-id":
                        rid ^= 0x5A5A0000
                    if self.mode == "wrong-op":
                        op ^= 1
                    r = ring + RING_HEADER + (rsp_prod % RING_SIZE) * ENTRY
                    struct.pack_into("<QBxh", mem, r, rid, op, status)
                    rsp_prod += 1
                    self.answered += 1
                if self.mode == "overflow" and self.answered:
                    rsp_prod += 1000
                struct.pack_into("<I", mem, ring + 8, rsp_prod)
                os.eventfd_write(send_fd, 1)
        finally:
            closer.cancel()
            loop.remove_reader(recv_fd)
            for fd in (mem_fd, gnt_fd, recv_fd, send_fd):
                os.close(fd)


@pytest.fixture
async def bad_backend(sim_host: SimHostProc, host_xs: XenStore, tmp_path: Path) -> AsyncIterator[object]:
    tasks: list[asyncio.Task[None]] = []

    async def make(mode: str) -> BadBackend:
        img = tmp_path / "bad.raw"
        img.touch()
        be = MiniBackend(sim_host, 1, "xvdb", img, BackendOffer())
        await be.attach(host_xs)
        bad = BadBackend(sim_host, host_xs, be, mode)
        tasks.append(asyncio.create_task(bad.run()))
        return bad

    yield make
    for t in tasks:
        t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await t


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("error", "read of 4096 bytes at offset 0 failed: status -1"),
        ("wrong-id", "backend protocol error: response with unknown id"),
        ("wrong-op", "has operation 1 instead of 0"),
        ("overflow", "backend protocol error: response producer"),
        ("silent", "no response from the backend for 1.0 s with 1 I/Os in flight"),
    ],
)
async def test_wrong_answers_fail_the_run_clearly(
    bad_backend: object, sim_host: SimHostProc, mode: str, message: str
) -> None:
    bad = await bad_backend(mode)  # type: ignore[operator]
    # Only the silent backend is meant to time out; a wrong answer that is merely slow on a loaded machine
    # must still be seen as the wrong answer it is.
    io_timeout = "1" if mode == "silent" else "60"
    r = await run_guest_cli(sim_host, 1, "--rw", "read", "--io-timeout", io_timeout, "--timeout", "60",
                            timeout=GENEROUS)  # fmt: skip
    assert r.rc == 1
    assert message in r.stderr, r.stderr
    assert r.disk("xvdb")["error"] in r.stderr
    assert bad.answered <= 2
