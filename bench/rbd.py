"""xenblk serving a Ceph RBD image against fio's own `rbd` engine on the same image (issue 19:
xenblk >= 0.9 x fio-rbd).

    python -m bench.rbd [--runtime 5] [--rounds 2] [--size-mib 256] [--cases randread-4k-qd1,...] [--json]

Starts a single-node Ceph cluster on loopback (tests/fixtures/ceph.py: one mon, one mgr, one
BlueStore OSD on a sparse file, pool size 1), the simulated host and `xenblk serve` with an
[rbd] config, creates and fills one image, then per case and round, alternating: the simulated
guest's workload through the ring on `rbd:POOL/IMAGE` (attached for the run, detached after, so
fio can take the image's lock), then fio with `ioengine=rbd` (librbd, same rw, block size,
queue depth, runtime; librbd's cache off on both sides). The best round of each side counts.
Prints IOPS, MB/s, p50 latencies and the ratio; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.fio import parse_fio
from tests.fixtures.ceph import CephCluster, missing_binaries
from tests.fixtures.e2e import Stack, run_stack

TARGET = 0.9
MiB = 1 << 20
# name: (sim guest / fio rw, block size, queue depth)
CASES: dict[str, tuple[str, str, int]] = {
    "randread-4k-qd1": ("randread", "4k", 1),
    "randread-4k-qd32": ("randread", "4k", 32),
    "randwrite-4k-qd1": ("randwrite", "4k", 1),
    "randwrite-4k-qd32": ("randwrite", "4k", 32),
    "read-1m-qd16": ("read", "1M", 16),
    "write-1m-qd16": ("write", "1M", 16),
}


def xenblk_side(stack: Stack, image: str, rw: str, bs: str, qd: int, runtime: float, domid: int) -> dict[str, Any]:
    stack.attach(domid, image, "xvdb")
    try:
        args = ["--rw", rw, "--bs", bs, "--iodepth", str(qd), "--runtime", f"{runtime:g}", "--ring-order", "2"]
        if bs != "4k":
            args.append("--indirect")  # 1 MiB as one INDIRECT request, as Linux blkfront sends it
        rc, result = stack.guest(domid, *args, timeout=runtime + 300)
        if rc != 0 or not isinstance(result, dict):
            raise SystemExit(f"bench.rbd: the simulated guest failed ({rc}): {result}")
        d = result["disks"][0]
        return {"iops": float(d["iops"]), "mbps": float(d["mbps"]), "p50_us": d["latency_us"]["p50"]}
    finally:
        stack.xenblk("detach", str(domid), "xvdb", "--force", "--sim", str(stack.sim))


def fio_side(cluster: CephCluster, name: str, rw: str, bs: str, qd: int, runtime: float) -> dict[str, Any]:
    argv = ["fio", "--name=ref", "--ioengine=rbd", "--clientname=admin", f"--pool={cluster.pool}",
            f"--rbdname={name}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", f"--runtime={max(1, round(runtime))}",
            "--time_based=1", "--norandommap=1", "--randrepeat=0", "--lat_percentiles=1",
            "--percentile_list=50:99:99.9", "--output-format=json"]  # fmt: skip
    env = {**os.environ, "CEPH_CONF": str(cluster.conf), "CEPH_ARGS": "--rbd_cache=false"}
    r = subprocess.run(argv, capture_output=True, text=True, timeout=runtime + 300, env=env)
    if r.returncode != 0:
        raise SystemExit(f"bench.rbd: fio failed ({r.returncode}): {r.stderr.strip()[-1000:]}")
    m = parse_fio(r.stdout)
    return {"iops": m.iops, "mbps": m.mbps, "p50_us": m.p50_us}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.rbd", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=float(os.environ.get("BENCH_RUNTIME") or 3))
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS") or 2))
    ap.add_argument("--size-mib", type=int, default=256, help="image size (the OSD's sparse file is 3 GiB)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    names = [c for c in a.cases.split(",") if c]
    if unknown := [c for c in names if c not in CASES]:
        ap.error(f"unknown cases: {', '.join(unknown)}")
    if missing := missing_binaries():
        print(f"bench.rbd: SKIPPED: {', '.join(missing)} not installed (ceph-mon ceph-osd ceph-mgr ceph-common)")
        return 0
    work = Path(tempfile.mkdtemp(prefix="xb-rbd-"))
    cluster = CephCluster(work / "ceph")
    records = []
    try:
        (work / "ceph").mkdir()
        cluster.start()
        cluster.create_image("bench", f"{a.size_mib}M")
        # Filled once, so reads read data rather than holes librbd answers without asking an OSD.
        cluster.run("rbd", "bench", "--io-type", "write", "--io-size", "4M", "--io-pattern", "seq",
                    "--io-total", f"{a.size_mib}M", f"{cluster.pool}/bench", timeout=600)  # fmt: skip
        sim = Path(tempfile.mkdtemp(prefix="xbb-"))
        try:
            with run_stack(work / "stack", sim, cluster.client_config()) as stack:
                image = f"rbd:{cluster.pool}/bench"
                domid = 1
                for name in names:
                    rw, bs, qd = CASES[name]
                    xs, fs = [], []
                    for _ in range(max(1, a.rounds)):
                        xs.append(xenblk_side(stack, image, rw, bs, qd, a.runtime, domid))
                        domid += 1
                        fs.append(fio_side(cluster, "bench", rw, bs, qd, a.runtime))
                    x = max(xs, key=lambda m: m["iops"])
                    f = max(fs, key=lambda m: m["iops"])
                    ratio = x["iops"] / f["iops"] if f["iops"] else 0.0
                    rec = {"case": f"rbd {name}", "xenblk": x, "fio_rbd": f, "ratio": round(ratio, 3),
                           "meets_target": ratio >= TARGET, "rounds": {"xenblk": xs, "fio_rbd": fs},
                           "load_avg": os.getloadavg()}  # fmt: skip
                    records.append(rec)
                    if not a.json:
                        print(f"rbd {name:<18} xenblk {x['iops']:>8.0f} IOPS {x['mbps']:>7.1f} MB/s p50 "
                              f"{x['p50_us']:>7.0f} us | fio-rbd {f['iops']:>8.0f} IOPS {f['mbps']:>7.1f} MB/s p50 "
                              f"{f['p50_us'] or 0:>7.0f} us | xenblk/fio {ratio:.2f} "
                              f"({'ok' if ratio >= TARGET else 'BELOW'} target {TARGET})", flush=True)  # fmt: skip
        finally:
            shutil.rmtree(sim, ignore_errors=True)
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    if a.json:
        print(json.dumps({"target_ratio": TARGET, "cases": records}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
