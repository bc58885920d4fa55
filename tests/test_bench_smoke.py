"""The benchmark harness in its tiny mode (1 s runs, 16 MiB images, 1 and 2 disks, 1 s idle
window), so it cannot rot: every part runs against the real CLIs and writes a well-formed
record of data really moved. Timings are never asserted: the machine is shared and noisy."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

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


TINY = ["--quick", "--runtime", "1", "--rounds", "1", "--size-mib", "16", "--scale-steps", "1,2", "--idle-seconds", "1"]


def _bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    """Run `python -m bench` in its tiny mode; the JSON document it wrote. Nothing may be left behind."""
    why = _stack_missing()
    if why:
        pytest.skip(why)
    results = tmp_path / "results"
    r = subprocess.run(
        [sys.executable, "-m", "bench", *args, *TINY, "--workdir", str(tmp_path), "--results-dir", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc: dict[str, Any] = json.loads((results / "latest.json").read_text())
    assert doc["meta"]["cpus"] and len(doc["meta"]["load_avg"]) == 3
    assert all(t["ok"] in (True, False, None) for t in doc["targets"])
    # The work directory (images, simulated host, logs) is removed and no child is left running.
    assert [p.name for p in tmp_path.iterdir()] == ["results"]
    assert not _processes_mentioning(str(tmp_path))
    return doc


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in argv:
            found.append(argv)
    return found


def _measured(side: dict[str, Any]) -> None:
    """A side really moved data: bytes, operations and latency percentiles, no errors."""
    assert side["bytes"] > 0 and side["iops"] > 0 and side["errors"] == 0
    assert all(isinstance(side["lat_us"][k], float) for k in ("p50", "p99", "p99.9"))


@pytest.mark.slow
def test_io_cases_write_well_formed_records(tmp_path: Path) -> None:
    cases = [CASE, "raw-direct/randwrite-4k-qd1", "qcow2-first/write-128k-qd8"]
    doc = _bench(tmp_path, "io", "--cases", ",".join(cases))
    assert [r["case"] for r in doc["cases"]] == cases
    for rec in doc["cases"]:
        assert rec["error"] is None, rec["error"]
        _measured(rec["xenblk"])
        _measured(rec["fio"])
        assert rec["ratio"] == round(rec["xenblk_iops"] / rec["fio_iops"], 3)
        assert set(rec["xenblk_lat_us"]) == set(rec["fio_lat_us"]) == {"p50", "p99", "p99.9"}
        assert rec["xenblk"]["cpu_s_per_gib"] is not None
    first = doc["cases"][2]  # qcow2: also measured on the raw twin through xenblk, in the same rounds
    _measured(first["xenblk_raw"])
    assert first["vs_raw"] == round(first["xenblk_iops"] / first["xenblk_raw"]["iops"], 3)
    direct = doc["cases"][1]
    assert direct["xenblk"]["bytes"] % 4096 == 0 and direct["fio"]["bytes"] % 4096 == 0


@pytest.mark.slow
def test_scrape_profile_and_scale_parts_run(tmp_path: Path) -> None:
    doc = _bench(tmp_path, "scrape")
    s = doc["scrape"]
    assert len(s["none_iops"]) == len(s["scrape_iops"]) == 2 and s["scrapes"] >= 2
    assert isinstance(s["measurable_loss"], bool)

    doc = _bench(tmp_path, "profile")
    p = doc["profile"]
    for op in ("read", "write"):
        _measured(p[f"qd1_{op}"]["guest"])
        # The data plane's own clocks saw the requests.
        assert p[f"qd1_{op}"]["daemon_request_mean_us"] > 0

    doc = _bench(tmp_path, "scale")
    steps = doc["scale"]["connect"]
    assert sorted(steps) == ["1", "2"] and doc["scale"]["error"] is None
    assert steps["2"]["disks"] == 2 and steps["2"]["rss_mib"] > 0
    assert doc["scale"]["idle_cpu_percent"] is not None
