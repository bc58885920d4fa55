"""The NBD export against `nbdkit file` on the same image, in the same run (issue 18: >= 0.8 x nbdkit).

    python -m bench.nbd [--size-mib 512] [--rounds 3] [--runtime 3] [--json]

Starts the simulated host and `xenblk serve` in a scratch directory, attaches a seeded raw image to a
guest domain (--wait=initwait: the disk is prepared, so its image is open and exported; no guest runs),
takes the socket from the backend's physical-device-path, and starts `nbdkit file` on the same image on
another socket. Then per case, rounds alternate xenblk and nbdkit (the best round of each side counts,
the least disturbed by the machine's other tenants): nbdcopy of the whole image to null: and from a
file into the export (MiB/s), and fio's nbd engine, 4 KiB random read and write at QD 32 (IOPS).
Prints each case's numbers and the ratio xenblk / nbdkit. Nothing is asserted: timings belong here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.hostile import XENBLK, Stack, _wait

TARGET = 0.8
MiB = 1 << 20


def _run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise SystemExit(f"bench.nbd: {' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def _nbdcopy(src: str, dst: str, nbytes: int) -> float:
    t = time.perf_counter()
    _run(["nbdcopy", src, dst])
    return nbytes / MiB / (time.perf_counter() - t)


def _fio(uri: str, rw: str, runtime: float, size: int) -> float:
    out = _run(["fio", "--name=nbd", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k", "--iodepth=32",
                f"--size={size}", f"--runtime={runtime:g}", "--time_based", "--output-format=json"])  # fmt: skip
    job = json.loads(out[out.index("{") :])["jobs"][0]  # the engine prints a line of its own first
    return float(job["read" if "read" in rw else "write"]["iops"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.nbd", description=__doc__)
    p.add_argument("--size-mib", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runtime", type=float, default=3.0, help="seconds per fio run")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    size = a.size_mib * MiB
    a.workdir.mkdir(parents=True, exist_ok=True)
    short = Path(tempfile.mkdtemp(prefix="xbn.", dir="/tmp"))  # unix socket paths: 108 bytes
    stack = Stack(short)
    kit: subprocess.Popen[bytes] | None = None
    rows: list[dict[str, object]] = []
    try:
        img = stack.images / "disk.raw"
        src = Path(tempfile.mkstemp(prefix="xbn-src.", dir=a.workdir)[1])
        with open(img, "wb") as f, open(src, "wb") as g:
            block = os.urandom(MiB)
            for i in range(a.size_mib):
                f.write(block)
                g.write(block[i % 4096 :] + block[: i % 4096])
        subprocess.run([*XENBLK, "--config", str(stack.config), "attach", "1", str(img), "--vdev", "xvdb",
                        "--sim", str(stack.sim), "--wait=initwait"], check=True, capture_output=True)  # fmt: skip
        env = {**os.environ, "XENSTORED_PATH": str(stack.sim / "xenstored" / "socket")}
        sock = subprocess.run(["xenstore-read", "/local/domain/0/backend/vbd3/1/51728/physical-device-path"],
                              check=True, capture_output=True, text=True, env=env).stdout.strip()  # fmt: skip
        kit_sock = short / "nbdkit.sock"
        kit = subprocess.Popen(["nbdkit", "-f", "-U", str(kit_sock), "file", str(img)], stderr=subprocess.DEVNULL)
        _wait(kit_sock.exists, kit, "nbdkit")  # type: ignore[arg-type]
        uris = {"xenblk": f"nbd+unix:///?socket={sock}", "nbdkit": f"nbd+unix:///?socket={kit_sock}"}
        cases: list[tuple[str, str, Callable[[str], float]]] = [
            ("nbdcopy read (whole image -> null:)", "MiB/s", lambda u: _nbdcopy(u, "null:", size)),
            ("nbdcopy write (file -> whole image)", "MiB/s", lambda u: _nbdcopy(str(src), u, size)),
            ("fio nbd randread 4k QD32", "IOPS", lambda u: _fio(u, "randread", a.runtime, size)),
            ("fio nbd randwrite 4k QD32", "IOPS", lambda u: _fio(u, "randwrite", a.runtime, size)),
        ]
        for name, unit, fn in cases:
            best = {"xenblk": 0.0, "nbdkit": 0.0}
            for _ in range(a.rounds):
                for side in ("xenblk", "nbdkit"):
                    best[side] = max(best[side], fn(uris[side]))
            ratio = best["xenblk"] / best["nbdkit"] if best["nbdkit"] else 0.0
            rows.append({"case": name, "unit": unit, **best, "ratio": round(ratio, 3)})
            print(f"{name:<40} xenblk {best['xenblk']:>10.0f} {unit:<5}  nbdkit {best['nbdkit']:>10.0f}  "
                  f"ratio {ratio:.2f}  {'met' if ratio >= TARGET else 'MISSED'} (>= {TARGET})", flush=True)  # fmt: skip
        src.unlink()
    finally:
        if kit is not None:
            kit.terminate()
            kit.wait(timeout=30)
        stack.close()
        shutil.rmtree(short, ignore_errors=True)
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.1f} {load[1]:.1f}; {os.cpu_count()} CPUs; image {a.size_mib} MiB, "
          f"best of {a.rounds} rounds per side")  # fmt: skip
    if a.json:
        json.dump({"cases": rows, "target": TARGET}, sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
