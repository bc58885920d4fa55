"""The XenStore client against the real xenstored 4.17, with Debian's xenstore-* CLI as the oracle."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import re
import subprocess

import pytest

from xenblk.sim.xenstored import Xenstored
from xenblk.xenstore import (
    InvalidArgument,
    NoEntry,
    Perm,
    TooBig,
    Transaction,
    TryAgain,
    WatchEvent,
    XenStore,
    XenStoreUnavailable,
)
from xenblk.xenstore import client as client_mod
from xenblk.xenstore.transport import FdTransport

LS_LINE = re.compile(r'^( *)(\S+) = "(.*)"[ .]*\(([^()]*)\)$')


def cli(xsd: Xenstored, *args: str) -> str:
    return subprocess.run(args, env=xsd.env(), check=True, capture_output=True, text=True, timeout=30).stdout


def xenstore_ls(xsd: Xenstored, path: str) -> dict[str, tuple[str, str]]:
    """`xenstore-ls -p path` as {relative path: (value, perms)}."""
    out: dict[str, tuple[str, str]] = {}
    stack: list[str] = []
    for line in cli(xsd, "xenstore-ls", "-p", path).splitlines():
        m = LS_LINE.match(line)
        assert m, f"unparsed xenstore-ls line: {line!r}"
        depth = len(m.group(1))
        del stack[depth:]
        stack.append(m.group(2))
        out["/".join(stack)] = (m.group(3), m.group(4))
    return out


async def next_event(w: client_mod.Watch) -> WatchEvent:
    async with asyncio.timeout(60):  # a failure bound only
        return await anext(aiter(w))


async def events_until(w: client_mod.Watch, path: str) -> list[WatchEvent]:
    seen: list[WatchEvent] = []
    while not seen or seen[-1].path != path:
        seen.append(await next_event(w))
    return seen


async def test_writes_and_perms_are_what_xenstore_ls_shows(xs: XenStore, xenstored: Xenstored) -> None:
    await xs.write("/test/vbd/51712/params", "/images/disk.qcow2")
    await xs.write("/test/vbd/51712/mode", b"w")
    await xs.mkdir("/test/vbd/51712/empty")
    await xs.write("/test/vbd/51712/state", "1")
    await xs.set_perms("/test/vbd/51712", [Perm("n", 0), Perm("r", 5)])
    await xs.set_perms("/test/vbd/51712/state", [Perm("n", 5), Perm("r", 0), Perm("b", 7)])

    assert xenstore_ls(xenstored, "/test") == {
        "vbd": ("", "n0"),
        "vbd/51712": ("", "n0,r5"),
        "vbd/51712/params": ("/images/disk.qcow2", "n0"),
        "vbd/51712/mode": ("w", "n0"),
        "vbd/51712/empty": ("", "n0"),
        "vbd/51712/state": ("1", "n5,r0,b7"),
    }
    assert await xs.get_perms("/test/vbd/51712/state") == [Perm("n", 5), Perm("r", 0), Perm("b", 7)]
    assert sorted(await xs.directory("/test/vbd/51712")) == ["empty", "mode", "params", "state"]


async def test_reads_what_the_cli_wrote(xs: XenStore, xenstored: Xenstored) -> None:
    cli(xenstored, "xenstore-write", "/cli/a", "hello world", "/cli/b", "")
    cli(xenstored, "xenstore-chmod", "/cli/a", "n3", "r0")
    assert await xs.read("/cli/a") == "hello world"
    assert await xs.read("/cli/b") == ""
    assert await xs.get_perms("/cli/a") == [Perm("n", 3), Perm("r", 0)]
    assert await xs.read("/local/domain/0/name") == "Domain-0"
    assert await xs.read("/local/domain/0/domid") == "0"


async def test_binary_values_round_trip(xs: XenStore) -> None:
    value = bytes(range(256))
    await xs.write("/bin", value)
    assert await xs.read_bytes("/bin") == value
    with pytest.raises(InvalidArgument, match="UTF-8"):
        await xs.read("/bin")


async def test_missing_node_is_no_entry(xs: XenStore) -> None:
    with pytest.raises(NoEntry) as e:
        await xs.read("/nowhere/x")
    assert e.value.errno == errno.ENOENT
    assert e.value.path == "/nowhere/x"
    assert "ENOENT" in str(e.value)
    assert await xs.try_read("/nowhere/x") is None
    with pytest.raises(NoEntry):
        await xs.directory("/nowhere")
    await xs.rm("/local/domain/0/not-there")  # ENOENT is not an error for rm
    await xs.write("/gone/x", "1")
    await xs.rm("/gone")
    assert await xs.try_read("/gone/x") is None


async def test_invalid_path_is_rejected_by_xenstored(xs: XenStore) -> None:
    with pytest.raises(InvalidArgument) as e:
        await xs.write("/bad path with spaces", "1")
    assert e.value.errno == errno.EINVAL


async def test_get_domain_path(xs: XenStore) -> None:
    assert await xs.get_domain_path(5) == "/local/domain/5"
    assert await xs.get_domain_path(0) == "/local/domain/0"


async def test_oversize_request_is_too_big_and_connection_stays_usable(xs: XenStore) -> None:
    with pytest.raises(TooBig):
        await xs.write("/big", "x" * 5000)
    assert await xs.try_read("/big") is None
    await xs.write("/big", "x" * 4000)  # fits: path + value under 4096
    assert len(await xs.read("/big")) == 4000


async def test_watch_fires_for_another_clients_write(xs: XenStore, xenstored: Xenstored) -> None:
    await xs.mkdir("/w")
    async with xs.watch("/w") as w:
        assert await next_event(w) == WatchEvent("/w", w.token)  # xenstored's initial fire
        cli(xenstored, "xenstore-write", "/w/frontend/state", "3")
        assert await next_event(w) == WatchEvent("/w/frontend/state", w.token)
        cli(xenstored, "xenstore-rm", "/w/frontend")
        assert (await next_event(w)).path == "/w/frontend"


async def test_two_watches_get_their_own_events(xs: XenStore) -> None:
    async with xs.watch("/a") as wa, xs.watch("/b") as wb:
        await next_event(wa)
        await next_event(wb)
        await xs.write("/b/x", "1")
        await xs.write("/a/y", "1")
        assert (await next_event(wa)).path == "/a/y"
        assert (await next_event(wb)).path == "/b/x"


async def test_watch_ends_iteration_when_left(xs: XenStore) -> None:
    w = xs.watch("/gone")
    async with w:
        await next_event(w)
    assert [e async for e in w] == []
    await xs.write("/gone/x", "1")  # no longer registered: nothing is queued
    assert [e async for e in w] == []


async def test_watch_flood_collapses_to_one_event_on_the_watched_path(
    xs: XenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_mod, "WATCH_QUEUE_MAX", 8)
    async with xs.watch("/flood") as w:
        await asyncio.gather(*(xs.write(f"/flood/{i}", "x") for i in range(50)))
        await xs.read("/flood/49")  # replies come in order, so every event is queued by now
        events = [await next_event(w) for _ in range(len(w._events))]
    assert len(events) <= 8
    assert WatchEvent("/flood", w.token) in events


async def test_transaction_commits_atomically(xs: XenStore) -> None:
    async with xs.transaction() as t:
        await t.write("/tx/a", "1")
        await t.write("/tx/b", "2")
        assert await xs.try_read("/tx/a") is None  # not visible outside before commit
        assert await t.read("/tx/a") == "1"
    assert (await xs.read("/tx/a"), await xs.read("/tx/b")) == ("1", "2")


async def test_transaction_aborts_when_body_raises(xs: XenStore) -> None:
    with pytest.raises(RuntimeError):
        async with xs.transaction() as t:
            await t.write("/abort/a", "1")
            raise RuntimeError("boom")
    assert await xs.try_read("/abort/a") is None
    await xs.write("/abort/b", "ok")  # the connection is fine afterwards
    assert await xs.read("/abort/b") == "ok"


async def test_conflicting_transaction_gets_eagain(xs: XenStore, xenstored: Xenstored) -> None:
    await xs.write("/c/counter", "0")
    with pytest.raises(TryAgain) as e:
        async with xs.transaction() as t:
            await t.read("/c/counter")
            cli(xenstored, "xenstore-write", "/c/counter", "100")
            await t.write("/c/counter", "1")
    assert e.value.errno == errno.EAGAIN
    assert await xs.read("/c/counter") == "100"


async def test_transact_retries_a_conflict_to_success(xs: XenStore, xenstored: Xenstored) -> None:
    await xs.write("/c/counter", "0")
    attempts = 0

    async def increment(t: Transaction) -> int:
        nonlocal attempts
        attempts += 1
        value = int(await t.read("/c/counter"))
        if attempts == 1:
            cli(xenstored, "xenstore-write", "/c/counter", "100")  # a concurrent writer wins the race
        await t.write("/c/counter", str(value + 1))
        return value + 1

    assert await xs.transact(increment) == 101
    assert attempts == 2
    assert await xs.read("/c/counter") == "101"


async def test_transact_gives_up_after_retries(xs: XenStore, xenstored: Xenstored) -> None:
    await xs.write("/c/x", "0")
    attempts = 0

    async def always_conflicts(t: Transaction) -> None:
        nonlocal attempts
        attempts += 1
        await t.read("/c/x")
        await xs.write("/c/x", str(attempts))  # outside the transaction: conflicts every time
        await t.write("/c/x", "mine")

    with pytest.raises(TryAgain):
        await xs.transact(always_conflicts, retries=2)
    assert attempts == 3


async def test_concurrent_transacts_on_one_connection_lose_no_update(xs: XenStore) -> None:
    await xs.write("/c/n", "0")

    async def increment(t: Transaction) -> None:
        await t.write("/c/n", str(int(await t.read("/c/n")) + 1))

    await asyncio.gather(*(xs.transact(increment, retries=100) for _ in range(10)))
    assert await xs.read("/c/n") == "10"


async def test_pipelined_reads_come_back_matched(xs: XenStore) -> None:
    n = 1000
    await asyncio.gather(*(xs.write(f"/p/{i // 100}/{i}", f"value-{i}") for i in range(n)))
    values = await asyncio.gather(*(xs.read(f"/p/{i // 100}/{i}") for i in range(n)))
    assert values == [f"value-{i}" for i in range(n)]


async def test_large_directory_is_read_in_parts(xs: XenStore) -> None:
    names = [f"device-{i:05d}" for i in range(500)]  # 500 * 13 bytes: more than one 4096-byte reply
    async with xs.transaction() as t:
        for name in names:
            await t.mkdir(f"/big/{name}")
    assert sorted(await xs.directory("/big")) == names


async def test_survives_restart_and_watches_fire_again(xs: XenStore, xenstored: Xenstored) -> None:
    await xs.write("/r/before", "1")
    async with xs.watch("/r") as w:
        await next_event(w)
        xenstored.restart()  # a fresh, empty store on the same socket
        events = await events_until(w, "/r")  # the re-registered watch fires once
        assert events[-1] == WatchEvent("/r", w.token)
        assert await xs.try_read("/r/before") is None  # xenstored lost its contents, as expected
        assert xs.reconnects == 1
        cli(xenstored, "xenstore-write", "/r/after", "2")
        assert await next_event(w) == WatchEvent("/r/after", w.token)
    await xs.write("/r/x", "3")
    assert await xs.read("/r/x") == "3"


async def test_requests_during_outage_wait_for_the_new_daemon(xs: XenStore, xenstored: Xenstored) -> None:
    xenstored.stop(kill=True)
    # The request either meets the dead connection (XenStoreUnavailable) or waits for the reconnect.
    pending = asyncio.ensure_future(xs.read("/local/domain/0/name"))
    await asyncio.sleep(0.3)
    xenstored.start()
    with contextlib.suppress(XenStoreUnavailable):
        assert await pending == "Domain-0"
    assert await xs.read("/local/domain/0/name") == "Domain-0"


async def test_transaction_across_restart_is_tried_again(xs: XenStore, xenstored: Xenstored) -> None:
    attempts = 0

    async def body(t: Transaction) -> None:
        nonlocal attempts
        attempts += 1
        await t.write("/rt/a", str(attempts))
        if attempts == 1:
            xenstored.restart()

    await xs.transact(body)
    assert attempts == 2
    assert await xs.read("/rt/a") == "2"


async def test_unreachable_socket_is_one_clear_line(tmp_path: object) -> None:
    path = "/nonexistent/xenstored/socket"
    with pytest.raises(XenStoreUnavailable) as e:
        await XenStore.open(path)
    message = str(e.value)
    assert "\n" not in message
    assert path in message and "No such file or directory" in message
    assert "XENSTORED_PATH" in message


async def test_default_paths_are_tried_in_order(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.delenv("XENSTORED_PATH", raising=False)
    monkeypatch.setenv("XENSTORED_RUNDIR", "/nonexistent-rundir")
    with pytest.raises(XenStoreUnavailable) as e:
        await XenStore.open()
    assert "/nonexistent-rundir/socket (No such file or directory), /dev/xen/xenbus" in str(e.value)


async def test_xenstored_path_env_is_used(monkeypatch: pytest.MonkeyPatch, xenstored: Xenstored) -> None:
    monkeypatch.setenv("XENSTORED_PATH", str(xenstored.socket_path))
    async with XenStore.open() as xs:
        assert await xs.read("/local/domain/0/name") == "Domain-0"


async def test_closed_client_refuses_requests(xenstored: Xenstored) -> None:
    xs = await XenStore.open(str(xenstored.socket_path))
    await xs.close()
    with pytest.raises(XenStoreUnavailable, match="closed"):
        await xs.read("/local/domain/0/name")


async def test_fd_transport_speaks_to_xenstored(xenstored: Xenstored, monkeypatch: pytest.MonkeyPatch) -> None:
    """The /dev/xen/xenbus code path (a raw non-blocking fd on loop.add_reader), over xenstored's socket fd."""
    import socket

    socks: list[socket.socket] = []

    async def connect_fd(path: str | None) -> FdTransport:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(xenstored.socket_path))
        socks.append(s)
        return FdTransport(str(path), s.detach())

    monkeypatch.setattr(client_mod, "connect", connect_fd)
    async with XenStore.open("/dev/xen/xenbus", timeout=10) as xs:
        await xs.write("/fd/a", "1")
        async with xs.watch("/fd") as w:
            await next_event(w)
            cli(xenstored, "xenstore-write", "/fd/b", "2")
            assert (await next_event(w)).path == "/fd/b"
        values = await asyncio.gather(*(xs.read("/fd/a") for _ in range(200)))
        assert set(values) == {"1"}
        xenstored.restart()
        async with asyncio.timeout(60):
            while True:
                try:
                    await xs.write("/fd/c", "3")
                    break
                except XenStoreUnavailable:
                    await asyncio.sleep(0.05)
        assert await xs.read("/fd/c") == "3"
        assert xs.reconnects == 1


async def test_runs_on_uvloop() -> None:
    import uvloop

    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


async def test_two_tasks_can_consume_one_watch(xs: XenStore) -> None:
    async with xs.watch("/shared") as w:
        await next_event(w)
        consumers = [asyncio.ensure_future(next_event(w)) for _ in range(2)]
        await asyncio.sleep(0)
        await xs.write("/shared/a", "1")
        await xs.write("/shared/b", "2")
        got = await asyncio.gather(*consumers)
    assert sorted(e.path for e in got) == ["/shared/a", "/shared/b"]


async def test_closing_the_client_ends_a_waiting_watch(xenstored: Xenstored) -> None:
    xs = await XenStore.open(str(xenstored.socket_path))
    w = xs.watch("/c")
    await w.__aenter__()
    await next_event(w)
    waiting = asyncio.ensure_future(next_event(w))
    await asyncio.sleep(0)
    await xs.close()
    with pytest.raises(XenStoreUnavailable, match="closed"):
        await waiting
    await w.__aexit__(None, None, None)


async def test_restart_under_load_fails_or_answers_every_request(xs: XenStore, xenstored: Xenstored) -> None:
    async def reader(i: int) -> str | None:
        try:
            return await xs.read("/local/domain/0/name")
        except XenStoreUnavailable:
            return None

    async def load() -> list[str | None]:
        return await asyncio.gather(*(reader(i) for i in range(500)))

    task = asyncio.ensure_future(load())
    await asyncio.sleep(0)  # the requests are written; most replies are still to come
    xenstored.restart()
    results = await task
    assert set(results) <= {"Domain-0", None}
    assert await xs.read("/local/domain/0/name") == "Domain-0"


async def test_watch_entered_during_an_outage_works_once_back(xs: XenStore, xenstored: Xenstored) -> None:
    xenstored.stop(kill=True)
    w = xs.watch("/late")
    entering = asyncio.ensure_future(w.__aenter__())
    await asyncio.sleep(0.2)
    xenstored.start()
    async with asyncio.timeout(60):
        await entering
    try:
        assert (await next_event(w)).path == "/late"
        cli(xenstored, "xenstore-write", "/late/x", "1")
        assert (await events_until(w, "/late/x"))[-1].path == "/late/x"
    finally:
        await w.__aexit__(None, None, None)


async def test_outage_longer_than_the_timeout_says_so(xenstored: Xenstored) -> None:
    async with XenStore.open(str(xenstored.socket_path), timeout=0.3) as xs:
        xenstored.stop(kill=True)
        with pytest.raises(XenStoreUnavailable, match=r"unreachable|lost the connection"):
            await xs.read("/x")
        with pytest.raises(XenStoreUnavailable, match="unreachable"):
            await xs.read("/x")
