"""The reference side: fio with the io_uring engine straight on the image file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from bench.procs import BenchError, run
from bench.results import Measure, per_gib, us_per_io


def available() -> bool:
    return shutil.which("fio") is not None


def fio_argv(path: Path, rw: str, bs: int, iodepth: int, runtime: float, direct: bool, size: int) -> list[str]:
    return [
        "fio",
        "--name=ref",
        f"--filename={path}",
        "--ioengine=io_uring",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--iodepth={iodepth}",
        f"--size={size}",
        f"--direct={int(direct)}",
        f"--runtime={max(1, round(runtime))}",
        "--time_based=1",
        "--ramp_time=0",
        # fio drops the file's page cache before a job by default: the page-cache cases must stay cached.
        f"--invalidate={int(direct)}",
        "--norandommap=1",
        "--randrepeat=0",
        "--lat_percentiles=1",
        "--percentile_list=50:99:99.9",
        "--output-format=json",
    ]


def run_fio(path: Path, rw: str, bs: int, iodepth: int, runtime: float, direct: bool, size: int) -> Measure:
    argv = fio_argv(path, rw, bs, iodepth, runtime, direct, size)
    out = run(argv, timeout=runtime + 60, what=f"fio {rw} bs={bs} qd={iodepth} on {path.name}")
    return parse_fio(out)


def parse_fio(out: str) -> Measure:
    # fio may print notes before the JSON document.
    start = out.find("{")
    if start < 0:
        raise BenchError(f"fio printed no JSON: {out[:500]!r}")
    doc = json.loads(out[start:])
    job = doc["jobs"][0]
    side: dict[str, Any] = job["read"] if job["read"]["io_bytes"] >= job["write"]["io_bytes"] else job["write"]
    seconds = job.get("job_runtime", side.get("runtime", 0)) / 1000.0
    lat = side.get("lat_ns", {}).get("percentile") or side.get("clat_ns", {}).get("percentile") or {}

    def pct(key: str) -> float | None:
        v = lat.get(key)
        return v / 1000.0 if v is not None else None

    cpu_s = (job.get("usr_cpu", 0.0) + job.get("sys_cpu", 0.0)) / 100.0 * seconds
    return Measure(
        iops=float(side["iops"]),
        mbps=side["bw_bytes"] / 1e6,
        p50_us=pct("50.000000"),
        p99_us=pct("99.000000"),
        p999_us=pct("99.900000"),
        bytes=int(side["io_bytes"]),
        seconds=seconds,
        errors=int(job.get("error", 0)),
        cpu_s_per_gib=per_gib(cpu_s, int(side["io_bytes"])),
        cpu_us_per_io=us_per_io(cpu_s, float(side["iops"]), seconds),
    )
