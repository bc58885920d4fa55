"""`make demo` (python -m xenblk.demo) runs end to end and shows what it promises."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_runs_end_to_end() -> None:
    r = subprocess.run([sys.executable, "-m", "xenblk.demo"], capture_output=True, text=True, timeout=280)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    # the device table while the guest runs, both disks connected with 2 queues and ring order 2
    assert re.search(r"1 xvdb\s+Connected\s+qcow2\s+2\s+2", out), out
    assert re.search(r"1 xvdc\s+Connected\s+raw\s+2\s+2", out), out
    # the guest's verified results: IOPS and latency percentiles, no I/O or verify errors
    rows = re.findall(r"^(xvd[bc])\s+(\d+)\s+[\d.]+\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$", out, re.M)
    assert {r[0] for r in rows} == {"xvdb", "xvdc"}, out
    assert all(int(r[1]) > 0 and r[5] == "0" and r[6] == "0" for r in rows), rows
    assert "Prometheus endpoint: http://127.0.0.1:" in out
    assert "No errors were found on the image." in out
