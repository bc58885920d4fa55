"""Injected storage faults (tests.fixtures.fault_image.FaultImage) seen by a guest through the real data plane:
EIO/ENOSPC on reads, writes, flushes and discards fail exactly the requests they touch with
BLKIF_RSP_ERROR, every other request succeeds with the right bytes, the counters say what failed
and why, and what was written before is intact. Raw and qcow2, both ABIs."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tests import _xbfault  # type: ignore[attr-defined]
from tests.fixtures.fault_image import FAULT_OPS, FaultImage, as_fault_ptr
from tests.fixtures.faults import MakeGuestDisk
from tests.fixtures.ring import (
    ABIS,
    OP_FLUSH,
    OP_READ,
    OP_WRITE,
    OP_WRITE_BARRIER,
    PAGE,
    RSP_ERROR,
    RSP_OKAY,
    GuestDisk,
    discard_request,
    make_raw_image,
    pattern_bytes,
    rw_request,
)
from tests.fixtures.storage import qemu_check, qemu_img
from xenblk import storage
from xenblk.dataplane import ERRORS

MiB = 1 << 20
SIZE = 8 * MiB
SECTOR = 512
CHUNK = 16 * 1024  # bytes per request below


def _image(tmp_path: Path, fmt: str) -> Path:
    if fmt == "raw":
        return make_raw_image(tmp_path / "disk.raw", SIZE, pattern=False)
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", str(path), str(SIZE))
    return path


def _fill(d: GuestDisk, seed: int) -> None:
    """The whole disk written through the ring with a pattern, then flushed."""
    b = d.start_batch(
        0,
        [(OP_WRITE, off // SECTOR, pattern_bytes(off, 256 * 1024, seed)) for off in range(0, SIZE, 256 * 1024)],
        indirect=True,
    )
    assert all(s == RSP_OKAY for s, _ in d.finish_batch(b))
    assert d.one(rw_request(d.abi, OP_FLUSH, 7, 0, [])).status == RSP_OKAY


def _errors(d: GuestDisk) -> dict[str, int]:
    st = d.stats()
    return dict(zip(ERRORS, st.errors, strict=True))


# Requests of CHUNK bytes at these offsets: the fault covers [FAULT_OFF, FAULT_OFF + FAULT_LEN).
FAULT_OFF, FAULT_LEN = 3 * MiB + 8192, 40 * 1024
OFFSETS = [
    0,
    3 * MiB - CHUNK,
    3 * MiB,
    3 * MiB + CHUNK,
    3 * MiB + 2 * CHUNK,
    3 * MiB + 3 * CHUNK,
    5 * MiB,
    SIZE - CHUNK,
]


def _hit(off: int) -> bool:
    return off < FAULT_OFF + FAULT_LEN and off + CHUNK > FAULT_OFF


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC], ids=["EIO", "ENOSPC"])
def test_read_faults_fail_exactly_the_affected_reads(
    guest_disks: MakeGuestDisk, tmp_path: Path, fmt: str, abi: str, err: int
) -> None:
    d, img = guest_disks(_image(tmp_path, fmt), fmt, faults=True, abi=abi)
    assert isinstance(img, FaultImage)
    _fill(d, seed=1)
    rule = img.inject_fault("read", err, off=FAULT_OFF, length=FAULT_LEN)
    before = d.stats()
    res = d.finish_batch(d.start_batch(0, [(OP_READ, off // SECTOR, CHUNK) for off in OFFSETS]))
    hit = [_hit(off) for off in OFFSETS]
    assert [s for s, _ in res] == [RSP_ERROR if h else RSP_OKAY for h in hit]
    for off, h, (_, data) in zip(OFFSETS, hit, res, strict=True):
        if not h:
            assert data == pattern_bytes(off, CHUNK, 1), f"read at {off}"
    # the fault fired once per affected request: the fast path did not go around it
    assert img.fault_hits(rule) == sum(hit)
    st = d.stats()
    reason = "nospc" if err == errno.ENOSPC else "io"
    assert _errors(d) == {k: (sum(hit) if k == reason else 0) for k in ERRORS}
    assert st.op_named("read").errors - before.op_named("read").errors == sum(hit)
    assert st.op_named("read").requests - before.op_named("read").requests == len(OFFSETS)
    assert st.in_flight == 0
    img.clear_faults()
    for off in OFFSETS:
        assert d.read(off // SECTOR, CHUNK) == (RSP_OKAY, pattern_bytes(off, CHUNK, 1))


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC], ids=["EIO", "ENOSPC"])
def test_write_faults_fail_exactly_the_affected_writes(
    guest_disks: MakeGuestDisk, tmp_path: Path, fmt: str, abi: str, err: int
) -> None:
    path = _image(tmp_path, fmt)
    d, img = guest_disks(path, fmt, faults=True, abi=abi)
    assert isinstance(img, FaultImage)
    _fill(d, seed=1)
    rule = img.inject_fault("write", err, off=FAULT_OFF, length=FAULT_LEN)
    res = d.finish_batch(d.start_batch(0, [(OP_WRITE, off // SECTOR, pattern_bytes(off, CHUNK, 2)) for off in OFFSETS]))
    hit = [_hit(off) for off in OFFSETS]
    assert [s for s, _ in res] == [RSP_ERROR if h else RSP_OKAY for h in hit]
    assert img.fault_hits(rule) == sum(hit)
    reason = "nospc" if err == errno.ENOSPC else "io"
    assert _errors(d) == {k: (sum(hit) if k == reason else 0) for k in ERRORS}
    assert d.stats().op_named("write").errors == sum(hit)
    # a failed write left the old data; the others landed
    img.clear_faults()
    assert d.one(rw_request(abi, OP_FLUSH, 9, 0, [])).status == RSP_OKAY
    for off, h in zip(OFFSETS, hit, strict=True):
        assert d.read(off // SECTOR, CHUNK) == (RSP_OKAY, pattern_bytes(off, CHUNK, 1 if h else 2)), f"at {off}"
    d.stop()
    img.close()
    if fmt == "qcow2":
        rc, report = qemu_check(path)
        assert rc == 0, report
    with open(path, "rb") as f:
        if fmt == "raw":
            for off, h in zip(OFFSETS, hit, strict=True):
                f.seek(off)
                assert f.read(CHUNK) == pattern_bytes(off, CHUNK, 1 if h else 2)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_fault_after_n_calls_for_count_calls(guest_disks: MakeGuestDisk, tmp_path: Path, fmt: str) -> None:
    """Writes one at a time: the rule lets two through, fails the next two, then is spent."""
    d, img = guest_disks(_image(tmp_path, fmt), fmt, faults=True)
    assert isinstance(img, FaultImage)
    rule = img.inject_fault("write", errno.EIO, after=2, count=2)
    statuses = [d.write(i * 16, pattern_bytes(i * 8192, 8192, 3)) for i in range(6)]
    assert statuses == [RSP_OKAY, RSP_OKAY, RSP_ERROR, RSP_ERROR, RSP_OKAY, RSP_OKAY]
    assert img.fault_hits(rule) == 2
    assert _errors(d)["io"] == 2
    for i in range(6):
        want = bytes(8192) if i in (2, 3) else pattern_bytes(i * 8192, 8192, 3)
        assert d.read(i * 16, 8192) == (RSP_OKAY, want)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("abi", ABIS)
def test_flush_failure_is_never_okay(guest_disks: MakeGuestDisk, tmp_path: Path, fmt: str, abi: str) -> None:
    """fdatasync failing (EIO): a FLUSH, and a WRITE_BARRIER whose flush fails, answer RSP_ERROR."""
    d, img = guest_disks(_image(tmp_path, fmt), fmt, faults=True, abi=abi)
    assert isinstance(img, FaultImage)
    assert d.write(0, pattern_bytes(0, PAGE, 4)) == RSP_OKAY
    rule = img.inject_fault("flush", errno.EIO, count=3)
    assert d.one(rw_request(abi, OP_FLUSH, 11, 0, [])).status == RSP_ERROR
    frames, refs = d.data_pages(pattern_bytes(PAGE, PAGE, 4), readonly=True)
    barrier = rw_request(abi, OP_WRITE_BARRIER, 12, PAGE // SECTOR, d.segs_for(refs, PAGE))
    assert d.one(barrier).status == RSP_ERROR
    d.release(frames, refs)
    assert d.one(rw_request(abi, OP_FLUSH, 13, 0, [])).status == RSP_ERROR
    assert img.fault_hits(rule) == 3
    st = d.stats()
    assert st.op_named("flush").errors == 2 and st.op_named("barrier").errors == 1
    assert _errors(d)["io"] == 3
    # the rule is spent: the next flush reaches the image and succeeds
    assert d.one(rw_request(abi, OP_FLUSH, 14, 0, [])).status == RSP_OKAY
    assert d.read(0, PAGE) == (RSP_OKAY, pattern_bytes(0, PAGE, 4))


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_discard_failure(guest_disks: MakeGuestDisk, tmp_path: Path, fmt: str) -> None:
    d, img = guest_disks(_image(tmp_path, fmt), fmt, faults=True)
    assert isinstance(img, FaultImage)
    _fill(d, seed=5)
    rule = img.inject_fault("discard", errno.EIO, off=MiB, length=MiB)
    assert d.one(discard_request(d.abi, 21, MiB // SECTOR, 65536 // SECTOR)).status == RSP_ERROR
    assert d.one(discard_request(d.abi, 22, 4 * MiB // SECTOR, 65536 // SECTOR)).status == RSP_OKAY
    assert img.fault_hits(rule) == 1
    assert d.stats().op_named("discard").errors == 1 and _errors(d)["io"] == 1
    # the failed discard dropped nothing
    assert d.read(MiB // SECTOR, 65536, indirect=True) == (RSP_OKAY, pattern_bytes(MiB, 65536, 5))


def test_faults_hold_on_the_fast_path_of_other_queues(guest_disks: MakeGuestDisk, tmp_path: Path) -> None:
    """Four queues reading at once, one range failing: only the requests touching it fail."""
    d, img = guest_disks(_image(tmp_path, "raw"), "raw", faults=True, nr_queues=4, ring_pages=4)
    assert isinstance(img, FaultImage)
    _fill(d, seed=6)
    rule = img.inject_fault("read", errno.EIO, off=2 * MiB, length=PAGE)
    batches = [
        d.start_batch(q, [(OP_READ, (q * 2 * MiB + k * 65536) // SECTOR, 65536) for k in range(32)], indirect=True)
        for q in range(4)
    ]
    failed = 0
    for q, b in enumerate(batches):
        for k, (status, data) in enumerate(d.finish_batch(b)):
            off = q * 2 * MiB + k * 65536
            if off == 2 * MiB:
                assert status == RSP_ERROR
                failed += 1
            else:
                assert (status, data) == (RSP_OKAY, pattern_bytes(off, 65536, 6)), f"queue {q} at {off}"
    assert failed == 1 and img.fault_hits(rule) == 1
    assert sum(d.stats(q).errors[ERRORS.index("io")] for q in range(4)) == 1


def test_fault_api_refuses_nonsense(tmp_path: Path) -> None:
    path = make_raw_image(tmp_path / "d.raw", MiB, pattern=False)
    with FaultImage.open(str(path)) as img:
        assert isinstance(img, FaultImage)
        with pytest.raises(storage.StorageError):
            img.inject_fault("scribble", errno.EIO)
        with pytest.raises(storage.StorageError):
            img.inject_fault("read", 0)
        # the synchronous API sees the faults too
        img.inject_fault(("read", "write"), errno.EIO, off=4096, length=4096)
        img.write(0, b"a" * 4096)
        with pytest.raises(storage.StorageError) as e:
            img.write(4096, b"b" * 10)
        assert e.value.errno == errno.EIO
        with pytest.raises(storage.StorageError):
            img.read(8000, 200)
        assert img.read(0, 4096) == b"a" * 4096
        assert img.check()["ok"] and img.info()["format"] == "raw"
    # a plain image has no fault rules to set, not even through the C call
    with storage.Image.open(str(path)) as plain:
        assert not hasattr(plain, "inject_fault")
        rc = _xbfault.lib.xb_fault_add(as_fault_ptr(plain.ptr), FAULT_OPS["read"], errno.EIO, 0, 0, 0, 0)
        assert rc == -errno.EINVAL
