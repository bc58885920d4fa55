"""A real full filesystem under a running device (a small tmpfs, nothing injected): writes that
need space the filesystem no longer has answer BLKIF_RSP_ERROR and are counted as nospc, every
write acknowledged before a completed flush is still there (read back through the ring and by
qemu-img from the file), and the qcow2 image stays consistent by `qemu-img check` (exit 0: no
corruption and no leaks: a cluster whose data write failed is handed back, not leaked)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fixtures.faults import MakeGuestDisk, MountSmallFs
from tests.fixtures.ring import ABIS, OP_FLUSH, RSP_ERROR, RSP_OKAY, GuestDisk, pattern_bytes, rw_request
from tests.fixtures.storage import qemu_check, qemu_img
from xenblk.dataplane import ERRORS

KiB, MiB = 1 << 10, 1 << 20
SECTOR = 512


def _flush(d: GuestDisk) -> int:
    return d.one(rw_request(d.abi, OP_FLUSH, d.new_id(), 0, [])).status


def _contents(path: Path, out: Path) -> bytes:
    """The guest-visible contents as qemu-img reads them (converted outside the full filesystem)."""
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(path), str(out))
    return out.read_bytes()


def _errors(d: GuestDisk) -> dict[str, int]:
    return dict(zip(ERRORS, d.stats().errors, strict=True))


def _write_until_full(d: GuestDisk, offsets: list[int], n: int, seed: int) -> list[int]:
    """Writes n bytes at each offset in turn; returns the statuses. Once the filesystem is full it
    stays full, so the statuses are some OKAYs then only ERRORs."""
    return [d.write(off // SECTOR, pattern_bytes(off, n, seed), indirect=n > 11 * 4096) for off in offsets]


def _ok_then_errors(statuses: list[int]) -> int:
    k = statuses.index(RSP_ERROR) if RSP_ERROR in statuses else len(statuses)
    assert statuses == [RSP_OKAY] * k + [RSP_ERROR] * (len(statuses) - k), statuses
    return k


@pytest.mark.parametrize("abi", ABIS)
def test_qcow2_allocation_hits_enospc(
    guest_disks: MakeGuestDisk, small_tmpfs: MountSmallFs, qemu_tools: None, tmp_path: Path, abi: str
) -> None:
    fs = small_tmpfs("1m")
    path = fs / "disk.qcow2"
    size = 16 * MiB
    cs = 64 * KiB
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", str(path), str(size))
    d, img = guest_disks(path, "qcow2", abi=abi)
    first = [i * cs for i in range(4)]
    assert _write_until_full(d, first, cs, seed=1) == [RSP_OKAY] * 4
    assert _flush(d) == RSP_OKAY
    # then far more clusters than the filesystem holds
    more = [(4 + i) * cs for i in range(20)]
    statuses = _write_until_full(d, more, cs, seed=1)
    k = _ok_then_errors(statuses)
    assert 0 < k < len(more), statuses
    failed = len(more) - k
    assert _errors(d) == {"io": 0, "nospc": failed, "grant": 0, "other": 0, "quota": 0}
    assert d.stats().op_named("write").errors == failed
    # acknowledged data reads back; a failed write allocated nothing (zeros, not garbage)
    acked = first + more[:k]
    for off in acked:
        assert d.read(off // SECTOR, cs, indirect=True) == (RSP_OKAY, pattern_bytes(off, cs, 1)), f"at {off}"
    for off in more[k:]:
        assert d.read(off // SECTOR, cs, indirect=True) == (RSP_OKAY, bytes(cs)), f"at {off}"
    # updating allocated clusters in place needs no space: still works on the full filesystem
    assert d.write(0, pattern_bytes(0, 4096, 2)) == RSP_OKAY
    assert _flush(d) == RSP_OKAY
    d.stop()
    img.close()
    rc, report = qemu_check(path)
    assert rc == 0, report
    data = _contents(path, tmp_path / "contents.raw")
    assert data[:4096] == pattern_bytes(0, 4096, 2)
    for off in acked[1:]:
        assert data[off : off + cs] == pattern_bytes(off, cs, 1), f"at {off}"
    assert data[more[k] :] == bytes(size - more[k])


def test_qcow2_flush_fails_on_enospc_and_succeeds_once_space_returns(
    guest_disks: MakeGuestDisk, small_tmpfs: MountSmallFs, qemu_tools: None, tmp_path: Path
) -> None:
    """New L2 tables are written at flush time: on a full filesystem the FLUSH itself fails
    (RSP_ERROR, never OKAY), the device still serves what it acknowledged, and once the operator
    frees space the next FLUSH makes all of it durable."""
    fs = small_tmpfs("1m")
    path = fs / "disk.qcow2"
    size = 8 * MiB
    cs = 4 * KiB  # one L2 table maps 2 MiB: writes at 4 MiB need a new one
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", str(path), str(size))
    d, img = guest_disks(path, "qcow2")
    first = [i * 16 * KiB for i in range(4)]
    assert _write_until_full(d, first, 16 * KiB, seed=3) == [RSP_OKAY] * 4
    assert _flush(d) == RSP_OKAY
    # leave ~96 KiB free, then write 16 KiB pieces at 4 MiB onwards until it is gone
    filler = fs / "filler"
    free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
    with open(filler, "wb") as f:
        f.write(b"\xff" * (free - 96 * KiB))
    more = [4 * MiB + i * 16 * KiB for i in range(12)]
    statuses = _write_until_full(d, more, 16 * KiB, seed=3)
    k = _ok_then_errors(statuses)
    assert 0 < k < len(more), statuses
    assert _flush(d) == RSP_ERROR
    st = d.stats()
    assert st.op_named("flush").errors == 1
    assert _errors(d)["nospc"] == len(more) - k + 1 and _errors(d)["io"] == 0
    acked = first + more[:k]
    for off in acked:
        assert d.read(off // SECTOR, 16 * KiB, indirect=True) == (RSP_OKAY, pattern_bytes(off, 16 * KiB, 3))
    filler.unlink()
    assert _flush(d) == RSP_OKAY
    d.stop()
    img.close()
    rc, report = qemu_check(path)
    assert rc == 0, report
    data = _contents(path, tmp_path / "contents.raw")
    for off in acked:
        assert data[off : off + 16 * KiB] == pattern_bytes(off, 16 * KiB, 3), f"at {off}"
    for off in more[k:]:
        assert data[off : off + 16 * KiB] == bytes(16 * KiB), f"at {off}"


def test_raw_sparse_file_on_a_full_filesystem(guest_disks: MakeGuestDisk, small_tmpfs: MountSmallFs) -> None:
    """A sparse raw image bigger than its filesystem: writes into holes fail once it is full, on
    the io_uring fast path (the error comes back in the completion), counted as nospc."""
    fs = small_tmpfs("512k")
    path = fs / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
    d, img = guest_disks(path, "raw")
    offs = [i * 64 * KiB for i in range(32)]
    statuses = _write_until_full(d, offs, 32 * KiB, seed=4)
    k = _ok_then_errors(statuses)
    assert 0 < k < len(offs), statuses
    assert _errors(d) == {"io": 0, "nospc": len(offs) - k, "grant": 0, "other": 0, "quota": 0}
    assert _flush(d) == RSP_OKAY
    for off in offs[:k]:
        assert d.read(off // SECTOR, 32 * KiB, indirect=True) == (RSP_OKAY, pattern_bytes(off, 32 * KiB, 4))
    d.stop()
    img.close()
    with open(path, "rb") as f:
        for off in offs[:k]:
            f.seek(off)
            assert f.read(32 * KiB) == pattern_bytes(off, 32 * KiB, 4)
