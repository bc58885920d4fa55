"""The daemon's main loop: XenStore watches on each backend type, one DeviceTask per
device, the metrics endpoint, the control socket, kernel uevents, signals and systemd.

SIGTERM/SIGINT: every device is drained; then with daemon.on_stop = "keep" (the default) it is left
as it stands in XenStore, its rings' journals kept, so the next daemon carries on and the guest only
waits (a restart without guest impact); with "close" it is closed (B/state = 6; the backend dirs stay,
so the next start serves them again, and Linux blkfront drops the disk). Exit status 0.
SIGHUP: reload the config file. What reloads: log.level and log.format; storage.* (allowed_dirs,
allowed_devices, backing_dirs, cache...: checked when a device next opens its image); dataplane.* (advertised at
a device's next InitWait); nbd.* and rbd.* (when a device next opens its image); metrics.enabled/listen (the
endpoint is restarted if they change); qos.* and qos_group.* (limits applied at once; qos.group at a disk's next
connection).
What needs a restart: daemon.* and xenstore.* (an invalid new config is logged and ignored).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from xenblk import config as xconfig
from xenblk import log as xlog
from xenblk.backend import sdnotify
from xenblk.backend.control import ControlServer, socket_path
from xenblk.backend.dataplane_port import DataplanePort
from xenblk.backend.device import DaemonContext, DeviceTask
from xenblk.backend.qos import QosGroups
from xenblk.backend.uevents import UeventListener
from xenblk.config import Config
from xenblk.errors import XenblkError
from xenblk.metrics import DaemonCounters, DiskView, MetricsServer
from xenblk.qos import groups_path
from xenblk.xen.paths import backend_type_path, domain_path
from xenblk.xen.states import parse_state
from xenblk.xenstore import Transaction, XenStore, XenStoreError

log = structlog.get_logger("xenblk.daemon")

Key = tuple[str, int, int]  # (backend type, domid, devid)


class Daemon:
    def __init__(
        self,
        cfg: Config,
        *,
        xenstore_path: str | None,
        dataplane_factory: Callable[[], DataplanePort],
        config_path: Path | None = None,
        metrics_listen: str | None = None,
        uevents: bool = True,
        log_overrides: tuple[str | None, str | None] = (None, None),
        sys_dir: Path = Path("/sys"),
    ) -> None:
        self.cfg = cfg
        self.xenstore_path = xenstore_path
        self.dataplane_factory = dataplane_factory
        self.config_path = config_path
        self.metrics_listen_override = metrics_listen
        self.use_uevents = uevents
        self.log_overrides = log_overrides  # --log-format/--log-level win over the file, also on reload
        self.sys_dir = sys_dir  # the simulated host has its own (<sim dir>/sys)
        self.counters = DaemonCounters()
        self.devices: dict[Key, DeviceTask] = {}
        self._left_to_blkback: set[Key] = set()
        self.ctx: DaemonContext | None = None
        self.metrics: MetricsServer | None = None
        self.control: ControlServer | None = None
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []

    # -- lifecycle

    def stop(self) -> None:
        self._stop.set()

    def _blkback_loaded(self) -> Path | None:
        module = self.sys_dir / "module" / "xen_blkback"
        return module if module.exists() else None

    def check_kernel_backend(self) -> None:
        """Backend type vbd is also xen-blkback's: two backends on one dir would both map the rings."""
        module = self._blkback_loaded()
        if "vbd" in self.cfg.daemon.backend_types and module is not None:
            raise XenblkError(
                f"daemon.backend_types has vbd but the kernel's xen-blkback is loaded ({module}): both would serve "
                "the same devices; unload it (modprobe -r xen-blkback, and blacklist it) or serve vbd3 only"
            )

    async def run(self) -> int:
        self.check_kernel_backend()
        loop = asyncio.get_running_loop()
        xs = await XenStore.open(self.xenstore_path, timeout=self.cfg.xenstore.timeout)
        dataplane = None
        uev: UeventListener | None = None
        handlers = False
        try:
            dataplane = await loop.run_in_executor(None, self.dataplane_factory)
            groups = QosGroups(xs, self.cfg, self.cfg.daemon.domid, log)
            self.ctx = DaemonContext(xs, self.cfg, dataplane, self.counters, self.cfg.daemon.domid, groups)
            self.control = ControlServer(socket_path(self.cfg.daemon.run_dir), self._control)
            await self.control.start()  # first: it refuses to start next to a running daemon
            self._start_metrics()
            self._check_rbd()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
            loop.add_signal_handler(signal.SIGHUP, self.reload)
            handlers = True
            async with contextlib.AsyncExitStack() as stack:
                for btype in self.cfg.daemon.backend_types:
                    w = await stack.enter_async_context(xs.watch(self._base(btype)))
                    self._tasks.append(asyncio.create_task(self._watch_loop(btype, w), name=f"watch {btype}"))
                gw = await stack.enter_async_context(xs.watch(groups_path(self.cfg.daemon.domid)))
                self._tasks.append(asyncio.create_task(self._watch_groups(gw), name="watch qos groups"))
                for btype in self.cfg.daemon.backend_types:
                    await self._rescan(btype)
                self._remove_orphan_journals(dataplane)
                if self.use_uevents:
                    uev = UeventListener(loop, self._on_block_resize)
                    uev.start()
                    await loop.run_in_executor(None, uev.wait_bound, 10.0)
                self.ready.set()
                sdnotify.notify("READY=1\nSTATUS=serving")
                log.info("daemon.ready", backend_types=self.cfg.daemon.backend_types, devices=len(self.devices))
                interval = sdnotify.watchdog_interval()
                if interval:
                    self._tasks.append(asyncio.create_task(self._watchdog(interval), name="watchdog"))
                await self._stop.wait()
                sdnotify.notify("STOPPING=1")
                log.info("daemon.stopping", devices=len(self.devices))
                await self._shutdown_devices()
        finally:
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if uev is not None:
                uev.stop()
            if self.control is not None:
                await self.control.close()
            if self.metrics is not None:
                self.metrics.stop()
            if handlers:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            await xs.close()
            if dataplane is not None:
                dataplane.close()
        log.info("daemon.stopped")
        return 0

    def _remove_orphan_journals(self, dataplane: object) -> None:
        """Journals a handover or a kill left for devices whose backend dirs went while no daemon ran
        (the guest destroyed meanwhile): nothing can resume them, and a name may come back for new rings."""
        jdir = getattr(dataplane, "journal_dir", None)
        if jdir is None:
            return
        live = {f"{b}-{d}-{i}" for b, d, i in self.devices}
        for p in Path(jdir).glob("*-q*.journal"):
            if p.name.rsplit("-q", 1)[0] not in live:
                with contextlib.suppress(OSError):
                    p.unlink()
                    log.info("daemon.orphan_journal_removed", journal=str(p))

    async def _shutdown_devices(self) -> None:
        hand_over = self.cfg.daemon.on_stop == "keep"
        for dev in self.devices.values():
            dev.request_shutdown(hand_over=hand_over)
        tasks = [d.task for d in self.devices.values() if d.task is not None]
        if tasks:
            await asyncio.wait(tasks)

    async def _watchdog(self, interval: float) -> None:
        while True:
            # Only a live event loop with a live XenStore connection counts as healthy.
            if self.ctx is not None and self.ctx.xs.connected:
                sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def reload(self) -> None:
        try:
            new = xconfig.load(self.config_path)
        except XenblkError as e:
            log.error("daemon.reload_failed", error=str(e))
            return
        fmt, level = self.log_overrides
        xlog.configure(fmt or new.log.format, level or new.log.level)
        for section in ("log", "storage", "dataplane", "metrics", "nbd", "rbd", "qos", "qos_group"):
            setattr(self.cfg, section, getattr(new, section))
        self._restart_metrics_if_changed()
        t = asyncio.ensure_future(self._reapply_qos())
        self._tasks.append(t)
        t.add_done_callback(self._forget_task)
        log.info("daemon.reloaded", config=str(self.config_path or xconfig.DEFAULT_PATH))

    def _check_rbd(self) -> None:
        """RBD pools configured on a host that cannot open them (the xenblk-rbd package or librbd missing):
        said once at start, not only when a disk fails to open."""
        if not self.cfg.rbd.names():
            return
        from xenblk import rbd

        why = rbd.unavailable()
        if why is not None:
            log.warning("daemon.rbd_unavailable", pools=self.cfg.rbd.names(), error=why)

    # -- metrics

    def _metrics_address(self) -> tuple[str, int] | None:
        if not self.cfg.metrics.enabled:
            return None
        return xconfig.parse_listen(self.metrics_listen_override or self.cfg.metrics.listen)

    def _start_metrics(self) -> None:
        addr = self._metrics_address()
        if addr is None:
            return
        self.metrics = MetricsServer(self._disk_views, self.counters, self._group_views)
        bound = self.metrics.start(*addr)
        log.info("daemon.metrics", url=f"http://{bound[0]}:{bound[1]}/metrics")
        if not _is_loopback(addr[0]):
            log.warning("daemon.metrics_exposed", listen=addr[0], hint="metrics.listen is not a loopback address")

    def _restart_metrics_if_changed(self) -> None:
        want = self._metrics_address()
        have = self.metrics.address if self.metrics is not None else None
        if want == have or (want is not None and have is not None and want[0] == have[0] and want[1] == 0):
            return
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        try:
            self._start_metrics()
        except OSError as e:
            log.error("daemon.metrics_failed", error=str(e))

    async def _reapply_qos(self) -> None:
        """New [qos]/[qos_group] defaults: every disk and group computes its limits again."""
        assert self.ctx is not None
        for dev in list(self.devices.values()):
            try:
                await dev.qos.apply(self.ctx.xs, self.cfg, dev.qos_kick)
            except XenblkError as e:
                dev.log.warning("device.qos_failed", error=str(e))
        if self.ctx.qos_groups is not None:
            await self.ctx.qos_groups.refresh()

    async def _watch_groups(self, watch: Any) -> None:
        """A toolstack (or `xenblk qos --group`) changed some group's limits: read the groups in use again."""
        assert self.ctx is not None and self.ctx.qos_groups is not None
        while True:
            try:
                async for _event in watch:
                    await self.ctx.qos_groups.refresh()
                return
            except XenblkError as e:  # XenStore trouble, or limits the data plane refused
                log.warning("daemon.qos_groups_failed", error=str(e))
                await asyncio.sleep(1)

    def _group_views(self) -> list[Any]:
        return self.ctx.qos_groups.views() if self.ctx is not None and self.ctx.qos_groups is not None else []

    def _disk_views(self) -> list[DiskView]:
        if self.ctx is not None:
            self.counters.watch_events = self.ctx.xs.watch_events
            self.counters.xenstore_reconnects = self.ctx.xs.reconnects
        return [d.disk_view() for d in list(self.devices.values())]

    # -- devices

    def _base(self, btype: str) -> str:
        return backend_type_path(self.cfg.daemon.domid, btype)

    async def _watch_loop(self, btype: str, watch: Any) -> None:
        base = self._base(btype)
        while True:
            try:
                async for event in watch:
                    rest = event.path[len(base) :].strip("/").split("/") if event.path.startswith(base) else []
                    if len(rest) >= 2 and rest[0].isdigit() and rest[1].isdigit():
                        await self._consider(btype, int(rest[0]), int(rest[1]))
                    elif len(rest) == 1 and rest[0].isdigit():
                        await self._rescan_domain(btype, int(rest[0]))
                    else:
                        await self._rescan(btype)  # the registration's event or a reconnect: look at everything
                return
            except XenStoreError as e:
                log.warning("daemon.watch_failed", backend_type=btype, error=str(e))
                await asyncio.sleep(1)
            except Exception:
                log.exception("daemon.watch_loop_error", backend_type=btype)
                await asyncio.sleep(1)

    async def _rescan(self, btype: str) -> None:
        assert self.ctx is not None
        try:
            domids = await self.ctx.xs.directory(self._base(btype))
        except XenStoreError:
            return  # NoEntry: nothing attached yet
        for d in domids:
            if d.isdigit():
                await self._rescan_domain(btype, int(d))

    async def _rescan_domain(self, btype: str, domid: int) -> None:
        assert self.ctx is not None
        try:
            devids = await self.ctx.xs.directory(f"{self._base(btype)}/{domid}")
        except XenStoreError:
            return
        for v in devids:
            if v.isdigit():
                await self._consider(btype, domid, int(v))

    async def _consider(self, btype: str, domid: int, devid: int) -> None:
        assert self.ctx is not None
        key = (btype, domid, devid)
        existing = self.devices.get(key)
        if existing is not None and existing.task is not None and not existing.task.done():
            return
        if self._stop.is_set() or domid > 0x7FEF or devid >= 1 << 32:
            return
        if btype == "vbd" and existing is None and (module := self._blkback_loaded()) is not None:
            # Loaded after the start (udev loads it by the xen-backend:vbd alias unless blacklisted): the
            # kernel serves vbd now; leave the device to it (`xenblk hotplug add` reports why).
            if key not in self._left_to_blkback:  # once per device: every watch event comes here
                self._left_to_blkback.add(key)
                log.error("daemon.blkback_loaded", backend=f"{self._base(btype)}/{domid}/{devid}", module=str(module))
            return
        state = parse_state(await self.ctx.xs.try_read(f"{self._base(btype)}/{domid}/{devid}/state"))
        if existing is not None and existing.crashed:
            # Closed with an error by a bug: serving it again could crash in a loop. A new attach
            # (the backend dir removed and written again) or a restart serves it.
            if state is None:
                del self.devices[key]
            return
        if state is None:
            return  # being written by the toolstack (state comes last) or being removed
        if self.devices.get(key) is not existing or self._stop.is_set():
            return  # another event spawned it while we read the state
        dev = DeviceTask(self.ctx, btype, domid, devid)
        self.devices[key] = dev
        dev.task = asyncio.create_task(self._run_device(key, dev), name=f"device {btype}/{domid}/{devid}")

    async def _run_device(self, key: Key, dev: DeviceTask) -> None:
        try:
            await dev.run()
        finally:
            if self.devices.get(key) is dev and not dev.crashed:
                del self.devices[key]
            # The device may have been re-created while this task was ending.
            if not self._stop.is_set():
                with contextlib.suppress(Exception):
                    await self._consider(*key)

    def _on_block_resize(self, major: int, minor: int) -> None:
        log.debug("daemon.uevent_resize", device=f"{major}:{minor}")
        for dev in list(self.devices.values()):
            spec = dev.spec
            if spec is None or dev.image is None or dev.image_format != "block":
                continue
            try:
                st = Path(spec.path).stat()
            except OSError:
                continue
            if stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (major, minor):
                log.info("daemon.block_resize", domid=dev.domid, vdev=dev.vdev, device=f"{major}:{minor}")
                t = asyncio.create_task(self._resize_quietly(dev))
                self._tasks.append(t)
                t.add_done_callback(self._forget_task)

    def _forget_task(self, t: asyncio.Task[Any]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(t)

    async def _resize_quietly(self, dev: DeviceTask) -> None:
        try:
            await dev.resize()
        except Exception as e:
            dev.log.warning("device.resize_failed", error=str(e))

    def find(self, domid: int, vdev: str) -> DeviceTask:
        for dev in self.devices.values():
            if dev.domid == domid and (dev.vdev == vdev or str(dev.devid) == vdev):
                return dev
        raise XenblkError(f"no device {vdev} of domain {domid} is served by this daemon")

    async def _control(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "ping":
            return {"ok": True}
        if op == "list":
            return {"ok": True, "devices": [d.describe() for d in self.devices.values()]}
        if op == "resize":
            domid, vdev = req.get("domid"), req.get("vdev")
            if not isinstance(domid, int) or not isinstance(vdev, str):
                raise XenblkError("resize needs an integer domid and a vdev")
            return {"ok": True, **(await self.find(domid, vdev).resize())}
        if op in ("take", "release"):
            return await self._hotplug(op, req)
        raise XenblkError(f"unknown control request {op!r}")

    def _backend_key(self, backend: object) -> Key:
        """The device of a backend dir named as libxl names it to hotplug scripts (XENBUS_PATH is
        `backend/<type>/<domid>/<devid>`, relative to this domain) or as an absolute path."""
        if not isinstance(backend, str) or len(backend) > 256:
            raise XenblkError("take/release needs backend: a backend dir path")
        home = f"{domain_path(self.cfg.daemon.domid)}/"
        rel = backend[len(home) :] if backend.startswith(home) else backend
        parts = rel.strip("/").split("/")
        if len(parts) != 4 or parts[0] != "backend" or not parts[2].isdigit() or not parts[3].isdigit():
            raise XenblkError(f"{backend!r} is not a backend dir of domain {self.cfg.daemon.domid} "
                              "(backend/<type>/<domid>/<devid>)")  # fmt: skip
        btype, domid, devid = parts[1], int(parts[2]), int(parts[3])
        if btype not in self.cfg.daemon.backend_types:
            raise XenblkError(
                f"backend type {btype} is not served by this xenblk (daemon.backend_types = "
                f"{', '.join(self.cfg.daemon.backend_types)}; add {btype} in the config file and restart)"
            )
        if domid > 0x7FEF or devid >= 1 << 32:
            raise XenblkError(f"{backend!r}: domid or devid out of range")
        return (btype, domid, devid)

    async def _hotplug(self, op: str, req: dict[str, Any]) -> dict[str, Any]:
        key = self._backend_key(req.get("backend"))
        timeout = req.get("timeout", 30.0)
        if not isinstance(timeout, int | float) or not 0 < timeout <= 600:
            raise XenblkError("timeout must be a number of seconds in (0, 600]")
        path = f"{self._base(key[0])}/{key[1]}/{key[2]}"
        if op != "take" or req.get("publish") is not True:
            return await self._take_or_release(op, key, path, timeout)
        # "publish": the hotplug script's outcome written here, so that the script itself needs no
        # XenStore client (block-xenblk runs xenblk/hotplug_client.py: a fast start, see there)
        try:
            reply = await self._take_or_release(op, key, path, timeout)
        except XenblkError as e:
            await self._publish_hotplug(path, str(e))
            raise
        await self._publish_hotplug(path, None)
        return reply

    async def _publish_hotplug(self, path: str, error: str | None) -> None:
        """B/hotplug-status = connected, or B/hotplug-error = the reason (libxl prints "script: <reason>")."""
        assert self.ctx is not None

        async def body(t: Transaction) -> None:
            if await t.try_read(f"{path}/state") is None:
                return  # removed meanwhile: never create B again
            if error is None:
                await t.rm(f"{path}/hotplug-error")
                await t.write(f"{path}/hotplug-status", "connected")
            else:
                await t.write(f"{path}/hotplug-error", error[:1000])
                await t.write(f"{path}/hotplug-status", "error")

        await self.ctx.xs.transact(body)

    async def _take_or_release(self, op: str, key: Key, path: str, timeout: float) -> dict[str, Any]:
        dev = self.devices.get(key)
        if op == "take" and key[0] == "vbd" and dev is None and (module := self._blkback_loaded()) is not None:
            raise XenblkError(
                f"the kernel's xen-blkback is loaded ({module}) and serves backend type vbd; xenblk leaves {path} "
                "to it (blacklist xen_blkback and reboot, or modprobe -r xen-blkback, to serve vbd with xenblk)"
            )
        if op == "release":
            if dev is not None:
                try:
                    await dev.release(float(timeout))
                except TimeoutError:
                    raise XenblkError(f"{path}: the image is still open after {timeout:g}s") from None
            return {"ok": True}
        if dev is None or dev.finished:
            await self._consider(*key)  # the watch event may not have been handled yet
            dev = self.devices.get(key)
        if dev is None:
            raise XenblkError(f"no backend at {path} (no state node)")
        if dev.crashed:
            raise XenblkError(dev.error or f"{path}: closed after an internal error")
        try:
            return {"ok": True, "backend": path, **(await dev.take(float(timeout)))}
        except TimeoutError:
            raise XenblkError(f"{path}: the image was neither opened nor refused within {timeout:g}s") from None


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
