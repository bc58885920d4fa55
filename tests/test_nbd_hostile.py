"""Hostile NBD clients against xenblk.nbd.NbdExport (the C server, in process): each gets a clear
error or is disconnected, the image keeps its data, and a well-behaved client is served after each."""

from __future__ import annotations

import random
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.nbd import (
    CMD_DISC,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    EINVAL,
    ENOSPC,
    EPERM,
    FLAG_FUA,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_LIST,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_TOO_BIG,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_SERVER,
    REQ_MAGIC,
    TF_READ_ONLY,
    Closed,
    RawNbd,
)
from tests.fixtures.wait import wait_until
from xenblk import storage
from xenblk.nbd import NbdExport, NbdStats

SIZE = 8 << 20
MAX_CLIENTS = 16  # more than the connections any one test opens, so a slow close is never a refusal


@pytest.fixture
def served(short_dir: Path) -> Iterator[tuple[NbdExport, Path, bytes]]:
    img_path = short_dir / "disk.raw"
    seed = random.Random(18).randbytes(SIZE)
    img_path.write_bytes(seed)
    img = storage.Image.open(str(img_path))
    exp = NbdExport(img, str(short_dir / "s.sock"), readonly=False, max_clients=MAX_CLIENTS)
    try:
        yield exp, img_path, seed
    finally:
        exp.close()
        img.close()
    assert not (short_dir / "s.sock").exists(), "the socket outlived its export"


def healthy(exp: NbdExport, img_path: Path, seed: bytes) -> NbdStats:
    """A good client reads what the image holds; the export answers after whatever came before."""
    c = RawNbd(exp.path).connect()
    assert c.size == SIZE
    assert c.read(4096, 65536) == seed[4096 : 4096 + 65536] == img_path.read_bytes()[4096 : 4096 + 65536]
    c.request(CMD_DISC, 0, 0)
    assert c.at_eof()
    c.close()
    return exp.stats()


def test_handshake_abuse(served: tuple[NbdExport, Path, bytes]) -> None:
    exp, img_path, seed = served
    # unknown client flags: the spec says disconnect
    c = RawNbd(exp.path)
    c.greeting(cflags=0x80)
    assert c.at_eof()
    # without the fixed-newstyle bit
    c = RawNbd(exp.path)
    c.greeting(cflags=0)
    assert c.at_eof()
    # bad option magic
    c = RawNbd(exp.path)
    c.greeting()
    c.option(OPT_GO, b"\0" * 6, magic=0x1122334455667788)
    assert c.at_eof()
    # unknown and unsupported options get NBD_REP_ERR_UNSUP, and the handshake goes on
    c = RawNbd(exp.path)
    c.greeting()
    for opt in (0x7FFF, OPT_STRUCTURED_REPLY, 5):
        c.option(opt, b"xyz")
        assert c.opt_reply()[1] == REP_ERR_UNSUP
    # malformed GO data, and a name this socket does not serve
    c.option(OPT_GO, struct.pack(">I", 50) + b"short")
    assert c.opt_reply()[1] == REP_ERR_INVALID
    c.option(OPT_GO, struct.pack(">I", 3) + b"abc" + struct.pack(">H", 0))
    assert c.opt_reply()[1] == REP_ERR_UNKNOWN
    # LIST: one export, the empty name
    c.option(OPT_LIST)
    assert c.opt_reply()[1:] == (REP_SERVER, b"\0\0\0\0")
    assert c.opt_reply()[1] == REP_ACK
    c.option(OPT_LIST, b"junk")
    assert c.opt_reply()[1] == REP_ERR_INVALID
    c.go()
    assert c.size == SIZE and c.read(0, 512) == seed[:512]
    c.close()
    # option data larger than any option needs: NBD_REP_ERR_TOO_BIG, then closed (its data is not read)
    c = RawNbd(exp.path)
    c.greeting()
    c.s.sendall(struct.pack(">QII", 0x49484156454F5054, OPT_GO, 1 << 30))
    assert c.opt_reply()[1] == REP_ERR_TOO_BIG
    assert c.at_eof()
    # EXPORT_NAME with an unknown name can only be closed
    c = RawNbd(exp.path)
    c.greeting()
    c.option(OPT_EXPORT_NAME, b"other")
    assert c.at_eof()
    # ABORT is acknowledged, then closed
    c = RawNbd(exp.path)
    c.greeting()
    c.option(OPT_ABORT)
    assert c.opt_reply()[1] == REP_ACK
    assert c.at_eof()
    # EXPORT_NAME "" (the oldest way in) works
    c = RawNbd(exp.path)
    c.greeting()
    c.option(OPT_EXPORT_NAME)
    size, _flags = struct.unpack(">QH", c.recv(10))
    assert size == SIZE
    assert c.read(SIZE - 512, 512) == seed[-512:]
    c.close()
    st = healthy(exp, img_path, seed)
    assert st.protocol_errors == 5, st  # flags x2, option magic, too big, unknown EXPORT_NAME


def test_request_abuse(served: tuple[NbdExport, Path, bytes]) -> None:
    exp, img_path, seed = served
    c = RawNbd(exp.path).connect()
    cases = [
        (CMD_READ, 0, 33 << 20, 0, EINVAL),  # larger than the advertised maximum (32 MiB)
        (CMD_READ, SIZE - 512, 1024, 0, EINVAL),  # past the end
        (CMD_READ, (1 << 64) - 512, 1024, 0, EINVAL),  # wraps
        (CMD_READ, 0, 0, 0, EINVAL),  # zero length
        (CMD_READ, 0, 512, 0x40, EINVAL),  # an unknown flag
        (CMD_TRIM, SIZE, 4096, 0, EINVAL),
        (CMD_WRITE_ZEROES, SIZE - 4096, 8192, 0, ENOSPC),
        (99, 0, 512, 0, EINVAL),  # an unknown command (carries no payload)
        (CMD_FLUSH, 0, 0, 0x40, EINVAL),  # an unknown flag on a flush
        (CMD_FLUSH, 0, 0, FLAG_FUA, 0),  # FUA is valid on every command once advertised (the spec: MUST accept)
        (CMD_READ, 0, 512, FLAG_FUA, 0),
    ]
    for i, (cmd, off, n, flags, want) in enumerate(cases):
        c.request(cmd, off, n, flags=flags, cookie=1000 + i)
        err, cookie, data = c.reply(n if cmd == CMD_READ else 0)
        assert (err, cookie) == (want, 1000 + i), (cmd, off, n)
        assert data == (seed[off : off + n] if cmd == CMD_READ and not want else b"")
    # a write past the end: ENOSPC, and its payload is read and dropped, so the stream stays in step
    c.request(CMD_WRITE, SIZE - 512, 4096, cookie=7, payload=b"\xee" * 4096)
    assert c.reply()[:2] == (ENOSPC, 7)
    assert c.read(SIZE - 512, 512) == seed[-512:]
    c.request(CMD_DISC, 0, 0)
    assert c.at_eof()
    # a write larger than the maximum: EINVAL, then closed (its payload is never read)
    c = RawNbd(exp.path).connect()
    c.request(CMD_WRITE, 0, 64 << 20, cookie=9)
    assert c.reply()[:2] == (EINVAL, 9)
    assert c.at_eof()
    # a request with a bad magic: closed without an answer
    c = RawNbd(exp.path).connect()
    c.s.sendall(struct.pack(">IHHQQI", REQ_MAGIC ^ 1, 0, CMD_READ, 1, 0, 512))
    assert c.at_eof()
    # disconnect in the middle of a write's payload: nothing of it reaches the image
    c = RawNbd(exp.path).connect()
    c.request(CMD_WRITE, 1 << 20, 1 << 20, payload=b"\xab" * 1000)
    c.close()
    st = healthy(exp, img_path, seed)
    assert img_path.read_bytes() == seed
    assert st.protocol_errors == 2 and st.written_bytes == 0, st


def test_client_bound(served: tuple[NbdExport, Path, bytes]) -> None:
    exp, img_path, seed = served
    clients = [RawNbd(exp.path).connect() for _ in range(MAX_CLIENTS)]
    extra = RawNbd(exp.path)
    with pytest.raises((Closed, ConnectionResetError)):
        extra.recv(18)  # closed before any greeting
    extra.close()
    assert exp.stats().refused == 1
    for i, c in enumerate(clients):  # the ones within the bound are all served
        assert c.read(i * 4096, 4096) == seed[i * 4096 : (i + 1) * 4096]
    clients.pop().close()
    wait_until(lambda: exp.stats().active < MAX_CLIENTS, "the export noticed a client left")
    st = healthy(exp, img_path, seed)
    assert st.refused == 1
    for c in clients:
        c.close()


def test_readonly_export_refuses_writes(short_dir: Path) -> None:
    img_path = short_dir / "ro.raw"
    seed = random.Random(3).randbytes(1 << 20)
    img_path.write_bytes(seed)
    with storage.Image.open(str(img_path)) as img:
        exp = NbdExport(img, str(short_dir / "ro.sock"), readonly=True)
        try:
            c = RawNbd(exp.path).connect()
            assert c.tflags & TF_READ_ONLY
            c.request(CMD_WRITE, 0, 4096, cookie=1, payload=b"\x11" * 4096)
            c.request(CMD_TRIM, 0, 4096, cookie=2)
            c.request(CMD_WRITE_ZEROES, 0, 4096, cookie=3)
            c.request(CMD_FLUSH, 0, 0, cookie=4)  # not advertised read-only
            assert sorted(c.reply()[:2] for _ in range(4)) == [(EPERM, 1), (EPERM, 2), (EPERM, 3), (EINVAL, 4)]
            assert c.read(0, 8192) == seed[:8192]
            c.close()
        finally:
            exp.close()
    assert img_path.read_bytes() == seed


def test_stale_socket_replaced_and_other_files_refused(short_dir: Path) -> None:
    img_path = short_dir / "d.raw"
    img_path.write_bytes(b"\0" * 65536)
    stale = short_dir / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))  # what a killed daemon leaves behind
    s.close()
    (short_dir / "file.sock").write_text("not a socket")
    with storage.Image.open(str(img_path)) as img:
        exp = NbdExport(img, str(stale), readonly=False)
        assert (stale.stat().st_mode & 0o777) == 0o600
        assert RawNbd(stale).connect().size == 65536
        exp.close()
        from xenblk.nbd import NbdError

        with pytest.raises(NbdError, match="not a socket"):
            NbdExport(img, str(short_dir / "file.sock"), readonly=False)
        with pytest.raises(NbdError, match="too long"):
            NbdExport(img, str(short_dir / ("x" * 120)), readonly=False)
    assert (short_dir / "file.sock").read_text() == "not a socket"


def test_direct_image_takes_aligned_requests_only(short_dir: Path) -> None:
    """An O_DIRECT image (cache=none, block devices) shares its fd with the rings: NBD offsets and lengths must
    be multiples of its logical block (advertised as the minimum block size), else EINVAL."""
    work = Path(tempfile.mkdtemp(prefix="xbnbd-", dir="/var/tmp"))  # not tmpfs: O_DIRECT
    try:
        img_path = work / "d.raw"
        seed = random.Random(7).randbytes(1 << 20)
        img_path.write_bytes(seed)
        with storage.Image.open(str(img_path), cache="none") as img:
            assert img.direct
            exp = NbdExport(img, str(short_dir / "d.sock"), readonly=False)
            try:
                c = RawNbd(exp.path).connect()
                for i, (off, n) in enumerate([(100, 512), (512, 100), (512, 513)]):
                    c.request(CMD_READ, off, n, cookie=i)
                    assert c.reply()[:2] == (EINVAL, i)
                c.request(CMD_WRITE, 1000, 512, cookie=9, payload=b"\x01" * 512)
                assert c.reply()[:2] == (EINVAL, 9)
                c.request(CMD_WRITE, 1024, 512, cookie=10, flags=FLAG_FUA, payload=b"\x02" * 512)
                assert c.reply()[:2] == (0, 10)
                assert c.read(512, 2048) == seed[512:1024] + b"\x02" * 512 + seed[1536:2560]
                c.close()
            finally:
                exp.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
