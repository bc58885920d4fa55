"""Ceph RBD images: `rbd:POOL/IMAGE[@SNAP]`, opened through xenblk._rbd (librbd's C API).

The driver is a cffi module of its own, imported only when an RBD image is opened: a host without
librbd1 loads everything else and says why an `rbd:` disk cannot be served. The image it returns
is a plain `struct xb_image`, wrapped as a xenblk.storage.Image like any file.

Ownership (README, "Ceph RBD"): a read-write image takes RBD's exclusive lock in EXCLUSIVE mode
(`rbd_lock_acquire`) before anything writes; until then the driver refuses every write with EROFS.
While another client holds the lock, `acquire_lock` raises LockBusy and the caller waits; librbd
breaks a lock only when its holder is dead (its watch expired), and blocklists that client first,
so a stalled holder cannot write after the handover; that break is logged by the caller.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Any

from xenblk.config import RbdConfig
from xenblk.storage import Image, StorageError
from xenblk.storage import ffi as storage_ffi
from xenblk.xen.params import RbdName


class LockBusy(StorageError):
    """Another client holds the image's exclusive lock; `owner` names it (librbd's cookie)."""

    def __init__(self, message: str, owner: str) -> None:
        super().__init__(message, _errno.EROFS)
        self.owner = owner


def unavailable() -> str | None:
    """Why `rbd:` disks cannot be opened on this host (xenblk._rbd or librbd missing), or None."""
    try:
        from xenblk import _rbd  # type: ignore[attr-defined]  # noqa: F401
    except ImportError as e:
        return (
            f"RBD support is not available on this host: {e} (Debian: install the xenblk-rbd package;"
            " from source: install librbd-dev, then rebuild)"
        )
    return None


def _lib() -> tuple[Any, Any]:
    why = unavailable()
    if why is not None:
        raise StorageError(why, _errno.ENOSYS)
    from xenblk import _rbd  # type: ignore[attr-defined]

    return _rbd.ffi, _rbd.lib


def _put(field: Any, value: str, what: str) -> None:
    b = os.fsencode(value)
    if len(b) >= len(field):
        raise StorageError(f"rbd {what} {value[:80]!r} is too long", _errno.ENAMETOOLONG)
    field[0 : len(b) + 1] = b + b"\0"


def open_image(name: RbdName, cfg: RbdConfig, *, readonly: bool = False) -> Image:
    """Connects and opens the image (read-only when asked or for a snapshot) with the settings of its pool
    name (RbdConfig.target: [rbd], or [rbd.pools.NAME]). A read-write image cannot be written until
    acquire_lock succeeded."""
    ffi, lib = _lib()
    t = cfg.target(name.pool)
    if t is None:
        raise StorageError(f"rbd:{name}: pool {name.pool} is not configured", _errno.EACCES)
    o = ffi.new("struct xb_rbd_opts *")
    _put(o.pool, t.pool, "pool")
    _put(o.image, name.image, "image")
    _put(o.snap, name.snap or "", "snapshot")
    _put(o.conf_file, t.conf_file, "conf_file")
    _put(o.client_id, t.client_id, "client_id")
    _put(o.keyring, t.keyring, "keyring")
    o.connect_timeout = t.connect_timeout
    o.op_timeout = t.op_timeout
    o.flags = lib.XB_OPEN_RDONLY if readonly or name.snap else 0
    err = ffi.new("char[]", 512)
    ptr = lib.xb_rbd_open(o, err)
    if ptr == ffi.NULL:
        msg = ffi.string(err).decode(errors="replace") or "cannot open"
        if t.pool != name.pool:  # the driver names the cluster's pool; say which [rbd.pools.NAME] led there
            msg = f"rbd:{name} ([rbd.pools.{name.pool}]): {msg}"
        raise StorageError(msg, _errno.EIO)
    # The driver lives in _rbd; only its address crosses to _storage, whose calls dispatch through its ops.
    return Image(storage_ffi.cast("struct xb_image *", int(ffi.cast("uintptr_t", ptr))), f"rbd:{name}")


def _rbd_ptr(image: Image) -> Any:
    ffi, _ = _lib()
    if image.ptr is None:
        raise StorageError(f"{image.path}: image is closed")
    return ffi.cast("struct xb_image *", int(storage_ffi.cast("uintptr_t", image.ptr)))


def acquire_lock(image: Image) -> str:
    """Takes the exclusive lock (nothing for a read-only image). Returns the previous holder librbd
    found dead and broke on the way ("" if the lock was free); raises LockBusy while a live client
    holds it."""
    ffi, lib = _lib()
    prev = ffi.new("char[]", lib.XB_RBD_NAMELEN)
    err = ffi.new("char[]", 512)
    rc = lib.xb_rbd_lock(_rbd_ptr(image), prev, err)
    owner = str(ffi.string(prev).decode(errors="replace"))
    if rc in (-_errno.EROFS, -_errno.EBUSY):
        raise LockBusy(ffi.string(err).decode(errors="replace"), owner)
    if rc < 0:
        raise StorageError(ffi.string(err).decode(errors="replace") or os.strerror(-rc), -rc)
    return owner


def update_fd(image: Image) -> int:
    """An eventfd readable when the image's header changed (a resize), or -1."""
    _, lib = _lib()
    return int(lib.xb_rbd_update_fd(_rbd_ptr(image)))
