"""The `make xen-bench` table: fio results from a real-Xen guest's console, side by side.

python -m bench.xen_bench CONSOLE [--results-dir DIR] [--runtime S]

CONSOLE is the guest console kept by tests/xen/dom0-bench.sh: one
`GUEST-JSON <disk> <job> <fio json>` line per fio run. The disks are xvdb = in-kernel
blkback, xvdc = QEMU qdisk, xvdd = xenblk, all on identical images in one boot, so the
ratios are what to track (software emulation makes absolute numbers meaningless).
Writes xen-<date>.txt and xen-<date>.json to the results directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

BACKENDS = {"xvdb": "blkback", "xvdc": "qdisk", "xvdd": "xenblk"}
JOBS = ["randread4k-qd1", "randread4k-qd32", "randwrite4k-qd1", "randwrite4k-qd32", "seqread1m", "seqwrite1m"]
RESULTS = Path(__file__).resolve().parent / "results"


def summarize(fio: dict[str, Any]) -> dict[str, float]:
    """IOPS, MB/s and completion-latency p50/p99 (µs) of a one-job fio JSON result."""
    job = fio["jobs"][0]
    side = job["write"] if job["write"]["io_bytes"] > job["read"]["io_bytes"] else job["read"]
    pct = side.get("clat_ns", {}).get("percentile", {})
    return {
        "iops": float(side["iops"]),
        "mbps": float(side["bw_bytes"]) / 1e6,
        "p50_us": float(pct.get("50.000000", 0)) / 1000,
        "p99_us": float(pct.get("99.000000", 0)) / 1000,
        "errors": float(job.get("error", 0)),
    }


def parse_console(text: str) -> dict[str, dict[str, dict[str, float]]]:
    """{job: {backend: summary}} from the GUEST-JSON lines."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for line in text.splitlines():
        # fio's progress output (no newline) may precede the marker on the same console line
        at = line.find("GUEST-JSON ")
        if at < 0:
            continue
        _, disk, job, payload = line[at:].split(" ", 3)
        # fio may print warnings before its JSON
        payload = payload[payload.index("{") :]
        out.setdefault(job, {})[BACKENDS.get(disk, disk)] = summarize(json.loads(payload))
    return out


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    head = f"{'job':<17}{'backend':<9}{'IOPS':>9}{'MB/s':>9}{'p50 us':>10}{'p99 us':>10}"
    lines = [head, "-" * len(head)]
    for job in [j for j in JOBS if j in results] + [j for j in results if j not in JOBS]:
        for be in ("blkback", "qdisk", "xenblk"):
            r = results[job].get(be)
            if r:
                lines.append(
                    f"{job:<17}{be:<9}{r['iops']:>9.0f}{r['mbps']:>9.2f}{r['p50_us']:>10.0f}{r['p99_us']:>10.0f}"
                )
    lines += ["", f"{'job':<17}{'xenblk/blkback IOPS':>21}{'xenblk/qdisk IOPS':>19}{'p99 vs blkback':>16}"]
    for job in [j for j in JOBS if j in results]:
        r = results[job]
        x, k, q = r.get("xenblk"), r.get("blkback"), r.get("qdisk")
        lines.append(
            f"{job:<17}{ratio(x['iops'], k['iops']) if x and k else '-':>21}"
            f"{ratio(x['iops'], q['iops']) if x and q else '-':>19}"
            f"{ratio(x['p99_us'], k['p99_us']) if x and k else '-':>16}"
        )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"host": platform.node(), "kernel": platform.release(), "cpu": cpu, "cores": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.xen_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("console", type=Path)
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--runtime", type=float, default=None, help="seconds per job (recorded only)")
    args = ap.parse_args(argv)
    results = parse_console(args.console.read_text(errors="replace"))
    if not results:
        print(f"xen-bench: no GUEST-JSON lines in {args.console}", file=sys.stderr)
        return 1
    date = time.strftime("%Y-%m-%d", time.gmtime())
    m = machine()
    title = (
        f"xen-bench {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: Xen 4.17 under QEMU TCG on "
        f"{m['cpu'] or 'unknown CPU'} ({m['cores']} cores); guest: 2 vCPUs, stock blkfront; "
        f"{args.runtime or '?'} s per job; images in Dom0 tmpfs"
    )
    text = f"{title}\n\n{table(results)}\n"
    print(text)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"xen-{date}.txt").write_text(text)
    doc = {"date": date, "machine": m, "runtime_s": args.runtime, "backends": BACKENDS, "results": results}
    (args.results_dir / f"xen-{date}.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"written: {args.results_dir / f'xen-{date}.txt'} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
