"""Persistent grants (native/dataplane/pgrant.c): with feature-persistent the data plane maps each
grant once and moves data through the mapping. The test guest behaves like Linux blkfront (a
pool of pages granted read-write once, reused by every request) and like a hostile one (a grant
revoked, or its ref pointed at another page, after the backend mapped it): the data read back
and written to the image is checked, and the mappings themselves in /proc/self/maps."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.ring import (
    ABIS,
    OP_READ,
    OP_WRITE,
    PAGE,
    RSP_ERROR,
    RSP_OKAY,
    SECTOR,
    GuestDisk,
    TestGuest,
    indirect_request,
    make_raw_image,
    pattern_bytes,
    rw_request,
)
from xenblk import storage
from xenblk.xenplatform import Platform

SIZE = 8 << 20


class Pool:
    """blkfront's persistent pool: frames granted read-write once, each request reuses them."""

    def __init__(self, guest: TestGuest, n: int) -> None:
        self.guest = guest
        self.frames = [guest.alloc_frames(1)[0] for _ in range(n)]
        self.refs = [guest.grant(f) for f in self.frames]


@pytest.fixture
def disk(
    request: pytest.FixtureRequest, sim_platform: Platform, test_guest: TestGuest, tmp_path: Path
) -> Iterator[GuestDisk]:
    params = getattr(request, "param", {})
    img = storage.Image.open(str(make_raw_image(tmp_path / "disk.raw", SIZE)), "raw")
    d = GuestDisk(sim_platform, test_guest, img, feature_persistent=True, **params)
    d.path = tmp_path / "disk.raw"  # type: ignore[attr-defined]
    yield d
    d.stop()
    img.close()


def _mapped_guest_pages(domid: int) -> int:
    """Pages of the guest's memory file mapped in this process (the test guest's own view and the
    sim platform's whole-memory view are two of them, each more than one page)."""
    n = 0
    with open("/proc/self/maps") as f:
        for line in f:
            if f"memfd:guest{domid}-mem" in line:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                if hi - lo == PAGE:
                    n += 1
    return n


def _write(d: GuestDisk, refs: list[int], frames: list[int], sector: int, data: bytes) -> int:
    for i, f in enumerate(frames):
        d.guest.write_frame(f, data[i * PAGE : (i + 1) * PAGE])
    rid = d.new_id()
    return d.submit([rw_request(d.abi, OP_WRITE, rid, sector, d.segs_for(refs, len(data)))])[rid].status


def _read(d: GuestDisk, refs: list[int], frames: list[int], sector: int, n: int) -> tuple[int, bytes]:
    for f in frames:
        d.guest.write_frame(f, b"\xee" * PAGE)
    rid = d.new_id()
    st = d.submit([rw_request(d.abi, OP_READ, rid, sector, d.segs_for(refs, n))])[rid].status
    return st, b"".join(d.guest.read_frame(f) for f in frames)[:n]


@pytest.mark.parametrize("abi", ABIS)
def test_grants_mapped_once_and_reused(sim_platform: Platform, test_guest: TestGuest, tmp_path: Path, abi: str) -> None:
    """Reuse: 40 requests over 11 pool pages map 11 grants, once; every byte is right both ways;
    disconnect unmaps them all."""
    img = storage.Image.open(str(make_raw_image(tmp_path / "disk.raw", SIZE)), "raw")
    d = GuestDisk(sim_platform, test_guest, img, abi=abi, feature_persistent=True)
    pool = Pool(test_guest, 11)
    ring_pages = _mapped_guest_pages(test_guest.domid)  # the ring, mapped at start
    try:
        for k in range(20):
            sector = k * 11 * PAGE // SECTOR
            data = pattern_bytes(k * 11 * PAGE, 11 * PAGE, seed=k + 1)
            assert _write(d, pool.refs, pool.frames, sector, data) == RSP_OKAY
            st, got = _read(d, pool.refs, pool.frames, sector, 11 * PAGE)
            assert st == RSP_OKAY and got == data
        s = d.stats()
        assert s.persistent_maps == 11 and s.persistent_mapped == 11
        assert s.persistent_hits == 40 * 11 - 11 and s.grant_copy_failures == 0
        assert _mapped_guest_pages(test_guest.domid) == ring_pages + 11
    finally:
        d.stop()
    assert d.stats().persistent_mapped == 0
    assert _mapped_guest_pages(test_guest.domid) == 0
    raw = (tmp_path / "disk.raw").read_bytes()
    for k in range(20):
        assert raw[k * 11 * PAGE : (k + 1) * 11 * PAGE] == pattern_bytes(k * 11 * PAGE, 11 * PAGE, seed=k + 1)
    img.close()


@pytest.mark.parametrize("disk", [{"max_persistent_grants": 16}], indirect=True)
def test_bound_and_purge_of_unused_grants(disk: GuestDisk) -> None:
    """Bound: never more than max_persistent_grants mapped; a guest moving on to other pages gets
    the old ones purged (blkback: the ones unused since the last purge), the new ones mapped."""
    pools = [Pool(disk.guest, 11) for _ in range(6)]
    for rnd in range(4):
        for k, p in enumerate(pools):
            sector = k * 11 * PAGE // SECTOR
            data = pattern_bytes(k, 11 * PAGE, seed=rnd * 10 + k + 1)
            assert _write(disk, p.refs, p.frames, sector, data) == RSP_OKAY
            st, got = _read(disk, p.refs, p.frames, sector, 11 * PAGE)
            assert st == RSP_OKAY and got == data
            assert disk.stats().persistent_mapped <= 16
            assert _mapped_guest_pages(disk.guest.domid) <= 16 + 1  # and the ring
    s = disk.stats()
    assert s.persistent_purged > 0 and s.persistent_maps > 16
    assert s.persistent_maps - s.persistent_purged == s.persistent_mapped


@pytest.mark.parametrize("abi", ABIS)
def test_revoked_grant_is_refused_never_served_from_the_old_mapping(
    sim_platform: Platform, test_guest: TestGuest, tmp_path: Path, abi: str
) -> None:
    img = storage.Image.open(str(make_raw_image(tmp_path / "disk.raw", SIZE)), "raw")
    d = GuestDisk(sim_platform, test_guest, img, abi=abi, feature_persistent=True)
    try:
        pool = Pool(test_guest, 2)
        st, got = _read(d, pool.refs, pool.frames, 0, 2 * PAGE)
        assert st == RSP_OKAY and got == pattern_bytes(0, 2 * PAGE)
        assert d.stats().persistent_mapped == 2
        test_guest.gnttab[pool.refs[1] * 8 : pool.refs[1] * 8 + 2] = b"\0\0"  # revoked while we hold it mapped
        st, got = _read(d, pool.refs, pool.frames, 16, 2 * PAGE)
        assert st == RSP_ERROR
        assert got[PAGE:] == b"\xee" * PAGE  # nothing reached the revoked page
        before = (tmp_path / "disk.raw").read_bytes()[: 2 * PAGE]
        assert _write(d, pool.refs, pool.frames, 0, b"\x5a" * 2 * PAGE) == RSP_ERROR
        assert (tmp_path / "disk.raw").read_bytes()[: 2 * PAGE] == before  # a refused write writes nothing
        s = d.stats()
        assert s.persistent_invalidated == 1 and s.persistent_mapped == 1 and s.grant_copy_failures >= 2
    finally:
        d.stop()
        img.close()


@pytest.mark.parametrize("abi", ABIS)
def test_gref_reused_for_another_page_moves_the_new_page(
    sim_platform: Platform, test_guest: TestGuest, tmp_path: Path, abi: str
) -> None:
    img = storage.Image.open(str(make_raw_image(tmp_path / "disk.raw", SIZE)), "raw")
    d = GuestDisk(sim_platform, test_guest, img, abi=abi, feature_persistent=True)
    try:
        old, new = test_guest.alloc_frames(1)[0], test_guest.alloc_frames(1)[0]
        ref = test_guest.grant(old)
        assert _write(d, [ref], [old], 0, b"\x11" * PAGE) == RSP_OKAY
        # the same ref now grants another page (flags cleared, frame changed, flags set again)
        test_guest.gnttab[ref * 8 : ref * 8 + 2] = b"\0\0"
        test_guest.gnttab[ref * 8 + 4 : ref * 8 + 8] = struct.pack("<I", new)
        test_guest.gnttab[ref * 8 : ref * 8 + 2] = struct.pack("<H", 1)
        test_guest.write_frame(old, b"\x22" * PAGE)
        assert _write(d, [ref], [new], 8, b"\x33" * PAGE) == RSP_OKAY
        assert (tmp_path / "disk.raw").read_bytes()[PAGE : 2 * PAGE] == b"\x33" * PAGE
        st, got = _read(d, [ref], [new], 0, PAGE)
        assert st == RSP_OKAY and got == b"\x11" * PAGE
        assert test_guest.read_frame(old) == b"\x22" * PAGE  # the old page was not written
        s = d.stats()
        assert s.persistent_invalidated == 1 and s.persistent_mapped == 1
    finally:
        d.stop()
        img.close()


@pytest.mark.parametrize("abi", ABIS)
def test_indirect_pages_persistent_too(sim_platform: Platform, test_guest: TestGuest, tmp_path: Path, abi: str) -> None:
    """A 256-segment indirect request (1 MiB) over a persistent pool, indirect page included, twice."""
    img = storage.Image.open(str(make_raw_image(tmp_path / "disk.raw", SIZE)), "raw")
    d = GuestDisk(sim_platform, test_guest, img, abi=abi, feature_persistent=True)
    try:
        pool = Pool(test_guest, 257)
        ind_frame, ind_ref = pool.frames[256], pool.refs[256]
        segs = d.segs_for(pool.refs[:256], 256 * PAGE)
        test_guest.write_frame(ind_frame, b"".join(struct.pack("<IBBH", g, f, last, 0) for g, f, last in segs))
        for k in range(2):
            data = pattern_bytes(0, 256 * PAGE, seed=k + 7)
            for i, f in enumerate(pool.frames[:256]):
                test_guest.write_frame(f, data[i * PAGE : (i + 1) * PAGE])
            rid = d.new_id()
            raw = indirect_request(abi, OP_WRITE, rid, 2048, 256, [ind_ref])
            assert d.submit([raw])[rid].status == RSP_OKAY
            assert (tmp_path / "disk.raw").read_bytes()[1 << 20 : 2 << 20] == data
        s = d.stats()
        assert s.persistent_maps == 257 and s.persistent_hits == 257
    finally:
        d.stop()
        img.close()
