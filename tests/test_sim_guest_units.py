"""The simulated guest's pure parts: sizes, workload shares, the data pattern, the random block order
and latency percentiles from the C histogram."""

from __future__ import annotations

import pytest

from xenblk.sim.guest_native import ffi, lib
from xenblk.sim.guest_workload import Workload, WorkloadError, latency_summary, parse_size, split


@pytest.mark.parametrize(
    ("text", "n"),
    [("4096", 4096), ("4k", 4096), ("4K", 4096), ("128k", 131072), ("1M", 1 << 20), ("1MiB", 1 << 20),
     ("16m", 16 << 20), ("2G", 2 << 30), ("512b", 512)],
)  # fmt: skip
def test_parse_size(text: str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "k", "4x", "-1", "1.5M", "4 kk"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(WorkloadError):
        parse_size(text)


def test_split_covers_everything() -> None:
    assert split(10, 4) == [3, 3, 2, 2]
    assert split(3, 4) == [1, 1, 1, 0]
    assert sum(split(16383, 7)) == 16383


@pytest.mark.parametrize(
    ("kw", "msg"),
    [({"rw": "bogus"}, "unknown --rw"), ({"rw": "read", "bs": 1000}, "multiple of 512"),
     ({"rw": "read", "iodepth": 0}, "--iodepth"), ({"rw": "trim", "verify": True}, "nothing to check"),
     ({"rw": "write", "verify": True, "discard_every": 3}, "--discard-every with --verify"),
     ({"rw": "read", "hostile": "overflow"}, "--hostile needs a --runtime"),
     ({"rw": "read", "hostile": "nuke", "runtime": 1}, "unknown --hostile"),
     ({"rw": "read", "until_stopped": True, "runtime": 1}, "--until-stopped runs until SIGTERM"),
     ({"rw": "read", "until_stopped": True, "size": 4096}, "--until-stopped runs until SIGTERM")],
)  # fmt: skip
def test_workload_checks(kw: dict[str, object], msg: str) -> None:
    with pytest.raises(WorkloadError, match=msg):
        Workload(**kw).check()  # type: ignore[arg-type]


def test_total_ios() -> None:
    assert Workload("read", bs=4096).total_ios(1 << 20) == 256
    assert Workload("read", bs=4096, size=8192).total_ios(1 << 20) == 2
    assert Workload("read", bs=4096, runtime=1.0).total_ios(1 << 20) == 0
    assert Workload("read", bs=4096, runtime=1.0, size=4096).total_ios(1 << 20) == 1
    assert Workload("read", bs=4096, until_stopped=True).total_ios(1 << 20) == 0  # no end of its own


def test_pattern_depends_on_offset_seed_and_generation() -> None:
    buf = ffi.new("uint8_t[]", 8192)
    lib.xb_sg_pattern_fill(buf, 1 << 20, 8192, 42, 3)
    assert lib.xb_sg_pattern_check(buf, 1 << 20, 8192, 42, 3) == -1
    assert lib.xb_sg_pattern_check(buf, (1 << 20) + 512, 8192, 42, 3) == 0
    assert lib.xb_sg_pattern_check(buf, 1 << 20, 8192, 43, 3) == 0
    assert lib.xb_sg_pattern_check(buf, 1 << 20, 8192, 42, 2) == 0
    raw = bytes(ffi.buffer(buf))
    assert int.from_bytes(raw[512:520], "little") == (1 << 20) + 512  # the offset is in the clear
    buf[5000] ^= 0x10
    assert lib.xb_sg_pattern_check(buf, 1 << 20, 8192, 42, 3) == 4608  # the sector holding byte 5000


def _hist_stats(values_ns: list[int]) -> object:
    s = ffi.new("struct xb_sg_stats *")
    for v in values_ns:
        s.lat_count += 1
        s.lat_sum_ns += v
        i = next(i for i in range(lib.XB_SG_HIST_BUCKETS) if lib.xb_sg_hist_lower_ns(i) <= v <
                 lib.xb_sg_hist_lower_ns(i) + lib.xb_sg_hist_width_ns(i))  # fmt: skip
        s.hist[i] += 1
    return s


def test_latency_percentiles_within_the_histogram_error() -> None:
    values = [10_000 + i for i in range(980)] + [500_000] * 19 + [9_000_000]
    summary = latency_summary([_hist_stats(values[:500]), _hist_stats(values[500:])])
    assert summary["p50"] == pytest.approx(10.5, rel=0.04)
    assert summary["p99"] == pytest.approx(500.0, rel=0.04)
    assert summary["p99.9"] == pytest.approx(500.0, rel=0.04)
    assert summary["mean"] == pytest.approx(sum(values) / len(values) / 1000, rel=0.001)
    assert latency_summary([_hist_stats([])]) == {"mean": 0.0, "p50": 0.0, "p99": 0.0, "p99.9": 0.0}


def test_histogram_buckets_tile_the_line() -> None:
    prev_end = 0
    for i in range(lib.XB_SG_HIST_BUCKETS):
        lo, w = lib.xb_sg_hist_lower_ns(i), lib.xb_sg_hist_width_ns(i)
        assert lo == prev_end and w >= 1 and (w == 1 or w * 32 <= lo)
        prev_end = lo + w
        if prev_end >= 1 << 62:
            break
