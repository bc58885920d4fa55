"""The simulated guest (`xenblk sim guest`): a blkfront that connects the disks attached to its domain
and runs a workload through the real rings.

Per disk it plays the handshake (`guest_frontend`), then gives each negotiated queue its share of
the disk (a contiguous range of blocks, so verification never races between queues) and its own C
thread (`guest_native`). While the workload runs it watches each backend: one that leaves Connected
fails that disk at once. SIGTERM/SIGINT stop the workload gracefully (in-flight I/O is answered),
and every disk is closed as a driver unbind would.

Like Linux blkfront, a connected disk reacts to its backend's state: Connected written again means
the disk may have been resized (`sectors` is read again, as blkfront_connect revalidates the size);
Closing without an `error` node is the toolstack detaching it (`xenblk detach`): stop issuing,
wait for the in-flight responses, then Closing and Closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xenblk.errors import XenblkError
from xenblk.sim.broker import DEFAULT_GNTTAB_ENTRIES, DEFAULT_MEM_PAGES, BrokerClient, read_host_json
from xenblk.sim.guest_frontend import Frontend, FrontendOptions
from xenblk.sim.guest_native import (
    GuestDomain,
    GuestError,
    GuestQueue,
    close_fds,
    error_message,
    new_config,
    pool_pages,
)
from xenblk.sim.guest_workload import Workload, disk_record, fill_workload, hostile_record, split
from xenblk.xen.paths import frontends_path
from xenblk.xen.states import XenbusState as S
from xenblk.xen.vdev import VdevError, devid_to_vdev, vdev_to_devid
from xenblk.xenstore import NoEntry, XenStore

WRITING_MODES = ("write", "randwrite", "rw", "randrw", "trim")


@dataclass
class GuestOptions:
    sim_dir: Path
    domid: int
    vdevs: list[str] | None
    workload: Workload
    frontend: FrontendOptions = field(default_factory=FrontendOptions)
    expect_resize: bool = False  # start the workload only once every disk has been resized


@dataclass
class Disk:
    frontend: Frontend
    hostile: str | None = None
    error: str | None = None
    backend_left: str | None = None  # the state a backend went to during a hostile run
    stats: list[Any] = field(default_factory=list)
    resizes: int = 0  # times the backend published a new size while connected
    resized: asyncio.Event = field(default_factory=asyncio.Event)
    detached: bool = False  # the backend went Closing (toolstack detach); the disk is closed
    closed: bool = False

    @property
    def queues(self) -> list[GuestQueue]:
        return self.frontend.queues

    def fail(self, message: str) -> None:
        if self.error is None:
            self.error = message

    def record(self) -> dict[str, Any]:
        fe = self.frontend
        rec: dict[str, Any] = {"vdev": fe.vdev, "devid": fe.devid}
        if fe.disk is not None:
            rec["sectors"] = fe.disk.sectors
        rec["resizes"] = self.resizes
        if self.detached:
            rec["detached"] = True
        if fe.negotiated is not None:
            rec["negotiated"] = fe.negotiated.as_json()
        rec.update(disk_record(self.stats))
        if self.hostile is not None:
            rec["hostile"] = hostile_record(self.hostile, self.stats)
            if self.backend_left is not None:
                rec["hostile"]["backend_state"] = self.backend_left
        if self.error is not None:
            rec["error"] = self.error
        return rec


async def _disks_of(xs: XenStore, domid: int, vdevs: list[str] | None) -> list[tuple[str, int]]:
    if vdevs:
        return [(v, vdev_to_devid(v)) for v in vdevs]
    found = []
    try:
        names = await xs.directory(frontends_path(domid))
    except NoEntry:
        names = []
    for name in names:
        if not name.isdigit():
            continue
        devid = int(name)
        try:
            found.append((devid_to_vdev(devid), devid))
        except VdevError:
            found.append((name, devid))
    if not found:
        raise XenblkError(f"no disks attached to domain {domid} (nothing under {frontends_path(domid)})")
    return sorted(found, key=lambda d: d[1])


def _plan_queues(disk: Disk, domain: GuestDomain, w: Workload) -> None:
    """Build the C queues of a connected disk: the workload split over its queues."""
    fe = disk.frontend
    assert fe.disk is not None and fe.negotiated is not None
    n = fe.negotiated
    if fe.disk.readonly and w.rw in WRITING_MODES:
        raise GuestError(f"{fe.vdev} is read-only; --rw {w.rw} would write to it")
    if w.rw is not None and w.bs % fe.disk.sector_size:
        raise GuestError(f"--bs {w.bs} is not a multiple of {fe.vdev}'s sector size {fe.disk.sector_size}")
    nblocks = fe.disk.bytes // w.bs
    if w.rw is not None and nblocks < n.queues:
        raise GuestError(f"{fe.vdev} ({fe.disk.bytes} bytes) has fewer blocks of {w.bs} bytes than queues")
    regions = split(nblocks, n.queues)
    ios = split(w.total_ios(fe.disk.bytes), n.queues)
    start = 0
    for q, gq in enumerate(fe.queues):
        cfg = new_config(gq.setup)
        fill_workload(cfg, w, region_start=start, region_blocks=regions[q], total_ios=ios[q])
        start += regions[q]
        if w.rw is not None and ios[q] == 0 and w.total_ios(fe.disk.bytes) > 0:
            cfg.rw = -1  # fewer I/Os than queues: this one has none (0 would mean "until the runtime")
        cfg.use_indirect = 1 if n.indirect_segments else 0
        cfg.max_segs = n.indirect_segments or 11
        cfg.persistent = 1 if n.persistent else 0
        cfg.can_flush = 1 if n.flush else 0
        cfg.can_discard = 1 if n.discard else 0
        cfg.sector_size = fe.disk.sector_size
        if w.rw is not None and w.discard_every and not n.discard:
            raise GuestError(f"--discard-every: the backend of {fe.vdev} does not offer discard")
        need = pool_pages(cfg)
        if need:
            cfg.pool_frame, cfg.pool_ref = domain.alloc(need, f"{fe.vdev} queue {q} buffers")
            cfg.pool_pages = need
        gq.configure(cfg)


async def _revalidate(disk: Disk) -> None:
    """The backend wrote Connected again: read `sectors` again, as blkfront_connect does."""
    fe = disk.frontend
    if fe.disk is None:
        return
    try:
        sectors = int(await fe.xs.try_read(f"{fe.backend}/sectors") or "")
    except ValueError:
        return  # a resize half seen or a bad value: the size in use stays
    if sectors > 0 and sectors != fe.disk.sectors:
        fe.disk.sectors = sectors
        disk.resizes += 1
        disk.resized.set()


async def _close_detached(disk: Disk, idle: bool) -> None:
    """The backend asked to close (toolstack detach): stop issuing, let in-flight I/O be answered,
    then Closing and Closed, so `xenblk detach` can remove the device while other disks run on."""
    disk.detached = True
    for q in disk.queues:
        q.stop()
    for q in disk.queues:
        await asyncio.to_thread(q.join)
    disk.stats = [q.stats() for q in disk.queues]
    if not idle:
        online = await disk.frontend.xs.try_read(f"{disk.frontend.backend}/online")
        why = "online=0: the toolstack detached it" if online == "0" else "the backend closed it"
        disk.fail(f"detached by the backend (state 5 Closing, {why}) before the workload finished")
    await disk.frontend.close()
    disk.closed = True


async def _watch_backend(disk: Disk, idle: bool) -> None:
    """Follow the backend while connected: a resize, a detach, or a failure of the disk."""
    fe = disk.frontend
    path = f"{fe.backend}/state"
    async with fe.xs.watch(path) as w:
        async for _ in w:
            state = await fe.xs.try_read(path)
            if state == str(int(S.CONNECTED)):
                await _revalidate(disk)
                continue
            err = await fe.xs.try_read(f"{fe.backend}/error")
            if disk.hostile is not None:  # provoking that is the point of a hostile run
                disk.backend_left = state
            elif state == str(int(S.CLOSING)) and not err:
                await _close_detached(disk, idle)
                return
            else:
                disk.fail(f"backend left Connected during the workload (state {state})" + (f": {err}" if err else ""))
            for q in disk.queues:
                q.stop(abort=True)
            return


def _join_all(disks: list[Disk]) -> None:
    for d in disks:
        for q in d.queues:
            q.join()


async def run_guest(opts: GuestOptions) -> tuple[dict[str, Any], list[str]]:
    """Run the guest; the --json document and one line per failure (empty: success)."""
    opts.workload.check()
    host = read_host_json(opts.sim_dir)
    with _domain_lock(opts.sim_dir, opts.domid):
        return await _run_guest(opts, host)


@contextlib.contextmanager
def _domain_lock(sim_dir: Path, domid: int) -> Iterator[None]:
    """One guest run per domain at a time: a run owns the domain's memory and grant table."""
    path = sim_dir / f"guest-{domid}.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise XenblkError(
                f"another simulated guest of domain {domid} is running (pid {f.read().strip()})"
            ) from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield


async def _run_guest(opts: GuestOptions, host: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    broker = BrokerClient(host["broker"])
    xs: XenStore | None = None
    domain: GuestDomain | None = None
    disks: list[Disk] = []
    try:
        reply, fds = await asyncio.to_thread(
            broker.call,
            {"op": "create_domain", "domid": opts.domid, "mem_pages": DEFAULT_MEM_PAGES,
             "gnttab_entries": DEFAULT_GNTTAB_ENTRIES},
        )  # fmt: skip
        try:
            domain = GuestDomain(fds[0], int(reply["mem_pages"]), fds[1], int(reply["gnttab_entries"]))
        finally:
            close_fds(*fds)
        xs = await XenStore.open(host["xenstored_path"], timeout=max(10.0, opts.frontend.timeout))
        for vdev, devid in await _disks_of(xs, opts.domid, opts.vdevs):
            fe = Frontend(xs, broker, domain, opts.domid, devid, vdev, opts.frontend)
            disks.append(Disk(fe, hostile=opts.workload.hostile))
        await _run(disks, domain, opts.workload, opts.expect_resize, opts.frontend.timeout)
    finally:
        for d in disks:
            if not d.closed:  # a detached disk's dirs may be gone: writing its state would recreate them
                await d.frontend.close()
        if domain is not None:
            domain.close()
        if xs is not None:
            await xs.close()
        broker.close()
    failures = [f"{d.frontend.vdev}: {d.error}" for d in disks if d.error]
    doc = {"domid": opts.domid, "ok": not failures, "disks": [d.record() for d in disks]}
    return doc, failures


async def _connect(disk: Disk) -> None:
    try:
        await disk.frontend.connect()
    except XenblkError as e:
        disk.fail(str(e))


def _plan(disk: Disk, domain: GuestDomain, w: Workload) -> None:
    try:
        _plan_queues(disk, domain, w)
    except XenblkError as e:
        disk.fail(str(e))


async def _wait_resized(disks: list[Disk], timeout: float) -> None:
    waits = [asyncio.create_task(d.resized.wait()) for d in disks]
    _done, pending = await asyncio.wait(waits, timeout=timeout)
    for t in pending:
        t.cancel()
    for d in disks:
        if not d.resized.is_set() and not d.detached:
            d.fail(f"--expect-resize: the backend published no new size within {timeout:g}s")


async def _run(disks: list[Disk], domain: GuestDomain, w: Workload, expect_resize: bool, timeout: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    live: list[Disk] = []

    def on_signal() -> None:
        stop.set()
        for d in live:
            for q in d.queues:
                q.stop()

    def handler(signum: int, frame: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: the run is over, its report being written
            loop.call_soon_threadsafe(on_signal)

    # From the start: a signal during the handshake still ends with every disk closed. signal.signal, not
    # loop.add_signal_handler: removing that restores SIG_DFL, and a stop asked for just as the run ended on
    # its own (a test stopping a guest whose disk failed) would then kill the process before its report.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    watched: list[Disk] = []
    watchers: list[asyncio.Task[None]] = []
    try:
        await asyncio.gather(*(_connect(d) for d in disks))
        live[:] = [d for d in disks if d.error is None]
        watched = list(live)
        watchers = [asyncio.create_task(_watch_backend(d, w.rw is None)) for d in watched]
        if expect_resize and live:
            await _wait_resized(live, timeout)
        for d in live:
            if d.error is None and not d.detached:
                _plan(d, domain, w)
        live[:] = [d for d in live if d.error is None and not d.closed]
        if w.rw is None:
            # Idle until the runtime, a signal, or every disk has been detached.
            stopped = asyncio.create_task(stop.wait())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(w.runtime):
                    while not stopped.done() and (not watchers or any(not t.done() for t in watchers)):
                        await asyncio.wait([stopped, *watchers], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
        elif not stop.is_set():
            for d in live:
                if not d.detached:
                    for q in d.queues:
                        q.start()
            await asyncio.to_thread(_join_all, live)
    finally:
        for d, t in zip(watched, watchers, strict=True):
            if not d.detached:  # a detach in progress finishes closing the disk
                t.cancel()
        for t in watchers:
            with contextlib.suppress(asyncio.CancelledError, XenblkError):
                await t
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: None)  # over: a late stop is a no-op, never a kill
    for d in live:
        if d.closed:
            continue  # its statistics were taken before it closed
        d.stats = [q.stats() for q in d.queues]
        for s in d.stats:
            if s.failed:
                d.fail(error_message(s))
                break


def main(opts: GuestOptions, as_json: bool) -> int:
    doc, failures = asyncio.run(run_guest(opts))
    if as_json:
        print(json.dumps(doc, indent=2))
    else:
        _print_table(doc)
    for line in failures:
        print(f"xenblk sim guest: {line}", file=sys.stderr)
    return 0 if not failures else 1


def _print_table(doc: dict[str, Any]) -> None:
    print(f"domain {doc['domid']}: {'ok' if doc['ok'] else 'FAILED'}")
    for d in doc["disks"]:
        n = d.get("negotiated") or {}
        lat = d["latency_us"]
        print(
            f"  {d['vdev']:<6} {d.get('sectors', 0) * 512 / 2**20:8.1f} MiB  {n.get('protocol', '-')} "
            f"ring {n.get('ring_pages', '-')}p x{n.get('queues', '-')}  {d['ios']} I/Os in {d['seconds']} s: "
            f"{d['iops']:.0f} IOPS {d['mbps']:.1f} MB/s  lat us mean {lat['mean']} p50 {lat['p50']} p99 {lat['p99']} "
            f"p99.9 {lat['p99.9']}  flushes {d['flushes']} discards {d['discards']}  errors {d['errors']} "
            f"verify errors {d['verify_errors']}" + (f"  ERROR: {d['error']}" if "error" in d else "")
        )
