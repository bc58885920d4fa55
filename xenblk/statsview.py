"""Turn two scrapes of the metrics endpoint into a per-disk table a person can
read at a Dom0 console: IOPS, MB/s (each beside the disk's QoS limit), p50/p99 latency, in-flight,
requests a QoS limit holds, errors."""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from xenblk.errors import XenblkError

Key = tuple[str, str]  # (domid, vdev)


@dataclass
class Scrape:
    at: float
    requests: dict[Key, float] = field(default_factory=dict)
    bytes: dict[Key, float] = field(default_factory=dict)
    errors: dict[Key, float] = field(default_factory=dict)
    inflight: dict[Key, float] = field(default_factory=dict)
    state: dict[Key, float] = field(default_factory=dict)
    limits: dict[Key, dict[str, float]] = field(default_factory=dict)  # xenblk_qos_limit by its limit label
    throttled: dict[Key, float] = field(default_factory=dict)  # xenblk_qos_queued_requests
    # latency buckets summed over ops: upper bound -> cumulative count
    buckets: dict[Key, dict[float, float]] = field(default_factory=dict)


@dataclass
class DiskRow:
    domid: str
    vdev: str
    state: int
    iops: float
    mbps: float
    p50_us: float | None
    p99_us: float | None
    inflight: int
    errors: int
    iops_limit: str = ""  # the QoS limits on IOPS, "" none: "1000", or "r500 w200" for per-op limits
    mbps_limit: str = ""
    throttled: int = 0  # requests a QoS limit holds now

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def fetch(url: str, timeout: float = 5.0) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body: bytes = r.read()
            return body.decode()
    except (urllib.error.URLError, OSError) as e:
        raise XenblkError(
            f"cannot read metrics from {url} ({e}): is `xenblk serve` running with metrics enabled?"
        ) from None


def parse(text: str, at: float) -> Scrape:
    s = Scrape(at=at)
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            lb = smp.labels
            if "domid" not in lb:
                continue
            key = (lb["domid"], lb["vdev"])
            if smp.name == "xenblk_requests_total":
                s.requests[key] = s.requests.get(key, 0) + smp.value
            elif smp.name == "xenblk_bytes_total":
                s.bytes[key] = s.bytes.get(key, 0) + smp.value
            elif smp.name == "xenblk_errors_total":
                s.errors[key] = s.errors.get(key, 0) + smp.value
            elif smp.name == "xenblk_inflight_requests":
                s.inflight[key] = s.inflight.get(key, 0) + smp.value
            elif smp.name == "xenblk_device_state":
                s.state[key] = smp.value
            elif smp.name == "xenblk_qos_limit":
                s.limits.setdefault(key, {})[lb.get("limit", "")] = smp.value
            elif smp.name == "xenblk_qos_queued_requests":
                s.throttled[key] = smp.value
            elif smp.name == "xenblk_request_duration_seconds_bucket":
                le = float(lb["le"])
                b = s.buckets.setdefault(key, {})
                b[le] = b.get(le, 0) + smp.value
    return s


def quantile(q: float, cumulative: dict[float, float]) -> float | None:
    """Quantile from cumulative histogram buckets (the upper bound of the bucket holding it)."""
    items = sorted(cumulative.items())
    if not items or items[-1][1] <= 0:
        return None
    target = q * items[-1][1]
    for le, count in items:
        if count >= target:
            return le if le != float("inf") else items[-2][0] if len(items) > 1 else None
    return None


def limit_text(limits: dict[str, float], unit: str, scale: float = 1.0) -> str:
    """The rate limits of one unit (iops, bps) as a short cell: the total, else per read/write."""
    if limits.get(unit):
        return f"{limits[unit] / scale:g}"
    parts = [f"{k[0]}{limits[f'{k}-{unit}'] / scale:g}" for k in ("read", "write") if limits.get(f"{k}-{unit}")]
    return " ".join(parts)


def rows(before: Scrape, after: Scrape) -> list[DiskRow]:
    dt = max(after.at - before.at, 1e-6)
    out = []
    for key in sorted(after.state, key=lambda k: (int(k[0]), k[1])):
        b0 = before.buckets.get(key, {})
        delta = {le: c - b0.get(le, 0) for le, c in after.buckets.get(key, {}).items()}
        p50 = quantile(0.5, delta)
        p99 = quantile(0.99, delta)
        out.append(
            DiskRow(
                domid=key[0],
                vdev=key[1],
                state=int(after.state[key]),
                iops=(after.requests.get(key, 0) - before.requests.get(key, 0)) / dt,
                mbps=(after.bytes.get(key, 0) - before.bytes.get(key, 0)) / dt / 1e6,
                p50_us=None if p50 is None else p50 * 1e6,
                p99_us=None if p99 is None else p99 * 1e6,
                inflight=int(after.inflight.get(key, 0)),
                errors=int(after.errors.get(key, 0)),
                iops_limit=limit_text(after.limits.get(key, {}), "iops"),
                mbps_limit=limit_text(after.limits.get(key, {}), "bps", 1e6),
                throttled=int(after.throttled.get(key, 0)),
            )
        )
    return out


STATE_NAMES = {1: "Initialising", 2: "InitWait", 3: "Initialised", 4: "Connected", 5: "Closing", 6: "Closed"}


def format_table(table: list[DiskRow]) -> str:
    head = (
        f"{'DOMID':>5} {'VDEV':<6} {'STATE':<11} {'IOPS':>9} {'LIMIT':<9} {'MB/s':>8} {'LIMIT':<9} "
        f"{'p50(us)':>9} {'p99(us)':>9} {'INFL':>5} {'QOSQ':>5} {'ERR':>5}"
    )
    lines = [head]
    for r in table:
        p50 = "-" if r.p50_us is None else f"<={r.p50_us:.0f}"
        p99 = "-" if r.p99_us is None else f"<={r.p99_us:.0f}"
        lines.append(
            f"{r.domid:>5} {r.vdev:<6} {STATE_NAMES.get(r.state, str(r.state)):<11} {r.iops:>9.0f} "
            f"{r.iops_limit or '-':<9} {r.mbps:>8.1f} {r.mbps_limit or '-':<9} "
            f"{p50:>9} {p99:>9} {r.inflight:>5} {r.throttled:>5} {r.errors:>5}"
        )
    if not table:
        lines.append("(no disks)")
    return "\n".join(lines)
