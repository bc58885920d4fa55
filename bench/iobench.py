"""The I/O cases: for each, xenblk through the ring (simulated guest -> daemon -> image),
then fio with io_uring straight on the same image."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import fio, images
from bench.cases import Case, ImageKind
from bench.procs import BenchError
from bench.results import Measure
from bench.xenblk_side import SimEnv

Log = Callable[[str], None]
FIRST_WRITE_SCALE = 16
DIRECT_MAX_BYTES = 11 * 4096  # BLKIF_MAX_SEGMENTS_PER_REQUEST pages


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def make_record(case: Case, xb: Measure | None, ref: Measure | None, error: str | None = None) -> dict[str, Any]:
    w = case.work
    return {
        "case": case.name,
        "image": case.image.name,
        "workload": w.name,
        "rw": w.rw,
        "bs": w.bs,
        "iodepth": w.iodepth,
        "fio_ref": case.image.fio_ref,
        "xenblk_iops": round(xb.iops, 1) if xb else None,
        "fio_iops": round(ref.iops, 1) if ref else None,
        "ratio": _ratio(xb.iops if xb else None, ref.iops if ref else None),
        "xenblk_lat_us": xb.as_dict()["lat_us"] if xb else None,
        "fio_lat_us": ref.as_dict()["lat_us"] if ref else None,
        "xenblk": xb.as_dict() if xb else None,
        "fio": ref.as_dict() if ref else None,
        "error": error,
    }


class IoBench:
    def __init__(self, work: Path, runtime: float, size: int, log: Log, rounds: int = 2) -> None:
        self.work = work
        self.images = work / "images"
        self.runtime = runtime
        self.rounds = max(1, rounds)
        self.size = size
        self.log = log
        self._raw: Path | None = None
        self._qcow2: Path | None = None
        self._vhd: Path | None = None
        self._fio_cache: dict[tuple[str, str], Measure] = {}  # (cache mode, workload) -> fio on the raw image
        self._domids = itertools.count(1)
        self._fresh = itertools.count(1)
        # First-write images used up, deleted once their kind is done: unlinking a sparse file of thousands
        # of extents (random first writes into a VHD's blocks) stalls the file system for many seconds, which
        # must not fall into the next attach or measurement.
        self._trash: list[Path] = []

    # -- images --------------------------------------------------------------------------------------------------------
    def raw(self) -> Path:
        if self._raw is None:
            self.images.mkdir(parents=True, exist_ok=True)
            t0 = time.monotonic()
            self._raw = images.filled_raw(self.images / "disk.raw", self.size)
            self.log(f"  image: {self._raw} ({self.size >> 20} MiB, filled) in {time.monotonic() - t0:.1f}s")
        return self._raw

    def qcow2(self) -> Path:
        if self._qcow2 is None:
            t0 = time.monotonic()
            self._qcow2 = images.allocated_qcow2(self.raw(), self.images / "alloc.qcow2")
            self.log(f"  image: {self._qcow2} (qcow2, fully allocated) in {time.monotonic() - t0:.1f}s")
        return self._qcow2

    def vhd(self) -> Path:
        if self._vhd is None:
            t0 = time.monotonic()
            self._vhd = images.allocated_vhd(self.raw(), self.images / "alloc.vhd")
            self.log(f"  image: {self._vhd} (dynamic VHD, fully allocated) in {time.monotonic() - t0:.1f}s")
        return self._vhd

    def image_for(self, case: Case) -> Path:
        kind = case.image
        if kind.fmt == "raw":
            return self.raw()
        if kind.fresh:
            # Virtually FIRST_WRITE_SCALE x larger than the data images, so that a time-based run keeps hitting
            # clusters it has not allocated yet (the image only grows by what is written).
            empty = images.empty_vhd if kind.fmt == "vhd" else images.empty_qcow2
            name = f"first-{case.work.name}-{next(self._fresh)}.{kind.fmt}"
            return empty(self.images / name, self.size * FIRST_WRITE_SCALE)
        return self.vhd() if kind.fmt == "vhd" else self.qcow2()

    # -- running -------------------------------------------------------------------------------------------------------
    def run(self, cases: list[Case]) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        kinds: list[ImageKind] = []
        for c in cases:
            if c.image not in kinds:
                kinds.append(c.image)
        for kind in kinds:
            mine = [c for c in cases if c.image == kind]
            self.log(f"\n[{kind.name}] {kind.about}")
            records += self._run_kind(kind, mine)
        return records

    def _run_kind(self, kind: ImageKind, cases: list[Case]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        # Images first: their creation must not overlap the measurements.
        for c in cases:
            if not c.image.fresh:
                self.image_for(c)
        with SimEnv(self.work / f"sim-{kind.name}", self.images) as env:
            env.start_daemon(cache=kind.cache)
            for case in cases:
                out.append(self._run_case(env, case))
        for p in self._trash:
            p.unlink(missing_ok=True)
        self._trash.clear()
        return out

    def _run_case(self, env: SimEnv, case: Case) -> dict[str, Any]:
        """`rounds` x (xenblk, then fio), alternating so both sides see the same background load; the best
        round of each side is the case's measure (the least disturbed one), every round's IOPS is kept.
        qcow2 and VHD cases also run the workload on the raw twin through xenblk in each round: their targets are
        ratios to raw, which must be measured under the same load, not minutes apart."""
        kind = case.image
        xbs: list[Measure] = []
        raws: list[Measure] = []  # qcow2/vhd cases: the same workload on the raw twin through xenblk, same daemon
        refs: list[Measure] = []
        errors: list[str] = []
        for _ in range(self.rounds):
            try:
                xbs.append(self._xenblk_round(env, case))
                if kind.fmt in ("qcow2", "vhd"):
                    raws.append(self._xenblk_round(env, case, raw_twin=True))
            except BenchError as e:
                errors.append(f"xenblk: {e}")
                break
            if not fio.available():
                errors.append("fio: not installed")
                continue
            if kind.fio_ref == "raw twin" and self._fio_key(case) in self._fio_cache:
                continue  # the raw twin was measured with the raw-pagecache case
            try:
                refs.append(self._fio(case))
            except BenchError as e:
                errors.append(f"fio: {e}")
                break
        if not refs and self._fio_key(case) in self._fio_cache:
            refs.append(self._fio_cache[self._fio_key(case)])
        elif refs and self._fio_key(case) not in self._fio_cache:
            self._fio_cache[self._fio_key(case)] = best(refs)
        xb = best(xbs) if xbs and not errors else None
        ref = best(refs) if refs else None
        if xb is not None:
            xb.extra["rounds_iops"] = [round(m.iops, 1) for m in xbs]
        if ref is not None and len(refs) > 1:
            ref.extra["rounds_iops"] = [round(m.iops, 1) for m in refs]
        rec = make_record(case, xb, ref, "; ".join(errors) or None)
        if raws and xb is not None:
            raw = best(raws)
            raw.extra["rounds_iops"] = [round(m.iops, 1) for m in raws]
            rec["xenblk_raw"] = raw.as_dict()
            rec["vs_raw"] = _ratio(xb.iops, raw.iops)
        rec["load_avg"] = [round(x, 2) for x in os.getloadavg()]
        self.log("  " + _line(rec))
        return rec

    def _xenblk_round(self, env: SimEnv, case: Case, raw_twin: bool = False) -> Measure:
        """One xenblk run of the case; with `raw_twin`, of the same workload on the raw image instead."""
        kind, w = case.image, case.work
        image = self.raw() if raw_twin else self.image_for(case)
        fmt, fresh = ("raw", False) if raw_twin else (kind.fmt, kind.fresh)
        try:
            if kind.cache == "writeback" and not fresh:
                images.warm(image)
            if env.daemon is None or not env.daemon.proc.alive():
                self.log("  (restarting the daemon)")
                env.start_daemon(cache=kind.cache)
            domid = next(self._domids)
            env.attach(domid, image, fmt)
            try:
                # Time-based like fio (no --size: with both, the guest stops at whichever ends first).
                # As Linux blkfront: an I/O of more than 11 segments goes as one INDIRECT request (the daemon
                # offers them), not split over several ring requests.
                return env.run_guest(domid, w.rw, w.bs, w.iodepth, self.runtime, indirect=w.bs > DIRECT_MAX_BYTES)
            finally:
                try:
                    env.detach(domid)
                except BenchError as e:
                    self.log(f"  (detach failed: {str(e).splitlines()[0]})")
        finally:
            if fresh:
                self._trash.append(image)

    def _fio_key(self, case: Case) -> tuple[str, str]:
        return ("none" if case.image.fio_direct else "writeback", case.work.name)

    def _fio(self, case: Case) -> Measure:
        kind, w = case.image, case.work
        raw = self.raw()
        if not kind.fio_direct:
            images.warm(raw)
        return fio.run_fio(raw, w.rw, w.bs, w.iodepth, self.runtime, kind.fio_direct, self.size)


def best(runs: list[Measure]) -> Measure:
    """The round with the most IOPS: on a shared machine, the one the least disturbed by others."""
    return max(runs, key=lambda m: m.iops)


def _line(rec: dict[str, Any]) -> str:
    def f(v: float | None, fmt: str = ".0f") -> str:
        return "-" if v is None else format(v, fmt)

    xl, fl = rec["xenblk_lat_us"] or {}, rec["fio_lat_us"] or {}
    xc, fc = (rec.get("xenblk") or {}).get("cpu_us_per_io"), (rec.get("fio") or {}).get("cpu_us_per_io")
    s = (
        f"{rec['case']:<32} xenblk {f(rec['xenblk_iops']):>8} IOPS {f(xc, '.1f'):>5} CPU us/IO p50 {f(xl.get('p50'))}us"
        f" | fio {f(rec['fio_iops']):>8} IOPS {f(fc, '.1f'):>5} CPU us/IO p50 {f(fl.get('p50'))}us"
        f" | ratio {f(rec['ratio'], '.2f')}"
    )
    if rec.get("vs_raw") is not None:
        s += f" | vs raw {rec['vs_raw']:.2f}"
    if rec["error"]:
        s += f"\n    ERROR {rec['error'][:600]}"
    return s
