"""What one run of a workload measured, from either side (xenblk through the ring, or fio)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

GIB = 1 << 30


@dataclass
class Measure:
    iops: float
    mbps: float  # MB/s, 10^6 bytes
    p50_us: float | None
    p99_us: float | None
    p999_us: float | None
    bytes: int
    seconds: float
    errors: int = 0
    cpu_s_per_gib: float | None = None  # CPU of the server side (xenblk daemon; fio: fio itself)
    cpu_us_per_io: float | None = None  # the same CPU per request (a gain bought with busy-polling shows here)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lat_us"] = {"p50": self.p50_us, "p99": self.p99_us, "p99.9": self.p999_us}
        return d


def per_gib(cpu_s: float, nbytes: int) -> float | None:
    return cpu_s / (nbytes / GIB) if nbytes > 0 else None


def us_per_io(cpu_s: float, iops: float, seconds: float) -> float | None:
    ios = iops * seconds
    return cpu_s / ios * 1e6 if ios > 0 else None
