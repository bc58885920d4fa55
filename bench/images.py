"""Benchmark images on the real disk (not tmpfs: O_DIRECT must work): a raw file full of
data, a fully allocated qcow2 and VHD of the same data, and empty qcow2/VHD files for first writes."""

from __future__ import annotations

import os
from pathlib import Path

from bench.procs import BenchError, run

MIB = 1 << 20


def filled_raw(path: Path, size: int) -> Path:
    """A raw file with every block written (non-zero data), so reads hit real blocks."""
    run(
        ["fio", "--name=fill", f"--filename={path}", "--rw=write", "--bs=1M", f"--size={size}", "--ioengine=psync",
         "--direct=1", "--end_fsync=1", "--output-format=terse"],
        timeout=600, what=f"filling {path}",
    )  # fmt: skip
    if path.stat().st_size != size:
        raise BenchError(f"{path}: expected {size} bytes after filling, got {path.stat().st_size}")
    return path


def allocated_qcow2(raw: Path, path: Path) -> Path:
    """A qcow2 with every cluster allocated: a copy of the filled raw file (no zero clusters)."""
    run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-S", "0", str(raw), str(path)],
        timeout=600, what=f"qemu-img convert to {path}")  # fmt: skip
    return path


def empty_qcow2(path: Path, size: int) -> Path:
    if path.exists():
        path.unlink()
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], timeout=60, what=f"qemu-img create {path}")
    return path


def allocated_vhd(raw: Path, path: Path) -> Path:
    """A dynamic VHD with every block allocated: a copy of the filled raw file (force_size: the raw size,
    not one rounded to a CHS geometry)."""
    run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "vpc", "-o", "force_size=on", "-S", "0", str(raw),
         str(path)], timeout=600, what=f"qemu-img convert to {path}")  # fmt: skip
    return path


def empty_vhd(path: Path, size: int) -> Path:
    if path.exists():
        path.unlink()
    run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "force_size=on", str(path), str(size)], timeout=60,
        what=f"qemu-img create {path}")  # fmt: skip
    return path


def sparse_raw(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def warm(path: Path) -> None:
    """Read the whole file once so it sits in the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        while os.read(fd, 8 * MIB):
            pass
    finally:
        os.close(fd)


def drop(path: Path) -> None:
    """Ask the kernel to drop the file's clean pages from the page cache (best effort)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
