"""The cost of scale: time and daemon memory to connect 1, 64 and 256 disks (8 per
simulated guest, small sparse raw images), and the CPU an idle daemon uses with them."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import images
from bench.procs import BenchError, Proc, cpu_seconds, group_cpu_seconds, pss_bytes, rss_bytes, wait_until
from bench.xenblk_side import SimEnv

Log = Callable[[str], None]
MIB = 1 << 20
DISKS_PER_GUEST = 8
IMAGE_SIZE = 64 * MIB
VDEVS = [f"xvd{chr(ord('b') + i)}" for i in range(DISKS_PER_GUEST)]


def connected(metrics_text: str) -> int:
    """Disks whose backend is Connected (XenbusState 4), from xenblk_device_state."""
    n = 0
    for line in metrics_text.splitlines():
        if line.startswith("xenblk_device_state{"):
            try:
                n += float(line.rsplit(" ", 1)[1]) == 4.0
            except ValueError:
                continue
    return n


def _attach_all(env: SimEnv, plan: list[tuple[int, str, Path]]) -> None:
    with ThreadPoolExecutor(max_workers=4) as ex:
        list(ex.map(lambda p: env.attach(p[0], p[2], "raw", p[1]), plan))


def _hold_argv(env: SimEnv, domid: int) -> list[str]:
    """A simulated guest that connects every disk of its domain and then stays connected, doing no I/O."""
    return [*env.guest_argv(domid, "randread", 4096, 1, 3600), "--idle"]


def _step(env: SimEnv, work: Path, n: int, image_dir: Path, log: Log, idle_seconds: float | None) -> dict[str, Any]:
    d = env.start_daemon(cache="writeback")
    time.sleep(1.0)
    rss_idle = rss_bytes(d.pid)
    nguests = math.ceil(n / DISKS_PER_GUEST)
    plan: list[tuple[int, str, Path]] = []
    for i in range(n):
        domid, vdev = 1 + i // DISKS_PER_GUEST, VDEVS[i % DISKS_PER_GUEST]
        plan.append((domid, vdev, image_dir / f"s{i:03d}.raw"))
    t0, c0 = time.monotonic(), cpu_seconds(d.pid)
    _attach_all(env, plan)
    t_attach, c_attach = time.monotonic() - t0, cpu_seconds(d.pid) - c0
    guests: list[Proc] = []
    try:
        assert env.host is not None
        t1, c1, h1 = time.monotonic(), cpu_seconds(d.pid), group_cpu_seconds(env.host.pid)
        for g in range(1, nguests + 1):
            guests.append(Proc(f"guest {g}", _hold_argv(env, g), work / f"guest-{n}-{g}.log"))
        wait_until(lambda: connected(d.metrics()) >= n, 120, f"{n} disks connected", [d.proc, *guests], 0.1)
        t_connect, c_connect = time.monotonic() - t1, cpu_seconds(d.pid) - c1
        guests_cpu = sum(cpu_seconds(g.pid) for g in guests)  # their start-up and handshakes, on the same CPUs
        host_cpu = group_cpu_seconds(env.host.pid) - h1  # xenstored and the grant/event broker
        time.sleep(1.0)
        rss = rss_bytes(d.pid)
        out: dict[str, Any] = {
            "disks": n,
            "guests": nguests,
            "attach_seconds": round(t_attach, 3),
            "attach_daemon_cpu_s": round(c_attach, 3),
            "seconds": round(t_connect, 3),
            # The daemon's own work for the handshakes, apart from the guests' (Python) start-up on the same CPUs.
            "connect_daemon_cpu_s": round(c_connect, 3),
            "connect_guests_cpu_s": round(guests_cpu, 3),
            "connect_xenstored_broker_cpu_s": round(host_cpu, 3),
            "rss_idle_mib": round(rss_idle / MIB, 1),
            "rss_mib": round(rss / MIB, 1),
            "pss_mib": round((pss_bytes(d.pid) or 0) / MIB, 1),
            "rss_per_disk_mib": round((rss - rss_idle) / n / MIB, 3),
        }
        log(f"  {n:>4} disks / {nguests:>2} guests: attach {t_attach:.2f}s, connected in {t_connect:.2f}s "
            f"(CPU: daemon {c_connect:.2f}s, guests {guests_cpu:.2f}s, xenstored+broker {host_cpu:.2f}s), "
            f"RSS {rss_idle / MIB:.1f} -> {rss / MIB:.1f} MiB ({out['rss_per_disk_mib']:.3f} MiB/disk)")  # fmt: skip
        if idle_seconds:
            time.sleep(2.0)
            c0, w0 = cpu_seconds(d.pid), time.monotonic()
            time.sleep(idle_seconds)
            for p in (d.proc, *guests):
                p.check_alive()
            cpu, wall = cpu_seconds(d.pid) - c0, time.monotonic() - w0
            out["idle_seconds"] = round(wall, 1)
            out["idle_cpu_seconds"] = round(cpu, 3)
            out["idle_cpu_percent"] = round(100.0 * cpu / wall, 3)
            log(f"  idle with {n} disks: {cpu:.2f} CPU s in {wall:.0f}s = {out['idle_cpu_percent']:.2f} % of a core")
        return out
    finally:
        for p in guests:
            p.stop(timeout=10)
        env.stop_daemon()


def run_scale(work: Path, steps: list[int], idle_seconds: float, log: Log) -> dict[str, Any]:
    log(f"\n[scale] connect {', '.join(map(str, steps))} disks ({DISKS_PER_GUEST} per guest), idle {idle_seconds:g}s")
    image_dir = work / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for i in range(max(steps)):
        images.sparse_raw(image_dir / f"s{i:03d}.raw", IMAGE_SIZE)
    result: dict[str, Any] = {"connect": {}, "idle_disks": max(steps), "error": None}
    try:
        for n in steps:
            with SimEnv(work / f"sim-{n}", image_dir) as env:
                idle = idle_seconds if n == max(steps) else None
                result["connect"][str(n)] = _step(env, work, n, image_dir, log, idle)
    except BenchError as e:
        result["error"] = str(e)
        log(f"  scale FAILED: {e}")
    top = result["connect"].get(str(max(steps)))
    if top:
        result["idle_cpu_percent"] = top.get("idle_cpu_percent")
        result["rss_idle_mib"] = top["rss_idle_mib"]
        result["rss_per_disk_mib"] = top["rss_per_disk_mib"]
        result["rss_check"] = {
            "disks": top["disks"],
            "rss_mib": top["rss_mib"],
            "limit_mib": 100.0 + 2.0 * top["disks"],
        }
    return result


def scale_table(s: dict[str, Any]) -> str:
    head = (
        f"{'disks':>5} {'guests':>6} {'attach s':>8} {'connect s':>9} {'daemon CPU s':>12} {'guests CPU s':>12}"
        f" {'RSS idle MiB':>12}"
        f" {'RSS MiB':>8} {'MiB/disk':>8}"
    )
    lines = [head, "-" * len(head)]
    for n, r in s.get("connect", {}).items():
        lines.append(
            f"{n:>5} {r['guests']:>6} {r['attach_seconds']:>8.2f} {r['seconds']:>9.2f}"
            f" {r['connect_daemon_cpu_s']:>12.2f} {r.get('connect_guests_cpu_s', 0.0):>12.2f}"
            f" {r['rss_idle_mib']:>12.1f}"
            f" {r['rss_mib']:>8.1f} {r['rss_per_disk_mib']:>8.3f}"
        )
    if s.get("idle_cpu_percent") is not None:
        lines.append(f"idle daemon with {s['idle_disks']} connected disks: {s['idle_cpu_percent']:.2f} % of one core")
    lines.append("attach s: `xenblk attach` of every disk, 4 at a time (one CLI process each: the toolstack's part)")
    lines.append(
        "connect s: from launching the guests (disks already attached) to every backend Connected; it includes"
    )
    lines.append("  the start-up of the simulated guests (a Python process each) on the same CPUs; daemon CPU s: the")
    lines.append(
        "  daemon's own CPU time over that span; guests CPU s: the simulated guests' processes, start-up included"
    )
    if s.get("error"):
        lines.append(f"scale error: {s['error'][:800]}")
    return "\n".join(lines)
