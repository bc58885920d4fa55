"""python -m bench [all|io|scrape|profile|scale|list] [--quick] [--cases PATTERNS] [--runtime S]"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from bench import cases as casemod
from bench import report
from bench.procs import BenchError

MIB = 1 << 20


def log(msg: str) -> None:
    print(msg, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("what", nargs="?", default="all", choices=["all", "io", "scrape", "scale", "profile", "list"],
                   help="all (default: io, scrape, profile, scale; with --cases only io), io (xenblk vs fio), "
                   "scrape (metrics scrape every 1 s vs none), profile (where a 4 KiB request's time goes), "
                   "scale, list (case names)")  # fmt: skip
    p.add_argument(
        "--quick", action="store_true", help="short run: fewer cases, 1 s each, 256 MiB images, 10 s idle window"
    )
    p.add_argument("--cases", default=None, help="comma-separated globs or substrings of case names (see `list`)")
    p.add_argument(
        "--runtime", type=float, default=None, help="seconds per case and side (default $BENCH_RUNTIME or 2, --quick 1)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="xenblk/fio rounds per case, alternating; the best round of each side counts (default $BENCH_ROUNDS or 2,"
        " --quick 1)",
    )
    p.add_argument(
        "--scrape-rounds", type=int, default=3, help="rounds of each kind (no scrape, scrape) in `scrape` (default 3)"
    )
    p.add_argument(
        "--size-mib", type=int, default=None, help="image size in MiB (default $BENCH_SIZE_MIB or 1024, --quick 256)"
    )
    p.add_argument(
        "--idle-seconds",
        type=float,
        default=None,
        help="idle CPU window in seconds (default $BENCH_IDLE_SECONDS or 60, --quick 10)",
    )
    p.add_argument("--scale-steps", default="1,64,256", help="disk counts to connect (8 per guest)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                   help="where images and the simulated host live; must not be tmpfs (O_DIRECT)")  # fmt: skip
    p.add_argument("--results-dir", type=Path, default=report.RESULTS, help="where <timestamp>.json and latest.json go")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, images) afterwards")
    a = p.parse_args(argv)
    a.runtime = _default(a.runtime, "BENCH_RUNTIME", 1.0 if a.quick else 2.0)
    a.rounds = int(_default(a.rounds, "BENCH_ROUNDS", 1 if a.quick else 2))
    a.size_mib = int(_default(a.size_mib, "BENCH_SIZE_MIB", 256 if a.quick else 1024))
    a.idle_seconds = _default(a.idle_seconds, "BENCH_IDLE_SECONDS", 10.0 if a.quick else 60.0)
    return a


def _default(given: float | None, env: str, fallback: float) -> float:
    """The command-line value, else the environment variable (for `make bench`), else the default."""
    if given is not None:
        return given
    raw = os.environ.get(env, "").strip()
    if not raw:
        return fallback
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"python -m bench: {env}={raw!r} is not a number") from None


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.what == "list":
        for c in casemod.select(a.cases, a.quick):
            print(c.name)
        return 0
    signal.signal(signal.SIGTERM, _on_term)
    a.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="xenblk-bench.", dir=a.workdir))
    t0 = time.monotonic()
    try:
        return run_bench(a, work)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        if a.keep:
            log(f"\nbench: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        log(f"bench: {time.monotonic() - t0:.0f}s in all")


def parts_of(a: argparse.Namespace) -> list[str]:
    """`all` is every part; with --cases only the I/O cases (the rest do not take a case filter)."""
    if a.what != "all":
        return [a.what]
    return ["io"] if a.cases else ["io", "scrape", "profile", "scale"]


def _part(name: str, fn: Any, errors: dict[str, str]) -> Any:
    """Run one part; a failure is recorded and the other parts still run."""
    try:
        return fn()
    except BenchError as e:
        errors[name] = str(e)
        log(f"  {name} FAILED: {e}")
        return None


def run_bench(a: argparse.Namespace, work: Path) -> int:
    parts = parts_of(a)
    records: list[dict[str, Any]] = []
    scale: dict[str, Any] | None = None
    scrape: dict[str, Any] | None = None
    prof: dict[str, Any] | None = None
    errors: dict[str, str] = {}
    load0 = os.getloadavg()
    log(f"bench: {', '.join(parts)}; load average {' '.join(f'{x:.2f}' for x in load0)} on {os.cpu_count()} CPUs")
    if "io" in parts:
        selected = casemod.select(a.cases, a.quick)
        if not selected:
            raise BenchError(f"no case matches {a.cases!r} (python -m bench list)")
        from bench.iobench import IoBench

        log(f"bench: {len(selected)} cases, {a.rounds} x {a.runtime:g}s each side, {a.size_mib} MiB images in {work}")
        records = IoBench(work / "io", a.runtime, a.size_mib * MIB, log, a.rounds).run(selected)
    if "scrape" in parts:
        from bench.scrape import run_scrape

        # A few scrapes per round: at least 3 s each unless --quick.
        runtime, rounds = (a.runtime, 2) if a.quick else (max(a.runtime, 3.0), a.scrape_rounds)
        scrape = _part("scrape", lambda: run_scrape(work / "scrape", runtime, a.size_mib * MIB, rounds, log), errors)
    if "profile" in parts:
        from bench.profile import run_profile

        runtime = a.runtime if a.quick else max(a.runtime, 3.0)
        prof = _part("profile", lambda: run_profile(work / "profile", runtime, a.size_mib * MIB, log), errors)
    if "scale" in parts:
        from bench.scale import run_scale

        steps = [int(s) for s in a.scale_steps.split(",") if s.strip()]
        scale = run_scale(work / "scale", steps, a.idle_seconds, log)
        if scale.get("error"):
            errors["scale"] = scale["error"]
    tgts = report.targets(records, scale, scrape)
    meta = report.meta({k: str(v) for k, v in vars(a).items()})
    meta["load_avg_start"] = load0
    doc = {
        "meta": meta,
        "cases": records,
        "scrape": scrape,
        "profile": prof,
        "scale": scale,
        "targets": [t.__dict__ for t in tgts],
        "errors": errors,
    }
    path = report.write(doc, a.results_dir)
    if records:
        log("\n" + report.table(records))
    if scrape:
        from bench.scrape import scrape_line

        log("\n" + scrape_line(scrape))
    if scale:
        from bench.scale import scale_table

        log("\n" + scale_table(scale))
    log("\nTargets (printed, not asserted):")
    for t in tgts:
        log("  " + t.line())
    log(f"\nbench: load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    log(f"bench: results in {path} and {a.results_dir / 'latest.json'}")
    failed = [r["case"] for r in records if r.get("error")] + sorted(errors)
    if failed:
        log(f"bench: {len(failed)} failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
