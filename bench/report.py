"""The printed table, the PASS/MISS target lines, and the JSON written to bench/results/."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1 << 20


def _f(v: float | None, fmt: str = ".0f") -> str:
    return "-" if v is None else format(v, fmt)


def table(records: list[dict[str, Any]]) -> str:
    head = (
        f"{'case':<32} {'xenblk IOPS':>11} {'us/IO':>6} {'MB/s':>7} {'p50':>6} {'p99':>6} {'p99.9':>7} {'CPU s/GiB':>9}"
        f" | {'fio IOPS':>9} {'us/IO':>6} {'MB/s':>7} {'p50':>6} {'p99':>6} {'p99.9':>7} | {'ratio':>5} {'vs raw':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        x, f = r.get("xenblk") or {}, r.get("fio") or {}
        lines.append(
            f"{r['case']:<32} {_f(x.get('iops')):>11} {_f(x.get('cpu_us_per_io'), '.1f'):>6}"
            f" {_f(x.get('mbps'), '.1f'):>7} {_f(x.get('p50_us')):>6}"
            f" {_f(x.get('p99_us')):>6} {_f(x.get('p999_us')):>7} {_f(x.get('cpu_s_per_gib'), '.2f'):>9}"
            f" | {_f(f.get('iops')):>9} {_f(f.get('cpu_us_per_io'), '.1f'):>6} {_f(f.get('mbps'), '.1f'):>7}"
            f" {_f(f.get('p50_us')):>6}"
            f" {_f(f.get('p99_us')):>6} {_f(f.get('p999_us')):>7} | {_f(r.get('ratio'), '.2f'):>5}"
            f" {_f(r.get('vs_raw'), '.2f'):>6}" + ("  (failed)" if r.get("error") else "")
        )
    lines.append("latencies in microseconds (xenblk: guest-side, submit to response; fio: io_uring total latency);")
    lines.append("us/IO: CPU microseconds per request, xenblk: the daemon process (all threads), fio: fio itself;")
    lines.append("CPU s/GiB: the xenblk daemon process (all threads) per GiB moved; ratio = xenblk IOPS / fio IOPS;")
    lines.append("vs raw (qcow2, vhd): xenblk IOPS / xenblk IOPS on the raw twin, measured in the same rounds")
    return "\n".join(lines)


@dataclass
class Target:
    name: str
    value: str
    limit: str
    ok: bool | None  # None: not measured in this run

    def line(self) -> str:
        tag = "SKIP" if self.ok is None else "PASS" if self.ok else "MISS"
        return f"{tag:<4}  {self.name}: {self.value} (target {self.limit})"


def _by_case(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["case"]: r for r in records if not r.get("error") or r.get("xenblk")}


def targets(
    records: list[dict[str, Any]], scale: dict[str, Any] | None, scrape: dict[str, Any] | None = None
) -> list[Target]:
    rc = _by_case(records)
    out: list[Target] = []

    r = rc.get("raw-pagecache/randread-4k-qd32")
    ratio = r.get("ratio") if r else None
    out.append(Target("raw page cache 4k randread QD32 IOPS vs fio", f"{_f(ratio, '.2f')} x", ">= 0.80 x",
                      None if ratio is None else ratio >= 0.8))  # fmt: skip

    r = rc.get("raw-pagecache/randread-4k-qd1")
    xp = (r.get("xenblk_lat_us") or {}).get("p50") if r else None
    fp = (r.get("fio_lat_us") or {}).get("p50") if r else None
    ok = None if xp is None or fp is None else xp <= fp + 15
    out.append(Target("raw page cache 4k randread QD1 p50 latency", f"{_f(xp, '.1f')} us vs fio {_f(fp, '.1f')} us",
                      "<= fio + 15 us", ok))  # fmt: skip

    direct = [r for n, r in rc.items() if n.startswith("raw-direct/") and r.get("ratio") is not None]
    if direct:
        worst = min(direct, key=lambda r: r["ratio"])
        out.append(Target(f"raw O_DIRECT vs fio, every case ({len(direct)})",
                          f"worst {worst['ratio']:.2f} x ({worst['workload']})", ">= 0.95 x",
                          all(r["ratio"] >= 0.95 for r in direct)))  # fmt: skip
    else:
        out.append(Target("raw O_DIRECT vs fio, every case", "not run", ">= 0.95 x", None))

    for kind, limit, name in (
        ("qcow2-alloc", 0.9, "qcow2 allocated vs raw"),
        ("qcow2-first", 0.5, "qcow2 first writes vs raw"),
        ("vhd-alloc", 0.9, "VHD allocated vs raw"),
        ("vhd-first", 0.5, "VHD first writes vs raw"),
    ):
        pairs = []
        for n, r in rc.items():
            if n.startswith(kind + "/"):
                if r.get("vs_raw") is not None:  # measured against raw in the same rounds
                    pairs.append((r["vs_raw"], r["workload"]))
                    continue
                raw = rc.get("raw-pagecache/" + r["workload"])
                if raw and raw.get("xenblk_iops") and r.get("xenblk_iops") is not None:
                    pairs.append((r["xenblk_iops"] / raw["xenblk_iops"], r["workload"]))
        if pairs:
            worst_ratio, worst_w = min(pairs)
            out.append(Target(f"{name} through xenblk ({len(pairs)} cases)", f"worst {worst_ratio:.2f} x ({worst_w})",
                              f">= {limit} x", worst_ratio >= limit))  # fmt: skip
        else:
            out.append(Target(f"{name} through xenblk", "not run", f">= {limit} x", None))

    s = scale or {}
    t256 = (s.get("connect") or {}).get("256", {}).get("seconds")
    out.append(Target("256 disks connected", f"{_f(t256, '.2f')} s", "< 10 s", None if t256 is None else t256 < 10))
    idle = s.get("idle_cpu_percent")
    out.append(Target(f"idle daemon CPU with {s.get('idle_disks', 256)} disks", f"{_f(idle, '.2f')} % of a core",
                      "< 1 %", None if idle is None else idle < 1.0))  # fmt: skip
    mem = s.get("rss_check")
    if mem:
        lim = f"< {mem['limit_mib']:.0f} MiB (100 + 2 per disk)"
        ok = mem["rss_mib"] < mem["limit_mib"]
        out.append(Target(f"daemon RSS with {mem['disks']} disks", f"{mem['rss_mib']:.1f} MiB", lim, ok))
    else:
        out.append(Target("daemon RSS", "not measured", "< 100 MiB + 2 MiB per disk", None))
    if scrape:
        out.append(Target("metrics scrape every 1 s (issue 6)",
                          f"median {scrape['change_percent']:+.1f} %, best round {scrape['best_change_percent']:+.1f} %"
                          f" IOPS (rounds spread {scrape['noise_percent']:.0f} %)",
                          "no measurable loss", not scrape["measurable_loss"]))  # fmt: skip
    else:
        out.append(Target("metrics scrape every 1 s (issue 6)", "not run", "no measurable loss", None))
    return out


def meta(args: dict[str, Any]) -> dict[str, Any]:
    def git() -> str | None:
        try:
            r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                               cwd=Path(__file__).resolve().parents[1])  # fmt: skip
            return r.stdout.strip() or None
        except OSError:
            return None

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "load_avg": os.getloadavg(),
        "git": git(),
        "args": args,
    }


def markdown(doc: dict[str, Any]) -> str:
    """The results as a Markdown table for the README: meta line, cases, targets."""
    m = doc["meta"]
    load = " ".join(f"{x:.1f}" for x in m.get("load_avg_start", m["load_avg"]))
    out = [
        f"{m['date']}, {m['cpus']} x {m['cpu_model'] or 'CPU'}, kernel {m['kernel']}, git {m['git']}, load average"
        f" at start {load}, at end {' '.join(f'{x:.1f}' for x in m['load_avg'])}; {m['args'].get('rounds')} x"
        f" {m['args'].get('runtime')} s rounds per side, best round kept",
        "",
        "| case | xenblk IOPS | MB/s | p50/p99/p99.9 µs | CPU s/GiB | fio IOPS | fio p50/p99/p99.9 µs | ratio"
        " | vs raw |",
        "|---|---:|---:|---|---:|---:|---|---:|---:|",
    ]

    def lat(d: dict[str, Any] | None) -> str:
        return "/".join(_f(d.get(k)) for k in ("p50", "p99", "p99.9")) if d else "-"

    for r in doc["cases"]:
        x = r.get("xenblk") or {}
        out.append(
            f"| {r['case']} | {_f(r.get('xenblk_iops'))} | {_f(x.get('mbps'))} | {lat(r.get('xenblk_lat_us'))}"
            f" | {_f(x.get('cpu_s_per_gib'), '.2f')} | {_f(r.get('fio_iops'))} | {lat(r.get('fio_lat_us'))}"
            f" | {_f(r.get('ratio'), '.2f')} | {_f(r.get('vs_raw'), '.2f')} |"
        )
    out += ["", "| target | measured | limit | |", "|---|---|---|---|"]
    for t in doc["targets"]:
        tag = "SKIP" if t["ok"] is None else "PASS" if t["ok"] else "MISS"
        out.append(f"| {t['name']} | {t['value']} | {t['limit']} | {tag} |")
    return "\n".join(out) + "\n"


def write(doc: dict[str, Any], results_dir: Path = RESULTS) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = results_dir / f"{stamp}.json"
    text = json.dumps(doc, indent=2, default=_default) + "\n"
    path.write_text(text)
    (results_dir / "latest.json").write_text(text)
    (results_dir / "latest.md").write_text(markdown(doc))
    return path


def _default(o: Any) -> Any:
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    return str(o)
