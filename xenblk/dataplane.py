"""The data plane as the control plane drives it: devices, their queues and statistics.

A thin typed layer over `native/dataplane/` (in xenblk._dataplane). Each queue is served by
its own C thread that never takes the GIL; Python creates a device once the frontend is
Initialised, starts each queue with its ring refs and event channel, reads statistics at any
time (relaxed atomic loads in C, no lock, nothing stops) and stops the device when the
frontend closes. `Device.stop()` blocks until every queue has drained (cffi releases the GIL
during the call): call it from an executor, e.g. `await loop.run_in_executor(None, dev.stop)`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from xenblk import _dataplane, qos, storage  # type: ignore[attr-defined]
from xenblk.errors import XenblkError
from xenblk.xenplatform import EventChannel, Platform

ffi: Any = _dataplane.ffi
lib: Any = _dataplane.lib

ABIS = {"x86_64-abi": lib.XB_ABI_X86_64, "x86_32-abi": lib.XB_ABI_X86_32}


def _names(table: Any, count: int) -> tuple[str, ...]:
    return tuple(ffi.string(table[i]).decode() for i in range(count))


# The counters' vocabulary is the C data plane's (native/dataplane/stats.c), indexed as its counters are;
# xenblk.metrics publishes the same names.
OPS = _names(lib.xb_stat_op_names, lib.XB_STAT_OPS)
REFUSALS = _names(lib.xb_refusal_names, lib.XB_REFUSE_REASONS)
ERRORS = _names(lib.xb_error_reason_names, lib.XB_ERR_REASONS)


class DataplaneError(XenblkError):
    """A device or queue could not be created or started; the message says why."""


@dataclass(frozen=True)
class DeviceConfig:
    domid: int
    handle: int
    abi: str = "x86_64-abi"  # "native" is taken as x86_64-abi (the daemon is x86_64)
    ring_pages: int = 1
    nr_queues: int = 1
    readonly: bool = False
    feature_persistent: bool = False
    max_indirect_segments: int = 256
    secure_discard: bool = False
    max_work_per_wake: int = 0  # 0: the C default
    memory_budget: int = 0  # bytes of request buffers the device's queues may hold; 0: the C default (64 MiB)
    max_persistent_grants: int = 0  # per queue, with feature_persistent; 0: blkback's default (1056)


@dataclass
class OpStats:
    requests: int = 0
    bytes: int = 0
    errors: int = 0
    lat_buckets: list[int] = field(default_factory=list)
    lat_sum_ns: int = 0
    storage_buckets: list[int] = field(default_factory=list)
    storage_sum_ns: int = 0


@dataclass
class QueueStats:
    """A snapshot of one queue's counters (struct xb_queue_stats). op[i] follows OPS; refusals
    follow REFUSALS (requests refused before touching storage); errors follow ERRORS (accepted
    requests that failed: op[i].errors counts the same requests by operation)."""

    op: list[OpStats]
    refusals: list[int]
    errors: list[int]
    seg_buckets: list[int]
    ring_buckets: list[int]
    grant_copy_failures: int
    grant_map_failures: int
    notifications_in: int
    notifications_out: int
    in_flight: int
    ring_protocol_errors: int
    mem_bytes: int = 0  # gauge: request data buffers held (in flight and kept for reuse)
    mem_waits: int = 0  # times the queue stopped taking requests until buffers came back
    mem_peak: int = 0  # the most mem_bytes ever was
    persistent_mapped: int = 0  # gauge: persistent grants mapped now
    persistent_maps: int = 0  # persistent grants mapped (each once until purged or disconnected)
    persistent_hits: int = 0  # segments moved through a mapping made earlier
    persistent_purged: int = 0  # unmapped by the purge of unused grants (cache at its bound)
    persistent_invalidated: int = 0  # mappings dropped: the guest revoked or re-pointed the grant
    qos_throttled: int = 0  # requests that waited for a QoS limit (the disk's or its group's)
    qos_throttled_ns: int = 0  # the time they waited, summed
    qos_queued: int = 0  # gauge: requests a limit holds back now

    def op_named(self, name: str) -> OpStats:
        return self.op[OPS.index(name)]

    def refused(self, reason: str) -> int:
        return self.refusals[REFUSALS.index(reason)]

    @classmethod
    def from_c(cls, s: Any) -> QueueStats:
        ops = [
            OpStats(
                requests=int(o.requests),
                bytes=int(o.bytes),
                errors=int(o.errors),
                lat_buckets=list(o.lat_buckets),
                lat_sum_ns=int(o.lat_sum_ns),
                storage_buckets=list(o.storage_buckets),
                storage_sum_ns=int(o.storage_sum_ns),
            )
            for o in s.op
        ]
        return cls(
            op=ops,
            refusals=list(s.refusals),
            errors=list(s.errors),
            seg_buckets=list(s.seg_buckets),
            ring_buckets=list(s.ring_buckets),
            grant_copy_failures=int(s.grant_copy_failures),
            grant_map_failures=int(s.grant_map_failures),
            notifications_in=int(s.notifications_in),
            notifications_out=int(s.notifications_out),
            in_flight=int(s.in_flight),
            ring_protocol_errors=int(s.ring_protocol_errors),
            mem_bytes=int(s.mem_bytes),
            mem_waits=int(s.mem_waits),
            mem_peak=int(s.mem_peak),
            persistent_mapped=int(s.persistent_mapped),
            persistent_maps=int(s.persistent_maps),
            persistent_hits=int(s.persistent_hits),
            persistent_purged=int(s.persistent_purged),
            persistent_invalidated=int(s.persistent_invalidated),
            qos_throttled=int(s.qos_throttled),
            qos_throttled_ns=int(s.qos_throttled_ns),
            qos_queued=int(s.qos_queued),
        )


@dataclass
class LimiterStats:
    throttled: int  # requests that had to wait for this limiter
    throttled_ns: int  # the time they waited, summed
    queued: int  # gauge: requests waiting for it now
    admitted: int  # requests it let through while some limit was set
    admitted_bytes: int


class Limiter:
    """A QoS limiter (struct xb_qos): the token buckets of one disk or one group, shared by the devices
    it is given to (Device.set_qos). Its limits change at any time, from any thread; the devices using it
    are told with Device.qos_changed(), so requests held under the old limits are looked at again."""

    def __init__(self) -> None:
        err = ffi.new("char[]", lib.XB_ERRLEN)
        ptr = lib.xb_qos_new(err)
        if ptr == ffi.NULL:
            raise DataplaneError(_errmsg(err, "qos: cannot create a limiter"))
        self._ptr: Any = ffi.gc(ptr, lib.xb_qos_unref)  # a device holds its own reference in C
        self.limits = qos.Limits()

    def set(self, limits: qos.Limits) -> None:
        c = ffi.new("struct xb_qos_limits *")
        n = len(qos.KINDS)
        for i, v in enumerate(limits.values):
            getattr(c, ("iops", "bps", "iops_burst", "bps_burst")[i // n])[i % n] = v
        err = ffi.new("char[]", lib.XB_ERRLEN)
        if lib.xb_qos_set(self._ptr, c, err) < 0:
            raise DataplaneError(_errmsg(err, "qos: limits refused"))
        self.limits = limits

    def stats(self) -> LimiterStats:
        out = ffi.new("struct xb_qos_stats *")
        lib.xb_qos_get_stats(self._ptr, out)
        return LimiterStats(int(out.throttled), int(out.throttled_ns), int(out.queued), int(out.admitted),
                            int(out.admitted_bytes))  # fmt: skip


def _image_ptr(image: storage.Image) -> Any:
    if image.ptr is None:
        raise DataplaneError(f"{image.path}: image is closed")
    # The image lives in the _storage module; only its address crosses to this one.
    return ffi.cast("struct xb_image *", int(storage.ffi.cast("uintptr_t", image.ptr)))


def _errmsg(err: Any, fallback: str) -> str:
    return str(ffi.string(err).decode(errors="replace")) or fallback


class Device:
    """One virtual disk of one guest: 1..nr_queues rings served by C threads.

    Keeps the platform, the image and each started queue's event channel referenced, so none
    is freed while a queue thread uses it. stop() is idempotent and also safe after a queue
    failed on its own; the event channels are closed by stop()."""

    def __init__(self, platform: Platform, image: storage.Image, cfg: DeviceConfig) -> None:
        abi = ABIS.get("x86_64-abi" if cfg.abi == "native" else cfg.abi)
        if abi is None:
            raise DataplaneError(f"device {cfg.handle} of domain {cfg.domid}: unknown protocol {cfg.abi!r}")
        self.platform = platform
        self.image = image
        self.cfg = cfg
        c = ffi.new("struct xb_device_config *")
        c.domid = cfg.domid
        c.handle = cfg.handle
        c.abi = abi
        c.ring_pages = cfg.ring_pages
        c.nr_queues = cfg.nr_queues
        c.readonly = int(cfg.readonly)
        c.feature_persistent = int(cfg.feature_persistent)
        c.max_indirect_segments = cfg.max_indirect_segments
        c.secure_discard = int(cfg.secure_discard)
        c.max_work_per_wake = cfg.max_work_per_wake
        c.memory_budget = cfg.memory_budget
        c.max_persistent_grants = cfg.max_persistent_grants
        err = ffi.new("char[]", lib.XB_ERRLEN)
        ptr = lib.xb_device_new(platform._p(), _image_ptr(image), c, err)
        if ptr == ffi.NULL:
            raise DataplaneError(_errmsg(err, f"device {cfg.handle} of domain {cfg.domid}: cannot create"))
        self._ptr: Any = ffi.gc(ptr, lib.xb_device_free)
        self._channels: dict[int, EventChannel] = {}
        self._lock = threading.Lock()  # start/stop
        self._free_lock = threading.Lock()  # readers against close(): stats never block on a drain
        self._stopped = False

    def start_queue(self, q: int, ring_refs: list[int], evtchn: EventChannel) -> None:
        """Map queue q's ring and start its thread. On success the queue uses `evtchn` until stop()."""
        refs = ffi.new("xb_grant_ref_t[]", ring_refs or [0])
        err = ffi.new("char[]", lib.XB_ERRLEN)
        with self._lock:
            if self._stopped:
                raise DataplaneError(f"device {self.cfg.handle} of domain {self.cfg.domid}: stopped")
            rc = lib.xb_device_start_queue(self._p(), q, refs, len(ring_refs), evtchn._p(), err)
            if rc < 0:
                raise DataplaneError(_errmsg(err, f"device {self.cfg.handle} queue {q}: cannot start"))
            self._channels[q] = evtchn

    def set_journal(self, q: int, path: str, ident: str, resume: bool) -> None:
        """Journal queue q's ring in `path` (call before start_queue; docs/DESIGN.md, "Restart without
        guest impact"). resume: continue from the journal a killed daemon left, which must carry the
        same `ident` (at most 63 bytes) and fit the ring, else DataplaneError."""
        err = ffi.new("char[]", lib.XB_ERRLEN)
        with self._lock:
            rc = lib.xb_device_set_journal(self._p(), q, path.encode(), ident.encode()[:63], int(resume), err)
        if rc < 0:
            raise DataplaneError(_errmsg(err, f"device {self.cfg.handle} queue {q}: cannot set the journal"))

    def set_qos(self, disk: Limiter | None, group: Limiter | None) -> None:
        """The disk's limiter and its group's (either None: none), before the first start_queue."""
        err = ffi.new("char[]", lib.XB_ERRLEN)
        with self._lock:
            rc = lib.xb_device_set_qos(self._p(), disk._ptr if disk else ffi.NULL, group._ptr if group else ffi.NULL,
                                       err)  # fmt: skip
        if rc < 0:
            raise DataplaneError(_errmsg(err, f"device {self.cfg.handle}: cannot set QoS"))

    def qos_changed(self) -> None:
        """A limiter of this device changed: queues holding requests look again now. Never blocks."""
        with self._free_lock:
            if self._ptr is not None:
                lib.xb_device_qos_changed(self._ptr)

    def stop(self) -> None:
        """Stop taking requests, wait for in-flight I/O and answer it, unmap the rings, close the
        event channels. Blocks (without the GIL) until done; idempotent."""
        with self._lock:
            if self._ptr is not None:  # None: closed, so already stopped
                lib.xb_device_stop(self._ptr)
            self._stopped = True
            channels, self._channels = self._channels, {}
        for ch in channels.values():
            ch.close()

    def close(self) -> None:
        """stop(), then free the C device (stats are gone after this)."""
        self.stop()
        with self._free_lock:
            if self._ptr is not None:
                ptr, self._ptr = self._ptr, None
                ffi.gc(ptr, None)  # drops the destructor in place (and returns None): freed here, once
                lib.xb_device_free(ptr)

    def _p(self) -> Any:
        if self._ptr is None:
            raise DataplaneError(f"device {self.cfg.handle} of domain {self.cfg.domid} is closed")
        return self._ptr

    def stats(self, q: int) -> QueueStats:
        """A snapshot of queue q's counters; safe from any thread, also while stop() drains."""
        out = ffi.new("struct xb_queue_stats *")
        with self._free_lock:
            rc = lib.xb_device_get_stats(self._p(), q, out)
        if rc < 0:
            raise DataplaneError(f"device {self.cfg.handle}: no queue {q}")
        return QueueStats.from_c(out)

    def queue_failed(self, q: int) -> str | None:
        """Why queue q stopped on its own (a guest protocol error), or None while it is healthy."""
        err = ffi.new("char[]", lib.XB_ERRLEN)
        with self._free_lock:
            failed = lib.xb_device_queue_failed(self._p(), q, err)
        return _errmsg(err, "queue failed") if failed else None

    def fail_fd(self) -> int:
        """An eventfd, readable once a queue failed (then ask queue_failed which); valid until close().
        The caller reads it to rearm."""
        with self._free_lock:
            return int(lib.xb_device_fail_fd(self._p()))

    def set_size(self, nbytes: int) -> None:
        """Online resize: requests from now on are checked against the new size."""
        with self._free_lock:
            lib.xb_device_set_size(self._p(), nbytes)


def journal_crash_at(point: int, after: int = 0) -> None:
    """Test only: the queue thread SIGKILLs its process at journal step `point` (1 taken, 2 consumed,
    3 response written, 4 answered, 5 counted) the `after`+1-th time it gets there; 0 disarms."""
    lib.xb_journal_crash_at(point, after)
