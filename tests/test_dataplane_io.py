"""Data through the real data plane: the test guest writes, reads back and verifies bytes over
1- and 16-page rings, 1 and 4 queues, direct and indirect requests, both ABIs; flush, discard
(a hole punched in the raw file), barrier ordering, out-of-order answers, statistics that add
up to what was issued, online resize, and a stop that drains what is in flight."""

from __future__ import annotations

import errno
import itertools
import os
import random
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.ring import (
    ABIS,
    OP_DISCARD,
    OP_FLUSH,
    OP_READ,
    OP_WRITE,
    OP_WRITE_BARRIER,
    PAGE,
    RSP_OKAY,
    GuestDisk,
    TestGuest,
    discard_request,
    make_raw_image,
    other_request,
    pattern_bytes,
    rw_request,
)
from xenblk import dataplane, storage
from xenblk.xenplatform import Platform

MiB = 1 << 20
SIZE = 8 * MiB

MakeDisk = Callable[..., GuestDisk]


@pytest.fixture
def make_disk(sim_platform: Platform, test_guest: TestGuest, tmp_path: Path) -> Iterator[MakeDisk]:
    disks: list[GuestDisk] = []
    images: list[storage.Image] = []

    def make(abi: str = "x86_64-abi", fmt: str = "raw", path: Path | None = None, **cfg: Any) -> GuestDisk:
        if path is None:
            path = make_raw_image(tmp_path / f"disk{len(disks)}.raw", SIZE, pattern=False)
        img = storage.Image.open(str(path), fmt)
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


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("ring_pages", [1, 16])
@pytest.mark.parametrize("queues", [1, 4])
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_write_read_verify(make_disk: MakeDisk, abi: str, ring_pages: int, queues: int, indirect: bool) -> None:
    d = make_disk(abi, ring_pages=ring_pages, nr_queues=queues)
    rng = random.Random(f"{abi}{ring_pages}{queues}{indirect}")
    # each queue owns a region; requests of 1..11 pages (direct) or up to 64 pages (indirect), many in flight
    region = SIZE // queues
    plans: list[list[tuple[int, int]]] = []
    for q in range(queues):
        off, plan = q * region, []
        while True:
            pages = rng.randint(1, 64 if indirect else 11)
            if off + pages * PAGE > (q + 1) * region or len(plan) == 40:
                break
            plan.append((off, pages * PAGE))
            off += pages * PAGE
        plans.append(plan)
    seed = ring_pages * 10 + queues
    batches = [
        d.start_batch(q, [(OP_WRITE, off // 512, pattern_bytes(off, n, seed)) for off, n in plan], indirect)
        for q, plan in enumerate(plans)
    ]
    for b in batches:
        assert all(status == RSP_OKAY for status, _ in d.finish_batch(b))
    batches = [
        d.start_batch(q, [(OP_READ, off // 512, n) for off, n in plan], indirect) for q, plan in enumerate(plans)
    ]
    for b, plan in zip(batches, plans, strict=True):
        for (status, data), (off, n) in zip(d.finish_batch(b), plan, strict=True):
            assert status == RSP_OKAY
            assert data == pattern_bytes(off, n, seed)
    # the file itself holds the bytes
    raw = Path(d.path).read_bytes()  # type: ignore[attr-defined]
    for plan in plans:
        for off, n in plan:
            assert raw[off : off + n] == pattern_bytes(off, n, seed)
    # statistics add up to what was issued, per queue
    for q, plan in enumerate(plans):
        s = d.stats(q)
        total = sum(n for _, n in plan)
        assert s.op_named("write").requests == len(plan) and s.op_named("write").bytes == total
        assert s.op_named("read").requests == len(plan) and s.op_named("read").bytes == total
        assert sum(s.op_named("read").lat_buckets) == len(plan)
        assert sum(s.op_named("write").storage_buckets) == len(plan)
        assert sum(s.seg_buckets) == 2 * len(plan)
        assert s.in_flight == 0 and sum(s.refusals) == 0 and sum(s.errors) == 0
        assert s.notifications_in >= 1 and s.notifications_out >= 1
        assert d.dev.queue_failed(q) is None


@pytest.mark.parametrize("abi", ABIS)
def test_sector_granular_segments(make_disk: MakeDisk, abi: str) -> None:
    """Segments covering parts of pages (first_sect..last_sect) land at the right offsets."""
    d = make_disk(abi)
    _frames, refs = d.data_pages(pattern_bytes(0, 3 * PAGE, 5), readonly=True)
    segs = [(refs[0], 2, 4), (refs[1], 0, 7), (refs[2], 7, 7)]  # 3 + 8 + 1 sectors
    rsp = d.one(rw_request(abi, OP_WRITE, 77, 100, segs))
    assert rsp.status == RSP_OKAY
    expect = (
        pattern_bytes(2 * 512, 3 * 512, 5) + pattern_bytes(PAGE, PAGE, 5) + pattern_bytes(2 * PAGE + 7 * 512, 512, 5)
    )
    assert d.image.read(100 * 512, len(expect)) == expect
    # read them back into other sector ranges of fresh pages
    rframes, rrefs = d.data_pages(b"\xee" * 2 * PAGE)
    rsp = d.one(rw_request(abi, OP_READ, 78, 100, [(rrefs[0], 1, 7), (rrefs[1], 3, 7)]))
    assert rsp.status == RSP_OKAY
    got = d.guest.read_frame(rframes[0])
    assert got[:512] == b"\xee" * 512 and got[512:] == expect[: 7 * 512]
    got = d.guest.read_frame(rframes[1])
    assert got[: 3 * 512] == b"\xee" * 3 * 512 and got[3 * 512 :] == expect[7 * 512 : 12 * 512]


@pytest.mark.parametrize("abi", ABIS)
def test_qcow2_through_the_ring(make_disk: MakeDisk, tmp_path: Path, abi: str) -> None:
    """qcow2 allocates on first write (the slow path), then serves allocated clusters (the fast path)."""
    path = tmp_path / "q.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(SIZE)], check=True)
    d = make_disk(abi, fmt="qcow2", path=path, nr_queues=2)
    for q in range(2):
        b = d.start_batch(
            q, [(OP_WRITE, (q * 4 * MiB + i * 40960) // 512, pattern_bytes(i, 40960, q)) for i in range(8)]
        )
        assert all(st == RSP_OKAY for st, _ in d.finish_batch(b))
    for q in range(2):
        b = d.start_batch(q, [(OP_READ, (q * 4 * MiB + i * 40960) // 512, 40960) for i in range(8)], indirect=True)
        for i, (st, data) in enumerate(d.finish_batch(b)):
            assert st == RSP_OKAY and data == pattern_bytes(i, 40960, q)
    rsp = d.one(rw_request(abi, OP_FLUSH, 5, 0, []))
    assert rsp.status == RSP_OKAY
    d.stop()
    d.image.close()
    r = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("abi", ABIS)
def test_flush(make_disk: MakeDisk, abi: str) -> None:
    d = make_disk(abi)
    assert d.write(0, b"F" * PAGE) == RSP_OKAY
    rsp = d.one(rw_request(abi, OP_FLUSH, 1234, 0, []))
    assert rsp.status == RSP_OKAY and rsp.operation == OP_FLUSH
    # Linux sends an empty flush with sector_number (sector_t)-1: no sectors, nothing to check
    assert d.one(rw_request(abi, OP_FLUSH, 1236, 2**64 - 1, [])).status == RSP_OKAY
    assert d.one(rw_request(abi, OP_WRITE_BARRIER, 1237, 2**64 - 1, [])).status == RSP_OKAY
    # a flush carrying data writes it, then flushes
    _frames, refs = d.data_pages(b"D" * PAGE, readonly=True)
    rsp = d.one(rw_request(abi, OP_FLUSH, 1235, 8, [(refs[0], 0, 7)]))
    assert rsp.status == RSP_OKAY
    assert d.image.read(8 * 512, PAGE) == b"D" * PAGE
    s = d.stats()
    assert s.op_named("flush").requests == 3 and s.op_named("flush").bytes == PAGE


def _allocated(path: Path, off: int, n: int) -> bool:
    """Whether any byte of [off, off+n) is allocated in the file (SEEK_DATA)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            data = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:
            return False
        return data < off + n
    finally:
        os.close(fd)


@pytest.mark.parametrize("abi", ABIS)
def test_discard_punches_a_hole(make_disk: MakeDisk, abi: str) -> None:
    d = make_disk(abi)
    if not d.image.can_discard:
        pytest.skip("this filesystem cannot punch holes")
    path = Path(d.path)  # type: ignore[attr-defined]
    b = d.start_batch(0, [(OP_WRITE, (MiB + i * 44 * 1024) // 512, b"Z" * 44 * 1024) for i in range(24)])
    assert all(st == RSP_OKAY for st, _ in d.finish_batch(b))
    assert _allocated(path, MiB, MiB)
    rsp = d.one(discard_request(abi, 4321, MiB // 512, MiB // 512))
    assert rsp.status == RSP_OKAY and rsp.operation == OP_DISCARD
    assert not _allocated(path, MiB, MiB)
    status, data = d.read(MiB // 512, 8 * PAGE)
    assert status == RSP_OKAY and data == bytes(8 * PAGE)
    assert d.stats().op_named("discard").requests == 1


@pytest.mark.parametrize("abi", ABIS)
def test_barrier_orders_writes(make_disk: MakeDisk, abi: str) -> None:
    """Writes before a barrier complete before it; writes after it start after it."""
    d = make_disk(abi, ring_pages=4)
    _frames_a, refs_a = d.data_pages(b"A" * 11 * PAGE, readonly=True)
    _frames_b, refs_b = d.data_pages(b"B" * 11 * PAGE, readonly=True)
    _frames_c, refs_c = d.data_pages(b"C" * 11 * PAGE, readonly=True)
    segs = [lambda refs=refs: [(r, 0, 7) for r in refs] for refs in (refs_a, refs_b, refs_c)]
    for rnd in range(5):
        x = rnd * 96
        entries = [rw_request(abi, OP_WRITE, 1000 * rnd + i, x, segs[0]()) for i in range(20)]
        entries.append(rw_request(abi, OP_WRITE_BARRIER, 1000 * rnd + 500, x, segs[1]()))
        entries.append(rw_request(abi, OP_WRITE, 1000 * rnd + 501, x + 88, segs[2]()))
        out = d.submit(entries)
        assert all(r.status == RSP_OKAY for r in out.values())
        assert out[1000 * rnd + 500].operation == OP_WRITE_BARRIER
        assert d.image.read(x * 512, 11 * PAGE) == b"B" * 11 * PAGE
        assert d.image.read((x + 88) * 512, 11 * PAGE) == b"C" * 11 * PAGE
    # a barrier without data is a drain + flush
    assert d.one(rw_request(abi, OP_WRITE_BARRIER, 9, 0, [])).status == RSP_OKAY
    assert d.stats().op_named("barrier").requests == 6


@pytest.mark.parametrize("abi", ABIS)
def test_answers_out_of_order(make_disk: MakeDisk, abi: str) -> None:
    """Answers go out as requests finish, not in ring order: a request refused by validation is
    answered while the writes taken before it are still in storage (their completions are only
    collected after the batch has been taken from the ring)."""
    d = make_disk(abi)
    _frames, refs = d.data_pages(b"W" * 8 * PAGE, readonly=True)
    ring = d.rings[0]
    for i in range(4):
        ring.put(rw_request(abi, OP_WRITE, 10 + i, i * 64, [(r, 0, 7) for r in refs]))
    ring.put(other_request(abi, 0x42, 99))
    ring.push()
    got = ring.wait_responses(5)
    ids = [r.id for r in got]
    assert sorted(ids) == [10, 11, 12, 13, 99]
    assert ids[0] == 99
    assert all(r.status == RSP_OKAY for r in got if r.id != 99)
    for i in range(4):
        assert d.image.read(i * 64 * 512, 8 * PAGE) == b"W" * 8 * PAGE


@pytest.mark.parametrize("abi", ABIS)
def test_ring_indexes_wrap(make_disk: MakeDisk, abi: str) -> None:
    """A ring whose indexes cross 2**32 (attached mid-life): every request is taken and answered once."""
    d = make_disk(abi, ring_start=2**32 - 40)
    items = [(OP_WRITE, i * 8, pattern_bytes(i * PAGE, PAGE, 3)) for i in range(100)]
    assert all(st == RSP_OKAY for st, _ in d.finish_batch(d.start_batch(0, items)))
    reads = d.finish_batch(d.start_batch(0, [(OP_READ, i * 8, PAGE) for i in range(100)]))
    assert [data for _, data in reads] == [pattern_bytes(i * PAGE, PAGE, 3) for i in range(100)]
    assert d.rings[0].req_prod_pvt < 200  # wrapped
    s = d.stats()
    assert s.op_named("write").requests == 100 and s.op_named("read").requests == 100
    assert d.dev.queue_failed(0) is None and s.ring_protocol_errors == 0


@pytest.mark.parametrize("abi", ABIS)
def test_resize(make_disk: MakeDisk, abi: str) -> None:
    d = make_disk(abi)
    path = Path(d.path)  # type: ignore[attr-defined]
    assert d.write(SIZE // 512, b"R" * PAGE) != RSP_OKAY
    with open(path, "r+b") as f:
        f.truncate(2 * SIZE)
    d.dev.set_size(d.image.refresh_size())
    assert d.write(SIZE // 512, b"R" * PAGE) == RSP_OKAY
    assert d.read(SIZE // 512, PAGE) == (RSP_OKAY, b"R" * PAGE)
    assert d.stats().refused("range") == 1


@pytest.mark.parametrize("abi", ABIS)
def test_stop_drains_in_flight(make_disk: MakeDisk, abi: str) -> None:
    """stop() right after a burst: every request the data plane took is answered and on disk."""
    d = make_disk(abi, ring_pages=16)
    ring = d.rings[0]
    n = min(ring.size, SIZE // (44 * 1024))
    data = {i: pattern_bytes(i * 44 * 1024, 44 * 1024, 9) for i in range(n)}
    frames, raws = [], []
    for i in range(n):
        fr, refs = d.data_pages(data[i], readonly=True)
        frames.append(fr)
        raws.append(rw_request(abi, OP_WRITE, 5000 + i, i * 88, [(r, 0, 7) for r in refs]))
    for r in raws:
        ring.put(r)
    ring.push(force_kick=True)
    d.stop()
    s = d.stats()
    assert s.in_flight == 0
    answered = ring.take_responses()
    assert len(answered) == s.op_named("write").requests
    assert all(r.status == RSP_OKAY for r in answered)
    for r in answered:
        i = r.id - 5000
        assert d.image.read(i * 88 * 512, 44 * 1024) == data[i]
    d.stop()  # idempotent


def test_devices_of_two_guests(make_disk: MakeDisk, sim_platform: Platform, tmp_path: Path) -> None:
    """Two guests, one of each ABI, served at once from one platform."""
    d1 = make_disk("x86_64-abi", nr_queues=2)
    g2 = TestGuest(sim_platform, 4242)
    img2 = storage.Image.open(str(make_raw_image(tmp_path / "g2.raw", SIZE, pattern=False)))
    d2 = GuestDisk(sim_platform, g2, img2, abi="x86_32-abi", ring_pages=2)
    try:
        b1 = d1.start_batch(1, [(OP_WRITE, i * 8, pattern_bytes(i, PAGE, 1)) for i in range(30)])
        b2 = d2.start_batch(0, [(OP_WRITE, i * 8, pattern_bytes(i, PAGE, 2)) for i in range(30)], indirect=True)
        assert all(st == RSP_OKAY for st, _ in d1.finish_batch(b1))
        assert all(st == RSP_OKAY for st, _ in d2.finish_batch(b2))
        for i in range(30):
            assert d1.image.read(i * PAGE, PAGE) == pattern_bytes(i, PAGE, 1)
            assert img2.read(i * PAGE, PAGE) == pattern_bytes(i, PAGE, 2)
    finally:
        d2.stop()
        img2.close()
        g2.close()


@pytest.mark.parametrize("abi", ABIS)
def test_full_indirect_requests(make_disk: MakeDisk, abi: str) -> None:
    """256 segments (1 MiB) per request, the most xenblk advertises, several in flight."""
    d = make_disk(abi, ring_pages=2)
    items = [(OP_WRITE, (i * MiB) // 512, pattern_bytes(i * MiB, MiB, 11)) for i in range(4)]
    assert all(st == RSP_OKAY for st, _ in d.finish_batch(d.start_batch(0, items, indirect=True)))
    reads = d.finish_batch(d.start_batch(0, [(OP_READ, (i * MiB) // 512, MiB) for i in range(4)], indirect=True))
    assert [data for _, data in reads] == [pattern_bytes(i * MiB, MiB, 11) for i in range(4)]
    s = d.stats()
    assert s.seg_buckets[-1] == 8  # all in the "<= 256 segments" bucket
    assert s.op_named("write").bytes == 4 * MiB and s.op_named("read").bytes == 4 * MiB


def test_device_config_errors(sim_platform: Platform, test_guest: TestGuest, tmp_path: Path) -> None:
    img = storage.Image.open(str(make_raw_image(tmp_path / "c.raw", SIZE, pattern=False)))
    try:
        bad = [
            ({"abi": "x86_16-abi"}, "protocol"),
            ({"ring_pages": 3}, "power of two"),
            ({"ring_pages": 32}, "power of two"),
            ({"nr_queues": 0}, "queues"),
            ({"nr_queues": 17}, "queues"),
            ({"max_indirect_segments": 257}, "max_indirect_segments"),
        ]
        for kw, words in bad:
            with pytest.raises(dataplane.DataplaneError, match=words):
                dataplane.Device(sim_platform, img, dataplane.DeviceConfig(domid=test_guest.domid, handle=1, **kw))
    finally:
        img.close()


@pytest.mark.parametrize("abi", ABIS)
def test_start_queue_errors(sim_platform: Platform, test_guest: TestGuest, tmp_path: Path, abi: str) -> None:
    """A ring the guest did not grant (or granted read-only), the wrong number of refs, a queue
    that does not exist or is started twice: each a DataplaneError, nothing left running."""
    img = storage.Image.open(str(make_raw_image(tmp_path / "q.raw", SIZE, pattern=False)))
    dev = dataplane.Device(
        sim_platform, img, dataplane.DeviceConfig(domid=test_guest.domid, handle=1, abi=abi, ring_pages=2, nr_queues=2)
    )
    g = test_guest
    try:
        frames = g.alloc_frames(2)
        good = [g.grant(f) for f in frames]
        ro = [g.grant(frames[0]), g.grant(frames[1], readonly=True)]
        _, ch = g.channel()
        with pytest.raises(dataplane.DataplaneError, match="map"):
            dev.start_queue(0, [good[0], 7777], ch)
        with pytest.raises(dataplane.DataplaneError, match="map"):
            dev.start_queue(0, ro, ch)
        assert dev.stats(0).grant_map_failures == 2
        with pytest.raises(dataplane.DataplaneError, match="refs"):
            dev.start_queue(0, good[:1], ch)
        with pytest.raises(dataplane.DataplaneError, match="does not exist"):
            dev.start_queue(2, good, ch)
        dev.start_queue(0, good, ch)
        with pytest.raises(dataplane.DataplaneError, match="already started"):
            dev.start_queue(0, good, ch)
        dev.stop()
        with pytest.raises(dataplane.DataplaneError, match="stopped"):
            dev.start_queue(1, good, ch)
    finally:
        dev.close()
        img.close()


def test_stats_while_stopping_and_after_close(make_disk: MakeDisk) -> None:
    """Statistics are readable from another thread while stop() drains, and after stop();
    after close() every call says the device is closed, and stop() stays harmless."""
    d = make_disk(ring_pages=4)
    ring = d.rings[0]
    for i in range(ring.size):
        _frames, refs = d.data_pages(b"S" * PAGE, readonly=True)
        ring.put(rw_request("x86_64-abi", OP_WRITE, 100 + i, i * 8, [(refs[0], 0, 7)]))
    ring.push(force_kick=True)
    seen: list[int] = []
    stop_reader = threading.Event()

    def reader() -> None:
        while not stop_reader.is_set():
            seen.append(d.dev.stats(0).op_named("write").requests)

    t = threading.Thread(target=reader)
    t.start()
    d.stop()
    stop_reader.set()
    t.join()
    final = d.dev.stats(0).op_named("write").requests
    assert seen and all(a <= b for a, b in itertools.pairwise(seen)) and seen[-1] <= final
    assert len(ring.take_responses()) == final
    d.dev.close()
    d.dev.close()
    d.dev.stop()
    with pytest.raises(dataplane.DataplaneError, match="closed"):
        d.dev.stats(0)
    with pytest.raises(dataplane.DataplaneError, match="closed"):
        d.dev.queue_failed(0)


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("op", [OP_FLUSH, OP_WRITE_BARRIER])
def test_flush_with_data_flushes_before_writing(guest_disks: Any, tmp_path: Path, abi: str, op: int) -> None:
    """A FLUSH or BARRIER carrying data (Linux: a FUA write after a preflush) makes what was
    answered before durable *before* it writes: when that first flush fails, the data is not
    written at all; when it works, data is written and flushed again (two flushes)."""
    path = make_raw_image(tmp_path / "f.raw", SIZE, pattern=False)
    d, img = guest_disks(path, "raw", faults=True, abi=abi)
    _frames, refs = d.data_pages(b"J" * 2 * PAGE, readonly=True)
    rule = img.inject_fault("flush", errno.EIO, count=1)
    assert d.one(rw_request(abi, op, 31, 64, [(r, 0, 7) for r in refs])).status != RSP_OKAY
    assert img.fault_hits(rule) == 1
    assert Path(path).read_bytes()[64 * 512 : 64 * 512 + 2 * PAGE] == bytes(2 * PAGE)
    rule = img.inject_fault("flush", errno.EIO, count=1, after=1)  # the second flush fails
    assert d.one(rw_request(abi, op, 32, 64, [(r, 0, 7) for r in refs])).status != RSP_OKAY
    assert img.fault_hits(rule) == 1
    assert Path(path).read_bytes()[64 * 512 : 64 * 512 + 2 * PAGE] == b"J" * 2 * PAGE
    assert d.one(rw_request(abi, op, 33, 64, [(r, 0, 7) for r in refs])).status == RSP_OKAY


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("work", [1, 3])
def test_small_work_bound_still_serves_everything(make_disk: MakeDisk, abi: str, work: int) -> None:
    """With max_work_per_wake 1 or 3 a full ring is taken a few requests at a time, completions
    collected in between; every request is answered once, data intact, barriers still ordered."""
    d = make_disk(abi, ring_pages=2, nr_queues=2, max_work_per_wake=work)
    for q in range(2):
        items = [(OP_WRITE, (q * 4 * MiB + i * PAGE) // 512, pattern_bytes(i * PAGE, PAGE, q)) for i in range(60)]
        assert all(st == RSP_OKAY for st, _ in d.finish_batch(d.start_batch(q, items)))
    _frames, refs = d.data_pages(b"B" * PAGE, readonly=True)
    out = d.submit([rw_request(abi, OP_WRITE_BARRIER, 7, 0, [(refs[0], 0, 7)])], q=1)
    assert out[7].status == RSP_OKAY
    for q in range(2):
        reads = d.finish_batch(d.start_batch(q, [(OP_READ, (q * 4 * MiB + i * PAGE) // 512, PAGE) for i in range(60)]))
        want = [pattern_bytes(i * PAGE, PAGE, q) for i in range(60)]
        if q == 0:
            want[0] = b"B" * PAGE  # the barrier on queue 1 wrote block 0
        assert [data for _, data in reads] == want
