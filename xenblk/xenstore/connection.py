"""One live connection to xenstored: many requests in flight, matched to replies by req_id.

A single reader task owns the input side; it resolves request futures and hands watch events to a
callback. A connection dies exactly once (peer gone, protocol violation, or close()); then every
pending request fails and the owner is told, so it can reconnect with a fresh Connection.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import structlog

from xenblk.xenstore import wire
from xenblk.xenstore.errors import (
    ConnectionLost,
    ProtocolError,
    TooBig,
    TryAgain,
    XenStoreError,
    XenStoreUnavailable,
    error_from_errno,
)
from xenblk.xenstore.transport import RequestRejected, Transport

log = structlog.get_logger(__name__)

Reply = tuple[wire.Header, bytes]


class Connection:
    def __init__(
        self,
        transport: Transport,
        generation: int,
        on_event: Callable[[bytes], None],
        on_lost: Callable[[Connection, XenStoreError], None],
    ) -> None:
        self.transport = transport
        self.generation = generation
        self._on_event = on_event
        self._on_lost = on_lost
        # req_id -> (future, transactional): a transactional request fails as TryAgain when the connection dies.
        self._pending: dict[int, tuple[asyncio.Future[Reply], bool]] = {}
        self._ids = itertools.cycle(range(1, 1 << 32))
        self.error: XenStoreError | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read_loop(), name="xenstore-reader")

    @property
    def alive(self) -> bool:
        return self.error is None

    def _next_id(self) -> int:
        while True:
            req_id = next(self._ids)
            if req_id not in self._pending:
                return req_id

    async def call(self, op: wire.Op, tx_id: int, payload: bytes, path: str | None = None) -> Reply:
        """Send one request and wait for its reply (header, payload); XS_ERROR replies are returned, not raised."""
        if len(payload) > self.transport.max_payload:
            raise TooBig(
                f"xenstore {op.name.lower()}: request payload of {len(payload)} bytes exceeds "
                f"{self.transport.max_payload} on {self.transport.path}",
                path=path,
            )
        # Losing the connection loses its transactions too, including one being started.
        transactional = tx_id != 0 or op == wire.Op.TRANSACTION_START
        if self.error is not None:
            raise self._failure(transactional)
        req_id = self._next_id()
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = (fut, transactional)
        try:
            self._send(op, req_id, tx_id, payload)
            await self.transport.drain()
            return await fut
        except RequestRejected as e:
            raise error_from_errno(e.errno, op.name.lower(), path) from e
        except OSError as e:
            self.kill(ConnectionLost(f"lost the connection to xenstored at {self.transport.path}: {e}"))
            if fut.done():
                fut.exception()  # raised below instead; mark it seen so asyncio does not warn
            raise self._failure(transactional) from e
        finally:
            self._pending.pop(req_id, None)

    def post(self, op: wire.Op, tx_id: int, payload: bytes) -> None:
        """Send without waiting for the reply (used to abort a transaction from cleanup code)."""
        if self.error is None:
            try:
                self._send(op, self._next_id(), tx_id, payload)
            except OSError as e:
                self.kill(ConnectionLost(f"lost the connection to xenstored at {self.transport.path}: {e}"))

    def _send(self, op: wire.Op, req_id: int, tx_id: int, payload: bytes) -> None:
        self.transport.write(wire.encode(op, req_id, tx_id, payload))

    def _failure(self, transactional: bool) -> XenStoreError:
        """What a request sees when the connection is gone: transactions died with it, so they are retried."""
        err = self.error
        assert err is not None
        if transactional and not isinstance(err, ProtocolError):
            return TryAgain(f"transaction lost with the connection: {err}")
        # A fresh instance per waiter, so tracebacks do not pile up on one shared object.
        return type(err)(str(err), errno=err.errno, path=err.path)

    async def _read_loop(self) -> None:
        error: XenStoreError
        try:
            while True:
                header = wire.decode_header(await self.transport.read_exactly(wire.HEADER.size))
                payload = await self.transport.read_exactly(header.length) if header.length else b""
                self._dispatch(header, payload)
        except XenStoreError as e:
            error = e
        except (OSError, EOFError) as e:
            error = ConnectionLost(f"lost the connection to xenstored at {self.transport.path}: {e}")
        except asyncio.CancelledError:
            error = XenStoreUnavailable("xenstore connection closed")
        except Exception as e:  # a bug must not leave requests waiting for replies that will never come
            log.exception("xenstore.reader_failed")
            error = ConnectionLost(f"xenstore connection failed: {e!r}")
        self.kill(error)

    def _dispatch(self, header: wire.Header, payload: bytes) -> None:
        if header.type == wire.Op.WATCH_EVENT:
            self._on_event(payload)
            return
        entry = self._pending.get(header.req_id)
        if entry is None or entry[0].done():
            # A reply to a request that timed out or was posted without waiting.
            log.debug("xenstore.unmatched_reply", type=header.type, req_id=header.req_id)
            return
        entry[0].set_result((header, payload))

    def kill(self, error: XenStoreError) -> None:
        """End the connection once: fail what is pending, close the transport, tell the owner."""
        if self.error is not None:
            return
        self.error = error
        for fut, transactional in self._pending.values():
            if not fut.done():
                fut.set_exception(self._failure(transactional))
        self._pending.clear()
        self.transport.close()
        if self._reader is not asyncio.current_task():
            self._reader.cancel()
        self._on_lost(self, error)

    async def close(self) -> None:
        self.kill(XenStoreUnavailable("xenstore connection closed"))
        await asyncio.wait([self._reader])
