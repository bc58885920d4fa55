"""The Xen primitives the data plane needs: grants and event channels, behind one interface.

A thin layer over `native/platform/` (in xenblk._dataplane). `Platform` is what the data plane
uses; `RealPlatform` is real Xen, where the C side talks to /dev/xen/gntdev and /dev/xen/evtchn
and needs nothing from here beyond opening it. The simulated host's implementation
(`xenblk.sim.platform.SimPlatform`) lives with the simulator: the CLI composition point
(`xenblk serve`, through xenblk/commands/_common.py) chooses one and hands it in, so the product
never imports the simulator.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from xenblk import _dataplane  # type: ignore[attr-defined]
from xenblk.errors import XenblkError

ffi: Any = _dataplane.ffi
lib: Any = _dataplane.lib


class PlatformError(XenblkError):
    """The platform cannot be opened, a domain attached or an event channel bound; the message says why."""


def errmsg(err: Any, fallback: str) -> str:
    """The message the C side left in `err` (char[XB_ERRLEN]), else `fallback`."""
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
    from any thread. Attaching a domain is reference-counted (one per device of that guest).
    Implementations say what attaching a new domain, forgetting one, binding and closing a
    channel and closing the platform need beyond that (the `_..._locked` hooks and bind_evtchn)."""

    kind = ""  # "real" | "sim": which implementation this is

    def __init__(self, ptr: Any, self_domid: int) -> None:
        self.ptr = ptr
        self.self_domid = self_domid
        self._lock = threading.Lock()  # attach/detach/close
        self._attached: dict[int, int] = {}

    def _p(self) -> Any:
        if self.ptr is None:
            raise PlatformError("the platform is closed")
        return self.ptr

    def attach_domain(self, domid: int) -> None:
        """Make a guest's grants usable."""
        with self._lock:
            if domid not in self._attached:
                self._attach_new_locked(domid)
            self._attached[domid] = self._attached.get(domid, 0) + 1

    def _attach_new_locked(self, domid: int) -> None:
        """The first attachment of `domid`; nothing to do where the hypervisor knows every guest."""

    def detach_domain(self, domid: int) -> None:
        """Drop one attachment; the last one forgets the guest (grants still mapped stay valid until unmapped)."""
        with self._lock:
            count = self._attached.get(domid, 0)
            if count > 1:
                self._attached[domid] = count - 1
                return
            self._attached.pop(domid, None)
            if count and self.ptr is not None:
                self._forget_locked(domid)

    def _forget_locked(self, domid: int) -> None:
        """The last attachment of `domid` is gone."""

    def bind_evtchn(self, domid: int, remote_port: int) -> EventChannel:
        """Bind to the event channel `domid` allocated unbound for us at `remote_port`."""
        raise NotImplementedError

    def _channel_closed(self, ch: EventChannel) -> None:
        """`ch` was closed."""

    def close(self) -> None:
        """Release the platform. Callers stop their devices (unmap, close channels) first."""
        with self._lock:
            if self.ptr is None:
                return
            lib.xb_platform_close(self.ptr)
            self.ptr = None
            self._attached.clear()


class RealPlatform(Platform):
    """Real Xen: /dev/xen/gntdev and /dev/xen/evtchn."""

    kind = "real"

    @classmethod
    def open(cls, self_domid: int = 0) -> RealPlatform:
        err = ffi.new("char[]", lib.XB_ERRLEN)
        ptr = lib.xb_platform_open_real(err)
        if ptr == ffi.NULL:
            raise PlatformError(errmsg(err, "cannot open the Xen platform"))
        return cls(ptr, self_domid)

    def bind_evtchn(self, domid: int, remote_port: int) -> EventChannel:
        err = ffi.new("char[]", lib.XB_ERRLEN)
        ptr = lib.xb_evtchn_bind_real(self._p(), domid, remote_port, err)
        if ptr == ffi.NULL:
            raise PlatformError(errmsg(err, f"cannot bind event channel {domid}:{remote_port}"))
        return EventChannel(self, ptr, domid, remote_port)
