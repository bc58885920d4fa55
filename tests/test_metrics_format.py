"""The exporter's text passes promtool and `xenblk stats` reads it back.

The inputs here are queue snapshots built by hand (the live data plane is
scraped in the end-to-end tests); what is checked is the exposition itself."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field

import pytest

from xenblk import metrics, statsview
from xenblk.backend.qos import GroupView


@dataclass
class Op:
    requests: int = 0
    bytes: int = 0
    errors: int = 0
    lat_buckets: list[int] = field(default_factory=lambda: [0] * 20)
    lat_sum_ns: int = 0
    storage_buckets: list[int] = field(default_factory=lambda: [0] * 20)
    storage_sum_ns: int = 0


@dataclass
class Q:
    op: list[Op] = field(default_factory=lambda: [Op() for _ in range(5)])
    refusals: list[int] = field(default_factory=lambda: [0] * 10)
    errors: list[int] = field(default_factory=lambda: [0] * len(metrics.ERRORS))
    seg_buckets: list[int] = field(default_factory=lambda: [0] * 10)
    ring_buckets: list[int] = field(default_factory=lambda: [0] * 8)
    grant_copy_failures: int = 0
    grant_map_failures: int = 0
    in_flight: int = 0
    mem_bytes: int = 0
    mem_waits: int = 0
    qos_throttled: int = 0
    qos_throttled_ns: int = 0
    qos_queued: int = 0


def test_exposition_passes_promtool_and_feeds_stats() -> None:
    q = Q()
    disk = metrics.DiskView(domid=3, vdev="xvdb", state=4, queues=[q], sectors=2048,
                            qos_limits={"iops": 2000, "read-bps": 10_000_000}, qos_group="g1")  # fmt: skip
    group = GroupView("g1", {"iops": 5000}, disks=1, throttled=7, throttled_ns=3_000_000_000, queued=2)
    server = metrics.MetricsServer(lambda: [disk], metrics.DaemonCounters(), lambda: [group])
    host, port = server.start("127.0.0.1", 0)
    url = f"http://{host}:{port}/metrics"
    try:
        before = statsview.parse(statsview.fetch(url), time.monotonic())
        # 100 reads of 4 KiB: 90 under 50 us, 10 under 1 ms
        q.op[0].requests, q.op[0].bytes = 100, 409600
        q.op[0].lat_buckets[2], q.op[0].lat_buckets[6] = 90, 10
        q.op[0].lat_sum_ns = 90 * 40_000 + 10 * 800_000
        q.in_flight = 3
        q.qos_throttled, q.qos_throttled_ns, q.qos_queued = 5, 1_500_000_000, 1
        text = urllib.request.urlopen(url).read().decode()
        after = statsview.parse(text, before.at + 1.0)
    finally:
        server.stop()
    assert 'xenblk_requests_total{domid="3",op="read",vdev="xvdb"} 100.0' in text
    assert 'xenblk_request_duration_seconds_bucket{domid="3",le="5e-05",op="read",vdev="xvdb"} 90.0' in text
    [row] = statsview.rows(before, after)
    assert row.iops == pytest.approx(100.0)
    assert row.p50_us == pytest.approx(50.0)
    assert row.p99_us == pytest.approx(1000.0)
    assert row.inflight == 3
    # the limits beside the rates, and what QoS holds back
    assert (row.iops_limit, row.mbps_limit, row.throttled) == ("2000", "r10", 1)
    assert "2000" in statsview.format_table([row])
    assert 'xenblk_qos_throttled_seconds_total{domid="3",vdev="xvdb"} 1.5' in text
    assert 'xenblk_qos_group_throttled_requests_total{group="g1"} 7.0' in text
    assert 'xenblk_qos_group_info{domid="3",group="g1",vdev="xvdb"} 1.0' in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool missing: `make test` installs the prometheus package")
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
