"""Every validation rule of the data plane, in both ABIs: a crafted request (raw ring bytes from
the test guest) must be answered with an error, counted under its reason, and must not touch
storage (the image file is byte-for-byte unchanged, no storage operation is counted, and a read's
guest pages are not written). A guest that breaks the ring protocol stops only its own queue."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.ring import (
    ABIS,
    OP_DISCARD,
    OP_FLUSH,
    OP_INDIRECT,
    OP_READ,
    OP_RESERVED_1,
    OP_WRITE,
    OP_WRITE_BARRIER,
    PAGE,
    RSP_EOPNOTSUPP,
    RSP_ERROR,
    RSP_OKAY,
    GuestDisk,
    TestGuest,
    discard_request,
    indirect_request,
    make_raw_image,
    other_request,
    pattern_bytes,
    rw_request,
)
from tests.fixtures.wait import wait_until
from xenblk import storage
from xenblk.xenplatform import Platform

SIZE = 1 << 20
SECTORS = SIZE // 512

MakeDisk = Callable[..., GuestDisk]


@pytest.fixture
def make_disk(sim_platform: Platform, test_guest: TestGuest, tmp_path: Path) -> Iterator[MakeDisk]:
    disks: list[GuestDisk] = []
    images: list[storage.Image] = []

    def make(abi: str, path: Path | None = None, readonly_image: bool = False, **cfg: Any) -> GuestDisk:
        if path is None:
            path = make_raw_image(tmp_path / f"disk{len(disks)}.raw", SIZE)
        img = storage.Image.open(str(path), readonly=readonly_image)
        images.append(img)
        d = GuestDisk(sim_platform, test_guest, img, abi=abi, **cfg)
        d.path = path  # type: ignore[attr-defined]
        disks.append(d)
        return d

    yield make
    for d in disks:
        d.stop()
    for i in images:
        i.close()


def _no_storage_ops(d: GuestDisk) -> None:
    s = d.stats()
    assert [o.requests for o in s.op] == [0] * 5
    assert s.in_flight == 0


def refused(d: GuestDisk, raw: bytes, reason: str, status: int = RSP_ERROR) -> None:
    """Send a crafted entry; it must be answered `status`, counted as `reason`, and touch nothing."""
    before = Path(d.path).read_bytes()  # type: ignore[attr-defined]
    rsp = d.one(raw)
    assert rsp.status == status
    # the wire opcode is echoed, for an indirect request its indirect_op (byte 1), as blkback does
    assert rsp.operation == (raw[1] if raw[0] == OP_INDIRECT else raw[0])
    s = d.stats()
    assert s.refused(reason) == 1, s.refusals
    assert sum(s.refusals) == 1
    _no_storage_ops(d)
    assert Path(d.path).read_bytes() == before  # type: ignore[attr-defined]


def data_segs(d: GuestDisk, nseg: int, fill: bytes = b"X") -> tuple[list[int], list[tuple[int, int, int]]]:
    frames, refs = d.data_pages(fill * (nseg * PAGE), readonly=True)
    return frames, [(r, 0, 7) for r in refs]


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("op", [OP_RESERVED_1, 7, 0x80, 0xFF])
def test_unknown_opcode(make_disk: MakeDisk, abi: str, op: int) -> None:
    d = make_disk(abi)
    refused(d, other_request(abi, op, 0xDEADBEEF), "bad_op", RSP_EOPNOTSUPP)


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("op", [OP_READ, OP_WRITE])
def test_zero_segments(make_disk: MakeDisk, abi: str, op: int) -> None:
    d = make_disk(abi)
    refused(d, rw_request(abi, op, 11, 0, []), "nseg")


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("op", [OP_READ, OP_WRITE, OP_FLUSH, OP_WRITE_BARRIER])
def test_too_many_direct_segments(make_disk: MakeDisk, abi: str, op: int) -> None:
    d = make_disk(abi)
    _, segs = data_segs(d, 11)
    refused(d, rw_request(abi, op, 12, 0, segs, nseg=12), "nseg")


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("nseg", [0, 33, 257, 0xFFFF])
def test_indirect_segment_count(make_disk: MakeDisk, abi: str, nseg: int) -> None:
    d = make_disk(abi, max_indirect_segments=32)
    ind = d.guest.alloc_frames(1)
    ref = d.guest.grant(ind[0], readonly=True)
    refused(d, indirect_request(abi, OP_WRITE, 13, 0, nseg, [ref]), "nseg")


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize(("first", "last"), [(3, 2), (0, 8), (8, 8), (255, 255)])
@pytest.mark.parametrize("op", [OP_READ, OP_WRITE])
def test_bad_sectors_in_segment(make_disk: MakeDisk, abi: str, first: int, last: int, op: int) -> None:
    d = make_disk(abi)
    frames, segs = data_segs(d, 2)
    segs[1] = (segs[1][0], first, last)
    refused(d, rw_request(abi, op, 14, 0, segs), "sect")
    if op == OP_READ:
        assert d.guest.read_frame(frames[0]) == b"X" * PAGE  # no data was copied to the guest


@pytest.mark.parametrize("abi", ABIS)
def test_bad_sectors_in_indirect_segment(make_disk: MakeDisk, abi: str) -> None:
    d = make_disk(abi)
    _frames, refs = d.data_pages(b"X" * 3 * PAGE, readonly=True)
    _rid, raw, (ind_frames, _) = d.rw_raw(OP_WRITE, 0, refs, 3 * PAGE, indirect=True)
    # the second descriptor in the indirect page gets first_sect 5 > last_sect 4
    d.guest.write_frame(ind_frames[0], bytes([5, 4]), offset=8 + 4)
    refused(d, raw, "sect")


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize(
    ("sector", "nseg"),
    [
        (SECTORS, 1),  # starts at the end
        (SECTORS - 8, 2),  # runs past the end
        (2**64 - 8, 2),  # wraps around
        (2**63, 1),
    ],
)
@pytest.mark.parametrize("op", [OP_READ, OP_WRITE])
def test_out_of_range(make_disk: MakeDisk, abi: str, sector: int, nseg: int, op: int) -> None:
    d = make_disk(abi)
    _, segs = data_segs(d, nseg)
    refused(d, rw_request(abi, op, 15, sector, segs), "range")


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize(("sector", "count"), [(SECTORS - 1, 2), (2**64 - 1, 2), (1, 2**64 - 1)])
def test_discard_out_of_range(make_disk: MakeDisk, abi: str, sector: int, count: int) -> None:
    d = make_disk(abi)
    if not d.image.can_discard:
        pytest.skip("this filesystem cannot punch holes")
    refused(d, discard_request(abi, 16, sector, count), "range")


@pytest.mark.parametrize("abi", ABIS)
def test_secure_discard_not_advertised(make_disk: MakeDisk, abi: str) -> None:
    d = make_disk(abi, secure_discard=False)
    if not d.image.can_discard:
        pytest.skip("this filesystem cannot punch holes")
    refused(d, discard_request(abi, 17, 0, 8, flag=1), "secure", RSP_EOPNOTSUPP)


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("which", ["write", "flush", "barrier", "discard", "indirect-write", "flush-data"])
def test_readonly_device_refuses_writes(make_disk: MakeDisk, abi: str, which: str) -> None:
    d = make_disk(abi, readonly=True)
    _, segs = data_segs(d, 2)
    raw = {
        "write": lambda: rw_request(abi, OP_WRITE, 18, 0, segs),
        "flush": lambda: rw_request(abi, OP_FLUSH, 18, 0, []),
        "barrier": lambda: rw_request(abi, OP_WRITE_BARRIER, 18, 0, segs),
        "discard": lambda: discard_request(abi, 18, 0, 8),
        "indirect-write": lambda: d.rw_raw(OP_WRITE, 0, [s[0] for s in segs], 2 * PAGE, indirect=True)[1],
        "flush-data": lambda: rw_request(abi, OP_FLUSH, 18, 0, segs),
    }[which]()
    refused(d, raw, "readonly")


@pytest.mark.parametrize("abi", ABIS)
def test_readonly_image_refuses_writes(make_disk: MakeDisk, tmp_path: Path, abi: str) -> None:
    """An image opened read-only makes the device read-only even if the config says rw."""
    d = make_disk(abi, readonly_image=True)
    _, segs = data_segs(d, 1)
    refused(d, rw_request(abi, OP_WRITE, 19, 0, segs), "readonly")
    status, data = d.read(0, PAGE)
    assert status == RSP_OKAY and data == pattern_bytes(0, PAGE)


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("indirect_op", [OP_WRITE_BARRIER, OP_FLUSH, OP_DISCARD, OP_INDIRECT, 0x77])
def test_indirect_op_must_be_read_or_write(make_disk: MakeDisk, abi: str, indirect_op: int) -> None:
    d = make_disk(abi)
    ind = d.guest.alloc_frames(1)
    ref = d.guest.grant(ind[0], readonly=True)
    refused(d, indirect_request(abi, indirect_op, 20, 0, 4, [ref]), "indirect")


@pytest.mark.parametrize("abi", ABIS)
def test_indirect_not_offered(make_disk: MakeDisk, abi: str) -> None:
    d = make_disk(abi, max_indirect_segments=0)
    _frames, refs = d.data_pages(b"X" * 2 * PAGE, readonly=True)
    _, raw, _ = d.rw_raw(OP_WRITE, 0, refs, 2 * PAGE, indirect=True)
    refused(d, raw, "indirect")


def _losetup_4k(path: Path) -> str | None:
    try:
        r = subprocess.run(
            ["losetup", "-f", "--show", "--sector-size", "4096", str(path)], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


@pytest.fixture
def disk_4k(tmp_path: Path) -> Iterator[Path]:
    """A real block device with 4096-byte logical sectors (a loop device), its backing file filled with a pattern."""
    backing = make_raw_image(tmp_path / "4k.raw", SIZE)
    dev = _losetup_4k(backing)
    if not dev:
        pytest.skip("no loop devices with 4096-byte sectors here")
    try:
        yield Path(dev)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize(
    ("sector", "first", "last"),
    [(1, 0, 7), (4, 0, 7), (0, 0, 3), (0, 4, 7), (0, 1, 7)],
)
@pytest.mark.parametrize("op", [OP_READ, OP_WRITE])
def test_misaligned_for_4k_sectors(
    make_disk: MakeDisk, disk_4k: Path, abi: str, sector: int, first: int, last: int, op: int
) -> None:
    d = make_disk(abi, path=disk_4k)
    assert d.image.logical_block == 4096
    _frames, refs = d.data_pages(b"X" * PAGE, readonly=op == OP_WRITE)
    before = d.image.read(0, SIZE)
    rsp = d.one(rw_request(abi, op, 21, sector, [(refs[0], first, last)]))
    assert rsp.status == RSP_ERROR
    s = d.stats()
    assert s.refused("align") == 1 and sum(s.refusals) == 1
    _no_storage_ops(d)
    assert d.image.read(0, SIZE) == before
    # and an aligned request on the same device works
    status, data = d.read(8, PAGE)
    assert status == RSP_OKAY and data == pattern_bytes(8 * 512, PAGE)


# ---- grants ----


@pytest.mark.parametrize("abi", ABIS)
def test_write_from_ungranted_page(make_disk: MakeDisk, abi: str) -> None:
    d = make_disk(abi)
    _frames, refs = d.data_pages(b"X" * 2 * PAGE, readonly=True)
    d.guest.revoke(refs[1])
    refused(d, rw_request(abi, OP_WRITE, 22, 0, [(refs[0], 0, 7), (refs[1], 0, 7)]), "grant")
    assert d.stats().grant_copy_failures >= 1


@pytest.mark.parametrize("abi", ABIS)
def test_write_from_grant_for_another_domain(make_disk: MakeDisk, abi: str) -> None:
    d = make_disk(abi)
    frame = d.guest.alloc_frames(1)[0]
    d.guest.write_frame(frame, b"X" * PAGE)
    ref = d.guest.grant(frame, readonly=True, domid=7)
    refused(d, rw_request(abi, OP_WRITE, 23, 0, [(ref, 0, 7)]), "grant")


@pytest.mark.parametrize("abi", ABIS)
def test_indirect_page_not_granted(make_disk: MakeDisk, abi: str) -> None:
    d = make_disk(abi)
    refused(d, indirect_request(abi, OP_WRITE, 24, 0, 4, [4000]), "grant")


@pytest.mark.parametrize("abi", ABIS)
def test_read_into_readonly_grant_fails(make_disk: MakeDisk, abi: str) -> None:
    """A READ reaches storage, but the copy to a page the guest granted read-only must fail the request."""
    d = make_disk(abi)
    frames, refs = d.data_pages(b"X" * PAGE, readonly=True)
    before = Path(d.path).read_bytes()  # type: ignore[attr-defined]
    rsp = d.one(rw_request(abi, OP_READ, 25, 0, [(refs[0], 0, 7)]))
    assert rsp.status == RSP_ERROR
    s = d.stats()
    assert s.op_named("read").errors == 1
    assert s.errors[2] == 1  # grant
    assert s.grant_copy_failures >= 1
    assert d.guest.read_frame(frames[0]) == b"X" * PAGE
    assert Path(d.path).read_bytes() == before  # type: ignore[attr-defined]


# ---- ring protocol ----


@pytest.mark.parametrize("abi", ABIS)
def test_producer_overflow_stops_only_that_queue(
    sim_platform: Platform, make_disk: MakeDisk, tmp_path: Path, abi: str
) -> None:
    bad = make_disk(abi, nr_queues=2)
    other_guest = TestGuest(sim_platform, 900 + ABIS.index(abi))
    other_img = storage.Image.open(str(make_raw_image(tmp_path / "other.raw", SIZE)))
    other = GuestDisk(sim_platform, other_guest, other_img, abi=abi)
    try:
        ring = bad.rings[0]
        ring.set_req_prod(ring.size + 1)  # more requests than the ring holds
        msg = wait_until(lambda: bad.dev.queue_failed(0), "queue 0 stopped on the overflow", interval=0.01)
        assert msg is not None and "ring" in msg
        assert bad.stats(0).ring_protocol_errors == 1
        _no_storage_ops(bad)
        # the device's other queue and another guest's device keep serving
        assert bad.dev.queue_failed(1) is None
        assert bad.write(0, b"Q" * PAGE, q=1) == RSP_OKAY
        assert bad.read(0, PAGE, q=1) == (RSP_OKAY, b"Q" * PAGE)
        assert other.write(8, b"O" * PAGE) == RSP_OKAY
        assert other.read(8, PAGE) == (RSP_OKAY, b"O" * PAGE)
    finally:
        other.stop()
        other_img.close()
        other_guest.close()
    # stopping a device whose queue failed works, twice
    bad.stop()
    bad.stop()


@pytest.mark.parametrize("abi", ABIS)
def test_refusals_do_not_disturb_good_requests(make_disk: MakeDisk, abi: str) -> None:
    """Hostile entries mixed into one batch with good ones: each is answered on its own."""
    d = make_disk(abi)
    _frames, refs = d.data_pages(b"G" * PAGE, readonly=True)
    good = rw_request(abi, OP_WRITE, 100, 64, [(refs[0], 0, 7)])
    bad1 = other_request(abi, 0x55, 101)
    bad2 = rw_request(abi, OP_WRITE, 102, SECTORS, [(refs[0], 0, 7)])
    out = d.submit([bad1, good, bad2])
    assert out[100].status == RSP_OKAY
    assert out[101].status == RSP_EOPNOTSUPP
    assert out[102].status == RSP_ERROR
    assert d.image.read(64 * 512, PAGE) == b"G" * PAGE
    s = d.stats()
    assert s.op_named("write").requests == 1 and sum(s.refusals) == 2
