"""The asyncio XenStore client: node operations, watches and transactions over one connection.

The connection is replaced transparently when xenstored restarts: requests in flight fail
(XenStoreUnavailable, or TryAgain inside a transaction), later requests wait for the new connection
(bounded by the request timeout), and every watch is registered again, which makes xenstored fire it
once so its owner re-reads state.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import structlog

from xenblk.xenstore import wire
from xenblk.xenstore.connection import Connection
from xenblk.xenstore.errors import (
    AlreadyExists,
    ConnectionLost,
    InvalidArgument,
    ProtocolError,
    TryAgain,
    XenStoreError,
    XenStoreUnavailable,
    error_from_reply,
)
from xenblk.xenstore.ops import NodeOps
from xenblk.xenstore.transport import Transport, connect

log = structlog.get_logger(__name__)

T = TypeVar("T")

RECONNECT_MIN_DELAY = 0.05
RECONNECT_MAX_DELAY = 2.0
WATCH_QUEUE_MAX = 4096  # beyond this, queued events collapse into one event on the watched path


@dataclass(frozen=True)
class WatchEvent:
    path: str
    token: str


class XenStore(NodeOps):
    def __init__(self, path: str | None, timeout: float) -> None:
        self._path = path
        self.timeout = timeout
        self._conn: Connection | None = None
        self._ready = asyncio.Event()
        self._closed = False
        self._generation = 0
        self._reconnector: asyncio.Task[None] | None = None
        self._watches: dict[str, Watch] = {}
        self._tokens = itertools.count(1)
        self.reconnects = 0
        self.watch_events = 0

    @classmethod
    def open(cls, path: str | None = None, *, timeout: float = 30.0) -> _Opening:
        """Connect to xenstored: `xs = await XenStore.open()` or `async with XenStore.open() as xs:`."""
        return _Opening(cls, path, timeout)

    async def _connect_first(self) -> None:
        self._install(await connect(self._path))
        self._ready.set()

    def _install(self, transport: Transport) -> Connection:
        self._generation += 1
        self._conn = Connection(transport, self._generation, self._on_event, self._on_lost)
        return self._conn

    @property
    def connected(self) -> bool:
        return self._ready.is_set() and self._conn is not None and self._conn.alive

    async def close(self) -> None:
        self._closed = True
        if self._reconnector is not None:
            self._reconnector.cancel()
            await asyncio.wait([self._reconnector])
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
        self._ready.set()  # release waiters so they see the client is closed
        for w in list(self._watches.values()):
            w._wake()

    async def __aenter__(self) -> XenStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- connection management

    def _on_lost(self, conn: Connection, error: XenStoreError) -> None:
        if conn is not self._conn or self._closed:
            return
        log.warning("xenstore.connection_lost", error=str(error))
        self._start_reconnecting()

    def _start_reconnecting(self) -> None:
        self._ready.clear()
        if self._reconnector is None or self._reconnector.done():
            self._reconnector = asyncio.get_running_loop().create_task(self._reconnect(), name="xenstore-reconnect")

    async def _reconnect(self) -> None:
        delay = RECONNECT_MIN_DELAY
        while not self._closed:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, RECONNECT_MAX_DELAY)
            try:
                if await self._reconnect_once():
                    return
            except Exception:  # keep trying: giving up would leave the client dead for good
                log.exception("xenstore.reconnect_error")

    async def _reconnect_once(self) -> bool:
        try:
            conn = self._install(await connect(self._path))
        except XenStoreError as e:
            log.debug("xenstore.reconnect_failed", error=str(e))
            return False
        watches = list(self._watches.values())
        try:
            async with asyncio.timeout(self.timeout):
                results = await asyncio.gather(
                    *(self._expect(conn, wire.Op.WATCH, 0, wire.strings(w.path, w.token), w.path) for w in watches),
                    return_exceptions=True,
                )
        except TimeoutError:
            results = [XenStoreUnavailable("no reply to watch registration")]
        for w, result in zip(watches, results, strict=False):
            if isinstance(result, XenStoreUnavailable | ProtocolError) or not conn.alive:
                log.warning("xenstore.rewatch_failed", error=str(result))
                await conn.close()
                return False
            if isinstance(result, BaseException):
                # xenstored refuses this one watch (e.g. a quota): tell its owner rather than retry forever.
                w._fail(result)
        self.reconnects += 1
        log.info("xenstore.reconnected", watches=len(self._watches))
        self._ready.set()
        return True

    async def _live(self) -> Connection:
        while True:
            if self._closed:
                raise XenStoreUnavailable("xenstore client is closed")
            conn = self._conn
            if self._ready.is_set():
                if conn is not None and conn.alive:
                    return conn
                self._start_reconnecting()
            await self._ready.wait()

    # -- requests

    async def _expect(self, conn: Connection, op: wire.Op, tx_id: int, payload: bytes, path: str | None) -> bytes:
        header, body = await conn.call(op, tx_id, payload, path)
        if header.type == wire.Op.ERROR:
            raise error_from_reply(wire.error_name(body), op.name.lower(), path)
        if header.type != op:
            raise ProtocolError(f"xenstore {op.name.lower()}: reply of type {header.type} to a {op.name} request")
        return body

    async def _request(
        self, op: wire.Op, payload: bytes, path: str | None, tx_id: int = 0, generation: int | None = None
    ) -> tuple[bytes, int]:
        """One request on the live connection; returns (reply payload, connection generation)."""
        wire.encode(op, 0, tx_id, payload)  # TooBig now, before waiting for anything
        try:
            async with asyncio.timeout(self.timeout):
                conn = await self._live()
                if generation is not None and conn.generation != generation:
                    raise TryAgain(f"transaction {tx_id} was lost when xenstored reconnected", path=path)
                return await self._expect(conn, op, tx_id, payload, path), conn.generation
        except TimeoutError:
            where = f" {path}" if path else ""
            why = "no reply from xenstored" if self.connected else "xenstored unreachable (still reconnecting)"
            raise XenStoreUnavailable(
                f"xenstore {op.name.lower()}{where}: {why} within {self.timeout:g}s", path=path
            ) from None

    async def _call(self, op: wire.Op, payload: bytes, path: str | None) -> bytes:
        return (await self._request(op, payload, path))[0]

    async def get_domain_path(self, domid: int) -> str:
        if not 0 <= domid <= 0xFFFF:
            raise InvalidArgument(f"xenstore get_domain_path: domid {domid} out of range")
        reply = await self._call(wire.Op.GET_DOMAIN_PATH, wire.strings(str(domid)), None)
        return wire.one_string(reply, "get_domain_path")

    # -- watches

    def watch(self, path: str) -> Watch:
        """`async with xs.watch(p) as w: async for event in w: ...`; the first event is xenstored's initial fire."""
        wire.path_arg(path)  # validate now, not when the watch is entered
        return Watch(self, path, f"xenblk-{next(self._tokens)}")

    def _on_event(self, payload: bytes) -> None:
        path, token = wire.watch_event(payload)
        w = self._watches.get(token)
        if w is not None:
            self.watch_events += 1
            w._push(WatchEvent(path, token))

    # -- transactions

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """One attempt: commits on normal exit (TryAgain if it conflicted), aborts if the body raises."""
        reply, generation = await self._request(wire.Op.TRANSACTION_START, b"\0", None)
        text = wire.one_string(reply, "transaction_start")
        if not text.isascii() or not text.isdigit() or not 0 < int(text) < 1 << 32:
            raise ProtocolError(f"xenstore transaction_start: bad transaction id {text[:16]!r}")
        tx = Transaction(self, int(text), generation)
        try:
            yield tx
        except BaseException:
            tx._abort()
            raise
        await tx._commit()

    async def transact(self, fn: Callable[[Transaction], Awaitable[T]], *, retries: int = 20) -> T:
        """Run fn in a transaction and commit; on conflict (TryAgain) run it again, up to `retries` more times."""
        for attempt in itertools.count():
            try:
                async with self.transaction() as tx:
                    result = await fn(tx)
                return result
            except TryAgain:
                if attempt >= retries:
                    raise
                # Jittered backoff so two conflicting writers stop colliding in lockstep.
                await asyncio.sleep(random.uniform(0, min(0.002 * 2**attempt, 0.2)))
        raise AssertionError("unreachable")


class _Opening:
    """What XenStore.open returns: awaitable (gives the client) and an async context manager (closes it)."""

    def __init__(self, cls: type[XenStore], path: str | None, timeout: float) -> None:
        self._cls, self._path, self._timeout = cls, path, timeout
        self._xs: XenStore | None = None

    async def _open(self) -> XenStore:
        xs = self._cls(self._path, self._timeout)
        await xs._connect_first()
        return xs

    def __await__(self) -> Generator[Any, None, XenStore]:
        return self._open().__await__()

    async def __aenter__(self) -> XenStore:
        self._xs = await self._open()
        return self._xs

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._xs is not None:
            await self._xs.close()


class Transaction(NodeOps):
    def __init__(self, xs: XenStore, tx_id: int, generation: int) -> None:
        self._xs = xs
        self.tx_id = tx_id
        self._generation = generation
        self._done = False

    async def _call(self, op: wire.Op, payload: bytes, path: str | None) -> bytes:
        if self._done:
            raise InvalidArgument(f"xenstore transaction {self.tx_id} is already finished", path=path)
        return (await self._xs._request(op, payload, path, self.tx_id, self._generation))[0]

    async def _commit(self) -> None:
        await self._call(wire.Op.TRANSACTION_END, b"T\0", None)
        self._done = True

    def _abort(self) -> None:
        # Cleanup must not block (it may run during cancellation): send the abort and do not wait.
        if self._done:
            return
        self._done = True
        conn = self._xs._conn
        if conn is not None and conn.alive and conn.generation == self._generation:
            conn.post(wire.Op.TRANSACTION_END, self.tx_id, b"F\0")


class Watch:
    def __init__(self, xs: XenStore, path: str, token: str) -> None:
        self._xs = xs
        self.path = path
        self.token = token
        self._events: deque[WatchEvent] = deque()
        self._changed = asyncio.Event()  # an Event, not a future: several tasks may iterate one watch
        self._active = False
        self._error: BaseException | None = None

    async def __aenter__(self) -> Watch:
        # Registered before the request so the initial event, which may arrive with the reply, is kept.
        self._xs._watches[self.token] = self
        self._active = True
        try:
            await self._xs._call(wire.Op.WATCH, wire.strings(self.path, self.token), self.path)
        except (AlreadyExists, ConnectionLost):
            pass  # the reconnect registers it (or already did), and xenstored then fires it once
        except BaseException:
            self._stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop()
        if not self._xs.connected:
            return  # the watch died with the connection, and the reconnect will not register it again
        with contextlib.suppress(XenStoreError):
            await self._xs._call(wire.Op.UNWATCH, wire.strings(self.path, self.token), self.path)

    def _stop(self) -> None:
        self._active = False
        self._xs._watches.pop(self.token, None)
        self._wake()

    def _fail(self, error: BaseException) -> None:
        """Registration was refused after a reconnect: iteration raises `error` once queued events are read."""
        self._error = error
        self._stop()

    def _push(self, event: WatchEvent) -> None:
        if len(self._events) >= WATCH_QUEUE_MAX:
            # A flood (e.g. a guest rewriting its keys in a loop) must not grow memory without bound:
            # one event on the watched path tells the consumer to re-read everything.
            self._events.clear()
            event = WatchEvent(self.path, self.token)
        self._events.append(event)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> WatchEvent:
        while not self._events:
            if self._error is not None:
                raise self._error
            if not self._active:
                raise StopAsyncIteration
            if self._xs._closed:
                raise XenStoreUnavailable("xenstore client is closed")
            self._changed.clear()
            await self._changed.wait()
        return self._events.popleft()
