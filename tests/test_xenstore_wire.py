"""Message framing and payload codecs, without a daemon."""

from __future__ import annotations

import pytest

from xenblk.xenstore import InvalidArgument, Perm, ProtocolError, TooBig, wire


def test_header_is_four_little_endian_u32() -> None:
    msg = wire.encode(wire.Op.READ, 0x01020304, 7, b"/a\0")
    assert msg[:16] == bytes([2, 0, 0, 0, 4, 3, 2, 1, 7, 0, 0, 0, 3, 0, 0, 0])
    assert msg[16:] == b"/a\0"
    assert wire.decode_header(msg[:16]) == wire.Header(2, 0x01020304, 7, 3)


def test_payload_limit_both_ways() -> None:
    wire.encode(wire.Op.WRITE, 1, 0, b"x" * wire.PAYLOAD_MAX)
    with pytest.raises(TooBig):
        wire.encode(wire.Op.WRITE, 1, 0, b"x" * (wire.PAYLOAD_MAX + 1))
    wire.decode_header(wire.HEADER.pack(2, 1, 0, wire.PAYLOAD_MAX))
    with pytest.raises(ProtocolError, match="4097"):
        wire.decode_header(wire.HEADER.pack(2, 1, 0, wire.PAYLOAD_MAX + 1))
    with pytest.raises(ProtocolError):
        wire.decode_header(wire.HEADER.pack(2, 1, 0, 0xFFFFFFFF))
    with pytest.raises(ProtocolError, match="truncated"):
        wire.decode_header(b"\0" * 15)


def test_path_argument() -> None:
    assert wire.path_arg("/local/domain/0") == b"/local/domain/0\0"
    assert wire.path_arg("@introduceDomain") == b"@introduceDomain\0"
    for bad in ("", "/a\0b"):
        with pytest.raises(InvalidArgument):
            wire.path_arg(bad)
    with pytest.raises(TooBig):
        wire.path_arg("/" + "a" * wire.ABS_PATH_MAX)


def test_string_lists() -> None:
    assert wire.split_strings(b"", "directory") == []
    assert wire.split_strings(b"a\0bc\0", "directory") == ["a", "bc"]
    with pytest.raises(ProtocolError, match="NUL-terminated"):
        wire.split_strings(b"a\0b", "directory")
    with pytest.raises(ProtocolError, match="UTF-8"):
        wire.split_strings(b"\xff\0", "directory")
    assert wire.strings("a", "b") == b"a\0b\0"
    with pytest.raises(InvalidArgument):
        wire.strings("a\0")


def test_single_string_replies() -> None:
    assert wire.one_string(b"OK\0", "write") == "OK"
    assert wire.one_string(b"/local/domain/5", "get_domain_path") == "/local/domain/5"
    with pytest.raises(ProtocolError):
        wire.one_string(b"a\0b\0", "x")


def test_error_names() -> None:
    assert wire.error_name(b"ENOENT\0") == "ENOENT"
    with pytest.raises(ProtocolError, match="unknown errno"):
        wire.error_name(b"EVIL\0")
    with pytest.raises(ProtocolError):
        wire.error_name(b"x" * 4000)


def test_watch_events() -> None:
    assert wire.watch_event(b"/a/b\0tok\0") == ("/a/b", "tok")
    assert wire.watch_event(b"/a/b\0tok\0\0") == ("/a/b", "tok")
    assert wire.watch_event(b"/a\0\0") == ("/a", "")
    assert wire.watch_event(b"/a\0t\0extra\0") == ("/a", "t")
    for bad in (b"", b"/a\0", b"/a", b"\0tok\0"):
        with pytest.raises(ProtocolError):
            wire.watch_event(bad)


def test_perms() -> None:
    assert str(Perm("n", 0)) == "n0"
    assert Perm.parse("r1") == Perm("r", 1)
    assert Perm.parse("b65535") == Perm("b", 65535)
    assert [str(Perm.parse(s)) for s in ("n0", "r12", "w3", "b4")] == ["n0", "r12", "w3", "b4"]
    for bad in ("", "r", "x1", "r-1", "r1a", "R1", "r 1", "r65536", "r٣", "rr1"):
        with pytest.raises(InvalidArgument):
            Perm.parse(bad)
    with pytest.raises(InvalidArgument):
        Perm("q", 1)


async def test_device_write_refusal_is_per_request() -> None:
    """Linux's xenbus device fails write() for one bad message; that must not read as a dead connection."""
    import errno
    import socket

    from xenblk.xenstore.transport import FdTransport, RequestRejected

    # Stand-in for the device (no Xen here): a datagram socket refuses one oversize write with EMSGSIZE.
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
    transport = FdTransport("/dev/xen/xenbus", ours.detach(), device=True)
    try:
        assert transport.max_payload == wire.PAYLOAD_MAX - wire.HEADER.size
        with pytest.raises(RequestRejected) as e:
            transport.write(b"x" * 8192)
        assert e.value.errno == errno.EMSGSIZE
        transport.write(wire.encode(wire.Op.READ, 1, 0, b"/a\0"))  # still usable
        assert peer.recv(100) == wire.encode(wire.Op.READ, 1, 0, b"/a\0")
    finally:
        transport.close()
        peer.close()
