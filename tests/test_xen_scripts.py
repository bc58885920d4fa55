"""Fast checks of the real-Xen harness (tests/xen/, bench/xen_bench.py) that need no VM.

The scripts themselves only run under `make xen-test` / `make xen-bench` (a booted Xen);
here they must at least parse (bash -n, busybox sh -n for the guest payload, shellcheck
when installed), and the bench table must come out of real fio JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bench import xen_bench

XEN = Path(__file__).resolve().parent / "xen"
BASH_SCRIPTS = [
    "run.sh",
    "dom0-all.sh",
    "dom0-test.sh",
    "dom0-restart.sh",
    "dom0-bench.sh",
    "dom0-lib.sh",
    "lvm-storage.sh",
]


@pytest.mark.parametrize("name", BASH_SCRIPTS)
def test_bash_syntax(name: str) -> None:
    r = subprocess.run(["bash", "-n", str(XEN / name)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    "name", ["run.sh", "dom0-all.sh", "dom0-test.sh", "dom0-restart.sh", "dom0-bench.sh", "lvm-storage.sh"]
)
def test_entry_scripts_are_executable(name: str) -> None:
    assert os.access(XEN / name, os.X_OK), f"tests/xen/{name} is run directly and must be executable"


def test_guest_payload_syntax() -> None:
    sh = shutil.which("busybox")
    cmd = [sh, "sh", "-n"] if sh else ["sh", "-n"]
    r = subprocess.run([*cmd, str(XEN / "guest-payload.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck not installed")
def test_shellcheck() -> None:
    names = [*BASH_SCRIPTS, "guest-payload.sh"]
    r = subprocess.run(
        ["shellcheck", "-S", "error", "-x", *[str(XEN / n) for n in names]], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout


def _fio_json(tmp_path: Path, rw: str, bs: str) -> str:
    f = tmp_path / "fio.img"
    r = subprocess.run(
        ["fio", "--name=t", f"--filename={f}", "--size=4M", f"--rw={rw}", f"--bs={bs}", "--ioengine=psync",
         "--output-format=json", "--runtime=1", "--time_based=0"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    json.loads(r.stdout)
    return r.stdout.replace("\n", "")


@pytest.mark.skipif(not shutil.which("fio"), reason="fio not installed")
def test_bench_table_from_real_fio(tmp_path: Path) -> None:
    lines = ["GUEST ready mode=bench"]
    for disk in ("xvdb", "xvdc", "xvdd"):
        lines.append(f"GUEST-JSON {disk} randwrite4k-qd1 {_fio_json(tmp_path, 'randwrite', '4k')}")
        # fio's progress output may precede the marker on the console line
        lines.append(f"Jobs: 1 (f=1): [r(1)][50.0%]GUEST-JSON {disk} seqread1m {_fio_json(tmp_path, 'read', '1M')}")
    console = tmp_path / "console.txt"
    console.write_text("\n".join(lines) + "\n")
    res = xen_bench.parse_console(console.read_text())
    assert set(res) == {"randwrite4k-qd1", "seqread1m"}
    for job in res.values():
        assert set(job) == {"blkback", "qdisk", "xenblk"}
        for r in job.values():
            assert r["iops"] > 0 and r["mbps"] > 0 and r["p99_us"] >= r["p50_us"] > 0
    out = tmp_path / "results"
    assert xen_bench.main([str(console), "--results-dir", str(out), "--runtime", "1"]) == 0
    txt = next(out.glob("xen-*.txt")).read_text()
    assert "xenblk/blkback IOPS" in txt and "randwrite4k-qd1" in txt
    doc = json.loads(next(out.glob("xen-*.json")).read_text())
    assert doc["results"]["seqread1m"]["xenblk"]["mbps"] > 0


def test_bench_no_results_is_an_error(tmp_path: Path) -> None:
    console = tmp_path / "console.txt"
    console.write_text("GUEST FAIL: xvdd: disks missing after 600s\n")
    assert xen_bench.main([str(console), "--results-dir", str(tmp_path / "r")]) == 1
