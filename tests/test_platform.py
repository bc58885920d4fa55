"""The platform layer (native/platform via xenblk.xenplatform and xenblk.sim.platform): the sim hypervisor
checks grants like Xen, maps and copies the guest's real pages, and event channels carry notifications both ways.

The guest side here is built by hand the way the broker and simulated guest do it: sealed memfds
for memory and grant table, grant entries written frame, domid, then flags last."""

from __future__ import annotations

import faulthandler
import fcntl
import mmap
import os
import select
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.sim import SimHostProc
from xenblk.sim.platform import SimPlatform
from xenblk.xenplatform import EventChannel, Platform, PlatformError, RealPlatform, ffi, lib

PAGE = 4096
GUEST = 7
BACKEND = 0
GTF_PERMIT = 1
GTF_READONLY = 4
# Xen's GNTST_* values, which the sim reports per copy segment
GNTST_OKAY, GNTST_BAD_DOMAIN, GNTST_BAD_GNTREF = 0, -2, -3
GNTST_PERMISSION_DENIED, GNTST_BAD_PAGE, GNTST_BAD_COPY_ARG = -8, -9, -10


def _sealed_memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


class Guest:
    """A simulated guest's memory and grant table, as the guest sees them."""

    def __init__(self, domid: int = GUEST, pages: int = 16, entries: int = 64) -> None:
        self.domid, self.pages, self.entries = domid, pages, entries
        self.mem_fd = _sealed_memfd("guest-mem", pages * PAGE)
        self.gnt_fd = _sealed_memfd("guest-gnttab", entries * 8)
        self.mem = mmap.mmap(self.mem_fd, pages * PAGE)
        self.gnt = mmap.mmap(self.gnt_fd, entries * 8)

    def page(self, frame: int) -> bytes:
        return self.mem[frame * PAGE : (frame + 1) * PAGE]

    def fill(self, frame: int, seed: int) -> bytes:
        data = bytes((seed + i * 7) & 0xFF for i in range(PAGE))
        self.mem[frame * PAGE : (frame + 1) * PAGE] = data
        return data

    def grant(self, ref: int, frame: int, *, to: int = BACKEND, readonly: bool = False) -> None:
        struct.pack_into("<HI", self.gnt, ref * 8 + 2, to, frame)
        struct.pack_into("<H", self.gnt, ref * 8, GTF_PERMIT | (GTF_READONLY if readonly else 0))

    def revoke(self, ref: int) -> None:
        struct.pack_into("<H", self.gnt, ref * 8, 0)

    def close(self) -> None:
        self.mem.close()
        self.gnt.close()
        os.close(self.mem_fd)
        os.close(self.gnt_fd)


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


@pytest.fixture
def plat(guest: Guest) -> Iterator[Platform]:
    p = SimPlatform.open(None, BACKEND)
    p.add_sim_domain_fds(guest.domid, guest.mem_fd, guest.pages, guest.gnt_fd, guest.entries)
    yield p
    p.close()


class Mapping:
    def __init__(self, plat: Platform, addr: Any, handle: Any, n: int) -> None:
        self.plat, self.addr, self.handle, self.n = plat, addr, handle, n

    def buf(self) -> Any:
        return ffi.buffer(self.addr, self.n * PAGE)

    def unmap(self) -> None:
        lib.xb_grant_unmap(self.plat.ptr, self.handle)


def try_map(plat: Platform, domid: int, refs: list[int], writable: bool) -> Mapping | str:
    """The mapping, or the error message the platform gave."""
    handle = ffi.new("struct xb_gmap **")
    err = ffi.new("char[]", lib.XB_ERRLEN)
    addr = lib.xb_grant_map(plat.ptr, domid, ffi.new("uint32_t[]", refs), len(refs), int(writable), handle, err)
    if addr == ffi.NULL:
        assert handle[0] == ffi.NULL
        return str(ffi.string(err).decode())
    return Mapping(plat, addr, handle[0], len(refs))


def do_map(plat: Platform, domid: int, refs: list[int], writable: bool) -> Mapping:
    m = try_map(plat, domid, refs, writable)
    assert isinstance(m, Mapping), m
    return m


class Copy:
    """A batch of grant copy segments, each with its own local page."""

    def __init__(self) -> None:
        self.segs: list[tuple[int, int, int, int, int, bytes | None]] = []

    def add(self, gref: int, direction: int, *, domid: int = GUEST, offset: int = 0, length: int = PAGE,
            data: bytes | None = None) -> int:  # fmt: skip
        self.segs.append((gref, domid, offset, length, direction, data))
        return len(self.segs) - 1

    def run(self, plat: Platform) -> tuple[int, list[int], list[bytes]]:
        arr = ffi.new("struct xb_copy_seg[]", len(self.segs))
        bufs = []
        for i, (gref, domid, offset, length, direction, data) in enumerate(self.segs):
            b = ffi.new("uint8_t[]", PAGE)
            if data is not None:
                ffi.memmove(b, data, len(data))
            bufs.append(b)
            arr[i].gref, arr[i].domid, arr[i].offset, arr[i].len = gref, domid, offset, length
            arr[i].dir, arr[i].status, arr[i].local = direction, 99, b
        rc = lib.xb_grant_copy(plat.ptr, arr, len(self.segs))
        return rc, [arr[i].status for i in range(len(self.segs))], [bytes(ffi.buffer(b)) for b in bufs]


FROM, TO = lib.XB_COPY_FROM_GUEST, lib.XB_COPY_TO_GUEST


# --- mapping ---------------------------------------------------------------------------------


def test_mapped_pages_are_the_guest_pages_in_ref_order(plat: Platform, guest: Guest) -> None:
    frames = [5, 2, 9]
    expect = [guest.fill(f, seed=f) for f in frames]
    for ref, f in enumerate(frames, start=10):
        guest.grant(ref, f, readonly=True)
    m = do_map(plat, GUEST, [10, 11, 12], writable=False)
    assert bytes(m.buf()) == b"".join(expect)
    # the map is the guest page itself, not a copy: later guest writes show through
    guest.mem[2 * PAGE : 2 * PAGE + 4] = b"LIVE"
    assert bytes(m.buf()[PAGE : PAGE + 4]) == b"LIVE"
    m.unmap()


def test_writes_through_a_writable_map_reach_guest_memory(plat: Platform, guest: Guest) -> None:
    guest.grant(1, 3)
    guest.grant(2, 4)
    m = do_map(plat, GUEST, [1, 2], writable=True)
    m.buf()[PAGE - 3 : PAGE + 3] = b"abcdef"
    m.unmap()
    assert guest.page(3)[-3:] == b"abc"
    assert guest.page(4)[:3] == b"def"


@pytest.mark.parametrize(
    ("setup", "ref", "writable", "message"),
    [
        ("none", 1, False, "not granted"),
        ("other-domid", 1, False, "not granted"),
        ("readonly", 1, True, "read-only"),
        ("frame-out-of-range", 1, False, "outside the guest's memory"),
        ("ok", 64, False, "out of range"),  # ref == entries
        ("ok", 0xFFFFFFFF, False, "out of range"),
    ],
)
def test_map_refuses_what_the_guest_did_not_grant(
    plat: Platform, guest: Guest, setup: str, ref: int, writable: bool, message: str
) -> None:
    if setup == "other-domid":
        guest.grant(1, 2, to=3)
    elif setup == "readonly":
        guest.grant(1, 2, readonly=True)
    elif setup == "frame-out-of-range":
        guest.grant(1, guest.pages)
    elif setup == "ok":
        guest.grant(1, 2)
    before = guest.page(2)
    err = try_map(plat, GUEST, [ref], writable)
    assert isinstance(err, str)
    assert message in err and f"ref {ref}" in err
    assert guest.page(2) == before


def test_one_bad_ref_fails_the_whole_map(plat: Platform, guest: Guest) -> None:
    guest.grant(1, 1)
    guest.grant(2, 2)
    err = try_map(plat, GUEST, [1, 2, 3], writable=False)
    assert isinstance(err, str) and "ref 3" in err
    # and the good ones are still mappable afterwards (nothing leaked or half-mapped)
    do_map(plat, GUEST, [1, 2], writable=False).unmap()


def test_map_of_an_unattached_domain_or_no_pages_is_refused(plat: Platform, guest: Guest) -> None:
    guest.grant(1, 1)
    err = try_map(plat, GUEST + 1, [1], writable=False)
    assert isinstance(err, str) and "not attached" in err
    err = try_map(plat, GUEST, [], writable=False)
    assert isinstance(err, str) and "0 pages" in err


def test_read_only_map_is_really_read_only(plat: Platform, guest: Guest) -> None:
    guest.grant(1, 1, readonly=True)
    m = do_map(plat, GUEST, [1], writable=False)
    assert _child_touch(plat, m, write=True) == -11  # SIGSEGV
    m.unmap()


def test_revoked_grant_can_no_longer_be_mapped_or_copied(plat: Platform, guest: Guest) -> None:
    guest.grant(4, 4)
    do_map(plat, GUEST, [4], writable=True).unmap()
    guest.revoke(4)
    err = try_map(plat, GUEST, [4], writable=False)
    assert isinstance(err, str) and "not granted" in err
    c = Copy()
    c.add(4, FROM)
    c.add(4, TO, data=b"x" * PAGE)
    rc, status, _ = c.run(plat)
    assert rc == -5 and status == [GNTST_PERMISSION_DENIED] * 2
    assert guest.page(4) == bytes(PAGE)


def _child_touch(plat: Platform, m: Mapping, *, write: bool, unmap_first: bool = False) -> int:
    """Touch a mapping in a forked child (a fault must not kill the test run); its exit status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        faulthandler.disable()  # the fault is the expected outcome, not a crash to report
        try:
            if unmap_first:
                m.unmap()
            b = ffi.cast("volatile uint8_t *", m.addr)
            if write:
                b[0] = 1
            else:
                _ = b[0]
            os._exit(0)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def test_unmapped_grant_is_gone(plat: Platform, guest: Guest) -> None:
    guest.grant(1, 1)
    m = do_map(plat, GUEST, [1], writable=True)
    assert _child_touch(plat, m, write=False) == 0
    assert _child_touch(plat, m, write=False, unmap_first=True) == -11  # SIGSEGV
    m.unmap()


# --- copy ------------------------------------------------------------------------------------


def test_copy_both_directions_with_per_segment_status(plat: Platform, guest: Guest) -> None:
    src = guest.fill(1, seed=1)
    guest.grant(1, 1, readonly=True)
    guest.grant(2, 2)
    guest.grant(3, 3, readonly=True)
    c = Copy()
    c.add(1, FROM, offset=512, length=1024)
    c.add(2, TO, offset=4096 - 512, length=512, data=b"W" * 512)
    c.add(3, TO, data=b"R" * PAGE)  # read-only: refused
    c.add(9, FROM)  # never granted
    c.add(2, FROM, domid=GUEST + 1)  # unknown domain
    c.add(2, TO, offset=4000, length=200, data=b"X" * 200)  # crosses the page
    rc, status, bufs = c.run(plat)
    assert rc == -5
    assert status == [GNTST_OKAY, GNTST_OKAY, GNTST_PERMISSION_DENIED, GNTST_PERMISSION_DENIED, GNTST_BAD_DOMAIN,
                      GNTST_BAD_COPY_ARG]  # fmt: skip
    assert bufs[0][:1024] == src[512:1536]
    assert guest.page(2) == bytes(PAGE - 512) + b"W" * 512
    assert guest.page(3) == bytes(PAGE)


@pytest.mark.parametrize(
    ("setup", "ref", "expect"),
    [
        ("other-domid", 1, GNTST_PERMISSION_DENIED),
        ("frame-out-of-range", 1, GNTST_BAD_PAGE),
        ("ok", 64, GNTST_BAD_GNTREF),
    ],
)
def test_copy_refuses_bad_grants(plat: Platform, guest: Guest, setup: str, ref: int, expect: int) -> None:
    guest.grant(1, 1, to=3) if setup == "other-domid" else guest.grant(1, guest.pages if "frame" in setup else 1)
    c = Copy()
    c.add(ref, TO, data=b"z" * PAGE)
    rc, status, _ = c.run(plat)
    assert (rc, status) == (-5, [expect])
    assert guest.page(1) == bytes(PAGE)


def test_all_good_copy_returns_zero(plat: Platform, guest: Guest) -> None:
    guest.grant(1, 1)
    c = Copy()
    for i in range(8):
        c.add(1, TO, offset=i * 512, length=512, data=bytes([i + 1]) * 512)
    rc, status, _ = c.run(plat)
    assert (rc, status) == (0, [0] * 8)
    assert guest.page(1) == b"".join(bytes([i + 1]) * 512 for i in range(8))


def test_copies_from_several_threads(plat: Platform, guest: Guest) -> None:
    for f in range(8):
        guest.grant(f, f)

    def worker(frame: int) -> None:
        for i in range(200):
            c = Copy()
            c.add(frame, TO, data=bytes([frame * 16 + i % 16]) * PAGE)
            c.add(frame, FROM)
            rc, status, bufs = c.run(plat)
            assert rc == 0 and status == [0, 0]
            assert bufs[1] == bytes([frame * 16 + i % 16]) * PAGE

    threads = [threading.Thread(target=worker, args=(f,)) for f in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for f in range(8):
        assert guest.page(f) == bytes([f * 16 + 199 % 16]) * PAGE


# --- domains ---------------------------------------------------------------------------------


def test_detached_domain_can_no_longer_be_used_but_live_maps_stay(plat: Platform, guest: Guest) -> None:
    guest.grant(1, 1)
    guest.fill(1, seed=3)
    m = do_map(plat, GUEST, [1], writable=False)
    plat.detach_domain(GUEST)
    err = try_map(plat, GUEST, [1], writable=False)
    assert isinstance(err, str) and "not attached" in err
    c = Copy()
    c.add(1, FROM)
    assert c.run(plat)[1] == [GNTST_BAD_DOMAIN]
    assert bytes(m.buf()) == guest.page(1)
    m.unmap()


def test_attach_refuses_unsealed_or_short_memory(guest: Guest) -> None:
    p = SimPlatform.open(None)
    try:
        unsealed = os.memfd_create("unsealed")
        os.ftruncate(unsealed, guest.pages * PAGE)
        with pytest.raises(PlatformError, match="not sealed"):
            p.add_sim_domain_fds(1, unsealed, guest.pages, guest.gnt_fd, guest.entries)
        os.close(unsealed)
        with pytest.raises(PlatformError, match="needs"):
            p.add_sim_domain_fds(1, guest.mem_fd, guest.pages + 1, guest.gnt_fd, guest.entries)
        with pytest.raises(PlatformError, match=r"grant table .* needs"):
            p.add_sim_domain_fds(1, guest.mem_fd, guest.pages, guest.gnt_fd, guest.entries + 1)
        p.add_sim_domain_fds(1, guest.mem_fd, guest.pages, guest.gnt_fd, guest.entries)
        with pytest.raises(PlatformError, match="already attached"):
            p.add_sim_domain_fds(1, guest.mem_fd, guest.pages, guest.gnt_fd, guest.entries)
    finally:
        p.close()


def test_real_platform_without_xen_says_so() -> None:
    if Path("/dev/xen/gntdev").exists():
        pytest.skip("running under Xen: the real platform opens here")
    with pytest.raises(PlatformError, match="/dev/xen/gntdev does not exist"):
        RealPlatform.open()


def test_sim_platform_without_a_host_says_so(tmp_path: Path) -> None:
    with pytest.raises(PlatformError, match="sim host"):
        SimPlatform.open_dir(tmp_path)


# --- event channels --------------------------------------------------------------------------


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def _channel(plat: Platform) -> tuple[EventChannel, int, int]:
    """A channel and the guest's ends: (channel, fd the guest writes to notify, fd the guest reads)."""
    to_backend = os.eventfd(0, os.EFD_CLOEXEC)
    to_guest = os.eventfd(0, os.EFD_CLOEXEC)
    ch = plat.wrap_sim_evtchn(GUEST, 5, os.dup(to_backend), os.dup(to_guest), 42)
    return ch, to_backend, to_guest


def test_evtchn_guest_to_backend(plat: Platform) -> None:
    ch, to_backend, to_guest = _channel(plat)
    assert ch.local_port == 42
    assert not _readable(ch.fileno()) and ch.ack() == 0
    os.eventfd_write(to_backend, 1)
    os.eventfd_write(to_backend, 1)
    assert _readable(ch.fileno())
    assert ch.ack() == 2
    assert not _readable(ch.fileno()) and ch.ack() == 0
    ch.close()
    ch.close()
    os.close(to_backend)
    os.close(to_guest)


def test_evtchn_backend_to_guest(plat: Platform) -> None:
    ch, to_backend, to_guest = _channel(plat)
    assert not _readable(to_guest)
    ch.notify()
    assert _readable(to_guest)
    assert os.eventfd_read(to_guest) == 1
    ch.notify()
    ch.notify()
    assert os.eventfd_read(to_guest) == 2
    assert not _readable(to_backend)  # our own notify never wakes us
    ch.close()
    with pytest.raises(PlatformError, match="closed"):
        ch.notify()
    os.close(to_backend)
    os.close(to_guest)


def test_evtchn_close_closes_its_fds(plat: Platform) -> None:
    ch, to_backend, to_guest = _channel(plat)
    fd = ch.fileno()
    ch.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    os.close(to_backend)
    os.close(to_guest)


# --- through the sim host's broker -----------------------------------------------------------


def test_attach_and_bind_through_the_sim_host_broker(sim_host: SimHostProc) -> None:
    from xenblk.sim.broker import BrokerClient

    pages, entries = 64, 32
    with BrokerClient(sim_host.broker) as guest_side:
        _, (mem_fd, gnt_fd) = guest_side.call(
            {"op": "create_domain", "domid": GUEST, "mem_pages": pages, "gnttab_entries": entries, "name": "g"}
        )
        reply, (g_recv, g_send) = guest_side.call({"op": "evtchn_alloc_unbound", "domid": GUEST, "remote_domid": 0})
        guest_port = int(reply["port"])
        mem = mmap.mmap(mem_fd, pages * PAGE)
        gnt = mmap.mmap(gnt_fd, entries * 8)
        mem[5 * PAGE : 6 * PAGE] = b"guest" * 819 + b"!"
        struct.pack_into("<HI", gnt, 3 * 8 + 2, BACKEND, 5)
        struct.pack_into("<H", gnt, 3 * 8, GTF_PERMIT)

        plat = SimPlatform.open_dir(sim_host.dir, BACKEND)
        try:
            assert plat.kind == "sim"
            plat.attach_domain(GUEST)
            c = Copy()
            c.add(3, FROM)
            c.add(3, TO, offset=100, length=4, data=b"BACK")
            rc, status, bufs = c.run(plat)
            assert (rc, status) == (0, [0, 0])
            assert bufs[0] == b"guest" * 819 + b"!"
            assert mem[5 * PAGE + 100 : 5 * PAGE + 104] == b"BACK"

            ch = plat.bind_evtchn(GUEST, guest_port)
            os.eventfd_write(g_send, 1)
            assert _readable(ch.fileno()) and ch.ack() == 1
            ch.notify()
            assert os.eventfd_read(g_recv) == 1
            ch.close()
            with pytest.raises(PlatformError, match="refused evtchn_bind_interdomain"):
                plat.bind_evtchn(GUEST, guest_port + 1000)
            plat.detach_domain(GUEST)
            assert c.run(plat)[1] == [GNTST_BAD_DOMAIN] * 2
        finally:
            plat.close()
            mem.close()
            gnt.close()
            for fd in (mem_fd, gnt_fd, g_recv, g_send):
                os.close(fd)
