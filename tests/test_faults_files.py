"""The image file changing under a running device, done for real to the file on disk.

- Removed (unlinked): the device keeps serving from its open descriptor, reads, writes and flushes
  all succeed and the (deleted) image stays consistent; the space is freed when the device closes.
- Truncated: what the truncation removed is gone, so a read of it answers BLKIF_RSP_ERROR (counted
  as an io error), never zeros a guest would take for its data; reads of what is left still
  succeed; a write past the new end re-extends the file (POSIX) and reads back. No crash and no
  SIGBUS (no driver maps an image into memory), and a second device next to it keeps serving.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import pytest

from tests.fixtures.faults import MakeGuestDisk
from tests.fixtures.ring import (
    ABIS,
    OP_FLUSH,
    OP_READ,
    RSP_ERROR,
    RSP_OKAY,
    GuestDisk,
    make_raw_image,
    pattern_bytes,
    rw_request,
)
from tests.fixtures.storage import qemu_check, qemu_img
from xenblk import storage
from xenblk.dataplane import ERRORS

KiB, MiB = 1 << 10, 1 << 20
SECTOR = 512
SIZE = 8 * MiB
CHUNK = 32 * KiB


def _image(tmp_path: Path, fmt: str, name: str = "disk") -> Path:
    if fmt == "raw":
        return make_raw_image(tmp_path / f"{name}.raw", SIZE, pattern=False)
    path = tmp_path / f"{name}.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", str(path), str(SIZE))
    return path


def _flush(d: GuestDisk) -> int:
    return d.one(rw_request(d.abi, OP_FLUSH, d.new_id(), 0, [])).status


def _fill(d: GuestDisk, seed: int, end: int = SIZE) -> None:
    items = [(1, off // SECTOR, pattern_bytes(off, 256 * KiB, seed)) for off in range(0, end, 256 * KiB)]
    assert all(s == RSP_OKAY for s, _ in d.finish_batch(d.start_batch(0, items, indirect=True)))
    assert _flush(d) == RSP_OKAY


def _fd_targets() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return out


def _deleted_fd(path: Path) -> str:
    """/proc path of this process's descriptor of the unlinked image (for qemu-img to open)."""
    for fd, target in _fd_targets().items():
        if target == f"{path} (deleted)":
            return f"/proc/{os.getpid()}/fd/{fd}"
    raise AssertionError(f"no open descriptor of {path}")


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_unlinked_image_keeps_serving(guest_disks: MakeGuestDisk, tmp_path: Path, qemu_tools: None, fmt: str) -> None:
    path = _image(tmp_path, fmt)
    d, img = guest_disks(path, fmt)
    _fill(d, seed=1, end=4 * MiB)
    path.unlink()
    # writes that allocate (qcow2) and overwrite, reads, flushes: all on the open descriptor
    _fill(d, seed=2, end=SIZE)
    assert d.write(0, pattern_bytes(0, CHUNK, 3), indirect=True) == RSP_OKAY
    assert _flush(d) == RSP_OKAY
    assert d.read(0, CHUNK, indirect=True) == (RSP_OKAY, pattern_bytes(0, CHUNK, 3))
    for off in range(CHUNK, SIZE, MiB + CHUNK):
        assert d.read(off // SECTOR, CHUNK, indirect=True) == (RSP_OKAY, pattern_bytes(off, CHUNK, 2))
    st = d.stats()
    assert st.errors == [0] * len(ERRORS) and sum(st.refusals) == 0
    if fmt == "qcow2":
        rc, report = qemu_check(Path(_deleted_fd(path)))
        assert rc == 0, report
    d.stop()
    img.close()
    assert not any(t.startswith(str(path)) for t in _fd_targets().values()), "the image's fd outlived close()"


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_truncated_image_sync_api(tmp_path: Path, qemu_tools: None, fmt: str) -> None:
    """The drivers themselves (the slow path): data cut off by a truncation is an EIO, not zeros."""
    path = _image(tmp_path, fmt)
    with storage.Image.open(str(path), fmt) as img:
        img.write(0, pattern_bytes(0, SIZE, 1))
        img.flush()
        os.truncate(path, 6 * 65536 if fmt == "qcow2" else 3 * MiB)
        with pytest.raises(storage.StorageError) as e:
            img.read(5 * MiB, 4096)
        assert e.value.errno == errno.EIO
        if fmt == "raw":
            assert img.read(MiB, 4096) == pattern_bytes(MiB, 4096, 1)


@pytest.mark.parametrize("abi", ABIS)
def test_truncated_raw_image(guest_disks: MakeGuestDisk, tmp_path: Path, abi: str) -> None:
    path = _image(tmp_path, "raw")
    d, _ = guest_disks(path, "raw", abi=abi)
    other, _ = guest_disks(_image(tmp_path, "raw", "other"), "raw", abi=abi)
    _fill(d, seed=1)
    _fill(other, seed=7)
    cut = 3 * MiB + 4 * KiB  # not on a request boundary: one read straddles it
    os.truncate(path, cut)
    offsets = [0, 3 * MiB - CHUNK, 3 * MiB, 4 * MiB, 6 * MiB, SIZE - CHUNK]
    lost = [off + CHUNK > cut for off in offsets]
    res = d.finish_batch(d.start_batch(0, [(OP_READ, off // SECTOR, CHUNK) for off in offsets], indirect=True))
    assert [s for s, _ in res] == [RSP_ERROR if x else RSP_OKAY for x in lost]
    for off, x, (_, data) in zip(offsets, lost, res, strict=True):
        if not x:
            assert data == pattern_bytes(off, CHUNK, 1)
    st = d.stats()
    assert st.errors[ERRORS.index("io")] == sum(lost) and st.op_named("read").errors == sum(lost)
    assert st.in_flight == 0
    # a write past the new end puts the file back out to there, and what it wrote reads back
    assert d.write(6 * MiB // SECTOR, pattern_bytes(6 * MiB, CHUNK, 4), indirect=True) == RSP_OKAY
    assert _flush(d) == RSP_OKAY
    assert os.stat(path).st_size == 6 * MiB + CHUNK
    assert d.read(6 * MiB // SECTOR, CHUNK, indirect=True) == (RSP_OKAY, pattern_bytes(6 * MiB, CHUNK, 4))
    assert d.read(0, CHUNK, indirect=True) == (RSP_OKAY, pattern_bytes(0, CHUNK, 1))
    # the device next to it never noticed
    for off in range(0, SIZE, MiB):
        assert other.read(off // SECTOR, CHUNK, indirect=True) == (RSP_OKAY, pattern_bytes(off, CHUNK, 7))
    assert other.write(0, pattern_bytes(0, CHUNK, 8), indirect=True) == RSP_OKAY
    assert other.stats().errors == [0] * len(ERRORS)


def test_truncated_qcow2_image(guest_disks: MakeGuestDisk, tmp_path: Path, qemu_tools: None) -> None:
    """Cut below the data clusters (the tables stay): reads of data that was there answer RSP_ERROR."""
    path = _image(tmp_path, "qcow2")
    d, _ = guest_disks(path, "qcow2")
    other, _ = guest_disks(_image(tmp_path, "qcow2", "other"), "qcow2")
    _fill(d, seed=1)
    _fill(other, seed=7)
    # qemu-img create puts header, L1, refcount table and block in the first 4 clusters; the
    # first data written lands after the L2 table in the next ones
    os.truncate(path, 6 * 65536)
    statuses = []
    for off in range(0, SIZE, MiB):
        status, data = d.read(off // SECTOR, CHUNK, indirect=True)
        statuses.append(status)
        if status == RSP_OKAY:
            assert data == pattern_bytes(off, CHUNK, 1), f"at {off}: wrong data instead of an error"
    assert statuses.count(RSP_ERROR) >= 7, statuses
    st = d.stats()
    assert st.errors[ERRORS.index("io")] == statuses.count(RSP_ERROR) and st.in_flight == 0
    for off in range(0, SIZE, MiB):
        assert other.read(off // SECTOR, CHUNK, indirect=True) == (RSP_OKAY, pattern_bytes(off, CHUNK, 7))
    assert other.stats().errors == [0] * len(ERRORS)
    assert _flush(other) == RSP_OKAY
