"""What the simulated guest runs (options, per-queue shares) and what it reports (the --json disk record)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from xenblk.errors import XenblkError
from xenblk.sim.guest_native import ffi, lib

RW_MODES = {
    "read": lib.XB_SG_RW_READ,
    "write": lib.XB_SG_RW_WRITE,
    "randread": lib.XB_SG_RW_RANDREAD,
    "randwrite": lib.XB_SG_RW_RANDWRITE,
    "rw": lib.XB_SG_RW_RW,
    "randrw": lib.XB_SG_RW_RANDRW,
    "trim": lib.XB_SG_RW_TRIM,
}
HOSTILE_MODES = {
    "overflow": lib.XB_SG_HOSTILE_OVERFLOW,
    "garbage": lib.XB_SG_HOSTILE_GARBAGE,
    "revoke": lib.XB_SG_HOSTILE_REVOKE,
    "no-drain": lib.XB_SG_HOSTILE_NO_DRAIN,
    "flood": lib.XB_SG_HOSTILE_FLOOD,
    "rewrite": lib.XB_SG_HOSTILE_REWRITE,
    "big-writes": lib.XB_SG_HOSTILE_BIG_WRITES,
    "discard-loop": lib.XB_SG_HOSTILE_DISCARD_LOOP,
}
# modes whose --count bounds the run (garbage: requests; big-writes: writes; discard-loop: rounds;
# flood: notifications)
COUNTED_MODES = ("garbage", "big-writes", "discard-loop", "flood")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"(\d+)\s*([kmgt]?)(i?b)?", re.IGNORECASE)


class WorkloadError(XenblkError):
    pass


def parse_size(text: str) -> int:
    """`4k`, `128K`, `1M`, `1MiB`, `16m`, `4096`: bytes (binary units)."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise WorkloadError(f"bad size {text!r}: expected bytes or a number with k, M, G or T")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


@dataclass(frozen=True)
class Workload:
    rw: str | None  # None: connect and stay idle
    bs: int = 4096
    iodepth: int = 1
    runtime: float | None = None
    size: int | None = None  # bytes per disk
    verify: bool = False
    seed: int = 0
    rwmix_read: int = 50
    flush_every: int = 0
    discard_every: int = 0
    io_timeout: float = 30.0
    hostile: str | None = None
    count: int | None = None  # requests per disk of a hostile garbage run
    until_stopped: bool = False  # no end of its own: runs until SIGTERM/SIGINT (tests stop it on a marker)

    def check(self) -> None:
        if self.rw is not None and self.rw not in RW_MODES:
            raise WorkloadError(f"unknown --rw {self.rw!r}: one of {', '.join(RW_MODES)}")
        if self.bs <= 0 or self.bs % 512 or self.bs > lib.XB_SG_MAX_BS:
            raise WorkloadError(f"--bs {self.bs} must be a multiple of 512 up to {lib.XB_SG_MAX_BS}")
        if not 1 <= self.iodepth <= lib.XB_SG_MAX_IODEPTH:
            raise WorkloadError(f"--iodepth must be 1..{lib.XB_SG_MAX_IODEPTH}")
        if self.runtime is not None and self.runtime <= 0:
            raise WorkloadError("--runtime must be positive")
        if self.size is not None and self.size < self.bs:
            raise WorkloadError("--size must be at least one block (--bs)")
        if not 0 <= self.rwmix_read <= 100:
            raise WorkloadError("--rwmixread must be 0..100")
        if self.flush_every < 0 or self.discard_every < 0:
            raise WorkloadError("--flush-every and --discard-every must be >= 0")
        if self.verify and self.rw == "trim":
            raise WorkloadError("--verify has nothing to check with --rw trim")
        if self.verify and self.discard_every and self.rw not in ("rw", "randrw"):
            raise WorkloadError("--discard-every with --verify needs --rw rw or randrw (discarded blocks are unknown)")
        if self.hostile is not None:
            if self.hostile not in HOSTILE_MODES:
                raise WorkloadError(f"unknown --hostile {self.hostile!r}: one of {', '.join(HOSTILE_MODES)}")
            if self.verify or self.runtime is None or self.rw is None:
                raise WorkloadError("--hostile needs a --runtime and a workload, and cannot --verify")
        if self.until_stopped and (self.runtime is not None or self.size is not None or self.hostile is not None):
            raise WorkloadError("--until-stopped runs until SIGTERM: not with --runtime, --size or --hostile")
        if self.count is not None and (self.hostile not in COUNTED_MODES or self.count < 1):
            raise WorkloadError(
                "--count N (N >= 1) is the number of requests of --hostile garbage, writes of big-writes, "
                "rounds of discard-loop, notifications of flood"
            )
        if not 0 <= self.seed < 1 << 64:
            raise WorkloadError("--seed must fit in 64 bits")

    def total_ios(self, disk_bytes: int) -> int:
        """I/Os per disk; 0 = as many as fit in the runtime (or until stopped)."""
        if self.until_stopped:
            return 0
        if self.count is not None:
            return self.count
        if self.size is not None:
            return max(1, self.size // self.bs)
        if self.runtime is not None:
            return 0
        return max(1, disk_bytes // self.bs)


def split(total: int, parts: int) -> list[int]:
    """`total` as `parts` nearly equal shares (earlier shares take the remainder)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def fill_workload(cfg: Any, w: Workload, *, region_start: int, region_blocks: int, total_ios: int) -> None:
    cfg.rw = RW_MODES[w.rw] if w.rw is not None else -1
    cfg.bs = w.bs
    cfg.iodepth = w.iodepth
    cfg.region_start = region_start
    cfg.region_blocks = region_blocks
    cfg.total_ios = total_ios
    cfg.runtime_ns = int(w.runtime * 1e9) if w.runtime else 0
    cfg.verify = 1 if w.verify else 0
    cfg.seed = w.seed
    cfg.rwmix_read = w.rwmix_read
    cfg.flush_every = w.flush_every
    cfg.discard_every = w.discard_every
    cfg.io_timeout_ns = int(w.io_timeout * 1e9)
    cfg.hostile = HOSTILE_MODES[w.hostile] if w.hostile else 0


_BOUNDS: list[tuple[int, int]] | None = None


def _bounds() -> list[tuple[int, int]]:
    global _BOUNDS
    if _BOUNDS is None:
        _BOUNDS = [(lib.xb_sg_hist_lower_ns(i), lib.xb_sg_hist_width_ns(i)) for i in range(lib.XB_SG_HIST_BUCKETS)]
    return _BOUNDS


def latency_summary(stats: list[Any]) -> dict[str, float]:
    """mean, p50, p99, p99.9 in microseconds over the merged histograms of the queues."""
    count = sum(int(s.lat_count) for s in stats)
    if count == 0:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0, "p99.9": 0.0}
    hist = [0] * lib.XB_SG_HIST_BUCKETS
    for s in stats:
        raw = ffi.unpack(s.hist, lib.XB_SG_HIST_BUCKETS)
        for i, v in enumerate(raw):
            if v:
                hist[i] += v
    out = {"mean": round(sum(int(s.lat_sum_ns) for s in stats) / count / 1000, 1)}
    bounds = _bounds()
    for name, q in (("p50", 0.50), ("p99", 0.99), ("p99.9", 0.999)):
        rank, seen = q * count, 0
        for i, v in enumerate(hist):
            seen += v
            if v and seen >= rank:
                lo, width = bounds[i]
                out[name] = round((lo + width / 2) / 1000, 1)
                break
    return out


def hostile_record(mode: str, stats: list[Any]) -> dict[str, Any]:
    """What a hostile run did and how the backend answered."""
    return {
        "mode": mode,
        "requests": sum(int(s.requests) for s in stats),
        "responses": sum(int(s.responses) for s in stats),
        "error_responses": sum(int(s.error_responses) for s in stats),
        "notifies": sum(int(s.notifies) for s in stats),
    }


def disk_record(stats: list[Any]) -> dict[str, Any]:
    """The I/O part of one disk's --json record, from its queues' statistics."""

    def total(field: str) -> int:
        return sum(int(getattr(s, field)) for s in stats)

    reads, writes = total("reads"), total("writes")
    nbytes = total("bytes_read") + total("bytes_written")
    ran = [s for s in stats if s.end_ns > s.start_ns]
    seconds = (max(s.end_ns for s in ran) - min(s.start_ns for s in ran)) / 1e9 if ran else 0.0
    ios = reads + writes
    return {
        "ios": ios,
        "reads": reads,
        "writes": writes,
        "flushes": total("flushes"),
        "discards": total("discards"),
        "bytes": nbytes,
        "seconds": round(seconds, 3),
        "iops": round(ios / seconds, 1) if seconds else 0.0,
        "mbps": round(nbytes / 1e6 / seconds, 2) if seconds else 0.0,
        "errors": total("errors"),
        "verify_errors": total("verify_errors"),
        "verified_reads": total("verified_reads"),
        "latency_us": latency_summary(stats),
    }
