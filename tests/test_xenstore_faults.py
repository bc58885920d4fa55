"""Hostile or broken peers: a fake xenstored that sends what the protocol forbids. Never a crash, never a hang."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
from collections.abc import Awaitable, Callable

import pytest

from tests.fixtures.xenstored import FakeConnection, FakeXenstored, Handler
from xenblk.xenstore import (
    AlreadyExists,
    NoEntry,
    PermissionDenied,
    ProtocolError,
    TooBig,
    Transaction,
    TryAgain,
    XenStore,
    XenStoreError,
    XenStoreUnavailable,
    wire,
)

Factory = Callable[[Handler], Awaitable[FakeXenstored]]


async def answer_reads(conn: FakeConnection) -> None:
    """Behave: READ p -> "value-of:p", WATCH -> OK, anything else -> OK."""
    while True:
        h, payload = await conn.recv()
        if h.type == wire.Op.READ:
            await conn.reply(h, b"value-of:" + payload.rstrip(b"\0"))
        else:
            await conn.reply(h, b"OK\0")


async def test_oversize_reply_fails_pending_requests_then_reconnects(fake_xenstored: Factory) -> None:
    async def handler(conn: FakeConnection) -> None:
        if conn.index > 0:
            return await answer_reads(conn)
        for _ in range(3):
            await conn.recv()
        await conn.send(wire.Op.READ, 1, b"x" * 16, length=wire.PAYLOAD_MAX + 1)
        await asyncio.sleep(3600)

    server = await fake_xenstored(handler)
    async with XenStore.open(str(server.path), timeout=30) as xs:
        results = await asyncio.gather(*(xs.read(f"/p{i}") for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, ProtocolError) for r in results), results
        assert "4097" in str(results[0]) and "4096" in str(results[0])
        assert await xs.read("/after") == "value-of:/after"  # a fresh connection
        assert server.connections == 2


async def test_error_names_map_to_exceptions(fake_xenstored: Factory) -> None:
    names = {
        b"/eacces": b"EACCES\0",
        b"/eperm": b"EPERM\0",
        b"/enoent": b"ENOENT\0",
        b"/eagain": b"EAGAIN\0",
        b"/eexist": b"EEXIST\0",
        b"/e2big": b"E2BIG\0",
        b"/enospc": b"ENOSPC\0",
        b"/bogus": b"EBOGUS\0",
        b"/nonul": b"EACCES",
    }

    async def handler(conn: FakeConnection) -> None:
        while True:
            h, payload = await conn.recv()
            await conn.send(wire.Op.ERROR, h.req_id, names[payload.rstrip(b"\0")])

    server = await fake_xenstored(handler)
    async with XenStore.open(str(server.path), timeout=30) as xs:
        with pytest.raises(PermissionDenied) as e:
            await xs.read("/eacces")
        assert (e.value.errno, e.value.path) == (errno.EACCES, "/eacces")
        assert "EACCES" in str(e.value) and "/eacces" in str(e.value)
        with pytest.raises(PermissionDenied):
            await xs.read("/eperm")
        with pytest.raises(NoEntry):
            await xs.read("/enoent")
        with pytest.raises(TryAgain):
            await xs.read("/eagain")
        with pytest.raises(AlreadyExists):
            await xs.read("/eexist")
        with pytest.raises(TooBig):
            await xs.read("/e2big")
        with pytest.raises(XenStoreError) as e:
            await xs.read("/enospc")
        assert e.value.errno == errno.ENOSPC
        with pytest.raises(ProtocolError, match="unknown errno"):
            await xs.read("/bogus")
        with pytest.raises(PermissionDenied):
            await xs.read("/nonul")  # older daemons may omit the NUL


async def test_oversize_request_is_never_sent(fake_xenstored: Factory) -> None:
    seen: list[tuple[int, bytes]] = []

    async def handler(conn: FakeConnection) -> None:
        while True:
            h, payload = await conn.recv()
            seen.append((h.type, payload))
            await conn.reply(h, b"OK\0")

    server = await fake_xenstored(handler)
    async with XenStore.open(str(server.path), timeout=30) as xs:
        with pytest.raises(TooBig):
            await xs.write("/big", b"x" * wire.PAYLOAD_MAX)
        with pytest.raises(TooBig):
            await xs.read("/" + "p" * 4000)
        await xs.mkdir("/small")
    assert seen == [(wire.Op.MKDIR, b"/small\0")]


async def test_silent_daemon_times_out_as_unavailable(fake_xenstored: Factory) -> None:
    async def handler(conn: FakeConnection) -> None:
        await asyncio.sleep(3600)

    server = await fake_xenstored(handler)
    async with XenStore.open(str(server.path), timeout=0.2) as xs:
        with pytest.raises(XenStoreUnavailable, match="no reply from xenstored"):
            await xs.read("/slow")


async def test_malformed_watch_event_resets_the_connection(fake_xenstored: Factory) -> None:
    async def handler(conn: FakeConnection) -> None:
        if conn.index > 0:
            return await answer_reads(conn)
        await conn.recv()
        await conn.send(wire.Op.WATCH_EVENT, 0, b"no-terminator")
        await asyncio.sleep(3600)

    server = await fake_xenstored(handler)
    async with XenStore.open(str(server.path), timeout=30) as xs:
        with pytest.raises(ProtocolError, match="watch event"):
            await xs.read("/x")
        assert await xs.read("/y") == "value-of:/y"


async def test_reply_of_the_wrong_type_fails_only_that_request(fake_xenstored: Factory) -> None:
    async def handler(conn: FakeConnection) -> None:
        while True:
            h, payload = await conn.recv()
            if payload == b"/wrong\0":
                await conn.send(wire.Op.DIRECTORY, h.req_id, b"a\0")
            else:
                await conn.reply(h, b"fine")

    server = await fake_xenstored(handler)
    async with XenStore.open(str(server.path), timeout=30) as xs:
        with pytest.raises(ProtocolError, match="type"):
            await xs.read("/wrong")
        assert await xs.read("/right") == "fine"
        assert server.connections == 1


async def test_unmatched_and_out_of_order_replies(fake_xenstored: Factory) -> None:
    async def handler(conn: FakeConnection) -> None:
        first, p1 = await conn.recv()
        second, p2 = await conn.recv()
        await conn.send(wire.Op.READ, 0xDEAD, b"nobody asked")
        await conn.reply(second, p2.rstrip(b"\0"))
        await conn.reply(first, p1.rstrip(b"\0"))
        await answer_reads(conn)

    server = await fake_xenstored(handler)
    async with XenStore.open(str(server.path), timeout=30) as xs:
        assert await asyncio.gather(xs.read("/one"), xs.read("/two")) == ["/one", "/two"]


async def test_daemon_closing_mid_message_fails_pending_then_reconnects(fake_xenstored: Factory) -> None:
    async def handler(conn: FakeConnection) -> None:
        if conn.index > 0:
            return await answer_reads(conn)
        h, _ = await conn.recv()
        conn.writer.write(wire.HEADER.pack(h.type, h.req_id, 0, 100) + b"only part")
        await conn.writer.drain()

    server = await fake_xenstored(handler)
    async with XenStore.open(str(server.path), timeout=30) as xs:
        with pytest.raises(XenStoreUnavailable, match="lost the connection"):
            await xs.read("/x")
        assert await xs.read("/z") == "value-of:/z"
        assert xs.reconnects == 1


async def test_transaction_request_fails_as_try_again_when_connection_drops(fake_xenstored: Factory) -> None:
    async def handler(conn: FakeConnection) -> None:
        h, _ = await conn.recv()
        if h.type == wire.Op.TRANSACTION_START:
            await conn.reply(h, b"7\0")
            await conn.recv()  # the first request inside the transaction: hang up instead of answering

    server = await fake_xenstored(handler)
    async with XenStore.open(str(server.path), timeout=30) as xs:
        with pytest.raises(TryAgain):
            async with xs.transaction() as t:
                await t.read("/x")


async def test_bad_transaction_id_is_a_protocol_error(fake_xenstored: Factory) -> None:
    async def handler(conn: FakeConnection) -> None:
        while True:
            h, _ = await conn.recv()
            await conn.reply(h, b"-1\0")

    server = await fake_xenstored(handler)
    async with XenStore.open(str(server.path), timeout=30) as xs:
        with pytest.raises(ProtocolError, match="transaction id"):
            async with xs.transaction():
                pass


async def test_random_garbage_from_the_daemon_only_raises_xenstore_errors(fake_xenstored: Factory) -> None:
    rng = random.Random(1234)

    async def handler(conn: FakeConnection) -> None:
        while True:
            h, _ = await conn.recv()
            for _ in range(rng.randrange(3)):
                kind = rng.choice([h.type, wire.Op.ERROR, wire.Op.WATCH_EVENT, rng.randrange(0, 1 << 32)])
                req_id = h.req_id if rng.random() < 0.5 else rng.randrange(0, 1 << 32)
                body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
                oversize = rng.random() < 0.05
                await conn.send(kind, req_id, body, length=wire.PAYLOAD_MAX + 1 if oversize else None)
                if oversize:
                    return
            await conn.reply(h, b"OK\0")  # so no request waits for its timeout

    server = await fake_xenstored(handler)
    async with XenStore.open(str(server.path), timeout=30) as xs:
        ops: list[Callable[[], Awaitable[object]]] = [
            lambda: xs.read("/a"),
            lambda: xs.directory("/a"),
            lambda: xs.get_perms("/a"),
            lambda: xs.write("/a", "v"),
            lambda: xs.get_domain_path(1),
        ]
        for _ in range(150):
            with contextlib.suppress(XenStoreError):
                await rng.choice(ops)()
        assert server.connections >= 1


async def test_watch_refused_after_reconnect_raises_in_its_iterator(fake_xenstored: Factory) -> None:
    async def handler(conn: FakeConnection) -> None:
        h, payload = await conn.recv()
        assert h.type == wire.Op.WATCH
        if conn.index == 0:
            await conn.reply(h, b"OK\0")
            await conn.send(wire.Op.WATCH_EVENT, 0, payload)  # the initial fire: "path\0token\0"
            return  # then hang up
        await conn.send(wire.Op.ERROR, h.req_id, b"ENOSPC\0")
        await answer_reads(conn)

    server = await fake_xenstored(handler)
    async with XenStore.open(str(server.path), timeout=30) as xs, xs.watch("/w") as w:
        first = await anext(aiter(w))
        assert first.path == "/w"
        with pytest.raises(XenStoreError) as e:
            async with asyncio.timeout(60):
                await anext(aiter(w))
        assert e.value.errno == errno.ENOSPC
        assert await xs.read("/still") == "value-of:/still"


async def test_transaction_start_lost_with_the_connection_is_retried(fake_xenstored: Factory) -> None:
    async def handler(conn: FakeConnection) -> None:
        h, _ = await conn.recv()
        if conn.index == 0:
            return  # hang up on the TRANSACTION_START
        await conn.reply(h, b"9\0")
        while True:
            h, _payload = await conn.recv()
            if h.type == wire.Op.READ:
                assert h.tx_id == 9
                await conn.reply(h, b"in-tx")
            else:
                await conn.reply(h, b"OK\0")

    attempts = 0

    async def body(t: Transaction) -> str:
        nonlocal attempts
        attempts += 1
        return await t.read("/x")

    server = await fake_xenstored(handler)
    async with XenStore.open(str(server.path), timeout=30) as xs:
        assert await xs.transact(body) == "in-tx"
    assert attempts == 1
