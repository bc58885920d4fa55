"""asyncio client of the XenStore wire protocol (see docs/DESIGN.md, `xenblk.xenstore`)."""

from xenblk.xenstore.client import Transaction, Watch, WatchEvent, XenStore
from xenblk.xenstore.errors import (
    AlreadyExists,
    InvalidArgument,
    NoEntry,
    PermissionDenied,
    ProtocolError,
    TooBig,
    TryAgain,
    XenStoreError,
    XenStoreUnavailable,
)
from xenblk.xenstore.perms import Perm
from xenblk.xenstore.wire import PAYLOAD_MAX

__all__ = [
    "PAYLOAD_MAX",
    "AlreadyExists",
    "InvalidArgument",
    "NoEntry",
    "Perm",
    "PermissionDenied",
    "ProtocolError",
    "TooBig",
    "Transaction",
    "TryAgain",
    "Watch",
    "WatchEvent",
    "XenStore",
    "XenStoreError",
    "XenStoreUnavailable",
]
