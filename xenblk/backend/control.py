"""The daemon's local control socket (`<daemon.run_dir>/control.sock`, mode 0600): one JSON
request per line, one JSON reply per line. Used by `xenblk list`, `xenblk resize` and `xenblk hotplug`.

    {"op": "list"}                                -> {"ok": true, "devices": [...]}
    {"op": "resize", "domid": 1, "vdev": "xvdb"}  -> {"ok": true, "old_sectors": N, "sectors": M, "changed": b}
    {"op": "take", "backend": "backend/vbd3/1/51712"}
                                                  -> open the image now; {"ok": true, "image", "format", "sectors"}
                                                     once open, {"ok": true, "image", "waiting": why} while
                                                     another open holds it (the disk connects once it is
                                                     released), or {"ok": false, "error": why} once refused
    {"op": "release", "backend": "backend/vbd3/1/51712"}
                                                  -> {"ok": true} once the device holds no image
    errors                                        -> {"ok": false, "error": "one line"}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

from xenblk.errors import XenblkError

SOCKET_NAME = "control.sock"
MAX_LINE = 64 * 1024

log = structlog.get_logger("xenblk.control")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def socket_path(run_dir: str) -> Path:
    return Path(run_dir) / SOCKET_NAME


# sun_path holds 108 bytes with its NUL; a deep run_dir (a test's tmp dir) does not fit.
_SUN_PATH_MAX = 107


@contextlib.contextmanager
def _unix_address(path: Path) -> Iterator[str]:
    """An AF_UNIX address naming `path` whatever its length: a long one is reached through an
    O_PATH descriptor of its directory (/proc/self/fd/N/name), which bind and connect resolve
    like any path, without a chdir that would affect the whole process."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield str(path)
        return
    try:
        fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    except OSError as e:
        raise FileNotFoundError(e.errno, e.strerror, str(path.parent)) from None
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class ControlServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if _answers(self.path):
            # Two daemons serving the same devices would corrupt the guests' disks.
            raise XenblkError(f"another xenblk serve is running (its control socket {self.path} answers)")
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            with _unix_address(self.path) as address:
                sock.bind(address)
        except OSError as e:
            sock.close()
            raise XenblkError(f"cannot create the control socket {self.path}: {e.strerror}") from None
        finally:
            os.umask(old)
        try:
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_LINE)
        except BaseException:
            sock.close()
            raise

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ValueError("request is not a JSON object")
                    reply = await self._handler(req)
                except (ValueError, XenblkError) as e:
                    reply = {"ok": False, "error": str(e)}
                except Exception as e:
                    log.exception("control.error")
                    reply = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is None:
            return  # never listened: the path may be another daemon's
        self._server.close()
        await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            with _unix_address(path) as address:
                s.connect(address)
        except OSError:
            return False
    return True


class DaemonNotRunning(XenblkError):
    pass


def call(run_dir: str, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """One request to the running daemon (blocking); DaemonNotRunning if nobody listens."""
    path = socket_path(run_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            with _unix_address(path) as address:
                s.connect(address)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise DaemonNotRunning(f"xenblk serve is not running (no control socket at {path}: {e.strerror})") from None
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise XenblkError(f"xenblk serve closed the control connection ({path})")
            buf += chunk
    reply = json.loads(buf)
    if not isinstance(reply, dict):
        raise XenblkError("xenblk serve sent a malformed reply")
    return reply
