"""Block-device growth from kernel uevents (e.g. after `lvextend`), via pyroute2's UeventSocket.

The socket is read on a thread of its own (pyroute2's sync socket blocks); each
`change` event of a block device carrying RESIZE=1 is handed to the event loop as
(major, minor).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger("xenblk.uevents")


def parse_block_resize(msg: Any) -> tuple[int, int] | None:
    """(major, minor) of a block device whose size changed, from one uevent, else None."""
    try:
        if msg.get("SUBSYSTEM") != "block" or msg.get("ACTION") != "change":
            return None
        if msg.get("RESIZE") != "1" and msg.get("DISK_MEDIA_CHANGE") != "1":
            return None
        return int(msg.get("MAJOR")), int(msg.get("MINOR"))
    except (TypeError, ValueError):
        return None


class UeventListener:
    def __init__(self, loop: asyncio.AbstractEventLoop, on_resize: Callable[[int, int], None]) -> None:
        self._loop = loop
        self._on_resize = on_resize
        self._sock: Any = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._bound = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._read, name="uevents", daemon=True)
        self._thread.start()

    def wait_bound(self, timeout: float) -> bool:
        """Block until the socket listens (or could not be made), so no growth before READY is missed."""
        return self._bound.wait(timeout)

    def _read(self) -> None:
        # Created on this thread: pyroute2's sync socket refuses a thread whose event loop is running.
        try:
            from pyroute2 import UeventSocket

            self._sock = UeventSocket()
            self._sock.bind()
        except Exception as e:  # no netlink (a container, or sandboxing): resize still works by `xenblk resize`
            log.warning("uevents.unavailable", error=str(e))
            self._sock = None
            self._bound.set()
            return
        self._bound.set()
        log.debug("uevents.listening")
        while not self._stopping:
            try:
                msgs = self._sock.get()
            except Exception as e:
                if not self._stopping:
                    log.warning("uevents.read_failed", error=str(e))
                return
            for msg in msgs:
                dev = parse_block_resize(msg)
                if dev is not None:
                    self._loop.call_soon_threadsafe(self._on_resize, *dev)

    def stop(self) -> None:
        self._stopping = True
        if self._sock is not None:
            with contextlib.suppress(Exception):
                self._sock.close()
