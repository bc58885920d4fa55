"""The xenblk side of the benchmark: the simulated host, the daemon under a config made
for the run, `xenblk attach`, and the simulated guest as the load generator."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.procs import BenchError, Proc, cpu_seconds, run, wait_until
from bench.results import Measure, per_gib, us_per_io

# The xenblk command line; XENBLK_BENCH_CLI (an argv prefix) swaps in a stand-in to test the harness itself.
XENBLK = (
    shlex.split(os.environ["XENBLK_BENCH_CLI"])
    if os.environ.get("XENBLK_BENCH_CLI")
    else [sys.executable, "-m", "xenblk"]
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            r.read()
        return True
    except OSError:
        return False


@dataclass
class Daemon:
    proc: Proc
    config: Path
    metrics_url: str
    cache: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            body: bytes = r.read()
        return body.decode()


class SimEnv:
    """One simulated host with at most one daemon; everything stops on exit, even on failure."""

    def __init__(self, work: Path, images: Path, *, log_level: str = "warning") -> None:
        self.work = work
        self.images = images
        # Unix socket paths are short (108 bytes): the simulated host's directory and the daemon's run_dir live
        # in a short directory of their own (created on entry, removed on exit); logs stay under `work`.
        self.short: Path | None = None
        self.sim = work / "sim"
        self.log_level = log_level
        self.host: Proc | None = None
        self.daemon: Daemon | None = None
        self._ndaemons = 0

    def __enter__(self) -> SimEnv:
        self.work.mkdir(parents=True, exist_ok=True)
        self.short = Path(tempfile.mkdtemp(prefix="xbb.", dir="/tmp"))
        self.sim = self.short / "sim"
        try:
            self.start_host()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.stop_daemon()
        finally:
            if self.host is not None:
                self.host.stop()
                self.host = None
            if self.short is not None:
                # Keep the simulated host's logs (xenstored's among them) with the others, for --keep.
                for log in self.short.glob("sim/**/*.log"):
                    with contextlib.suppress(OSError):
                        shutil.copy(log, self.work / f"sim-{log.parent.name}-{log.name}")
                shutil.rmtree(self.short, ignore_errors=True)
                self.short = None

    # -- the simulated host ------------------------------------------------------------------------------------------
    def start_host(self) -> None:
        self.host = Proc("xenblk sim host", [*XENBLK, "sim", "host", "--dir", str(self.sim)], self.work / "host.log")
        hj = self.sim / "host.json"
        wait_until(hj.exists, 60, "the simulated host (host.json)", [self.host])

    # -- the daemon ----------------------------------------------------------------------------------------------------
    def start_daemon(self, cache: str = "writeback", **dataplane: Any) -> Daemon:
        self.stop_daemon()
        self._ndaemons += 1
        n = self._ndaemons
        port = free_port()
        cfg = self.work / f"xenblk-{n}.toml"
        dp = "".join(f"{k} = {json.dumps(v)}\n" for k, v in dataplane.items())
        cfg.write_text(
            f'[daemon]\nrun_dir = "{self.short}/run"\nstate_dir = "{self.work}/state-{n}"\n'
            f'[storage]\nallowed_dirs = ["{self.images}"]\ncache = "{cache}"\n'
            f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
            f'[log]\nformat = "console"\nlevel = "{self.log_level}"\n' + (f"[dataplane]\n{dp}" if dp else "")
        )
        argv = [*XENBLK, "--config", str(cfg), "serve", "--sim", str(self.sim)]
        proc = Proc("xenblk serve", argv, self.work / f"serve-{n}.log")
        self.daemon = Daemon(proc, cfg, f"http://127.0.0.1:{port}/metrics", cache)
        wait_until(lambda: _http_ok(self.daemon.metrics_url), 60, "xenblk serve (metrics endpoint)", [proc])  # type: ignore[union-attr]
        return self.daemon

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.proc.stop(timeout=30)
            self.daemon = None

    def need_daemon(self) -> Daemon:
        if self.daemon is None:
            raise BenchError("no daemon running")
        self.daemon.proc.check_alive()
        return self.daemon

    # -- devices and guests --------------------------------------------------------------------------------------------
    def attach(self, domid: int, image: Path, fmt: str, vdev: str = "xvdb") -> None:
        d = self.need_daemon()
        run(
            [*XENBLK, "--config", str(d.config), "attach", str(domid), f"{fmt}:{image}", "--vdev", vdev,
             "--format", fmt, "--sim", str(self.sim)],
            timeout=60, what=f"xenblk attach {domid} {image.name}",
        )  # fmt: skip

    def detach(self, domid: int, vdev: str = "xvdb") -> None:
        d = self.need_daemon()
        run(
            [*XENBLK, "--config", str(d.config), "detach", str(domid), vdev, "--force", "--sim", str(self.sim)],
            timeout=60, what=f"xenblk detach {domid} {vdev}",
        )  # fmt: skip

    def guest_argv(self, domid: int, rw: str, bs: int, iodepth: int, runtime: float, size: int | None = None,
                   queues: int = 1, ring_order: int | None = None, indirect: bool = False) -> list[str]:  # fmt: skip
        argv = [*XENBLK, "sim", "guest", "--dir", str(self.sim), "--domid", str(domid), "--rw", rw,
                "--bs", str(bs), "--iodepth", str(iodepth), "--runtime", f"{runtime:g}", "--json",
                "--queues", str(queues)]  # fmt: skip
        if size is not None:
            argv += ["--size", str(size)]
        if ring_order is not None:
            argv += ["--ring-order", str(ring_order)]
        if indirect:
            argv.append("--indirect")
        return argv

    def run_guest(self, domid: int, rw: str, bs: int, iodepth: int, runtime: float, **kw: Any) -> Measure:
        """Run the simulated blkfront's workload; the daemon's CPU time is measured around it."""
        d = self.need_daemon()
        cpu0 = cpu_seconds(d.pid)
        out = run(self.guest_argv(domid, rw, bs, iodepth, runtime, **kw), timeout=runtime + 120,
                  what=f"xenblk sim guest {rw} bs={bs} qd={iodepth}")  # fmt: skip
        cpu = cpu_seconds(d.pid) - cpu0
        m = parse_guest(out)
        m.cpu_s_per_gib = per_gib(cpu, m.bytes)
        m.cpu_us_per_io = us_per_io(cpu, m.iops, m.seconds)
        m.extra["daemon_cpu_s"] = round(cpu, 3)
        return m


def _num(d: dict[str, Any], *keys: str) -> float | None:
    for k in keys:
        if k in d and d[k] is not None:
            return float(d[k])
    return None


def parse_guest(out: str) -> Measure:
    """The simulated guest's --json output: one disk (the benchmark attaches one) or the summed disks."""
    start = out.find("{")
    if start < 0:
        raise BenchError(f"xenblk sim guest printed no JSON: {out[:500]!r}")
    doc: Any = json.loads(out[start:])
    disks = doc.get("disks", [doc]) if isinstance(doc, dict) else doc
    if isinstance(disks, dict):
        disks = list(disks.values())
    if not disks:
        raise BenchError(f"xenblk sim guest reported no disks: {out[:500]!r}")
    d0: dict[str, Any] = disks[0]
    lat: dict[str, Any] = d0.get("latency_us") or d0.get("lat_us") or d0
    seconds = _num(d0, "seconds", "runtime_s", "elapsed_s", "runtime") or 0.0
    iops = sum(_num(d, "iops") or 0.0 for d in disks)
    mbps = sum(_num(d, "mbps", "mb_s", "MBps") or 0.0 for d in disks)
    nbytes = sum(int(_num(d, "bytes", "io_bytes") or 0) for d in disks)
    if not nbytes and seconds:
        nbytes = int(mbps * 1e6 * seconds)
    errors = sum(int(_num(d, "errors", "io_errors") or 0) for d in disks)
    mean = _num(lat, "mean")
    return Measure(
        extra={"mean_us": mean} if mean is not None else {},
        iops=iops,
        mbps=mbps,
        p50_us=_num(lat, "p50", "50"),
        p99_us=_num(lat, "p99", "99"),
        p999_us=_num(lat, "p99.9", "p999", "99.9"),
        bytes=nbytes,
        seconds=seconds,
        errors=errors,
    )
