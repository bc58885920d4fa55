"""The grant/event broker against the real xenstored: domains, shared memory, event channels, bad clients."""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from xenblk.sim.broker import DEFAULT_GNTTAB_ENTRIES, DEFAULT_MEM_PAGES, Broker, BrokerClient, BrokerError
from xenblk.sim.xenstored import Xenstored
from xenblk.xenstore import NoEntry, Perm, XenStore


@contextmanager
def client(broker: Broker) -> Iterator[BrokerClient]:
    with BrokerClient(broker.socket_path) as c:
        yield c


async def call(c: BrokerClient, **req: object) -> tuple[dict[str, object], list[int]]:
    return await asyncio.to_thread(c.call, dict(req))


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


async def test_create_domain_writes_nodes_and_perms_like_a_toolstack(broker: Broker, xs: XenStore) -> None:
    with client(broker) as c:
        reply, fds = await call(c, op="create_domain", domid=7, mem_pages=64, gnttab_entries=32, name="guest7")
    assert reply == {"ok": True, "mem_pages": 64, "gnttab_entries": 32}
    mem_fd, gnt_fd = fds
    assert os.fstat(mem_fd).st_size == 64 * 4096
    assert os.fstat(gnt_fd).st_size == 32 * 8
    close_all(fds)
    assert await xs.read("/local/domain/7/name") == "guest7"
    assert await xs.read("/local/domain/7/domid") == "7"
    assert await xs.get_perms("/local/domain/7") == [Perm("n", 7), Perm("r", 0)]


async def test_create_is_idempotent_and_map_gives_the_same_memory(broker: Broker) -> None:
    with client(broker) as c:
        r1, (mem1, gnt1) = await call(c, op="create_domain", domid=3)
        # A second create (other sizes asked) returns the existing domain, not a new one.
        r2, (mem2, gnt2) = await call(c, op="create_domain", domid=3, mem_pages=8)
        r3, (mem3, gnt3) = await call(c, op="map_domain", domid=3)
    assert r1 == r2 == r3 == {"ok": True, "mem_pages": DEFAULT_MEM_PAGES, "gnttab_entries": DEFAULT_GNTTAB_ENTRIES}
    maps = [mmap.mmap(fd, 8192) for fd in (mem1, mem2, mem3)]
    maps[0][4096:4101] = b"guest"
    assert maps[1][4096:4101] == b"guest" and maps[2][4096:4101] == b"guest"
    maps[2][0:7] = b"backend"
    assert maps[0][0:7] == b"backend"
    g1, g3 = mmap.mmap(gnt1, 8), mmap.mmap(gnt3, 8)
    g1[:] = bytes([1, 0, 0, 0, 9, 0, 0, 0])
    assert g3[:] == g1[:]
    for m in [*maps, g1, g3]:
        m.close()
    close_all([mem1, gnt1, mem2, gnt2, mem3, gnt3])


async def test_guest_memory_cannot_be_resized_by_a_holder(broker: Broker) -> None:
    with client(broker) as c:
        _, fds = await call(c, op="create_domain", domid=4, mem_pages=4, gnttab_entries=4)
    for fd in fds:
        for size in (0, 1 << 30):
            with pytest.raises(PermissionError):
                os.ftruncate(fd, size)
    close_all(fds)


async def test_destroy_domain_removes_it(broker: Broker, xs: XenStore) -> None:
    with client(broker) as c:
        _, fds = await call(c, op="create_domain", domid=5, mem_pages=4, gnttab_entries=4)
        close_all(fds)
        r, _ = await call(c, op="evtchn_alloc_unbound", domid=5, remote_domid=0)
        assert r["ok"]
        assert await call(c, op="destroy_domain", domid=5) == ({"ok": True}, [])
        with pytest.raises(NoEntry):
            await xs.read("/local/domain/5/name")
        with pytest.raises(BrokerError, match="no simulated domain 5"):
            await call(c, op="map_domain", domid=5)
        with pytest.raises(BrokerError, match="no unbound port"):
            await call(c, op="evtchn_bind_interdomain", domid=0, remote_domid=5, remote_port=r["port"])
        # The domid can be used again, with fresh (zeroed) memory.
        _, fds = await call(c, op="create_domain", domid=5, mem_pages=4, gnttab_entries=4)
        assert mmap.mmap(fds[0], 4096)[:16] == bytes(16)
        close_all(fds)


def _notified(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


async def test_event_channel_pairs_and_notifies_both_ways(broker: Broker) -> None:
    with client(broker) as guest, client(broker) as backend:
        close_all((await call(guest, op="create_domain", domid=2, mem_pages=4, gnttab_entries=4))[1])
        r, (g_recv, g_send) = await call(guest, op="evtchn_alloc_unbound", domid=2, remote_domid=0)
        port = r["port"]
        rb, (b_recv, b_send) = await call(backend, op="evtchn_bind_interdomain", domid=0, remote_domid=2,
                                          remote_port=port)  # fmt: skip
        assert isinstance(rb["port"], int)
        assert _notified(b_recv) == 0 and _notified(g_recv) == 0
        os.eventfd_write(g_send, 1)
        assert _notified(b_recv) == 1 and _notified(g_recv) == 0
        os.eventfd_write(b_send, 1)
        os.eventfd_write(b_send, 1)
        assert _notified(g_recv) == 2 and _notified(b_recv) == 0
        # A second bind of the same port, or a bind by a domain it was not allocated for, is refused.
        with pytest.raises(BrokerError, match="already bound"):
            await call(backend, op="evtchn_bind_interdomain", domid=0, remote_domid=2, remote_port=port)
        r2, fds2 = await call(guest, op="evtchn_alloc_unbound", domid=2, remote_domid=0)
        with pytest.raises(BrokerError, match="is for domain 0, not 9"):
            await call(backend, op="evtchn_bind_interdomain", domid=9, remote_domid=2, remote_port=r2["port"])
        assert r2["port"] != port
        # The backend closing its side leaves the guest's port unbound: a new backend can bind it again.
        await call(backend, op="evtchn_close", domid=0, port=rb["port"])
        _, (b2_recv, b2_send) = await call(backend, op="evtchn_bind_interdomain", domid=0, remote_domid=2,
                                           remote_port=port)  # fmt: skip
        os.eventfd_write(g_send, 1)
        assert _notified(b2_recv) == 1
        await call(guest, op="evtchn_close", domid=2, port=port)
        with pytest.raises(BrokerError, match="no port"):
            await call(guest, op="evtchn_close", domid=2, port=port)
        close_all([g_recv, g_send, b_recv, b_send, b2_recv, b2_send, *fds2])


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        ({"op": "create_domain"}, "missing 'domid'"),
        ({"op": "create_domain", "domid": 0}, "'domid' must be an integer in 1..32751"),
        ({"op": "create_domain", "domid": True}, "'domid' must be an integer"),
        ({"op": "create_domain", "domid": "1"}, "'domid' must be an integer"),
        ({"op": "create_domain", "domid": 40000}, "'domid' must be an integer"),
        ({"op": "create_domain", "domid": 1, "mem_pages": 0}, "'mem_pages'"),
        ({"op": "create_domain", "domid": 1, "mem_pages": 1 << 40}, "'mem_pages'"),
        ({"op": "create_domain", "domid": 1, "gnttab_entries": -1}, "'gnttab_entries'"),
        ({"op": "create_domain", "domid": 1, "name": ""}, "'name'"),
        ({"op": "create_domain", "domid": 1, "name": "a\nb"}, "'name'"),
        ({"op": "map_domain", "domid": 99}, "no simulated domain 99"),
        ({"op": "destroy_domain", "domid": 99}, "no simulated domain 99"),
        ({"op": "evtchn_alloc_unbound", "domid": 99, "remote_domid": 0}, "no simulated domain 99"),
        ({"op": "evtchn_bind_interdomain", "domid": 0, "remote_domid": 1, "remote_port": 1}, "no unbound port"),
        ({"op": "evtchn_bind_interdomain", "domid": 0, "remote_domid": 1, "remote_port": 0}, "'remote_port'"),
        ({"op": "evtchn_close", "domid": 0, "port": 5}, "no port 5"),
        ({"op": "launch_missiles"}, "unknown op 'launch_missiles'"),
        ({"op": ["create_domain"]}, "unknown op"),
        ({}, "unknown op None"),
    ],
)
async def test_bad_requests_are_refused(broker: Broker, request_: dict[str, object], error: str) -> None:
    with client(broker) as c:
        with pytest.raises(BrokerError, match=error.replace("(", r"\(").replace(".", r"\.")):
            await call(c, **request_)
        assert (await call(c, op="create_domain", domid=1, mem_pages=1, gnttab_entries=1))[0]["ok"]


def _raw_exchange(path: str, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


async def test_malformed_and_hostile_clients_do_not_hurt_the_broker(broker: Broker) -> None:
    path = str(broker.socket_path)
    replies = await asyncio.to_thread(_raw_exchange, path, b'not json\n[1,2]\n"x"\n\xff\xfe\n{"op":"map_domain"}\n')
    lines = [json.loads(x) for x in replies.splitlines()]
    assert len(lines) == 5 and all(r["ok"] is False and r["error"] for r in lines)
    # An endless line is refused and the client dropped; a half line then EOF is just a goodbye.
    huge = await asyncio.to_thread(_raw_exchange, path, b"x" * (200 * 1024))
    assert json.loads(huge.splitlines()[0])["error"].startswith("request longer than")
    assert await asyncio.to_thread(_raw_exchange, path, b'{"op": "crea') == b""
    # A client that sends requests but never reads its replies does not block anybody else.
    hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hog.connect(path)
    hog.setblocking(False)
    try:
        for _ in range(2000):
            try:
                hog.send(b'{"op":"map_domain","domid":1}\n' * 50)
            except BlockingIOError:
                break
        with client(broker) as c:
            r, fds = await call(c, op="create_domain", domid=6, mem_pages=1, gnttab_entries=1)
            assert r["ok"]
            close_all(fds)
    finally:
        hog.close()


def test_client_reports_an_absent_broker() -> None:
    with pytest.raises(BrokerError, match="cannot reach the sim broker"):
        BrokerClient("/nonexistent/broker.sock")


def test_broker_refuses_a_too_long_socket_path() -> None:
    b = Broker("/tmp/" + "d" * 120 + "/broker.sock", "/tmp/x")
    with pytest.raises(BrokerError, match="too long"):
        asyncio.run(b.start())


async def test_create_after_a_xenstored_restart_writes_the_nodes_again(broker: Broker, xenstored: Xenstored) -> None:
    with client(broker) as c:
        close_all((await call(c, op="create_domain", domid=8, mem_pages=1, gnttab_entries=1))[1])
        xenstored.restart()
        reply, fds = await call(c, op="create_domain", domid=8)
        close_all(fds)
    assert reply["mem_pages"] == 1, "the same domain, not a new one"
    async with XenStore.open(str(xenstored.socket_path), timeout=10.0) as xs:
        assert await xs.read("/local/domain/8/domid") == "8"
        assert await xs.get_perms("/local/domain/8") == [Perm("n", 8), Perm("r", 0)]
