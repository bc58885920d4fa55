"""Raw files through xenblk.storage.Image: buffered and O_DIRECT I/O, discard, resize, read-only."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from xenblk.storage import Image, StorageError

MiB = 1 << 20


def test_writeback_read_write_roundtrip(raw_file: Callable[[str, int], Path]) -> None:
    p = raw_file("a.raw", 4 * MiB)
    with Image.open(str(p)) as img:
        assert img.format == "raw" and img.size == 4 * MiB and not img.readonly and not img.direct
        img.write(1000, b"hello world")
        img.flush()
        assert img.read(995, 20) == b"\0" * 5 + b"hello world" + b"\0" * 4
    with open(p, "rb") as f:
        f.seek(1000)
        assert f.read(11) == b"hello world"


def test_direct_unaligned_io(raw_file: Callable[[str, int], Path]) -> None:
    p = raw_file("d.raw", MiB)
    try:
        img = Image.open(str(p), cache="none")
    except StorageError as e:
        pytest.skip(f"O_DIRECT unsupported here: {e}")
    with img:
        assert img.direct
        img.write(4093, b"abcdefgh")  # straddles a 4 KiB boundary
        img.write(8192, b"x" * 4096)
        assert img.read(4090, 14) == b"\0\0\0abcdefgh\0\0\0"
        img.flush()
    data = p.read_bytes()
    assert data[4093:4101] == b"abcdefgh" and data[8192:12288] == b"x" * 4096


def test_discard_punches_hole(raw_file: Callable[[str, int], Path]) -> None:
    p = raw_file("h.raw", 4 * MiB)
    with Image.open(str(p)) as img:
        img.write(0, os.urandom(4 * MiB))
        img.flush()
        before = os.stat(p).st_blocks
        img.discard(MiB, 2 * MiB)
        after = os.stat(p).st_blocks
        assert after <= before - (2 * MiB // 512) + 16
        assert img.read(MiB, 2 * MiB) == bytes(2 * MiB)
        assert os.stat(p).st_size == 4 * MiB


def test_write_zeroes(raw_file: Callable[[str, int], Path]) -> None:
    p = raw_file("z.raw", MiB)
    with Image.open(str(p)) as img:
        img.write(0, b"\xff" * MiB)
        img.write_zeroes(4096, 8192)
        assert img.read(4096, 8192) == bytes(8192)
        assert img.read(0, 4096) == b"\xff" * 4096


def test_refresh_size_after_grow(raw_file: Callable[[str, int], Path]) -> None:
    p = raw_file("g.raw", MiB)
    with Image.open(str(p)) as img:
        os.truncate(p, 3 * MiB)
        assert img.refresh_size() == 3 * MiB
        assert img.size == 3 * MiB
        img.write(3 * MiB - 4, b"tail")
        assert img.read(3 * MiB - 4, 4) == b"tail"


def test_readonly(raw_file: Callable[[str, int], Path]) -> None:
    p = raw_file("r.raw", MiB)
    with Image.open(str(p), readonly=True) as img:
        assert img.readonly and not img.can_discard
        with pytest.raises(StorageError, match="Read-only"):
            img.write(0, b"x")


def test_out_of_range_and_missing(raw_file: Callable[[str, int], Path], tmp_path: Path) -> None:
    p = raw_file("o.raw", MiB)
    with Image.open(str(p)) as img, pytest.raises(StorageError):
        img.read(MiB - 1, 2)
    with pytest.raises(StorageError, match="No such file"):
        Image.open(str(tmp_path / "missing"))
    with pytest.raises(StorageError, match="unknown image format"):
        Image.open(str(p), "vmdk")
    with pytest.raises(StorageError, match="not a block device"):
        Image.open(str(p), "block")


def test_cli_info_and_check(raw_file: Callable[[str, int], Path]) -> None:
    p = raw_file("c.raw", 2 * MiB)
    out = subprocess.run(
        [sys.executable, "-m", "xenblk", "image", "info", str(p), "--json"], capture_output=True, text=True, check=True
    )
    assert '"virtual_size": 2097152' in out.stdout
    rc = subprocess.run([sys.executable, "-m", "xenblk", "image", "check", str(p)], capture_output=True, text=True)
    assert rc.returncode == 0 and "no errors found" in rc.stdout


def _losetup(p: Path) -> str | None:
    try:
        r = subprocess.run(["losetup", "-f", "--show", str(p)], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def test_block_device_loop(raw_file: Callable[[str, int], Path]) -> None:
    p = raw_file("loop.raw", 8 * MiB)
    dev = _losetup(p)
    if not dev:
        pytest.skip("losetup does not work in this sandbox")
    try:
        with Image.open(dev) as img:  # S_ISBLK -> format block
            assert img.format == "block" and img.size == 8 * MiB
            assert img.direct  # O_DIRECT is the default for block devices
            assert img.logical_block in (512, 4096)
            img.write(2 * MiB, b"B" * 4096)
            img.flush()
            assert img.read(2 * MiB, 4096) == b"B" * 4096
            if img.can_discard:
                img.discard(0, MiB)
        with Image.open(dev, "block", cache="none") as img:
            assert img.direct
            assert img.read(2 * MiB + 3, 5) == b"BBBBB"
        with Image.open(dev, readonly=True) as img:
            assert img.readonly
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
