"""`python -m bench profile`: where a 4 KiB request's time goes.

Two views, both from one daemon serving a raw image in the page cache:
1. latency decomposition at QD1 from the data plane's own clocks (the exported
   request and storage histograms) against what the simulated guest observes;
2. a `perf record -e cpu-clock` of the daemon's threads at QD32, its samples
   grouped by stage (ring, validation, grant copy/map, io_uring, response,
   notification, ...) by symbol name.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import images
from bench.procs import BenchError, run
from bench.results import Measure
from bench.xenblk_side import Daemon, SimEnv, parse_guest

Log = Callable[[str], None]

# First match wins; patterns are tried against the lower-cased symbol, then the DSO. The data plane's
# own stages are static functions, mostly inlined into xb_queue_main: they show as "data plane (inlined)".
STAGES: list[tuple[str, str]] = [
    ("io_uring + page cache", r"^_*io_|io_uring|liburing|filemap|copy_to_iter|copy_from_iter|copy_page_to_iter|"
                              r"copy_page_from_iter|ext4|iomap|generic_perform_write|xas_|folio|^blk_|submit_bio|"
                              r"rw_verify_area|fsnotify|touch_atime|file_update_time|security_file"),
    ("notification (event channel)", r"evtchn|eventfd|notify|kick"),
    ("response", r"respon|push_rsp|make_rsp"),
    ("validation", r"valid|parse_req|parse_indirect|check_req|refus"),
    ("ring (copy request in)", r"xb_ring|consume|get_req|copy_req"),
    ("grant copy / map", r"grant|gnt|memcpy|memmove|copy_user|rep_movs|mmap|munmap|page_fault|handle_mm_fault|"
                         r"user_addr_fault"),
    ("data plane (inlined stages)", r"xb_queue_main|xb_|_dataplane"),
    ("clock reads", r"clock_gettime|vdso"),
    ("wait / wake-up / scheduler", r"schedule|futex|epoll|poll|wake|switch|idle|irq|softirq|hrtimer|task"),
    ("syscall entry/exit", r"entry_syscall|syscall|do_syscall|__x64_sys|ret_from|fdget|fput"),
    ("allocation", r"malloc|free|alloc|kmem_cache"),
    ("python / control plane", r"^_?py|libpython|python3"),
]  # fmt: skip


def classify(symbol: str, dso: str) -> str:
    for target in (symbol.lower(), dso.lower()):
        for stage, pat in STAGES:
            if re.search(pat, target):
                return stage
    return "other"


def _hist(metrics: str, name: str, op: str) -> tuple[float, float]:
    """(count, sum) of a histogram over every disk, for one op."""
    count = total = 0.0
    for line in metrics.splitlines():
        if not line.startswith(name) or f'op="{op}"' not in line:
            continue
        value = float(line.rsplit(" ", 1)[1])
        if line.startswith(name + "_count"):
            count += value
        elif line.startswith(name + "_sum"):
            total += value
    return count, total


def _mean_us(before: str, after: str, name: str, op: str) -> float | None:
    c0, s0 = _hist(before, name, op)
    c1, s1 = _hist(after, name, op)
    return (s1 - s0) / (c1 - c0) * 1e6 if c1 > c0 else None


def _perf_ok() -> bool:
    if shutil.which("perf") is None:
        return False
    r = subprocess.run(["perf", "record", "-e", "cpu-clock", "-o", "/dev/null", "true"], capture_output=True)
    return r.returncode == 0


def perf_stages(report_text: str) -> tuple[list[tuple[str, float]], list[tuple[float, str, str, str]]]:
    """Parse `perf report --stdio --no-children --sort comm,dso,sym`: (stage shares, top symbols)."""
    rows: list[tuple[float, str, str, str]] = []
    for line in report_text.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+(\S+)\s+\[[.kKgu]\]\s+(.+?)\s*$", line)
        if m:
            rows.append((float(m.group(1)), m.group(2), m.group(3), m.group(4)))
    stages: dict[str, float] = {}
    for pct, _comm, dso, sym in rows:
        st = classify(sym, dso)
        stages[st] = stages.get(st, 0.0) + pct
    return sorted(stages.items(), key=lambda kv: -kv[1]), rows


def _perf_record(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["perf", "record", "-e", "cpu-clock", "-F", "2999", "-g", "-p", str(pid), "-o", str(out), "--",
         "sleep", f"{seconds:g}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


def run_profile(work: Path, runtime: float, size: int, log: Log) -> dict[str, Any]:
    result: dict[str, Any] = {}
    img_dir = work / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    size = min(size, 256 << 20)
    raw = images.filled_raw(img_dir / "disk.raw", size)
    images.warm(raw)
    with SimEnv(work / "sim", img_dir) as env:
        d = env.start_daemon(cache="writeback")
        steps = (("randread", "read", "writeback"), ("randwrite", "write", "writeback"), ("randread", "read", "none"))
        for domid, (rw, op, cache) in enumerate(steps, start=1):
            where = "raw in page cache" if cache == "writeback" else "raw with O_DIRECT (cache=none)"
            log(f"\n[profile {domid}/4] 4 KiB {rw}, QD1, {where}: latency by the data plane's own clocks")
            if cache != d.cache:
                d = env.start_daemon(cache=cache)
            key = f"qd1_{op}" + ("" if cache == "writeback" else "_direct")
            result[key] = _qd1(env, d, domid, raw, rw, op, runtime, log)
        d = env.start_daemon(cache="writeback")
        log("\n[profile 4/4] 4 KiB randread, QD32, raw in page cache: daemon CPU samples by stage (perf, cpu-clock)")
        if not _perf_ok():
            log("  perf is not usable here (apt-get install linux-perf; kernel.perf_event_paranoid); skipped")
            return result
        images.warm(raw)
        env.attach(4, raw, "raw")
        data = work / "perf.data"
        guest = subprocess.Popen(
            env.guest_argv(4, "randread", 4096, 32, runtime),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        perf: subprocess.Popen[bytes] | None = None
        try:
            lead = 1.0 if runtime >= 3 else 0.3  # the handshake, then the workload
            time.sleep(lead)
            perf = _perf_record(d.pid, max(0.5, runtime - lead - 0.5), data)
            perf.wait(timeout=runtime + 60)
            gout, gerr = guest.communicate(timeout=runtime + 120)
        finally:
            for p in (guest, perf):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()
        if guest.returncode != 0:
            raise BenchError(f"guest failed during the profile: {gerr[-2000:]}")
        m32 = parse_guest(gout)
        result["qd32"] = m32.as_dict()
        log(f"  (the guest did {m32.iops:.0f} IOPS, p50 {_f(m32.p50_us)} us, while perf sampled the daemon)")
        text = run(["perf", "report", "--stdio", "--no-children", "-i", str(data), "--sort", "comm,dso,sym",
                    "-g", "none", "--percent-limit", "0.2"], timeout=120, what="perf report")  # fmt: skip
        stages, rows = perf_stages(text)
        result["qd32_stages"] = stages
        result["qd32_top"] = rows[:25]
        for st, pct in stages:
            log(f"  {pct:5.1f} %  {st}")
        log("\n  top symbols (self time):")
        for pct, comm, dso, sym in rows[:20]:
            log(f"  {pct:5.1f} %  {comm:<16} {dso:<28} {sym[:70]}")
    return result


def _qd1(env: SimEnv, d: Daemon, domid: int, raw: Path, rw: str, op: str, runtime: float, log: Log) -> dict[str, Any]:
    env.attach(domid, raw, "raw")
    try:
        before = d.metrics()
        m: Measure = env.run_guest(domid, rw, 4096, 1, runtime)
        after = d.metrics()
    finally:
        env.detach(domid)
    req = _mean_us(before, after, "xenblk_request_duration_seconds", op)
    sto = _mean_us(before, after, "xenblk_storage_duration_seconds", op)
    mean_guest = m.extra.get("mean_us")
    log(f"  guest-observed latency      mean {_f(mean_guest)} us  p50 {_f(m.p50_us)} us  p99 {_f(m.p99_us)} us"
        f"   ({m.iops:.0f} IOPS)")  # fmt: skip
    log(f"  daemon: ring -> response    mean {_f(req)} us   (xenblk_request_duration_seconds)")
    log(f"    of which storage          mean {_f(sto)} us   (xenblk_storage_duration_seconds: io_uring)")
    if req is not None and sto is not None:
        log(f"    validation + grant copy + response (the rest)  {_f(req - sto)} us")
    outside = mean_guest - req if req is not None and mean_guest is not None else None
    log(f"  outside the daemon's clock  {_f(outside)} us  (guest mean - daemon mean: notification both ways, wake-ups,"
        " the guest's own work)")  # fmt: skip
    return {"guest": m.as_dict(), "daemon_request_mean_us": req, "storage_mean_us": sto, "outside_us": outside}


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"
