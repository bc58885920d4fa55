"""QoS (issue 22): a limit is what it says, and a limited noisy neighbour cannot hurt a good guest.

    python -m bench.qos [--runtime 10] [--rounds 2] [--json]

Starts the simulated host and `xenblk serve` in a scratch directory, one disk for a good guest
(domain 2) and one for a flooding guest (domain 1), and measures, each against a reference taken in
the same run:
  - the good guest's random-read IOPS alone, next to the flooder unlimited, and next to the flooder
    limited to a tenth of the good guest's alone figure (target: >= 0.9 x alone when limited);
  - accuracy: a limited guest's rate over --runtime, as measured on its own side, against its limit, at
    IOPS limits of 1/20 and 1/5 of the unlimited rate (4 KiB) and a byte limit with 64 KiB reads (target:
    within 5 %);
  - a live change: the seconds from `xenblk qos` returning to the first 0.1 s window in which the daemon
    answered at more than twice the old limit (target: within 1 s).
Nothing is asserted (tests/test_qos.py checks the outcomes with bounds a slow machine cannot break).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.hostile import XENBLK, _wait

TARGET_NEIGHBOUR = 0.9
TARGET_ACCURACY = 0.05
TARGET_LIVE_S = 1.0
MiB = 1 << 20


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    def __init__(self, work: Path) -> None:
        self.sim, self.images, self.config = work / "sim", work / "images", work / "xenblk.toml"
        self.images.mkdir()
        run = work / "run"
        port = _free_port()
        self.metrics = f"http://127.0.0.1:{port}/metrics"
        self.config.write_text(
            f'[daemon]\nrun_dir = "{run}"\nstate_dir = "{work}/state"\n[storage]\nallowed_dirs = ["{self.images}"]\n'
            f'[metrics]\nlisten = "127.0.0.1:{port}"\n[log]\nformat = "json"\nlevel = "warning"\n'
        )
        self.host = subprocess.Popen([*XENBLK, "sim", "host", "--dir", str(self.sim)], stdout=subprocess.DEVNULL,
                                     stderr=open(work / "host.log", "wb"))  # fmt: skip  # noqa: SIM115
        self.serve: subprocess.Popen[bytes] | None = None
        _wait(lambda: (self.sim / "host.json").exists(), self.host, "xenblk sim host")
        self.serve = subprocess.Popen([*XENBLK, "--config", str(self.config), "serve", "--sim", str(self.sim)],
                                      stdout=open(work / "serve.log", "wb"), stderr=subprocess.STDOUT)  # fmt: skip  # noqa: SIM115
        _wait(lambda: (run / "control.sock").exists(), self.serve, "xenblk serve")

    def xenblk(self, *args: str) -> None:
        subprocess.run([*XENBLK, "--config", str(self.config), *args], check=True, capture_output=True)

    def attach(self, domid: int, size: int) -> None:
        img = self.images / f"dom{domid}.raw"
        with open(img, "wb") as f:
            f.truncate(size)
        self.xenblk("attach", str(domid), str(img), "--vdev", "xvdb", "--sim", str(self.sim))

    def qos(self, domid: int, *limits: str) -> None:
        self.xenblk("qos", str(domid), "xvdb", "--clear", *limits, "--sim", str(self.sim))

    def guest(self, domid: int, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([*XENBLK, "sim", "guest", "--dir", str(self.sim), "--domid", str(domid), "--json",
                                 *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip

    def served(self, domid: int) -> int:
        text = urllib.request.urlopen(self.metrics, timeout=30).read().decode()
        return sum(int(float(v)) for v in re.findall(rf'^xenblk_requests_total\{{domid="{domid}",[^}}]*\}} (\S+)$',
                                                     text, re.M))  # fmt: skip

    def close(self) -> None:
        for p in (self.serve, self.host):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def _disk(proc: subprocess.Popen[str], what: str) -> dict[str, Any]:
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"bench.qos: {what} failed ({proc.returncode}): {err.strip() or out.strip()}")
    disk: dict[str, Any] = json.loads(out)["disks"][0]
    return disk


def _reads(runtime: float, bs: str = "4k", depth: int = 16) -> list[str]:
    return ["--rw", "randread", "--bs", bs, "--iodepth", str(depth), "--runtime", f"{runtime:g}"]


def neighbours(stack: Stack, runtime: float, rounds: int) -> dict[str, Any]:
    """The good guest alone, next to the flooder unlimited, next to it limited; the best round of each."""

    def good_next_to(flooder_limit: int | None) -> float:
        stack.qos(1, *(["--iops-limit", str(flooder_limit)] if flooder_limit else []))
        bad = stack.guest(1, *_reads(runtime + 1.5, depth=32))
        time.sleep(0.5)  # the flooder is connected and flooding before the good guest starts
        iops = float(_disk(stack.guest(2, *_reads(runtime)), "the good guest")["iops"])
        _disk(bad, "the flooder")
        return iops

    alone, unlimited, limited = [], [], []
    flooder_limit = 0
    for _ in range(rounds):
        alone.append(float(_disk(stack.guest(2, *_reads(runtime)), "the good guest alone")["iops"]))
        unlimited.append(good_next_to(None))
        flooder_limit = max(10, int(max(alone) / 10))
        limited.append(good_next_to(flooder_limit))
    a = max(alone)
    return {"good_alone_iops": a, "good_next_to_unlimited_iops": max(unlimited),
            "good_next_to_limited_iops": max(limited), "flooder_limit_iops": flooder_limit,
            "ratio_unlimited": round(max(unlimited) / a, 3), "ratio_limited": round(max(limited) / a, 3),
            "meets_target": max(limited) / a >= TARGET_NEIGHBOUR}  # fmt: skip


def accuracy(stack: Stack, runtime: float, free_iops: float, free_mbps: float) -> list[dict[str, Any]]:
    """A guest limited in IOPS (two rates) and in bytes: its own measured rate against the limit."""
    out = []
    cases = [("iops", max(10, int(free_iops / 20)), "4k"), ("iops", max(10, int(free_iops / 5)), "4k"),
             ("bps", max(MiB, int(free_mbps * 1e6 / 5)), "64k")]  # fmt: skip
    for unit, limit, bs in cases:
        # the default burst, a tenth of the rate: over the run it adds 0.1 s worth (1 % of 10 s)
        stack.qos(2, f"--{unit}-limit", str(limit))
        d = _disk(stack.guest(2, *_reads(runtime, bs=bs)), f"the guest limited to {limit} {unit}")
        rate = d["ios"] / d["seconds"] if unit == "iops" else d["bytes"] / d["seconds"]
        ok = abs(rate / limit - 1) <= TARGET_ACCURACY
        out.append({"unit": unit, "bs": bs, "limit": limit, "measured": round(rate, 1),
                    "ratio": round(rate / limit, 4), "within_5pct": ok})  # fmt: skip
    stack.qos(2)
    return out


def live_change(stack: Stack, free_iops: float) -> dict[str, Any]:
    """Seconds from `xenblk qos` raising a limit to the daemon answering faster than the old limit allows."""
    old = max(10, int(free_iops / 20))
    new = max(4 * old, int(free_iops / 2))
    stack.qos(2, "--iops-limit", str(old))
    g = stack.guest(2, "--rw", "randread", "--iodepth", "16", "--until-stopped")
    try:
        n = stack.served(2)
        deadline = time.monotonic() + 60
        while stack.served(2) < n + old and time.monotonic() < deadline:  # connected and held to the old limit
            time.sleep(0.1)
        stack.qos(2, "--iops-limit", str(new))
        t0 = time.monotonic()
        seen = None
        prev_n, prev_t = stack.served(2), time.monotonic()
        while time.monotonic() - t0 < 10:
            time.sleep(0.1)
            cur_n, cur_t = stack.served(2), time.monotonic()
            if (cur_n - prev_n) / (cur_t - prev_t) > 2 * old:
                seen = cur_t - t0
                break
            prev_n, prev_t = cur_n, cur_t
    finally:
        g.terminate()
        g.communicate(timeout=600)
    stack.qos(2)
    return {"old_limit": old, "new_limit": new, "applied_after_s": None if seen is None else round(seen, 3),
            "meets_target": seen is not None and seen <= TARGET_LIVE_S}  # fmt: skip


@contextlib.contextmanager
def _workdir(given: str | None) -> Iterator[Path]:
    if given:
        p = Path(given)
        p.mkdir(parents=True, exist_ok=True)
        yield Path(tempfile.mkdtemp(prefix="qos-", dir=p))
    else:
        with tempfile.TemporaryDirectory(prefix="xb-qos-") as d:
            yield Path(d)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.qos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=10.0, help="seconds per measured run (default 10)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the neighbour runs, best kept (default 2)")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one, removed)")
    ap.add_argument("--json", action="store_true", help="print the record as JSON")
    a = ap.parse_args(argv)
    with _workdir(a.workdir) as work:
        stack = Stack(work)
        try:
            stack.attach(1, 64 * MiB)
            stack.attach(2, 64 * MiB)
            _disk(stack.guest(2, *_reads(1.0)), "warm-up")  # first connects, page cache
            free = _disk(stack.guest(2, *_reads(a.runtime)), "the guest unlimited")
            free64 = _disk(stack.guest(2, *_reads(a.runtime, bs="64k")), "the guest unlimited, 64 KiB")
            rec: dict[str, Any] = {
                "neighbours": neighbours(stack, a.runtime, max(1, a.rounds)),
                "accuracy": accuracy(stack, a.runtime, float(free["iops"]), float(free64["mbps"])),
                "live_change": live_change(stack, float(free["iops"])),
                "unlimited_iops": free["iops"],
            }
        finally:
            stack.close()
    if a.json:
        print(json.dumps(rec, indent=2))
        return 0
    n = rec["neighbours"]
    print(f"good guest alone {n['good_alone_iops']:.0f} IOPS; next to a flooder unlimited "
          f"{n['good_next_to_unlimited_iops']:.0f} (ratio {n['ratio_unlimited']:.2f}); next to it limited to "
          f"{n['flooder_limit_iops']} IOPS {n['good_next_to_limited_iops']:.0f} (ratio {n['ratio_limited']:.2f}, "
          f"{'ok' if n['meets_target'] else 'BELOW'} target {TARGET_NEIGHBOUR})")  # fmt: skip
    for c in rec["accuracy"]:
        print(f"limit {c['limit']} {c['unit']} ({c['bs']} reads, {a.runtime:g} s): measured {c['measured']:.0f}, "
              f"ratio {c['ratio']:.3f} ({'ok' if c['within_5pct'] else 'OUTSIDE'} +-5 %)")  # fmt: skip
    lc = rec["live_change"]
    print(f"live change {lc['old_limit']} -> {lc['new_limit']} IOPS: applied after {lc['applied_after_s']} s "
          f"({'ok' if lc['meets_target'] else 'ABOVE'} target {TARGET_LIVE_S} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
