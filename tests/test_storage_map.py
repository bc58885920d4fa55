"""The data plane's fast path (ops->map/unmap) as it sees it: plain fd ranges for
allocated clusters, the slow path for everything else, and clusters pinned while
an extent is out so a concurrent discard cannot hand them to another write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.fixtures.storage import qemu_check, qemu_io, qemu_raw
from xenblk.storage import Image, ffi

KiB = 1 << 10


def _map(img: Image, off: int, n: int, write: bool) -> tuple[int, object]:
    ext = ffi.new("struct xb_extent *")
    rc = img.ptr.ops.map(img.ptr, off, n, int(write), ext)
    return int(rc), ext


def test_map_write_and_read(make_qcow2: Callable[..., Path]) -> None:
    p = make_qcow2("m.qcow2", "1M", cluster_size=4096)
    qemu_io(p, "qcow2", "write -P 0xab 0 8k")
    with Image.open(str(p), "qcow2") as img:
        assert _map(img, 8192, 4096, False)[0] == 0  # unallocated: slow path
        assert _map(img, 8192, 4096, True)[0] == 0
        rc, ext = _map(img, 100, 10000, True)
        assert rc == 1 and ext.len == 4096 - 100 and ext.host_off % 4096 == 100  # type: ignore[attr-defined]
        os.pwrite(ext.fd, b"\x42" * 50, ext.host_off)  # type: ignore[attr-defined]
        img.ptr.ops.unmap(img.ptr, ext)
        rc, ext = _map(img, 4096, 4096, False)
        assert rc == 1 and os.pread(ext.fd, 4, ext.host_off) == b"\xab" * 4  # type: ignore[attr-defined]
        img.ptr.ops.unmap(img.ptr, ext)
    data = qemu_raw(p)
    assert data[100:150] == b"\x42" * 50 and data[150:8192] == b"\xab" * (8192 - 150)


def test_discard_waits_for_unmap_before_reuse(make_qcow2: Callable[..., Path]) -> None:
    p = make_qcow2("d.qcow2", "1M", cluster_size=4096)
    qemu_io(p, "qcow2", "write -P 0xab 0 4k")
    with Image.open(str(p), "qcow2") as img:
        rc, ext = _map(img, 0, 4096, True)
        assert rc == 1
        host = ext.host_off  # type: ignore[attr-defined]
        img.discard(0, 4096)
        img.flush()
        img.flush()
        img.write(65536, b"\x01" * 4096)  # must not land in the still-mapped cluster
        rc2, ext2 = _map(img, 65536, 4096, False)
        assert rc2 == 1 and ext2.host_off != host  # type: ignore[attr-defined]
        img.ptr.ops.unmap(img.ptr, ext2)
        img.ptr.ops.unmap(img.ptr, ext)
    rc, report = qemu_check(p)
    assert rc == 0, report


def test_cli_qcow2_info_chain_and_check(make_qcow2: Callable[..., Path], tmp_path: Path) -> None:
    base = make_qcow2("base.qcow2", "1M")
    top = make_qcow2("top.qcow2", "", backing=base)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "xenblk",
            "image",
            "info",
            str(top),
            "--format",
            "qcow2",
            "--json",
            "--backing-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    info = json.loads(out.stdout)
    assert info["cluster_size"] == 65536 and info["backing"]["format"] == "qcow2"
    r = subprocess.run(
        [sys.executable, "-m", "xenblk", "image", "check", str(top), "-f", "qcow2", "--backing-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0 and "no errors found" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "xenblk", "image", "info", str(top), "-f", "qcow2", "--backing-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert "backing file:" in r.stdout
