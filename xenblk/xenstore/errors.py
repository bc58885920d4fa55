"""Typed XenStore errors: xenstored names errors by errno string ("ENOENT"); each maps to one class."""

from __future__ import annotations

import errno as _errno
import os

from xenblk.errors import XenblkError


class XenStoreError(XenblkError):
    """An error from xenstored or from talking to it. `errno` is the POSIX number, `path` the node if known."""

    default_errno = _errno.EIO

    def __init__(self, message: str, *, errno: int | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.errno: int = self.default_errno if errno is None else errno
        self.path = path


class NoEntry(XenStoreError):
    default_errno = _errno.ENOENT


class PermissionDenied(XenStoreError):
    default_errno = _errno.EACCES


class TryAgain(XenStoreError):
    """EAGAIN: the transaction conflicted with another writer (or its connection was lost); run it again."""

    default_errno = _errno.EAGAIN


class InvalidArgument(XenStoreError):
    default_errno = _errno.EINVAL


class TooBig(XenStoreError):
    default_errno = _errno.E2BIG


class AlreadyExists(XenStoreError):
    default_errno = _errno.EEXIST


class ProtocolError(XenStoreError):
    """The peer sent something the wire protocol does not allow (oversize or malformed message)."""

    default_errno = _errno.EPROTO


class XenStoreUnavailable(XenStoreError):
    """xenstored cannot be reached, the connection was lost, or it did not answer in time."""

    default_errno = _errno.ENOTCONN


class ConnectionLost(XenStoreUnavailable):
    """The connection dropped with the request in flight (xenstored restarted or died); the client reconnects."""


_BY_ERRNO: dict[int, type[XenStoreError]] = {
    _errno.ENOENT: NoEntry,
    _errno.EACCES: PermissionDenied,
    _errno.EPERM: PermissionDenied,
    _errno.EAGAIN: TryAgain,
    _errno.EINVAL: InvalidArgument,
    _errno.E2BIG: TooBig,
    _errno.EEXIST: AlreadyExists,
}

# The error names xenstored may send (xs_wire.h's table plus EPERM, which newer daemons use).
KNOWN_ERRNO_NAMES = frozenset(
    {
        "EINVAL",
        "EACCES",
        "EEXIST",
        "EISDIR",
        "ENOENT",
        "ENOMEM",
        "ENOSPC",
        "EIO",
        "ENOTEMPTY",
        "ENOSYS",
        "EROFS",
        "EBUSY",
        "EAGAIN",
        "EISCONN",
        "E2BIG",
        "EPERM",
    }
)


def error_from_reply(name: str, op: str, path: str | None) -> XenStoreError:
    """Build the exception for an XS_ERROR reply carrying errno name `name` (already validated)."""
    return error_from_errno(getattr(_errno, name, _errno.EIO), op, path)


def error_from_errno(number: int, op: str, path: str | None) -> XenStoreError:
    cls = _BY_ERRNO.get(number, XenStoreError)
    where = f" {path}" if path is not None else ""
    name = _errno.errorcode.get(number, "EIO")
    return cls(f"xenstore {op}{where}: {name} ({os.strerror(number)})", errno=number, path=path)
