"""The ring journal's crash windows (native/dataplane/journal.c): a backend process is SIGKILLed
at each step of taking and answering a request, a second process resumes from the journal, and
the guest gets exactly one response per request (none lost, none twice) with the right data.
Also: a journal for another ring or none at all is refused (the daemon then closes the device)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.ring import (
    OP_FLUSH,
    OP_READ,
    OP_WRITE,
    PAGE,
    RSP_OKAY,
    SECTOR,
    GuestRing,
    Response,
    TestGuest,
    make_raw_image,
    other_request,
    pattern_bytes,
    rw_request,
)
from tests.fixtures.wait import GENEROUS
from xenblk import dataplane, storage
from xenblk.xenplatform import Platform

ROOT = Path(__file__).resolve().parent.parent
ABI = "x86_64-abi"
SIZE = 4 << 20
NREQ = 12

BACKEND = r"""
import json, sys
from xenblk import dataplane, storage
from xenblk.sim.platform import SimPlatform
a = json.loads(sys.argv[1])
p = SimPlatform.open(None)
p.add_sim_domain_fds(a["domid"], a["mem_fd"], a["mem_pages"], a["gnt_fd"], a["entries"])
img = storage.Image.open(a["image"], "raw")
cfg = dataplane.DeviceConfig(domid=a["domid"], handle=1, abi=a["abi"], max_work_per_wake=3,
                             feature_persistent=a["persistent"])
dev = dataplane.Device(p, img, cfg)
dev.set_journal(0, a["journal"], a["ident"], a["resume"])
ch = p.wrap_sim_evtchn(a["domid"], 1, a["recv_fd"], a["send_fd"], 1)
if a["point"]:
    dataplane.journal_crash_at(a["point"], a["after"])
dev.start_queue(0, a["refs"], ch)
print("started", flush=True)
sys.stdin.read()  # until the test closes our stdin
dev.close()
img.close()
"""


class Backend:
    """The data plane in its own process, so it can be killed like a daemon."""

    def __init__(
        self,
        guest: TestGuest,
        ring: GuestRing,
        image: Path,
        journal: Path,
        resume: bool,
        point: int = 0,
        after: int = 0,
        ident: str = "dom-test q0",
        persistent: bool = False,
    ) -> None:
        args = {
            "domid": guest.domid, "mem_fd": guest.mem_fd, "mem_pages": guest.mem_pages, "gnt_fd": guest.gnt_fd,
            "entries": guest.entries, "image": str(image), "abi": ABI, "journal": str(journal), "ident": ident,
            "resume": resume, "recv_fd": ring.chan.send_fd, "send_fd": ring.chan.recv_fd, "refs": ring.refs,
            "point": point, "after": after, "persistent": persistent,
        }  # fmt: skip
        fds = [guest.mem_fd, guest.gnt_fd, ring.chan.send_fd, ring.chan.recv_fd]
        for fd in fds:
            os.set_inheritable(fd, True)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", BACKEND, json.dumps(args)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=fds, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip

    def stop(self) -> str:
        assert self.proc.stdin is not None
        _out, err = self.proc.communicate(b"", timeout=GENEROUS)
        return err.decode(errors="replace")


@pytest.fixture
def guest(sim_platform: Platform, test_guest: TestGuest) -> TestGuest:
    return test_guest


def _ring(guest: TestGuest) -> GuestRing:
    ring = GuestRing(guest, ABI, 1)
    ring.backend_chan.close()  # the backend is another process: it gets the raw eventfds
    return ring


def _data(i: int) -> bytes:
    return bytes([(i * 37 + 11) % 251 + 1]) * 7 + i.to_bytes(4, "little") + bytes(PAGE - 11)


class Workload:
    """NREQ requests on one ring: writes to sectors of their own, reads of a pre-filled area, a flush."""

    def __init__(self, guest: TestGuest, ring: GuestRing, persistent: bool = False) -> None:
        self.guest, self.ring = guest, ring
        self.expect: dict[int, tuple[str, int, int]] = {}  # id -> (kind, frame, index)
        for i in range(NREQ):
            rid = 1000 + i * 7919
            frame = guest.alloc_frames(1)[0]
            if i % 4 == 3:
                self.expect[rid] = ("read", frame, i)
                ref = guest.grant(frame)
                guest.write_frame(frame, b"\xee" * PAGE)  # poisoned: a read that returns nothing fails
                ring.put(rw_request(ABI, OP_READ, rid, (SIZE // 2 + i * PAGE) // SECTOR, [(ref, 0, 7)]))
            elif i == NREQ - 1:
                self.expect[rid] = ("flush", frame, i)
                ring.put(other_request(ABI, OP_FLUSH, rid))
            else:
                self.expect[rid] = ("write", frame, i)
                guest.write_frame(frame, _data(i))
                ref = guest.grant(frame, readonly=not persistent)  # blkfront's persistent pages are read-write
                ring.put(rw_request(ABI, OP_WRITE, rid, i * PAGE // SECTOR, [(ref, 0, 7)]))
        ring.push(force_kick=True)

    def check(self, responses: list[Response], image: Path) -> None:
        ids = [r.id for r in responses]
        assert sorted(ids) == sorted(self.expect), f"responses {ids}: lost or duplicated"
        assert all(r.status == RSP_OKAY for r in responses), responses
        assert self.ring.rsp_prod == self.ring.req_prod  # nothing beyond one response per request
        raw = image.read_bytes()
        for kind, frame, i in self.expect.values():
            if kind == "write":
                assert raw[i * PAGE : (i + 1) * PAGE] == _data(i), f"write {i} not on the image"
            elif kind == "read":
                off = SIZE // 2 + i * PAGE
                assert self.guest.read_frame(frame) == pattern_bytes(off, PAGE), f"read {i} returned wrong data"


@pytest.mark.parametrize("after", [0, 5])
@pytest.mark.parametrize("point", [1, 2, 3, 4, 5], ids=["taken", "consumed", "rsp-written", "answered", "counted"])
def test_kill_at_each_step_then_resume(guest: TestGuest, tmp_path: Path, point: int, after: int) -> None:
    image = make_raw_image(tmp_path / "disk.raw", SIZE)
    journal = tmp_path / "q0.journal"
    ring = _ring(guest)
    first = Backend(guest, ring, image, journal, resume=False, point=point, after=after)
    work = Workload(guest, ring)
    assert first.proc.wait(timeout=30) == -9, first.proc.stderr.read() if first.proc.stderr else ""
    got = ring.take_responses()  # what the killed process published before it died
    assert len(got) < NREQ
    second = Backend(guest, ring, image, journal, resume=True)
    try:
        got += ring.wait_responses(NREQ - len(got), timeout=GENEROUS)
    finally:
        err = second.stop()
    assert second.proc.returncode == 0, err
    got += ring.take_responses()
    work.check(got, image)


def test_resume_twice_and_in_the_middle_of_a_stream(guest: TestGuest, tmp_path: Path) -> None:
    """Killed in the middle of the stream, killed again while executing the journaled requests, resumed."""
    image = make_raw_image(tmp_path / "disk.raw", SIZE)
    journal = tmp_path / "q0.journal"
    ring = _ring(guest)
    first = Backend(guest, ring, image, journal, resume=False, point=3, after=7)
    work = Workload(guest, ring)
    assert first.proc.wait(timeout=30) == -9
    got = ring.take_responses()
    second = Backend(guest, ring, image, journal, resume=True, point=4, after=1)  # killed while replaying
    assert second.proc.wait(timeout=30) == -9
    got += ring.take_responses()
    third = Backend(guest, ring, image, journal, resume=True)
    try:
        got += ring.wait_responses(NREQ - len(got), timeout=GENEROUS)
    finally:
        err = third.stop()
    assert third.proc.returncode == 0, err
    got += ring.take_responses()
    work.check(got, image)


def test_resume_with_persistent_grants_mapped(guest: TestGuest, tmp_path: Path) -> None:
    """The killed process held the grants mapped (persistent); the next maps them again as it replays."""
    image = make_raw_image(tmp_path / "disk.raw", SIZE)
    journal = tmp_path / "q0.journal"
    ring = _ring(guest)
    first = Backend(guest, ring, image, journal, resume=False, point=3, after=5, persistent=True)
    work = Workload(guest, ring, persistent=True)
    assert first.proc.wait(timeout=30) == -9
    got = ring.take_responses()
    second = Backend(guest, ring, image, journal, resume=True, persistent=True)
    try:
        got += ring.wait_responses(NREQ - len(got), timeout=GENEROUS)
    finally:
        err = second.stop()
    assert second.proc.returncode == 0, err
    got += ring.take_responses()
    work.check(got, image)


def test_resume_refuses_a_foreign_or_missing_journal(sim_platform: Platform, guest: TestGuest, tmp_path: Path) -> None:
    image = make_raw_image(tmp_path / "disk.raw", SIZE)
    journal = tmp_path / "q0.journal"
    ring = _ring(guest)
    first = Backend(guest, ring, image, journal, resume=False, ident="ring A")
    assert first.proc.stdout is not None and first.proc.stdout.readline() == b"started\n"
    first.proc.kill()
    first.proc.wait(timeout=30)
    img = storage.Image.open(str(image), "raw")
    try:
        for path, ident, why in [
            (journal, "ring B", "another ring or image"),
            (tmp_path / "none.journal", "ring A", "No such file"),
        ]:
            dev = dataplane.Device(sim_platform, img, dataplane.DeviceConfig(domid=guest.domid, handle=1))
            try:
                _g, ch = guest.channel()
                dev.set_journal(0, str(path), ident, resume=True)
                with pytest.raises(dataplane.DataplaneError, match=why):
                    dev.start_queue(0, ring.refs, ch)
                ch.close()
            finally:
                dev.close()
        # A ring the guest reset (indexes back to 0 after requests were answered) does not fit the journal.
        ring.put(other_request(ABI, OP_FLUSH, 1))
        ring.push(force_kick=True)
        second = Backend(guest, ring, image, journal, resume=True, ident="ring A")
        assert len(ring.wait_responses(1)) == 1
        second.stop()
        dev = dataplane.Device(sim_platform, img, dataplane.DeviceConfig(domid=guest.domid, handle=1))
        try:
            for off in (0, 8):
                guest.mem[ring.base + off : ring.base + off + 4] = bytes(4)
            _g, ch = guest.channel()
            dev.set_journal(0, str(journal), "ring A", resume=True)
            with pytest.raises(dataplane.DataplaneError, match="does not fit the ring"):
                dev.start_queue(0, ring.refs, ch)
            ch.close()
        finally:
            dev.close()
    finally:
        img.close()
