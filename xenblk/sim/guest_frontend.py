"""The VBD handshake of the simulated blkfront over XenStore (docs/DESIGN.md, "The VBD handshake",
Frontend part), in the order Linux blkfront plays it: reset to Initialising, wait for the backend's
InitWait, read its limits, set up rings and event channels, publish them and go Initialised, wait
for Connected, read the disk's geometry and features, go Connected; on close, Closing then Closed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xenblk.errors import XenblkError
from xenblk.sim.broker import BrokerClient
from xenblk.sim.guest_native import GuestDomain, GuestQueue, QueueSetup, close_fds
from xenblk.xen.paths import frontend_path
from xenblk.xen.states import XenbusState as S
from xenblk.xenstore import Transaction, XenStore

_RING_KEYS = {"ring-page-order", "multi-queue-num-queues", "event-channel", "protocol", "feature-persistent"}


class ConnectError(XenblkError):
    pass


@dataclass
class FrontendOptions:
    abi: str = "x86_64-abi"
    ring_order: int = 0
    queues: int = 1
    indirect: bool = False
    persistent: bool = True
    timeout: float = 30.0


@dataclass
class Negotiated:
    protocol: str
    ring_pages: int
    queues: int
    indirect_segments: int  # per request when --indirect was asked and offered; 0 = direct requests
    persistent: bool
    flush: bool
    discard: bool
    backend_max_indirect: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "ring_pages": self.ring_pages,
            "queues": self.queues,
            "indirect_segments": self.indirect_segments,
            "persistent": self.persistent,
            "flush": self.flush,
            "discard": self.discard,
        }


@dataclass
class DiskInfo:
    sectors: int
    sector_size: int
    physical_sector_size: int
    info: int

    @property
    def bytes(self) -> int:
        return self.sectors * 512

    @property
    def readonly(self) -> bool:
        return bool(self.info & 4)


def _state(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _uint(value: str | None, default: int, what: str) -> int:
    if value is None:
        return default
    try:
        n = int(value)
    except ValueError:
        raise ConnectError(f"backend wrote a bad {what}: {value!r}") from None
    if n < 0:
        raise ConnectError(f"backend wrote a bad {what}: {value!r}")
    return n


@dataclass
class Frontend:
    xs: XenStore
    broker: BrokerClient
    domain: GuestDomain
    domid: int
    devid: int
    vdev: str
    opts: FrontendOptions
    backend: str = ""
    backend_id: int = 0
    negotiated: Negotiated | None = None
    disk: DiskInfo | None = None
    queues: list[GuestQueue] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    connected: bool = False

    @property
    def path(self) -> str:
        return frontend_path(self.domid, self.devid)

    async def _wait_backend(
        self,
        accept: Callable[[int | None], bool],
        what: str,
        stale_error: str | None = None,
        closing_fails: bool = False,
    ) -> int | None:
        """Wait until the backend's state satisfies `accept`. A Closed backend with a fresh error (not
        `stale_error`, unless the backend moved in between) fails at once; so does a Closing one
        with `closing_fails` (a detach during the handshake: waiting on would only time out)."""
        state_path = f"{self.backend}/state"
        moved = False
        try:
            async with asyncio.timeout(self.opts.timeout), self.xs.watch(state_path) as w:
                async for _ in w:
                    state = _state(await self.xs.try_read(state_path))
                    if accept(state):
                        return state
                    if state == S.CLOSING and closing_fails:
                        raise ConnectError(f"backend {self.backend} is Closing (the disk is being detached)")
                    if state != S.CLOSED:
                        moved = True
                    elif (err := await self.xs.try_read(f"{self.backend}/error")) and (moved or err != stale_error):
                        raise ConnectError(f"backend refused the device: {err}")
        except TimeoutError:
            now = await self.xs.try_read(state_path)
            err = await self.xs.try_read(f"{self.backend}/error")
            extra = f"; backend error: {err}" if err else ""
            raise ConnectError(
                f"backend {self.backend} did not reach {what} within {self.opts.timeout:g}s (state {now}){extra}"
            ) from None
        raise ConnectError(f"watch on {state_path} ended")

    async def connect(self) -> None:
        xs = self.xs
        backend = await xs.try_read(f"{self.path}/backend")
        if backend is None:
            raise ConnectError(f"{self.vdev} is not attached to domain {self.domid} ({self.path}/backend missing)")
        self.backend = backend
        self.backend_id = _uint(await xs.try_read(f"{self.path}/backend-id"), 0, "backend-id")
        state = _state(await xs.try_read(f"{self.path}/state"))
        # Going back to Initialising makes the backend retry, so an error it wrote before is stale until
        # it moves; with the frontend already Initialising, a Closed backend's error is its answer.
        stale_error = await xs.try_read(f"{self.backend}/error") if state != S.INITIALISING else None
        if state != S.INITIALISING:
            if state not in (None, S.CLOSED):
                # A previous run died while connected: unplug first, as a driver unbind would.
                await xs.write(f"{self.path}/state", str(int(S.CLOSED)))
                await self._wait_backend(lambda s: s in (S.CLOSED, S.INIT_WAIT, None), "Closed")
            await xs.write(f"{self.path}/state", str(int(S.INITIALISING)))
        await self._wait_backend(lambda s: s == S.INIT_WAIT, "InitWait (2)", stale_error, closing_fails=True)
        await self._talk_to_backend()
        await self._wait_backend(lambda s: s == S.CONNECTED, "Connected (4)", closing_fails=True)
        await self._read_disk()
        await xs.write(f"{self.path}/state", str(int(S.CONNECTED)))
        self.connected = True

    async def _talk_to_backend(self) -> None:
        xs, o = self.xs, self.opts
        max_order = _uint(await xs.try_read(f"{self.backend}/max-ring-page-order"), 0, "max-ring-page-order")
        max_queues = _uint(await xs.try_read(f"{self.backend}/multi-queue-max-queues"), 1, "multi-queue-max-queues")
        backend_persistent = await xs.try_read(f"{self.backend}/feature-persistent") == "1"
        order = min(o.ring_order, max_order)
        nq = max(1, min(o.queues, max_queues))
        pages = 1 << order
        for q in range(nq):
            frame, ref = self.domain.alloc(pages, f"{self.vdev} ring {q}")
            reply, fds = await asyncio.to_thread(
                self.broker.call,
                {"op": "evtchn_alloc_unbound", "domid": self.domid, "remote_domid": self.backend_id},
            )
            if len(fds) != 2:
                close_fds(*fds)
                raise ConnectError("the broker sent no event-channel fds")
            self.ports.append(int(reply["port"]))
            setup = QueueSetup(o.abi, pages, frame, ref, self.devid, self.backend_id, fds[0], fds[1])
            self.queues.append(GuestQueue(self.domain, setup))  # the ring is granted before it is published
        self.negotiated = Negotiated(
            protocol=o.abi,
            ring_pages=pages,
            queues=nq,
            indirect_segments=0,
            persistent=o.persistent and backend_persistent,
            flush=False,
            discard=False,
        )

        async def publish(t: Transaction) -> None:
            # A previous connection may have left other ring keys (more pages, more queues): a backend
            # must not read those, so they go first.
            for key in await t.directory(self.path):
                if key in _RING_KEYS or key.startswith(("ring-ref", "queue-")):
                    await t.rm(f"{self.path}/{key}")
            if pages > 1:
                await t.write(f"{self.path}/ring-page-order", str(order))
            if nq > 1:
                await t.write(f"{self.path}/multi-queue-num-queues", str(nq))
            for q, gq in enumerate(self.queues):
                base = self.path if nq == 1 else f"{self.path}/queue-{q}"
                if pages == 1:
                    await t.write(f"{base}/ring-ref", str(gq.setup.ring_ref))
                else:
                    for i in range(pages):
                        await t.write(f"{base}/ring-ref{i}", str(gq.setup.ring_ref + i))
                await t.write(f"{base}/event-channel", str(self.ports[q]))
            await t.write(f"{self.path}/protocol", o.abi)
            await t.write(f"{self.path}/feature-persistent", "1" if o.persistent else "0")

        await xs.transact(publish)
        await xs.write(f"{self.path}/state", str(int(S.INITIALISED)))

    async def _read_disk(self) -> None:
        xs, b = self.xs, self.backend

        async def key(name: str, default: int) -> int:
            return _uint(await xs.try_read(f"{b}/{name}"), default, name)

        sectors = await key("sectors", 0)
        if sectors == 0:
            raise ConnectError(f"backend {b} is Connected but wrote no sectors")
        sector_size = await key("sector-size", 512)
        if sector_size < 512 or sector_size & (sector_size - 1):
            raise ConnectError(f"backend wrote a bad sector-size: {sector_size}")
        self.disk = DiskInfo(sectors, sector_size, await key("physical-sector-size", sector_size), await key("info", 0))
        n = self.negotiated
        assert n is not None
        n.flush = await key("feature-flush-cache", 0) == 1
        n.discard = await key("feature-discard", 0) == 1
        n.backend_max_indirect = await key("feature-max-indirect-segments", 0)
        if self.opts.indirect:
            if n.backend_max_indirect <= 11:
                raise ConnectError(f"--indirect: the backend of {self.vdev} offers no indirect segments")
            # Up to what the protocol carries (8 indirect pages); xenblk offers 256.
            n.indirect_segments = min(n.backend_max_indirect, 8 * 512)

    async def close(self) -> None:
        """Closing, wait for the backend to let go, Closed, then revoke the rings. Safe on a half-connected
        frontend; the queues' threads must have ended."""
        xs = self.xs
        if self.backend:
            with contextlib.suppress(XenblkError, TimeoutError):
                await xs.write(f"{self.path}/state", str(int(S.CLOSING)))
                state = await self._wait_backend(
                    lambda s: s in (S.CLOSING, S.CLOSED, None), "Closing (5) or Closed (6)"
                )
                await xs.write(f"{self.path}/state", str(int(S.CLOSED)))
                if state == S.CLOSING:
                    await self._wait_backend(lambda s: s in (S.CLOSED, None), "Closed (6)")
        for gq in self.queues:
            gq.free()
        self.queues.clear()
        for port in self.ports:
            with contextlib.suppress(XenblkError):
                await asyncio.to_thread(self.broker.call, {"op": "evtchn_close", "domid": self.domid, "port": port})
        self.ports.clear()
        self.connected = False
