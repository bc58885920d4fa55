"""A tiny run of the benchmark harness (one 1-second case): the record it writes is
well-formed. Timings are never asserted: the machine is shared and noisy."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CASE = "raw-pagecache/randread-4k-qd1"


def _stack_missing() -> str | None:
    if shutil.which("fio") is None:
        return "fio is not installed"
    for mod in ("xenblk.sim.host", "xenblk.sim.guest", "xenblk.commands.serve", "xenblk.commands.attach"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not there yet"
    return None


def test_targets_and_table_from_a_synthetic_record() -> None:
    from bench import report
    from bench.cases import all_cases
    from bench.iobench import make_record
    from bench.results import Measure

    case = next(c for c in all_cases() if c.name == CASE)
    m = Measure(iops=10.0, mbps=0.04, p50_us=5.0, p99_us=9.0, p999_us=12.0, bytes=40960, seconds=1.0)
    rec = make_record(case, m, m)
    assert rec["ratio"] == 1.0
    assert CASE in report.table([rec])
    lines = [t.line() for t in report.targets([rec], None)]
    assert any(line.startswith("PASS") and "QD1 p50" in line for line in lines)
    assert all(line.split()[0] in ("PASS", "MISS", "SKIP") for line in lines)


@pytest.mark.slow
def test_one_second_case_writes_a_well_formed_record(tmp_path: Path) -> None:
    why = _stack_missing()
    if why:
        pytest.skip(why)
    results = tmp_path / "results"
    r = subprocess.run(
        [sys.executable, "-m", "bench", "io", "--cases", CASE, "--runtime", "1", "--size-mib", "16",
         "--workdir", str(tmp_path), "--results-dir", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((results / "latest.json").read_text())
    assert set(doc) >= {"meta", "cases", "targets"}
    [rec] = doc["cases"]
    assert rec["case"] == CASE and rec["error"] is None
    for side in ("xenblk", "fio"):
        assert isinstance(rec[f"{side}_iops"], float)
        assert set(rec[f"{side}_lat_us"]) == {"p50", "p99", "p99.9"}
    assert isinstance(rec["ratio"], float)
    assert all(t["ok"] in (True, False, None) for t in doc["targets"])
    # Nothing is left behind: the work directory is removed.
    assert [p.name for p in tmp_path.iterdir()] == ["results"]
