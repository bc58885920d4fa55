"""The simulated host's implementation of the platform interface (xenblk.xenplatform.Platform).

The broker of `xenblk sim host --dir DIR` hands out each guest's memory and grant table and each
event channel's eventfds; SimPlatform fetches them and gives them to the C side, which then checks
every grant itself, the way Xen does. Without a broker (tests without a sim host) domains and event
channels are given as fds directly (add_sim_domain_fds, wrap_sim_evtchn).
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any

from xenblk.sim.broker import BrokerClient, BrokerError, read_host_json
from xenblk.xenplatform import EventChannel, Platform, PlatformError, errmsg, ffi, lib


class SimPlatform(Platform):
    """The sim platform talking to the broker at `broker_path` (None: no broker, see the module doc)."""

    kind = "sim"

    def __init__(self, ptr: Any, self_domid: int, broker_path: str | None = None) -> None:
        super().__init__(ptr, self_domid)
        self.broker_path = broker_path
        self._broker: BrokerClient | None = None
        self._broker_lock = threading.Lock()  # the broker connection

    @classmethod
    def open(cls, broker_path: str | None, self_domid: int = 0) -> SimPlatform:
        err = ffi.new("char[]", lib.XB_ERRLEN)
        ptr = lib.xb_platform_open_sim(self_domid, err)
        if ptr == ffi.NULL:
            raise PlatformError(errmsg(err, "cannot open the sim platform"))
        return cls(ptr, self_domid, broker_path)

    @classmethod
    def open_dir(cls, sim_dir: str | Path, self_domid: int = 0) -> SimPlatform:
        """The platform of the sim host running in `sim_dir` (its host.json names the broker)."""
        try:
            broker = read_host_json(sim_dir)["broker"]
        except BrokerError as e:
            raise PlatformError(str(e)) from None
        return cls.open(broker, self_domid)

    def _call_broker(self, req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        if self.broker_path is None:
            raise PlatformError(f"sim platform without a broker cannot do {req.get('op')}")
        with self._broker_lock:
            if self.ptr is None:
                raise PlatformError("the platform is closed")
            try:
                if self._broker is None:
                    self._broker = BrokerClient(self.broker_path)
                return self._broker.call(req)
            except BrokerError as e:
                if isinstance(e.__cause__, OSError) and self._broker is not None:
                    # The connection broke (a restarted host): the next call connects afresh.
                    self._broker.close()
                    self._broker = None
                raise PlatformError(str(e)) from e

    def _attach_new_locked(self, domid: int) -> None:
        """Fetch the guest's memory and grant table from the broker."""
        reply, fds = self._call_broker({"op": "map_domain", "domid": domid})
        try:
            if len(fds) != 2:
                raise PlatformError(f"sim broker: map_domain {domid} sent {len(fds)} fds, expected 2")
            self._add_domain_locked(domid, fds[0], int(reply["mem_pages"]), fds[1], int(reply["gnttab_entries"]))
        except (KeyError, TypeError, ValueError) as e:
            raise PlatformError(f"sim broker: malformed map_domain reply {reply!r}") from e
        finally:
            for fd in fds:
                os.close(fd)

    def add_sim_domain_fds(self, domid: int, mem_fd: int, mem_pages: int, gnttab_fd: int, entries: int) -> None:
        """Attach a guest from its memory and grant-table fds directly (what attach_domain does
        after asking the broker). The fds stay the caller's: the platform keeps its own copies."""
        with self._lock:
            if domid in self._attached:
                raise PlatformError(f"domain {domid} is already attached")
            self._add_domain_locked(domid, mem_fd, mem_pages, gnttab_fd, entries)
            self._attached[domid] = 1

    def _add_domain_locked(self, domid: int, mem_fd: int, mem_pages: int, gnttab_fd: int, entries: int) -> None:
        err = ffi.new("char[]", lib.XB_ERRLEN)
        rc = lib.xb_platform_sim_add_domain(self._p(), domid, mem_fd, mem_pages, gnttab_fd, entries, err)
        if rc < 0:
            raise PlatformError(errmsg(err, f"domain {domid}: cannot attach: {os.strerror(-rc)}"))

    def _forget_locked(self, domid: int) -> None:
        lib.xb_platform_sim_remove_domain(self.ptr, domid)

    def bind_evtchn(self, domid: int, remote_port: int) -> EventChannel:
        req = {"op": "evtchn_bind_interdomain", "domid": self.self_domid, "remote_domid": domid}
        reply, fds = self._call_broker({**req, "remote_port": remote_port})
        try:
            port = int(reply["port"])
            if len(fds) != 2:
                raise PlatformError(f"sim broker: evtchn_bind_interdomain sent {len(fds)} fds, expected 2")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return self.wrap_sim_evtchn(domid, remote_port, fds[0], fds[1], port)

    def wrap_sim_evtchn(self, domid: int, remote_port: int, recv_fd: int, send_fd: int, port: int) -> EventChannel:
        """An event channel from its two eventfds (what bind_evtchn does after asking the broker).
        Takes ownership of both fds, also on failure."""
        err = ffi.new("char[]", lib.XB_ERRLEN)
        ptr = lib.xb_evtchn_sim(recv_fd, send_fd, port, err)
        if ptr == ffi.NULL:
            os.close(recv_fd)
            os.close(send_fd)
            raise PlatformError(errmsg(err, f"cannot wrap event channel {domid}:{remote_port}"))
        return EventChannel(self, ptr, domid, remote_port)

    def _channel_closed(self, ch: EventChannel) -> None:
        if self.broker_path is not None:
            # The broker forgets the channel; if it is gone (host stopped) there is nothing left to free.
            with contextlib.suppress(PlatformError):
                self._call_broker({"op": "evtchn_close", "domid": self.self_domid, "port": ch.local_port})

    def close(self) -> None:
        super().close()
        with self._broker_lock:
            if self._broker is not None:
                self._broker.close()
                self._broker = None
