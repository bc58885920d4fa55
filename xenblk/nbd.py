"""The NBD export of an open image (docs/DESIGN.md, "NBD export").

A thin typed layer over `native/nbd/` (in xenblk._dataplane): C threads accept clients on a unix
socket and serve them on the same `struct xb_image` the data plane's queues use, so data written
through the ring and through NBD is one image, one cache, one lock. Python only starts it, reads
its counters and stops it; no request goes through Python.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, fields
from typing import Any

from xenblk import storage
from xenblk.dataplane import _image_ptr, ffi, lib
from xenblk.errors import XenblkError


def socket_path(run_dir: str, btype: str, domid: int, devid: int) -> str:
    """Where the daemon serves a disk: <run_dir>/nbd/<type>-<domid>-<devid>.sock."""
    return os.path.join(run_dir, "nbd", f"{btype}-{domid}-{devid}.sock")


def make_socket_dir(path: str) -> None:
    """The socket's directory, 0700: only root reaches the sockets in it."""
    d = os.path.dirname(path)
    os.makedirs(d, mode=0o700, exist_ok=True)
    os.chmod(d, 0o700)


class NbdError(XenblkError):
    """The export could not be created or bound; the message says why."""


@dataclass(frozen=True)
class NbdStats:
    connections: int = 0  # clients that completed the handshake
    refused: int = 0  # clients closed at once because max_clients were connected
    active: int = 0  # connected now (handshake included)
    requests: int = 0
    read_bytes: int = 0
    written_bytes: int = 0
    errors: int = 0  # requests answered with an error
    protocol_errors: int = 0  # connections closed for a malformed handshake or request


class NbdExport:
    """Serves `image` on the unix socket `path` until close(). The image must stay open until then
    (close() returns only once no NBD request is in storage any more)."""

    def __init__(self, image: storage.Image, path: str, *, readonly: bool, max_clients: int = 16) -> None:
        err = ffi.new("char[]", lib.XB_ERRLEN)
        ptr = lib.xb_nbd_export_new(_image_ptr(image), int(readonly), max_clients, err)
        if ptr == ffi.NULL:
            raise NbdError(ffi.string(err).decode(errors="replace") or "cannot create the NBD export")
        rc = lib.xb_nbd_export_listen(ptr, path.encode(), err)
        if rc < 0:
            lib.xb_nbd_export_free(ptr)
            raise NbdError(ffi.string(err).decode(errors="replace") or f"{path}: cannot listen")
        self.path = path
        self.image = image  # referenced: the C threads use it until close()
        self.readonly = readonly
        self._ptr: Any = ptr
        self._lock = threading.Lock()

    def stats(self) -> NbdStats:
        out = ffi.new("struct xb_nbd_stats *")
        with self._lock:
            if self._ptr is None:
                return NbdStats()
            lib.xb_nbd_export_get_stats(self._ptr, out)
        return NbdStats(**{f.name: int(getattr(out, f.name)) for f in fields(NbdStats)})

    def close(self) -> None:
        """Disconnect every client, wait for their requests in storage, remove the socket. Blocks
        (without the GIL) for at most the storage calls in flight; idempotent."""
        with self._lock:
            ptr, self._ptr = self._ptr, None
            if ptr is not None:
                lib.xb_nbd_export_free(ptr)
