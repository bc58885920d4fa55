"""The Xen primitives the data plane needs: grants and event channels, on real Xen or the sim host.

A thin layer over `native/platform/` (in xenblk._dataplane). On real Xen the C side talks to
/dev/xen/gntdev and /dev/xen/evtchn and needs nothing from here beyond opening it. On the
simulated host (`xenblk sim host --dir DIR`) the broker hands out each guest's memory and grant
table and each event channel's eventfds; this module fetches them and gives them to the C side,
which then checks every grant itself, the way Xen does.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from xenblk import _dataplane  # type: ignore[attr-defined]
from xenblk.errors import XenblkError

ffi: Any = _dataplane.ffi
lib: Any = _dataplane.lib


class PlatformError(XenblkError):
    """The platform cannot be opened, a domain attached or an event channel bound; the message says why."""


def _errmsg(err: Any, fallback: str) -> str:
    return str(ffi.string(err).decode(errors="replace")) or fallback


class EventChannel:
    """One bound interdomain event channel; `ptr` (struct xb_evtchn *) is handed to a data-plane queue,
    which then owns its use until the queue stops. close() is idempotent."""

    def __init__(self, platform: Platform, ptr: Any, domid: int, remote_port: int) -> None:
        self.platform = platform
        self.ptr = ptr
        self.domid = domid
        self.remote_port = remote_port
        self.local_port = int(lib.xb_evtchn_local_port(ptr))

    def fileno(self) -> int:
        """Readable when the other side notified us."""
        return int(lib.xb_evtchn_fd(self._p()))

    def notify(self) -> None:
        rc = lib.xb_evtchn_notify(self._p())
        if rc < 0:
            raise PlatformError(f"event channel {self.local_port} to domain {self.domid}: notify: {os.strerror(-rc)}")

    def ack(self) -> int:
        """Consume pending notifications (and unmask); how many were pending (0: none)."""
        rc = int(lib.xb_evtchn_ack(self._p()))
        if rc < 0:
            raise PlatformError(f"event channel {self.local_port} to domain {self.domid}: ack: {os.strerror(-rc)}")
        return rc

    def _p(self) -> Any:
        if self.ptr is None:
            raise PlatformError(f"event channel {self.local_port} to domain {self.domid} is closed")
        return self.ptr

    def close(self) -> None:
        if self.ptr is None:
            return
        lib.xb_evtchn_close(self.ptr)
        self.ptr = None
        self.platform._channel_closed(self)


class Platform:
    """Grant map/copy and event channels for the data plane; `ptr` is the `struct xb_platform *`.

    Thread-safe: the C platform is shared by all queue threads; attach/detach/bind may be called
    from any thread. Attaching a domain is reference-counted (one per device of that guest)."""

    def __init__(self, kind: str, ptr: Any, self_domid: int, broker_path: str | None = None) -> None:
        self.kind = kind
        self.ptr = ptr
        self.self_domid = self_domid
        self.broker_path = broker_path
        self._broker: Any = None
        self._lock = threading.Lock()  # attach/detach/close
        self._broker_lock = threading.Lock()  # the broker connection
        self._attached: dict[int, int] = {}

    def _p(self) -> Any:
        if self.ptr is None:
            raise PlatformError("the platform is closed")
        return self.ptr

    def _call_broker(self, req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        from xenblk.sim.broker import BrokerClient, BrokerError

        if self.broker_path is None:
            raise PlatformError(f"sim platform without a broker cannot do {req.get('op')}")
        with self._broker_lock:
            if self.ptr is None:
                raise PlatformError("the platform is closed")
            try:
                if self._broker is None:
                    self._broker = BrokerClient(self.broker_path)
                return self._broker.call(req)  # type: ignore[no-any-return]
            except BrokerError as e:
                if isinstance(e.__cause__, OSError) and self._broker is not None:
                    # The connection broke (a restarted host): the next call connects afresh.
                    self._broker.close()
                    self._broker = None
                raise PlatformError(str(e)) from e

    def attach_domain(self, domid: int) -> None:
        """Make a guest's grants usable. sim: fetch its memory and grant table from the broker."""
        with self._lock:
            if self.kind == "sim" and domid not in self._attached:
                reply, fds = self._call_broker({"op": "map_domain", "domid": domid})
                try:
                    if len(fds) != 2:
                        raise PlatformError(f"sim broker: map_domain {domid} sent {len(fds)} fds, expected 2")
                    self._add_sim_domain_locked(
                        domid, fds[0], int(reply["mem_pages"]), fds[1], int(reply["gnttab_entries"])
                    )
                except (KeyError, TypeError, ValueError) as e:
                    raise PlatformError(f"sim broker: malformed map_domain reply {reply!r}") from e
                finally:
                    for fd in fds:
                        os.close(fd)
            self._attached[domid] = self._attached.get(domid, 0) + 1

    def add_sim_domain_fds(self, domid: int, mem_fd: int, mem_pages: int, gnttab_fd: int, entries: int) -> None:
        """sim: attach a guest from its memory and grant-table fds directly (what attach_domain does
        after asking the broker). The fds stay the caller's: the platform keeps its own copies."""
        with self._lock:
            if domid in self._attached:
                raise PlatformError(f"domain {domid} is already attached")
            self._add_sim_domain_locked(domid, mem_fd, mem_pages, gnttab_fd, entries)
            self._attached[domid] = 1

    def _add_sim_domain_locked(self, domid: int, mem_fd: int, mem_pages: int, gnttab_fd: int, entries: int) -> None:
        err = ffi.new("char[]", lib.XB_ERRLEN)
        rc = lib.xb_platform_sim_add_domain(self._p(), domid, mem_fd, mem_pages, gnttab_fd, entries, err)
        if rc < 0:
            raise PlatformError(_errmsg(err, f"domain {domid}: cannot attach: {os.strerror(-rc)}"))

    def detach_domain(self, domid: int) -> None:
        """Drop one attachment; the last one forgets the guest (grants still mapped stay valid until unmapped)."""
        with self._lock:
            count = self._attached.get(domid, 0)
            if count > 1:
                self._attached[domid] = count - 1
                return
            self._attached.pop(domid, None)
            if count and self.kind == "sim" and self.ptr is not None:
                lib.xb_platform_sim_remove_domain(self.ptr, domid)

    def bind_evtchn(self, domid: int, remote_port: int) -> EventChannel:
        """Bind to the event channel `domid` allocated unbound for us at `remote_port`."""
        err = ffi.new("char[]", lib.XB_ERRLEN)
        if self.kind == "real":
            ptr = lib.xb_evtchn_bind_real(self._p(), domid, remote_port, err)
            if ptr == ffi.NULL:
                raise PlatformError(_errmsg(err, f"cannot bind event channel {domid}:{remote_port}"))
            return EventChannel(self, ptr, domid, remote_port)
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
        """sim: an event channel from its two eventfds (what bind_evtchn does after asking the broker).
        Takes ownership of both fds, also on failure."""
        err = ffi.new("char[]", lib.XB_ERRLEN)
        ptr = lib.xb_evtchn_sim(recv_fd, send_fd, port, err)
        if ptr == ffi.NULL:
            os.close(recv_fd)
            os.close(send_fd)
            raise PlatformError(_errmsg(err, f"cannot wrap event channel {domid}:{remote_port}"))
        return EventChannel(self, ptr, domid, remote_port)

    def _channel_closed(self, ch: EventChannel) -> None:
        if self.kind == "sim" and self.broker_path is not None:
            # The broker forgets the channel; if it is gone (host stopped) there is nothing left to free.
            with contextlib.suppress(PlatformError):
                self._call_broker({"op": "evtchn_close", "domid": self.self_domid, "port": ch.local_port})

    def close(self) -> None:
        """Release the platform. Callers stop their devices (unmap, close channels) first."""
        with self._lock:
            if self.ptr is None:
                return
            lib.xb_platform_close(self.ptr)
            self.ptr = None
            self._attached.clear()
        with self._broker_lock:
            if self._broker is not None:
                self._broker.close()
                self._broker = None


def _sim_broker_path(sim_dir: str) -> str:
    host_json = Path(sim_dir) / "host.json"
    try:
        info = json.loads(host_json.read_text())
        return str(info["broker"])
    except OSError as e:
        raise PlatformError(f"{host_json}: {e.strerror}: is `xenblk sim host --dir {sim_dir}` running?") from None
    except (ValueError, KeyError, TypeError):
        raise PlatformError(f'{host_json}: not a sim host description (no "broker")') from None


def open_platform(sim_dir: str | None, self_domid: int = 0) -> Platform:
    """The real Xen platform (sim_dir None) or the simulated host's in `sim_dir`."""
    err = ffi.new("char[]", lib.XB_ERRLEN)
    if sim_dir is None:
        ptr = lib.xb_platform_open_real(err)
        if ptr == ffi.NULL:
            raise PlatformError(_errmsg(err, "cannot open the Xen platform"))
        return Platform("real", ptr, self_domid)
    return open_sim_platform(_sim_broker_path(sim_dir), self_domid)


def open_sim_platform(broker_path: str | None, self_domid: int = 0) -> Platform:
    """The sim platform talking to the broker at `broker_path`; None: no broker, domains and event
    channels are given as fds (add_sim_domain_fds, wrap_sim_evtchn), as tests without a sim host do."""
    err = ffi.new("char[]", lib.XB_ERRLEN)
    ptr = lib.xb_platform_open_sim(self_domid, err)
    if ptr == ffi.NULL:
        raise PlatformError(_errmsg(err, "cannot open the sim platform"))
    return Platform("sim", ptr, self_domid, broker_path)
