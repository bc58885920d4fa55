"""The benchmark cases: image kinds x workloads, and the `--cases` filter."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass


@dataclass(frozen=True)
class ImageKind:
    name: str
    fmt: str  # raw | qcow2 | vhd
    cache: str  # storage.cache of the daemon: writeback | none
    fresh: bool  # a new, empty image for every case (first writes)
    fio_direct: bool
    fio_ref: str  # what fio runs on: "same image" or "raw twin" (fio cannot read qcow2)
    about: str


IMAGE_KINDS: tuple[ImageKind, ...] = (
    ImageKind(
        "raw-pagecache", "raw", "writeback", False, False, "same image",
        "raw file in the page cache (cache=writeback): storage is nearly free, so this exposes xenblk's own overhead",
    ),
    ImageKind(
        "raw-direct", "raw", "none", False, True, "same image",
        "raw file with O_DIRECT (cache=none) on the real disk: the disk dominates, xenblk should be near fio",
    ),
    ImageKind(
        "qcow2-alloc", "qcow2", "writeback", False, False, "raw twin",
        "qcow2 with every cluster allocated (qemu-img convert from filled raw), page cache: L2 lookup cost",
    ),
    ImageKind(
        "qcow2-first", "qcow2", "writeback", True, False, "raw twin",
        "a new empty qcow2 for each case: every write allocates clusters (metadata updates, zero-fill)",
    ),
    ImageKind(
        "vhd-alloc", "vhd", "writeback", False, False, "raw twin",
        "dynamic VHD with every block allocated (qemu-img convert -O vpc from filled raw), page cache: BAT lookup",
    ),
    ImageKind(
        "vhd-first", "vhd", "writeback", True, False, "raw twin",
        "a new empty dynamic VHD for each case: every write into a new 2 MiB block allocates it (footer moved)",
    ),
)  # fmt: skip


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str  # randread | randwrite | read | write
    bs: int
    iodepth: int

    @property
    def is_write(self) -> bool:
        return "write" in self.rw


WORKLOADS: tuple[Workload, ...] = (
    Workload("randread-4k-qd1", "randread", 4096, 1),
    Workload("randread-4k-qd32", "randread", 4096, 32),
    Workload("randwrite-4k-qd1", "randwrite", 4096, 1),
    Workload("randwrite-4k-qd32", "randwrite", 4096, 32),
    Workload("read-128k-qd8", "read", 128 * 1024, 8),
    Workload("write-128k-qd8", "write", 128 * 1024, 8),
)

# --quick: the cases every target needs, nothing else.
QUICK = {
    "raw-pagecache/randread-4k-qd1",
    "raw-pagecache/randread-4k-qd32",
    "raw-pagecache/randwrite-4k-qd32",
    "raw-pagecache/write-128k-qd8",
    "raw-direct/randread-4k-qd32",
    "raw-direct/randwrite-4k-qd32",
    "qcow2-alloc/randread-4k-qd32",
    "qcow2-first/randwrite-4k-qd32",
    "vhd-alloc/randread-4k-qd32",
    "vhd-first/randwrite-4k-qd32",
}


@dataclass(frozen=True)
class Case:
    image: ImageKind
    work: Workload

    @property
    def name(self) -> str:
        return f"{self.image.name}/{self.work.name}"


def all_cases() -> list[Case]:
    out = []
    for kind in IMAGE_KINDS:
        for w in WORKLOADS:
            if kind.fresh and not w.is_write:
                continue  # reads of a never-written qcow2 are reads of zeros: nothing to learn
            out.append(Case(kind, w))
    return out


def select(patterns: str | None, quick: bool) -> list[Case]:
    """Cases matching any comma-separated pattern (a glob, or a substring of the name)."""
    cases = all_cases()
    if patterns:
        pats = [p.strip() for p in patterns.split(",") if p.strip()]
        cases = [c for c in cases if any(fnmatch.fnmatch(c.name, p) or p in c.name for p in pats)]
    elif quick:
        cases = [c for c in cases if c.name in QUICK]
    return cases
