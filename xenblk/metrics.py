"""Prometheus exporter: per-disk counters and latency histograms read from the C
data plane (a snapshot per scrape, never stopping a queue), plus daemon-level
counters. Served by prometheus-client on a loopback address by default."""

from __future__ import annotations

import platform as _platform
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from xenblk import __version__, _dataplane, dataplane  # type: ignore[attr-defined]

_ffi: Any = _dataplane.ffi
_lib: Any = _dataplane.lib


# The vocabulary is the C data plane's (native/dataplane/stats.c), indexed as its counters are:
# op, refusal and error labels (read by xenblk.dataplane), and the finite upper bounds of the
# histograms (then +Inf).
OPS, REFUSALS, ERRORS = dataplane.OPS, dataplane.REFUSALS, dataplane.ERRORS
# 1-2-5 steps from 10 us to 10 s
LAT_BOUNDS_S = tuple(int(_lib.xb_lat_bounds_ns[i]) / 1e9 for i in range(_lib.XB_LAT_BUCKETS - 1))
SEG_BOUNDS = tuple(int(_lib.xb_seg_bounds[i]) for i in range(_lib.XB_SEG_BUCKETS - 1))


class QueueStatsLike(Protocol):
    """What the exporter reads of xenblk.dataplane.QueueStats (one queue's snapshot)."""

    op: Sequence[Any]  # per XB_STAT_* op: requests, bytes, errors, lat_buckets, lat_sum_ns, storage_*
    refusals: Sequence[int]
    errors: Sequence[int]
    seg_buckets: Sequence[int]
    ring_buckets: Sequence[int]
    grant_copy_failures: int
    grant_map_failures: int
    in_flight: int
    mem_bytes: int
    mem_waits: int
    qos_throttled: int
    qos_throttled_ns: int
    qos_queued: int


@dataclass
class DiskView:
    """One disk as the exporter sees it at scrape time."""

    domid: int
    vdev: str
    state: int
    queues: list[QueueStatsLike] = field(default_factory=list)
    reconnects: int = 0
    resizes: int = 0
    sectors: int = 0
    lock_wait: bool = False  # waiting for another open of its image to release it
    qos_limits: dict[str, int] = field(default_factory=dict)  # the QoS limits set (xenblk.qos.KEYS), 0s left out
    qos_group: str | None = None  # the group it is in while connected


class GroupViewLike(Protocol):
    """What the exporter reads of a QoS group (xenblk.backend.qos.GroupView)."""

    name: str
    limits: dict[str, int]
    disks: int
    throttled: int
    throttled_ns: int
    queued: int


@dataclass
class DaemonCounters:
    watch_events: int = 0
    xenstore_reconnects: int = 0
    devices_closed_on_error: int = 0


def _cumulative(buckets: Sequence[int], bounds: Sequence[float], scale: float = 1.0) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    acc = 0
    for i, b in enumerate(bounds):
        acc += buckets[i] if i < len(buckets) else 0
        out.append((_fmt(b * scale), float(acc)))
    acc += sum(buckets[len(bounds) :])
    out.append(("+Inf", float(acc)))
    return out


def _fmt(v: float) -> str:
    return repr(float(v)) if v != int(v) else f"{v:.1f}"


class _DiskFamilies:
    """The per-disk metric families of one scrape, filled disk by disk."""

    def __init__(self) -> None:
        labels = ["domid", "vdev"]
        self.req = CounterMetricFamily("xenblk_requests", "Requests completed, by operation", labels=[*labels, "op"])
        self.byt = CounterMetricFamily("xenblk_bytes", "Bytes transferred, by operation", labels=[*labels, "op"])
        self.err = CounterMetricFamily(
            "xenblk_request_errors", "Requests answered with an error, by op", labels=[*labels, "op"]
        )
        self.lat = HistogramMetricFamily(
            "xenblk_request_duration_seconds",
            "Request received from the ring to response pushed, by operation",
            labels=[*labels, "op"],
        )
        self.sto = HistogramMetricFamily(
            "xenblk_storage_duration_seconds", "Time spent in storage only, by operation", labels=[*labels, "op"]
        )
        self.segs = HistogramMetricFamily("xenblk_request_segments", "Segments per request", labels=labels)
        self.occ = HistogramMetricFamily(
            "xenblk_ring_occupancy_ratio", "Share of the ring holding requests at wake-up", labels=[*labels, "queue"]
        )
        self.infl = GaugeMetricFamily(
            "xenblk_inflight_requests", "Requests taken from the ring, not yet answered", labels=[*labels, "queue"]
        )
        self.refs = CounterMetricFamily(
            "xenblk_refused_requests", "Requests refused by validation, by reason", labels=[*labels, "reason"]
        )
        self.errs = CounterMetricFamily("xenblk_errors", "Request failures, by reason", labels=[*labels, "reason"])
        self.gcf = CounterMetricFamily("xenblk_grant_copy_failures", "Grant copy operations that failed", labels=labels)
        self.gmf = CounterMetricFamily("xenblk_grant_map_failures", "Grant map operations that failed", labels=labels)
        self.memb = GaugeMetricFamily(
            "xenblk_buffer_bytes", "Request data buffers held by the disk's queues (memory budget)", labels=labels
        )
        self.memw = CounterMetricFamily(
            "xenblk_memory_waits", "Times a queue stopped reading its ring: memory budget spent", labels=labels
        )
        self.state = GaugeMetricFamily(
            "xenblk_device_state", "XenbusState of the backend (4 = Connected)", labels=labels
        )
        self.qn = GaugeMetricFamily("xenblk_device_queues", "Queues (rings) in use", labels=labels)
        self.size = GaugeMetricFamily("xenblk_device_size_bytes", "Disk size advertised to the guest", labels=labels)
        self.rec = CounterMetricFamily("xenblk_device_reconnects", "Frontend reconnections", labels=labels)
        self.rsz = CounterMetricFamily("xenblk_device_resizes", "Online resizes published", labels=labels)
        self.lkw = GaugeMetricFamily(
            "xenblk_device_image_lock_wait",
            "1 while the disk waits for another open of its image (another daemon or device) to release it",
            labels=labels,
        )
        self.qlim = GaugeMetricFamily(
            "xenblk_qos_limit", "QoS limits set on the disk (per second; bursts in requests or bytes)",
            labels=[*labels, "limit"],
        )  # fmt: skip
        self.qthr = CounterMetricFamily(
            "xenblk_qos_throttled_requests", "Requests a QoS limit (the disk's or its group's) held back", labels=labels
        )
        self.qsec = CounterMetricFamily(
            "xenblk_qos_throttled_seconds", "Time requests waited for a QoS limit, summed", labels=labels
        )
        self.qque = GaugeMetricFamily("xenblk_qos_queued_requests", "Requests a QoS limit holds now", labels=labels)
        self.qgrp = InfoMetricFamily("xenblk_qos_group", "The QoS group the disk is in", labels=labels)

    def add(self, d: DiskView) -> None:
        lv = [str(d.domid), d.vdev]
        self.state.add_metric(lv, d.state)
        self.qn.add_metric(lv, len(d.queues))
        self.size.add_metric(lv, d.sectors * 512)
        self.rec.add_metric(lv, d.reconnects)
        self.lkw.add_metric(lv, 1 if d.lock_wait else 0)
        self.rsz.add_metric(lv, d.resizes)
        for k, v in d.qos_limits.items():
            self.qlim.add_metric([*lv, k], v)
        if d.qos_group is not None:
            self.qgrp.add_metric(lv, {"group": d.qos_group})
        if not d.queues:
            return
        self._add_ops(lv, d.queues)
        seg = _sum_lists(q.seg_buckets for q in d.queues)
        self.segs.add_metric(lv, _cumulative(seg, SEG_BOUNDS[: len(seg) - 1]), sum_value=0.0)
        for qi, q in enumerate(d.queues):
            nb = len(q.ring_buckets)
            bounds = [1.0 / 2 ** (nb - 1 - k) for k in range(nb - 1)]
            self.occ.add_metric([*lv, str(qi)], _cumulative(list(q.ring_buckets), bounds), sum_value=0.0)
            self.infl.add_metric([*lv, str(qi)], q.in_flight)
        for i, reason in enumerate(REFUSALS):
            self.refs.add_metric([*lv, reason], sum(q.refusals[i] for q in d.queues))
        for i, reason in enumerate(ERRORS):
            self.errs.add_metric([*lv, reason], sum(q.errors[i] for q in d.queues))
        self.gcf.add_metric(lv, sum(q.grant_copy_failures for q in d.queues))
        self.gmf.add_metric(lv, sum(q.grant_map_failures for q in d.queues))
        self.memb.add_metric(lv, sum(q.mem_bytes for q in d.queues))
        self.memw.add_metric(lv, sum(q.mem_waits for q in d.queues))
        self.qthr.add_metric(lv, sum(q.qos_throttled for q in d.queues))
        self.qsec.add_metric(lv, sum(q.qos_throttled_ns for q in d.queues) / 1e9)
        self.qque.add_metric(lv, sum(q.qos_queued for q in d.queues))

    def _add_ops(self, lv: list[str], queues: Sequence[QueueStatsLike]) -> None:
        for i, opname in enumerate(OPS):
            ops = [q.op[i] for q in queues]
            n = sum(o.requests for o in ops)
            self.req.add_metric([*lv, opname], n)
            self.byt.add_metric([*lv, opname], sum(o.bytes for o in ops))
            self.err.add_metric([*lv, opname], sum(o.errors for o in ops))
            self.lat.add_metric(
                [*lv, opname],
                _cumulative(_sum_lists(o.lat_buckets for o in ops), LAT_BOUNDS_S),
                sum_value=sum(o.lat_sum_ns for o in ops) / 1e9,
            )
            self.sto.add_metric(
                [*lv, opname],
                _cumulative(_sum_lists(o.storage_buckets for o in ops), LAT_BOUNDS_S),
                sum_value=sum(o.storage_sum_ns for o in ops) / 1e9,
            )

    def families(self) -> Iterator[Any]:
        yield from (self.req, self.byt, self.err, self.lat, self.sto, self.segs, self.occ, self.infl)
        yield from (self.refs, self.errs, self.gcf, self.gmf, self.memb, self.memw)
        yield from (self.state, self.qn, self.size, self.rec, self.rsz, self.lkw)
        yield from (self.qlim, self.qthr, self.qsec, self.qque, self.qgrp)


def _group_families(groups: Iterable[GroupViewLike]) -> Iterator[Any]:
    lim = GaugeMetricFamily("xenblk_qos_group_limit", "QoS limits set on the group", labels=["group", "limit"])
    disks = GaugeMetricFamily("xenblk_qos_group_disks", "Connected disks in the group", labels=["group"])
    thr = CounterMetricFamily(
        "xenblk_qos_group_throttled_requests", "Requests the group's limits held back", labels=["group"]
    )
    sec = CounterMetricFamily(
        "xenblk_qos_group_throttled_seconds", "Time requests waited for the group's limits, summed", labels=["group"]
    )
    que = GaugeMetricFamily(
        "xenblk_qos_group_queued_requests", "Requests the group's limits hold now", labels=["group"]
    )
    for g in groups:
        for k, v in g.limits.items():
            lim.add_metric([g.name, k], v)
        disks.add_metric([g.name], g.disks)
        thr.add_metric([g.name], g.throttled)
        sec.add_metric([g.name], g.throttled_ns / 1e9)
        que.add_metric([g.name], g.queued)
    yield from (lim, disks, thr, sec, que)


class XenblkCollector(Collector):
    def __init__(
        self,
        disks: Callable[[], Iterable[DiskView]],
        daemon: DaemonCounters,
        groups: Callable[[], Iterable[GroupViewLike]] | None = None,
    ) -> None:
        self._disks = disks
        self._daemon = daemon
        self._groups = groups

    def collect(self) -> Iterator[Any]:
        fams = _DiskFamilies()
        for d in self._disks():
            fams.add(d)
        yield from fams.families()
        yield from _group_families(self._groups() if self._groups is not None else ())
        yield from self._daemon_families()

    def _daemon_families(self) -> Iterator[Any]:
        yield CounterMetricFamily(
            "xenblk_xenstore_watch_events", "XenStore watch events received", value=self._daemon.watch_events
        )
        yield CounterMetricFamily(
            "xenblk_xenstore_reconnects", "Reconnections to xenstored", value=self._daemon.xenstore_reconnects
        )
        yield CounterMetricFamily(
            "xenblk_devices_closed_on_error",
            "Devices closed because of bad frontend input",
            value=self._daemon.devices_closed_on_error,
        )
        info = InfoMetricFamily("xenblk_build", "xenblk build information")
        info.add_metric([], {"version": __version__, "python": _platform.python_version()})
        yield info


def _sum_lists(lists: Iterable[Sequence[int]]) -> list[int]:
    out: list[int] = []
    for seq in lists:
        if len(out) < len(seq):
            out += [0] * (len(seq) - len(out))
        for i, v in enumerate(seq):
            out[i] += v
    return out


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck scraper never holds the daemon's exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # one line per scrape on stderr is noise
        pass


class MetricsServer:
    """The HTTP endpoint. Scrapes run on prometheus-client's own thread and only
    read C counters, so they never block the event loop or a queue."""

    def __init__(
        self,
        disks: Callable[[], Iterable[DiskView]],
        daemon: DaemonCounters,
        groups: Callable[[], Iterable[GroupViewLike]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(XenblkCollector(disks, daemon, groups))
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None

    def start(self, host: str, port: int) -> tuple[str, int]:
        # Our own server around make_wsgi_app, not start_http_server: that one returns its server only
        # since prometheus-client 0.17 (Debian 12 ships 0.16), and stop() needs it.
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server_class = type("_MetricsHTTPServer", (_ThreadingWSGIServer,), {"address_family": family})
        self._server = make_server(host, port, make_wsgi_app(self.registry), server_class, _QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        self.address = (host, self._server.server_address[1])
        return self.address

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
