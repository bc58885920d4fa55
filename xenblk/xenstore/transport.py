"""Byte transports to xenstored: its unix socket, or the /dev/xen/xenbus character device.

Both carry the same message framing; the client only needs read_exactly/write/drain/close.
"""

from __future__ import annotations

import abc
import asyncio
import errno
import os
import socket
import stat

from xenblk.xenstore import wire
from xenblk.xenstore.errors import XenStoreUnavailable

DEFAULT_SOCKET = "/var/run/xenstored/socket"
XENBUS_DEVICE = "/dev/xen/xenbus"
_READ_CHUNK = 65536
CONNECT_TIMEOUT = 10.0  # seconds to get past a full listen backlog
# Write errors from the xenbus device that mean the device (not one message) is gone.
_DEVICE_DEAD = frozenset({errno.EBADF, errno.EIO, errno.ENODEV, errno.ENXIO, errno.EPIPE})


class RequestRejected(Exception):
    """The xenbus device refused one message (write() failed with `errno`) and dropped it; the connection lives."""

    def __init__(self, number: int) -> None:
        super().__init__(os.strerror(number))
        self.errno = number


class Transport(abc.ABC):
    """A connected byte stream. read_exactly raises ConnectionError when the peer goes away."""

    # Largest request payload the path to xenstored accepts.
    max_payload = wire.PAYLOAD_MAX

    def __init__(self, path: str) -> None:
        self.path = path

    @abc.abstractmethod
    async def read_exactly(self, n: int) -> bytes: ...

    @abc.abstractmethod
    def write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def drain(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...


class SocketTransport(Transport):
    def __init__(self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(path)
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, path: str) -> SocketTransport:
        reader, writer = await asyncio.open_unix_connection(sock=await _connect_unix(path))
        return cls(path, reader, writer)

    async def read_exactly(self, n: int) -> bytes:
        try:
            return await self._reader.readexactly(n)
        except asyncio.IncompleteReadError as e:
            raise ConnectionResetError(f"xenstored closed the connection at {self.path}") from e

    def write(self, data: bytes) -> None:
        if self._writer.is_closing():
            raise ConnectionResetError(f"connection to xenstored at {self.path} is closed")
        self._writer.write(data)

    async def drain(self) -> None:
        await self._writer.drain()

    def close(self) -> None:
        self._writer.close()


class FdTransport(Transport):
    """A non-blocking file descriptor driven by loop.add_reader: the xenbus device (or any stream fd).

    The xenbus device hands back whole queued replies; a read may still return part of one, so input is
    buffered and parsed like a stream. Linux's device differs from the socket in two ways (device=True):
    it buffers header and payload together in 4096 bytes, and it answers some bad requests (a watch it
    cannot register, an unknown transaction) by failing write() instead of with an XS_ERROR reply.
    """

    def __init__(self, path: str, fd: int, *, device: bool = False) -> None:
        super().__init__(path)
        self._device = device
        if device:
            self.max_payload = wire.PAYLOAD_MAX - wire.HEADER.size
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray()
        self._out = bytearray()
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._on_readable)

    @classmethod
    async def open(cls, path: str) -> FdTransport:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        return cls(path, fd, device=True)

    def _wake(self, fut: asyncio.Future[None] | None) -> None:
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
        self._wake(self._waiter)
        self._wake(self._drained)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, _READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._fail(ConnectionResetError(f"reading {self.path}: {e.strerror}"))
            return
        if not data:
            self._fail(ConnectionResetError(f"xenstored closed the connection at {self.path}"))
            return
        self._buf += data
        self._wake(self._waiter)

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            if self._error is not None:
                raise self._error
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if not self._out:
            try:
                sent = os.write(self._fd, data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                if self._device and e.errno not in _DEVICE_DEAD:
                    raise RequestRejected(e.errno or errno.EIO) from e
                self._fail(ConnectionResetError(f"writing {self.path}: {e.strerror}"))
                raise self._error from e  # type: ignore[misc]
            data = data[sent:]
            if not data:
                return
            self._loop.add_writer(self._fd, self._on_writable)
        self._out += data

    def _on_writable(self) -> None:
        try:
            sent = os.write(self._fd, self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._fail(ConnectionResetError(f"writing {self.path}: {e.strerror}"))
            return
        del self._out[:sent]
        if not self._out:
            self._loop.remove_writer(self._fd)
            self._wake(self._drained)

    async def drain(self) -> None:
        while self._out and self._error is None:
            self._drained = self._loop.create_future()
            try:
                await self._drained
            finally:
                self._drained = None
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        if self._fd < 0:
            return
        self._fail(ConnectionResetError(f"connection to {self.path} closed"))
        os.close(self._fd)
        self._fd = -1


def candidate_paths(path: str | None) -> list[str]:
    """Where to look for xenstored, in libxenstore's order; an explicit path or $XENSTORED_PATH is final."""
    if path:
        return [path]
    if os.environ.get("XENSTORED_PATH"):
        return [os.environ["XENSTORED_PATH"]]
    rundir = os.environ.get("XENSTORED_RUNDIR")
    first = os.path.join(rundir, "socket") if rundir else DEFAULT_SOCKET
    return [first, XENBUS_DEVICE]


def _is_device(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return path.startswith("/dev/")


async def _connect_unix(path: str, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    """A connected unix socket. xenstored listens with a backlog of 1: while it is full, a non-blocking
    connect() fails with EAGAIN, which for a unix socket is not "in progress" as for TCP (asyncio would take
    the socket for connected and the first read would find it dead): try again until accepted or `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.001
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
            return sock
        except BlockingIOError:
            sock.close()
            if loop.time() >= deadline:
                raise ConnectionRefusedError(
                    errno.EAGAIN, "xenstored accepts no connection (listen backlog full)"
                ) from None
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.05)
        except BaseException:
            sock.close()
            raise


async def connect(path: str | None) -> Transport:
    """Connect to the first reachable candidate; XenStoreUnavailable names every path tried and why not."""
    tried: list[str] = []
    for candidate in candidate_paths(path):
        try:
            if _is_device(candidate):
                return await FdTransport.open(candidate)
            return await SocketTransport.connect(candidate)
        except OSError as e:
            tried.append(f"{candidate} ({e.strerror or e})")
    raise XenStoreUnavailable(
        f"cannot reach xenstored at {', '.join(tried)}: is xenstored running? set XENSTORED_PATH or xenstore.path"
    )
