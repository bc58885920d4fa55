"""One VBD's state machine (docs/DESIGN.md, "The VBD handshake", backend side).

Every watch event only wakes the machine; each step re-reads the states it depends on,
because events collapse and a frontend may skip states. All failures caused by the
frontend, the image or a grant end in `B/error` + Closed for this device only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from xenblk import log as xlog
from xenblk.backend.dataplane_port import Advertised, DataplanePort, RunningDevice, journals_on
from xenblk.backend.frontend import FrontendConfig, FrontendError, Limits, read_frontend
from xenblk.backend.imagespec import ImageBusy, ImageSpec, ImageSpecError, apply_format_rules, open_image, parse_params
from xenblk.backend.qos import DiskQos, QosGroups
from xenblk.backend.ratelimit import RateLimitedLog
from xenblk.config import Config
from xenblk.errors import XenblkError
from xenblk.metrics import DaemonCounters, DiskView
from xenblk.xen.paths import backend_path, domain_path
from xenblk.xen.states import XenbusState as S
from xenblk.xen.states import name as state_name
from xenblk.xen.states import parse_state
from xenblk.xenstore import Transaction, TryAgain, XenStore, XenStoreError, XenStoreUnavailable

VDISK_CDROM = 1
VDISK_READONLY = 4
RETRY_SECONDS = 0.5  # after xenstored was unreachable
# A frontend that reconnects without ever getting a request served (a reconnect loop, a guest rewriting
# its keys forever) is served again after a growing pause: the first FREE_RECONNECTS at once, then
# BACKOFF_FIRST, doubling, up to BACKOFF_MAX seconds. Each connection builds threads and an io_uring.
FREE_RECONNECTS = 3
BACKOFF_FIRST = 0.25
BACKOFF_MAX = 4.0
# An image another open holds (its OFD lock: the source of a handover, another daemon, another device) is
# tried again after LOCK_RETRY_FIRST seconds, doubling up to LOCK_RETRY_MAX, for as long as it takes: the
# holder releases it when its device closes or its process dies, and nothing signals that to us.
LOCK_RETRY_FIRST = 0.05
LOCK_RETRY_MAX = 1.0


def lock_retry_delay(tries: int) -> float:
    """Seconds before the next attempt to open an image held by another open, after `tries` attempts."""
    return min(LOCK_RETRY_FIRST * (1 << min(max(tries - 1, 0), 16)), LOCK_RETRY_MAX)


def reconnect_backoff(fruitless: int) -> float:
    """Seconds to wait before serving again after `fruitless` connections in a row served nothing."""
    if fruitless <= FREE_RECONNECTS:
        return 0.0
    return min(BACKOFF_FIRST * (1 << min(fruitless - FREE_RECONNECTS - 1, 16)), BACKOFF_MAX)


def cycle_logged(fruitless: int) -> bool:
    """Whether a connection cycle's info lines are logged: the first ones of a fruitless run, then only
    the 4th, 8th, 16th... (the others at debug), so a reconnect loop cannot flood the journal."""
    return fruitless <= FREE_RECONNECTS or fruitless & (fruitless - 1) == 0


class Phase(enum.Enum):
    NEW = "new"
    INIT_WAIT = "initwait"
    CONNECTED = "connected"
    CLOSED = "closed"


@dataclass
class DaemonContext:
    """What every device task shares with the daemon."""

    xs: XenStore
    cfg: Config
    dataplane: DataplanePort
    counters: DaemonCounters = field(default_factory=DaemonCounters)
    self_domid: int = 0
    qos_groups: QosGroups | None = None  # None: groups are not served (a unit test's context)


@dataclass
class Snapshot:
    bstate: int | None
    online: str | None
    fstate: int | None


class DeviceTask:
    def __init__(self, ctx: DaemonContext, btype: str, domid: int, devid: int) -> None:
        self.ctx = ctx
        self.btype = btype
        self.domid = domid
        self.devid = devid
        self.bpath = backend_path(ctx.self_domid, btype, domid, devid)
        self.fpath = ""
        self.vdev = str(devid)
        self.phase = Phase.NEW
        self.state = 0  # what this daemon last wrote to B/state
        self.spec: ImageSpec | None = None
        self.image: Any = None
        self.nbd: Any = None  # xenblk.nbd.NbdExport of the open image (docs/DESIGN.md, "NBD export")
        self.image_format = ""
        self._header_fd = -1  # an RBD image's "header changed" eventfd, watched by the loop (online resize)
        self._header_tasks: set[asyncio.Task[None]] = set()
        self.cdrom = False
        self.sectors = 0
        self.frontend: FrontendConfig | None = None
        self.error: str | None = None
        self.connections = 0
        self.resizes = 0
        self._adv: Advertised | None = None
        self._running: RunningDevice | None = None
        self._fail_fd: int | None = None  # the running device's failure eventfd, watched by the loop
        self._retired: list[Any] = []  # last stats of the previous connection, exported while closed
        self._stats_lock = threading.Lock()  # the scrape thread reads stats while the loop stops devices
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._shutdown = False
        self._hand_over = False
        self.crashed = False  # the task died of a bug: not served again until re-attached or restarted
        self._resume_on: set[int] = set()
        self._fs_at_close: int | None = None  # the frontend's state when this backend closed
        self._frontend_moved = False  # it was seen in another state since
        self._seen_other_than_1 = False
        self._served = False  # the current connection had a request served (a reconnect loop does not)
        self.fruitless = 0  # connections in a row that served nothing
        self.backoffs = 0  # reconnects delayed by reconnect_backoff()
        self._backoff_until: float | None = None
        self.frontend_connected = False  # the daemon has seen F=4 since this connection began
        # A toolstack that runs a hotplug script (libxl writes B/script) gets InitWait before the image is
        # opened: libxl runs the script only after InitWait, and the script's `xenblk hotplug add` (control op
        # "take") is what opens it, so a refusal reaches xl as the script's hotplug-error instead of a timeout.
        self.hotplug = False
        self.taken = False
        self._progress = asyncio.Event()  # set after every step: take/release wait on it
        self.finished = False
        # Waiting for another open of the image to release it (ImageBusy): the reason, since when, attempts.
        self.lock_wait: str | None = None
        self._lock_wait_since = 0.0
        self._lock_tries = 0
        self._lock_timer: asyncio.TimerHandle | None = None
        self.log = xlog.get("xenblk.device", domid=domid, devid=devid)
        self.guest_log = RateLimitedLog(self.log)
        self.qos = DiskQos(domid, self.bpath, self.log)
        self.task: asyncio.Task[None] | None = None

    # -- API for the daemon

    def wake(self) -> None:
        self._changed.set()

    def request_shutdown(self, hand_over: bool = False) -> None:
        """Stop serving. hand_over: the next daemon carries on where this one stops, so nothing is
        written that the guest could see (a connected device's rings stay with their journals)."""
        self._shutdown = True
        self._hand_over = hand_over
        self._changed.set()

    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            await self._stop_dataplane()
            raise
        except Exception as e:  # one device's bug must never take the daemon down
            self.crashed = True
            self.log.exception("device.crashed")
            with contextlib.suppress(Exception):
                await self._close_with_error(f"internal error: {type(e).__name__}: {e}")
        finally:
            self._end_lock_wait()
            await self._stop_dataplane()
            await self._release_image()
            self.finished = True
            self._progress.set()

    async def _run(self) -> None:
        xs = self.ctx.xs
        frontend = await xs.try_read(f"{self.bpath}/frontend")
        dev = await xs.try_read(f"{self.bpath}/dev")
        self.hotplug = await xs.try_read(f"{self.bpath}/script") is not None
        # Taken before a daemon restart (or by a script that only writes hotplug-status): open at once.
        self.taken = self.taken or await xs.try_read(f"{self.bpath}/hotplug-status") == "connected"
        self.state = max(parse_state(await xs.try_read(f"{self.bpath}/state")) or 0, 0)  # as found
        if dev:
            self.vdev = dev[:32]
        self.log = self.log.bind(vdev=self.vdev)
        self.guest_log = RateLimitedLog(self.log)
        self.qos.log = self.log
        expected = f"{domain_path(self.domid)}/"
        if frontend is None or not frontend.startswith(expected) or len(frontend) > 256:
            # B is written by the toolstack, but refuse to watch another domain's tree on its say-so.
            await self._close_with_error(f"backend node frontend is {frontend!r}: expected a path under {expected}")
            self.fpath = ""
        else:
            self.fpath = frontend
        async with contextlib.AsyncExitStack() as stack:
            watches = [await stack.enter_async_context(xs.watch(self.bpath))]
            if self.fpath:
                watches.append(await stack.enter_async_context(xs.watch(self.fpath)))
            pumps = [asyncio.create_task(self._pump(w), name=f"watch {w.path}") for w in watches]
            # Limits change live: qos/ has its own watch, applied without a step of the machine.
            qw = await stack.enter_async_context(xs.watch(self.qos.node))
            pumps.append(asyncio.create_task(self._qos_pump(qw), name=f"watch {qw.path}"))
            stack.callback(lambda: [p.cancel() for p in pumps])
            self._changed.set()
            while True:
                # No timeout: a queue that fails wakes us through its device's eventfd (_watch_failures).
                await self._changed.wait()
                self._changed.clear()
                try:
                    async with self._lock:
                        if await self._step():
                            return
                    self._progress.set()
                except XenStoreUnavailable as e:
                    # xenstored restarting: the client reconnects and the watches fire again; look again then.
                    self.log.warning("device.xenstore_unavailable", error=str(e))
                    await asyncio.sleep(RETRY_SECONDS)
                    self._changed.set()

    async def _pump(self, watch: Any) -> None:
        try:
            async for _event in watch:
                self._changed.set()
        except XenStoreError as e:
            self.log.warning("device.watch_failed", error=str(e))
            self._changed.set()

    async def _qos_pump(self, watch: Any) -> None:
        try:
            async for _event in watch:
                try:
                    await self.qos.apply(self.ctx.xs, self.ctx.cfg, self.qos_kick)
                except XenblkError as e:  # a XenStore failure, or limits the data plane refused
                    self.log.warning("device.qos_failed", error=str(e))
        except XenStoreError as e:
            self.log.warning("device.watch_failed", error=str(e))

    def qos_kick(self) -> None:
        running = self._running
        if running is not None:
            running.qos_changed()

    async def _qos_join(self) -> tuple[Any, Any]:
        """The limiters for a new connection: the disk's, with its qos/ read now, and its group's."""
        await self.qos.apply(self.ctx.xs, self.ctx.cfg, None)
        if self.ctx.qos_groups is None:
            return self.qos.limiter, None
        return await self.qos.join(self.ctx.qos_groups, self, self.qos_kick)

    def _qos_leave(self) -> None:
        if self.ctx.qos_groups is not None:
            self.qos.leave(self.ctx.qos_groups, self)

    # -- the machine

    async def _snapshot(self) -> Snapshot:
        xs = self.ctx.xs
        bstate = parse_state(await xs.try_read(f"{self.bpath}/state"))
        online = await xs.try_read(f"{self.bpath}/online")
        fstate = parse_state(await xs.try_read(f"{self.fpath}/state")) if self.fpath else None
        return Snapshot(bstate, online, fstate)

    async def _step(self) -> bool:
        """One look at the world; True when this task is finished."""
        s = await self._snapshot()
        if s.bstate is None:
            self.log.info("device.removed")
            return True
        if self._shutdown:
            if self._hand_over and (self.phase is not Phase.CONNECTED or journals_on(self.ctx.dataplane)):
                # Drained and answered, the state nodes as they are: the next daemon resumes a connected
                # device from its journals and takes up any other where the handshake stands.
                await self._stop_dataplane(keep_journals=True)
                self.log.info("device.handed_over", phase=self.phase.name.lower())
                return True
            await self._stop_dataplane()
            if self.phase is not Phase.NEW and s.bstate != S.CLOSED:
                await self._write_state(S.CLOSED)
            return True
        if s.online is not None and s.online.strip() == "0":
            return await self._detach(s)
        if not self.fpath:
            return False  # closed with an error at start; only removal or shutdown from here
        fs = s.fstate
        if self.phase is Phase.NEW:
            if s.bstate == S.CONNECTED and fs in (S.INITIALISED, S.CONNECTED):
                resumed = await self._resume(fs)
                if resumed or resumed is None:  # None: the image is held elsewhere; the rings wait for it
                    return False
            if s.bstate in (S.INITIALISED, S.CONNECTED, S.CLOSING) and fs in (S.INITIALISED, S.CONNECTED, S.CLOSING):
                # A previous daemon left this device connected without closing it, and its rings cannot be
                # resumed (no journal, or not for these rings). Close, and serve it again once the frontend
                # has closed or restarted.
                self.log.info("device.stale_connection", backend=state_name(s.bstate), frontend=state_name(fs))
                await self._write_state(S.CLOSED)
                self._enter_closed(resume_on={S.INITIALISING, S.CLOSED}, fs=fs)
                return False
            if not await self._prepare():
                return False
        elif self.phase is Phase.CLOSED:
            if fs != S.INITIALISING:
                self._seen_other_than_1 = True
            if fs != self._fs_at_close:
                self._frontend_moved = True
            # Only a frontend that moved since the close: one still Connected to the rings this backend
            # refused would be refused again, in a loop, its error node never there long enough to read.
            resume = (fs in self._resume_on and self._frontend_moved) or (
                fs == S.INITIALISING and self._seen_other_than_1
            )
            if not resume:
                return False
            if not self._backoff_ready():
                return False
            self._cycle_info("device.reconnect", frontend=state_name(fs), fruitless=self.fruitless)
            if not await self._prepare():
                return False
        if self.phase is Phase.INIT_WAIT and self.image is None:
            if not self.taken:
                self.taken = await self.ctx.xs.try_read(f"{self.bpath}/hotplug-status") == "connected"
            if not self.taken:
                return False  # the hotplug script's take opens it; the frontend waits in the meantime
            try:
                if not await self._open_or_wait():
                    return False  # held by another open: the frontend waits until it is released
            except ImageSpecError as e:
                await self._close_with_error(str(e), fs)
                return False
        if self.phase is Phase.INIT_WAIT:
            if fs is None:
                await self._close_with_error("frontend state node disappeared during the handshake", fs)
            elif fs == -1:
                await self._close_with_error("frontend state is not a XenbusState", fs)
            elif fs in (S.INITIALISED, S.CONNECTED):
                await self._connect(fs)
            return False
        if self.phase is Phase.CONNECTED:
            if fs in (S.CLOSING, S.CLOSED):
                self._cycle_info("device.frontend_closing", frontend=state_name(fs))
                await self._stop_dataplane()
                await self._write_state(S.CLOSED)
                # A blkfront rebound while this backend still said Connected connects again at once
                # (new rings, Initialised/Connected, never Initialising): serve it, as blkback does.
                self._enter_closed(resume_on={S.INITIALISED, S.CONNECTED}, fs=fs)
            elif fs is None:
                await self._close_with_error("frontend state node disappeared while connected", fs)
            elif fs == -1:
                await self._close_with_error("frontend state is not a XenbusState", fs)
            elif fs != S.CONNECTED and fs != S.INITIALISED:
                await self._close_with_error(f"frontend state went back from Connected to {state_name(fs)}", fs)
            elif fs == S.INITIALISED and self.state == S.CONNECTED and self.frontend_connected:
                await self._close_with_error("frontend state went back from Connected to Initialised", fs)
            else:
                if fs == S.CONNECTED:
                    self.frontend_connected = True
                await self._check_queues(fs)
        return False

    def _backoff_ready(self) -> bool:
        """At a reconnect: count a connection that served nothing and, past FREE_RECONNECTS of them in a
        row, wait (the task is woken when the pause is over; other events only look again)."""
        loop = asyncio.get_running_loop()
        if self._backoff_until is None:
            self.fruitless = 0 if self._served else self.fruitless + 1
            self._served = False
            delay = reconnect_backoff(self.fruitless)
            if delay:
                self.backoffs += 1
                self._backoff_until = loop.time() + delay
                self._cycle_info("device.reconnect_backoff", seconds=delay, fruitless=self.fruitless)
                loop.call_later(delay, self._changed.set)
                return False
            return True
        if loop.time() < self._backoff_until:
            return False
        self._backoff_until = None
        return True

    def _cycle_info(self, event: str, **kw: Any) -> None:
        if cycle_logged(self.fruitless):
            self.log.info(event, **kw)
        else:
            self.log.debug(event, **kw)

    def _enter_closed(self, resume_on: set[int], fs: int | None) -> None:
        self.phase = Phase.CLOSED
        self._resume_on = resume_on
        self._fs_at_close = fs
        self._frontend_moved = False
        self._seen_other_than_1 = fs != S.INITIALISING

    async def _write_state(self, state: int) -> None:
        # In a transaction that checks B still exists: a plain write after `detach --force` removed B
        # would create B/state (and B) again.
        with contextlib.suppress(_Vanished):
            await self._transact_state({}, state)

    async def _transact_state(self, values: dict[str, str], state: int, remove: tuple[str, ...] = ()) -> None:
        async def body(t: Transaction) -> None:
            if await t.try_read(f"{self.bpath}/state") is None:
                raise _Vanished()
            for k in remove:
                await t.rm(f"{self.bpath}/{k}")
            for k, v in values.items():
                await t.write(f"{self.bpath}/{k}", v)
            await t.write(f"{self.bpath}/state", str(int(state)))

        await self.ctx.xs.transact(body)
        self._cycle_info("device.state", state=state_name(state), previous=state_name(self.state))
        self.state = int(state)

    async def _transact_values(self, values: dict[str, str]) -> None:
        async def body(t: Transaction) -> None:
            if await t.try_read(f"{self.bpath}/state") is None:
                raise _Vanished()
            for k, v in values.items():
                await t.write(f"{self.bpath}/{k}", v)

        await self.ctx.xs.transact(body)

    async def _close_with_error(self, reason: str, fs: int | None = None) -> None:
        await self._stop_dataplane()
        self.error = reason
        self.ctx.counters.devices_closed_on_error += 1
        self.guest_log.warning("device.error", error=reason)
        with contextlib.suppress(_Vanished):
            await self._transact_state({"error": reason[:1000]}, S.CLOSED)
        self._enter_closed(resume_on={S.INITIALISED, S.CONNECTED}, fs=fs)

    async def _open_image(self) -> None:
        """Check params and open the image (raises ImageSpecError)."""
        cfg = self.ctx.cfg
        xs = self.ctx.xs
        params = await xs.try_read(f"{self.bpath}/params")
        mode = await xs.try_read(f"{self.bpath}/mode")
        self.cdrom = (await xs.try_read(f"{self.bpath}/device-type")) == "cdrom"
        self.spec = apply_format_rules(parse_params(params, mode), list(cfg.storage.qcow2_dirs))
        loop = asyncio.get_running_loop()
        spec = self.spec
        wt = journals_on(self.ctx.dataplane)
        st = cfg.storage
        self.image = await loop.run_in_executor(
            None,
            lambda: open_image(
                spec,
                list(st.allowed_dirs),
                st.cache,
                allowed_devices=list(st.allowed_devices),
                backing_dirs=list(st.backing_dirs),
                meta_writethrough=wt,
                rbd=cfg.rbd,
            ),
        )
        if spec.format == "rbd" and not self.image.readonly:
            await self._rbd_lock()
        if spec.format == "rbd":
            self._watch_rbd_header()
        self.image_format = str(self.image.format)
        self.sectors = int(self.image.size) // 512
        self.log.info("device.image_opened", path=self.spec.path, format=self.image_format, sectors=self.sectors)
        await self._export_nbd()

    async def _export_nbd(self) -> None:
        """Serve the open image on a unix socket too, on the same image handle as the rings; for vbd3
        publish it as physical-device-path, where libxl looks for tapdisk's NBD socket (an HVM guest's
        QEMU gets nbd+unix:///?socket=<it>). A failure only logs: the rings are served regardless."""
        cfg = self.ctx.cfg
        spec, img = self.spec, self.image
        if not cfg.nbd.enabled or self.nbd is not None or img is None or spec is None:
            return
        from xenblk.nbd import NbdExport, make_socket_dir, socket_path

        path = socket_path(cfg.daemon.run_dir, self.btype, self.domid, self.devid)
        readonly = spec.readonly or bool(img.readonly)

        def export() -> Any:
            make_socket_dir(path)
            return NbdExport(img, path, readonly=readonly, max_clients=cfg.nbd.max_clients)

        try:
            self.nbd = await asyncio.get_running_loop().run_in_executor(None, export)
        except (XenblkError, OSError) as e:
            self.log.warning("device.nbd_failed", socket=path, error=str(e))
            return
        node = f"{self.bpath}/physical-device-path"
        # Not for vbd (backendtype=phy): libxl would take it for a device path. Not rewritten when it already
        # names this socket (a resume after a restart writes nothing under B).
        if self.btype == "vbd3" and await self.ctx.xs.try_read(node) != path:
            with contextlib.suppress(_Vanished):
                await self._transact_values({"physical-device-path": path})
        self.log.info("device.nbd_export", socket=path, readonly=readonly)

    async def _rbd_lock(self) -> None:
        """Hold the RBD image's exclusive lock before anything can write (README, "Ceph RBD"): while
        another client (another Dom0's daemon) holds it, wait, the device not yet served."""
        from xenblk import rbd
        from xenblk.storage import StorageError

        loop = asyncio.get_running_loop()
        img = self.image
        waiting = False
        try:
            while True:
                try:
                    prev = await loop.run_in_executor(None, rbd.acquire_lock, img)
                except rbd.LockBusy as e:
                    if not waiting:
                        self.log.warning("device.rbd_lock_wait", image=str(img.path), owner=e.owner, error=str(e))
                        waiting = True
                    await asyncio.sleep(1.0)
                    xs = self.ctx.xs
                    online, bstate = await xs.try_read(f"{self.bpath}/online"), await xs.try_read(f"{self.bpath}/state")
                    if self._shutdown or bstate is None or (online or "").strip() == "0":
                        # detached (or removed, or the daemon stopping) while waiting: stop waiting
                        raise StorageError(f"{img.path}: detached while waiting for the exclusive lock") from None
                    continue
                break
        except StorageError as e:
            self._close_image()
            raise ImageSpecError(str(e)) from None
        except BaseException:
            self._close_image()
            raise
        if prev:
            # librbd hands over a held lock only when its holder's watch is gone, and blocklists that
            # client first; or the holder released it between our look and our acquire.
            self.log.warning("device.rbd_lock_taken_over", image=str(img.path), previous_owner=prev)
        self.log.info("device.rbd_lock_acquired", image=str(img.path), waited=waiting)

    def _watch_rbd_header(self) -> None:
        """An RBD image grows from anywhere (`rbd resize` on any host): librbd's header watch wakes
        the loop, which re-reads the size as `xenblk resize` would."""
        from xenblk import rbd

        fd = rbd.update_fd(self.image)
        if fd < 0:
            return
        self._header_fd = fd

        def changed() -> None:
            with contextlib.suppress(OSError):
                os.read(fd, 8)
            t = asyncio.ensure_future(self._resize_quietly())
            self._header_tasks.add(t)
            t.add_done_callback(self._header_tasks.discard)

        asyncio.get_running_loop().add_reader(fd, changed)

    async def _resize_quietly(self) -> None:
        try:
            await self.resize()
        except XenblkError as e:
            self.log.warning("device.resize_failed", error=str(e))

    async def _resume(self, fs: int) -> bool | None:
        """A previous daemon died with this device Connected: carry on its rings from their journals,
        writing nothing the guest could notice. False (nothing changed) when that cannot be done; None
        while another open holds the image (tried again later: its rings wait, unanswered)."""
        xs = self.ctx.xs
        cfg = self.ctx.cfg
        try:
            if not await self._open_or_wait():
                return None
        except ImageSpecError as e:
            self.log.warning("device.resume_impossible", error=str(e))
            return False
        await self._repair_leaks()

        async def node(key: str, default: int) -> int:
            v = await xs.try_read(f"{self.bpath}/{key}")
            try:
                return int(v) if v is not None else default
            except ValueError:
                return default

        # What the guest negotiated against is what the previous daemon advertised, not today's config.
        dp = cfg.dataplane
        adv = Advertised(
            max_ring_page_order=await node("max-ring-page-order", dp.max_ring_page_order),
            max_queues=await node("multi-queue-max-queues", dp.max_queues),
            max_indirect_segments=await node("feature-max-indirect-segments", 0),
            persistent=await node("feature-persistent", 0) == 1,
            max_work_per_wake=dp.max_work_per_wake,
            memory_per_disk=dp.memory_per_disk_mib << 20,
        )
        limits = Limits(adv.max_ring_page_order, adv.max_queues, adv.persistent)
        fpath = self.fpath

        async def read(t: Transaction) -> FrontendConfig:
            return await read_frontend(t, fpath, limits)

        spec = self.spec
        assert spec is not None
        readonly = spec.readonly or bool(self.image.readonly)
        try:
            fe = await xs.transact(read)
            limiters = await self._qos_join()
            running = await asyncio.get_running_loop().run_in_executor(
                None,
                lambda: self.ctx.dataplane.connect(
                    self.domid,
                    self.devid,
                    self.image,
                    fe,
                    adv,
                    readonly,
                    journal=self._journal_name,
                    resume=True,
                    qos=limiters,
                ),
            )
        except XenblkError as e:
            self._qos_leave()
            self.log.info("device.resume_impossible", error=str(e))
            return False
        with self._stats_lock:
            self._running = running
            self._retired = []
        self._watch_failures(running)
        self._adv = adv
        self.frontend = fe
        self.connections += 1
        self.state = S.CONNECTED
        self.phase = Phase.CONNECTED
        self.frontend_connected = fs == S.CONNECTED
        if await xs.try_read(f"{self.bpath}/sectors") != str(self.sectors):
            # The image changed size while no daemon ran: tell the guest as a resize does.
            with contextlib.suppress(_Vanished):
                await self._transact_state({"sectors": str(self.sectors)}, S.CONNECTED)
        self.log.info("device.resumed", protocol=fe.protocol, ring_pages=fe.ring_pages, queues=len(fe.queues))
        return True

    async def _repair_leaks(self) -> None:
        """The previous daemon was killed, maybe between a cluster's refcount and the L2 entry naming it
        (refcount first keeps a crash to leaks): give such clusters back before the first request.
        A failure only costs space, so it is logged and the device is served anyway."""
        image = self.image
        if image.readonly:
            return
        try:
            fixed = await asyncio.get_running_loop().run_in_executor(None, image.repair_leaks)
        except XenblkError as e:  # a StorageError: the image's own words
            self.log.warning("device.leak_repair_failed", error=str(e))
            return
        if fixed:
            self.log.info("device.leaks_repaired", clusters=fixed)

    @property
    def _journal_name(self) -> str:
        return f"{self.btype}-{self.domid}-{self.devid}"

    async def _prepare(self) -> bool:
        """Open the image (once per device), advertise the features, InitWait."""
        cfg = self.ctx.cfg
        if self.image is None and self.hotplug and not self.taken:
            self.sectors = 0  # opened at take (see __init__); the InitWait nodes do not depend on the image
        elif self.image is None:
            try:
                if not await self._open_or_wait():
                    return False  # B stays Initialising: the frontend waits for InitWait
            except ImageSpecError as e:
                await self._close_with_error(str(e))
                return False
        else:
            # Reconnecting: the image may have grown while the guest was away.
            img = self.image
            self.sectors = int(await asyncio.get_running_loop().run_in_executor(None, img.refresh_size)) // 512
        dp = cfg.dataplane
        self._adv = Advertised(
            max_ring_page_order=dp.max_ring_page_order,
            max_queues=dp.max_queues,
            max_indirect_segments=dp.max_indirect_segments,
            persistent=dp.feature_persistent,
            max_work_per_wake=dp.max_work_per_wake,
            memory_per_disk=dp.memory_per_disk_mib << 20,
        )
        values = {
            "max-ring-page-order": str(dp.max_ring_page_order),
            "multi-queue-max-queues": str(dp.max_queues),
            "feature-persistent": "1" if dp.feature_persistent else "0",
        }
        if dp.max_indirect_segments:
            values["feature-max-indirect-segments"] = str(dp.max_indirect_segments)
        try:
            await self._transact_state(values, S.INIT_WAIT, remove=("error", "feature-max-indirect-segments"))
        except _Vanished:
            return False
        self.error = None
        self.frontend_connected = False
        self.phase = Phase.INIT_WAIT
        return True

    async def _connect(self, fs: int) -> None:
        assert self._adv is not None
        adv = self._adv
        limits = Limits(adv.max_ring_page_order, adv.max_queues, adv.persistent)
        fpath = self.fpath

        async def read(t: Transaction) -> FrontendConfig:
            return await read_frontend(t, fpath, limits)

        try:
            fe = await self.ctx.xs.transact(read)
        except FrontendError as e:
            await self._close_with_error(str(e), fs)
            return
        except TryAgain:
            # Every read of the keys conflicted with a write to them: a frontend rewriting its keys
            # forever. Its own doing: close this device (it is served again when the frontend restarts).
            await self._close_with_error(
                "the frontend kept changing its keys while they were read (every XenStore transaction "
                "conflicted); close and restart the frontend",
                fs,
            )
            return
        spec = self.spec
        assert spec is not None
        readonly = spec.readonly or bool(self.image.readonly)
        loop = asyncio.get_running_loop()
        try:
            limiters = await self._qos_join()
            running = await loop.run_in_executor(
                None,
                lambda: self.ctx.dataplane.connect(
                    self.domid, self.devid, self.image, fe, adv, readonly, journal=self._journal_name, qos=limiters
                ),
            )
        except XenblkError as e:
            self._qos_leave()
            await self._close_with_error(f"cannot connect the rings: {e}", fs)
            return
        with self._stats_lock:
            self._running = running
            self._retired = []
        self._watch_failures(running)
        self.frontend = fe
        self.connections += 1
        info = (VDISK_CDROM if self.cdrom else 0) | (VDISK_READONLY if readonly else 0)
        img = self.image
        discard = bool(img.can_discard) and not readonly
        values = {
            "sectors": str(self.sectors),
            "info": str(info),
            "sector-size": str(int(img.logical_block)),
            "physical-sector-size": str(int(img.physical_block)),
            "feature-flush-cache": "1" if img.can_flush else "0",
            "feature-barrier": "1" if img.can_flush else "0",
            "feature-discard": "1" if discard else "0",
        }
        if discard:
            values["discard-granularity"] = str(int(img.discard_granularity) or int(img.logical_block))
            values["discard-alignment"] = str(int(img.discard_alignment))
            values["discard-secure"] = "1" if img.can_secure_discard else "0"
        try:
            await self._transact_state(values, S.CONNECTED)
        except BaseException as e:
            await self._stop_dataplane()  # never two data planes for one device: the next step connects again
            if isinstance(e, _Vanished):
                return
            raise
        self.phase = Phase.CONNECTED
        self._cycle_info(
            "device.connected",
            protocol=fe.protocol,
            ring_pages=fe.ring_pages,
            queues=len(fe.queues),
            persistent=fe.persistent,
            readonly=readonly,
        )

    async def _check_queues(self, fs: int | None) -> None:
        running = self._running
        if running is None or self.frontend is None:
            return
        for q in range(len(self.frontend.queues)):
            why = running.queue_failed(q)
            if why:
                await self._close_with_error(f"queue {q}: {why}", fs)
                return

    async def _detach(self, s: Snapshot) -> bool:
        if self.phase is Phase.CONNECTED and s.fstate in (S.INITIALISED, S.CONNECTED):
            # Let the frontend finish and close first, as with blkback: it sees Closing and closes.
            if s.bstate != S.CLOSING:
                await self._write_state(S.CLOSING)
            return False
        self._end_lock_wait()  # detached while waiting for the image: nothing to wait for any more
        await self._stop_dataplane()
        await self._release_image()  # before Closed: whoever waits for Closed may hand the image to someone else
        if s.bstate != S.CLOSED:
            await self._write_state(S.CLOSED)
        if self.hotplug:
            await self.ctx.xs.rm(f"{self.bpath}/physical-device-path")  # its socket is gone
            # libxl runs the hotplug script's remove (which reads B/script) after Closed, then removes B
            # itself; this task ends when B is gone.
            if self.phase is not Phase.CLOSED:
                self.log.info("device.detached")
            self._enter_closed(resume_on=set(), fs=s.fstate)
            return False
        await self.ctx.xs.rm(self.bpath)
        self.log.info("device.detached")
        return True

    def _watch_failures(self, running: Any) -> None:
        """A queue that fails (a guest protocol error) makes the device's eventfd readable: look then,
        instead of asking every queue of every disk on a timer (an idle daemon with 256 disks)."""
        fd = running.fail_fd()
        self._fail_fd = fd
        asyncio.get_running_loop().add_reader(fd, self._on_queue_failed, fd)

    def _on_queue_failed(self, fd: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(fd, 8)  # rearm; _check_queues says which queue and why
        self._changed.set()

    async def _stop_dataplane(self, keep_journals: bool = False) -> None:
        if self._fail_fd is not None:
            asyncio.get_running_loop().remove_reader(self._fail_fd)  # before close() closes it
            self._fail_fd = None
        with self._stats_lock:
            running, self._running = self._running, None
        self._qos_leave()
        if running is None:
            return
        nq = len(self.frontend.queues) if self.frontend else 0
        loop = asyncio.get_running_loop()

        def stop() -> list[Any]:
            retired: list[Any] = []
            try:
                running.stop()
                retired = [running.stats(q) for q in range(nq)]  # the final counts, drained requests included
            except Exception:
                self.log.exception("device.stop_failed")
            try:
                running.close(keep_journals=keep_journals)
            except Exception:
                self.log.exception("device.free_failed")
            return retired

        retired = await loop.run_in_executor(None, stop)
        with self._stats_lock:
            self._retired = retired
        if any(int(getattr(o, "requests", 0)) for q in retired for o in getattr(q, "op", ())):
            self._served = True
            self.fruitless = 0
        self._cycle_info("device.stopped")

    def _take_image(self) -> tuple[Any, Any]:
        """The image and its NBD export, no longer the device's, and RBD's header watch stopped (on the
        loop's thread); the caller closes them, the export first."""
        exp, self.nbd = self.nbd, None
        img, self.image = self.image, None
        if self._header_fd >= 0:
            with contextlib.suppress(RuntimeError):  # no loop: nothing is watching it
                asyncio.get_running_loop().remove_reader(self._header_fd)
            self._header_fd = -1
        return img, exp

    def _close_image(self) -> None:
        img, exp = self._take_image()
        if exp is not None:
            exp.close()  # first: it returns once no NBD request is in the image any more
        if img is not None:
            img.close()

    async def _release_image(self) -> None:
        """Flush and close the image, which releases its ownership lock (the OFD lock dies with the
        descriptor, closed last by the driver after its own final metadata writes). Called only once the
        data plane has stopped (every request taken from the rings answered), so another device or daemon
        waiting for the lock finds everything this one acknowledged in the file and none of its writes
        still to come. The NBD export goes first: its close returns once no NBD request is in the image."""
        img, exp = self._take_image()
        if img is None and exp is None:
            return
        path = self.spec.path if self.spec else None

        def release() -> str | None:
            if exp is not None:
                exp.close()
            if img is None:
                return None
            why = None
            if img.can_flush and not img.readonly:
                try:
                    img.flush()
                except XenblkError as e:  # nothing better to do than say so: the guest was already answered
                    why = str(e)
            img.close()
            return why

        why = await asyncio.get_running_loop().run_in_executor(None, release)
        if why:
            self.log.error("device.release_flush_failed", path=path, error=why)
        if img is not None:
            self._cycle_info("device.image_released", path=path)

    async def _open_or_wait(self) -> bool:
        """_open_image, except that an image held by another open (ImageBusy) is no refusal: the device
        waits for it, trying again on the lock_retry_delay() schedule. True once open, False while waiting;
        raises ImageSpecError on a refusal."""
        loop = asyncio.get_running_loop()
        try:
            await self._open_image()
        except ImageBusy as e:
            self._lock_tries += 1
            if self.lock_wait is None:
                self._lock_wait_since = loop.time()
                self.log.warning("device.image_busy", error=str(e), retry_max_seconds=LOCK_RETRY_MAX)
            elif self._lock_tries & (self._lock_tries - 1) == 0:  # 2nd, 4th, 8th... attempt: still waiting
                self.log.info("device.image_busy", error=str(e), tries=self._lock_tries,
                              seconds=round(loop.time() - self._lock_wait_since, 3))  # fmt: skip
            self.lock_wait = str(e)
            if self._lock_timer is not None:
                self._lock_timer.cancel()  # one pending retry, however many watch events came meanwhile
            self._lock_timer = loop.call_later(lock_retry_delay(self._lock_tries), self._changed.set)
            self._progress.set()  # a hotplug take returns: waiting is not a failure
            return False
        if self.lock_wait is not None:
            self.log.info("device.image_lock_acquired", tries=self._lock_tries + 1,
                          seconds=round(loop.time() - self._lock_wait_since, 3))  # fmt: skip
            self._end_lock_wait()
        return True

    def _end_lock_wait(self) -> None:
        self.lock_wait = None
        self._lock_tries = 0
        if self._lock_timer is not None:
            self._lock_timer.cancel()
            self._lock_timer = None

    # -- the hotplug script's requests (control ops take/release)

    async def take(self, timeout: float) -> dict[str, Any]:
        """Open the image now (hotplug add) and wait until it is open or refused; XenblkError(reason) if refused."""
        self.taken = True
        self.wake()
        async with asyncio.timeout(timeout):
            while True:
                self._progress.clear()
                if self.image is not None:
                    return {"image": self.spec.path if self.spec else None, "format": self.image_format,
                            "sectors": self.sectors}  # fmt: skip
                if self.lock_wait is not None:
                    # Held by another open (the source of a handover is released only after this device is
                    # added): accepted; the device connects once it gets the image.
                    return {"image": self.spec.path if self.spec else None, "waiting": self.lock_wait}
                if self.phase is Phase.CLOSED and self.error:
                    raise XenblkError(self.error)
                if self.finished:
                    raise XenblkError(f"{self.bpath} is no longer served (removed or shut down)")
                await self._progress.wait()

    async def release(self, timeout: float) -> None:
        """Wait until this device holds no image (hotplug remove, after the toolstack's Closing/Closed)."""
        async with asyncio.timeout(timeout):
            while self.image is not None and not self.finished:
                self._progress.clear()
                await self._progress.wait()

    # -- resize, metrics, listing

    async def resize(self) -> dict[str, Any]:
        async with self._lock:
            img = self.image
            if img is None:
                raise XenblkError(f"dom{self.domid}/{self.vdev}: no image open (state {state_name(self.state)})")
            loop = asyncio.get_running_loop()
            new_bytes = int(await loop.run_in_executor(None, img.refresh_size))
            old = self.sectors
            new = new_bytes // 512
            if new == old:
                return {"old_sectors": old, "sectors": new, "changed": False}
            self.sectors = new
            self.resizes += 1
            running = self._running
            if running is not None:
                running.set_size(new_bytes)
            if self.phase is Phase.CONNECTED:
                # blkfront re-reads sectors when the backend state is written, so both go in one transaction.
                with contextlib.suppress(_Vanished):
                    await self._transact_state({"sectors": str(new)}, S.CONNECTED)
            self.log.info("device.resized", old_sectors=old, sectors=new)
            return {"old_sectors": old, "sectors": new, "changed": True}

    def disk_view(self) -> DiskView:
        with self._stats_lock:
            running = self._running
            nq = len(self.frontend.queues) if self.frontend and running else 0
            queues = [running.stats(q) for q in range(nq)] if running is not None else list(self._retired)
        return DiskView(
            domid=self.domid,
            vdev=self.vdev,
            state=self.state,
            queues=queues,
            reconnects=max(self.connections - 1, 0),
            resizes=self.resizes,
            sectors=self.sectors,
            lock_wait=self.lock_wait is not None,
            qos_limits=self.qos.limiter.limits.as_dict() if self.qos.limiter is not None else {},
            qos_group=self.qos.group,
        )

    def describe(self) -> dict[str, Any]:
        fe = self.frontend
        view = self.disk_view()
        return {
            "domid": self.domid,
            "vdev": self.vdev,
            "devid": self.devid,
            "type": self.btype,
            "image": self.spec.path if self.spec else None,
            "format": self.image_format or None,
            "state": self.state,
            "phase": self.phase.value,
            "error": self.error,
            "sectors": self.sectors,
            "queues": len(fe.queues) if fe and self.phase is Phase.CONNECTED else 0,
            "ring_pages": fe.ring_pages if fe and self.phase is Phase.CONNECTED else 0,
            "protocol": fe.protocol if fe else None,
            "persistent": fe.persistent if fe else None,
            "in_flight": sum(int(getattr(q, "in_flight", 0)) for q in view.queues) if self._running else 0,
            "connections": self.connections,
            "resizes": self.resizes,
            "reconnect_backoffs": self.backoffs,
            "nbd": {"socket": self.nbd.path, **dataclasses.asdict(self.nbd.stats())} if self.nbd is not None else None,
            "lock_wait": self.lock_wait,
            "qos": {
                "limits": self.qos.limiter.limits.as_dict() if self.qos.limiter is not None else {},
                "group": self.qos.group,
            },
        }


class _Vanished(Exception):
    """B disappeared under us (the toolstack removed the device)."""
