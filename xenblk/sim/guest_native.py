"""The simulated guest's side of its domain (memory, grant table) and its queues, over `xenblk._simguest`.

`GuestDomain` maps the memory and grant table the broker gave the domain and hands out pages and
grant references from them (a bump allocator: one guest run owns the whole domain). `GuestQueue`
is one ring + event channel + page pool whose C thread runs the workload without the GIL.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Any

from xenblk import _simguest  # type: ignore[attr-defined]
from xenblk.errors import XenblkError

ffi: Any = _simguest.ffi
lib: Any = _simguest.lib

ABIS = {"x86_64-abi": 0, "x86_32-abi": 1}


class GuestError(XenblkError):
    pass


def _err_buf() -> Any:
    return ffi.new("char[]", lib.XB_SG_ERRLEN)


def _msg(buf: Any) -> str:
    return str(ffi.string(buf).decode(errors="replace"))


class GuestDomain:
    def __init__(self, mem_fd: int, mem_pages: int, gnttab_fd: int, gnttab_entries: int) -> None:
        err = _err_buf()
        ptr = lib.xb_sg_domain_open(mem_fd, mem_pages, gnttab_fd, gnttab_entries, err)
        if ptr == ffi.NULL:
            raise GuestError(f"cannot map the simulated domain: {_msg(err)}")
        self.ptr = ptr
        self.mem_pages = mem_pages
        self.gnttab_entries = gnttab_entries
        self._next_frame = 0
        self._next_ref = int(lib.XB_SG_FIRST_FREE_GREF)
        # A fresh boot: nothing a previous run of this guest granted stays granted.
        lib.xb_sg_revoke_all(ptr)

    def alloc(self, pages: int, what: str) -> tuple[int, int]:
        """`pages` contiguous frames and as many consecutive grant refs: (first frame, first ref)."""
        if self._next_frame + pages > self.mem_pages:
            raise GuestError(
                f"{what} needs {pages} more pages of guest memory; the domain has {self.mem_pages} pages and "
                f"{self.mem_pages - self._next_frame} are free (lower --iodepth, --bs or --queues)"
            )
        if self._next_ref + pages > self.gnttab_entries:
            raise GuestError(f"{what} needs {pages} more grant entries; the domain's grant table is full")
        frame, ref = self._next_frame, self._next_ref
        self._next_frame += pages
        self._next_ref += pages
        return frame, ref

    def close(self) -> None:
        if self.ptr is not None:
            lib.xb_sg_domain_close(self.ptr)
            self.ptr = None


@dataclass
class QueueSetup:
    """Everything a queue needs; the workload fields are filled in once the backend is connected."""

    abi: str
    ring_pages: int
    ring_frame: int
    ring_ref: int
    handle: int
    backend_domid: int
    evt_recv_fd: int
    evt_send_fd: int


def new_config(setup: QueueSetup) -> Any:
    c = ffi.new("struct xb_sg_queue_config *")
    c.abi = ABIS[setup.abi]
    c.ring_pages = setup.ring_pages
    c.ring_frame = setup.ring_frame
    c.ring_ref = setup.ring_ref
    c.handle = setup.handle & 0xFFFF
    c.backend_domid = setup.backend_domid
    c.evt_recv_fd = setup.evt_recv_fd
    c.evt_send_fd = setup.evt_send_fd
    c.rw = -1
    return c


def pool_pages(cfg: Any) -> int:
    err = _err_buf()
    n = int(lib.xb_sg_pool_pages(cfg, err))
    if n == 0 and cfg.rw >= 0:
        raise GuestError(_msg(err))
    return n


class GuestQueue:
    """One queue: its ring is initialised and granted at construction (before the frontend publishes
    it); `setup()` adds the page pool and workload once the backend is connected. Owns the event
    channel's fds from construction on, also when it raises."""

    def __init__(self, domain: GuestDomain, setup: QueueSetup) -> None:
        err = _err_buf()
        self.setup = setup
        ptr = lib.xb_sg_queue_new(domain.ptr, new_config(setup), err)
        if ptr == ffi.NULL:
            raise GuestError(_msg(err))
        self.ptr = ptr
        self.started = False
        # Joining is done from more than one thread (the run's join and a detach's drain); pthread_join
        # must be called once, and free() must not race a join.
        self._join_lock = threading.Lock()

    def configure(self, cfg: Any) -> None:
        err = _err_buf()
        if lib.xb_sg_queue_setup(self.ptr, cfg, err) != 0:
            raise GuestError(_msg(err))

    def start(self) -> None:
        err = _err_buf()
        if lib.xb_sg_queue_start(self.ptr, err) != 0:
            raise GuestError(_msg(err))
        self.started = True

    def join(self) -> None:
        """Blocks until the thread ends (the GIL is released while waiting). Safe from several threads."""
        with self._join_lock:
            if self.ptr is not None:
                lib.xb_sg_queue_join(self.ptr)

    def stop(self, abort: bool = False) -> None:
        if self.ptr is not None:
            lib.xb_sg_queue_stop(self.ptr, 1 if abort else 0)

    def stats(self) -> Any:
        out = ffi.new("struct xb_sg_stats *")
        lib.xb_sg_queue_stats(self.ptr, out)
        return out

    def free(self) -> None:
        with self._join_lock:
            if self.ptr is not None:
                lib.xb_sg_queue_free(self.ptr)
                self.ptr = None


def error_message(stats: Any) -> str:
    """The first error a queue recorded (struct xb_sg_stats.error)."""
    return _msg(stats.error)


def close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
