"""asyncio client of the XenStore wire protocol (the contract is docs/DESIGN.md, `xenblk.xenstore`).

    async with XenStore.open() as xs:                 # or: xs = await XenStore.open(path, timeout=5)
        await xs.write("/local/domain/0/backend/vbd/5/51712/state", "2")
        async with xs.watch("/local/domain/5/device/vbd") as w:
            async for event in w:                     # first event: the registration's own fire
                ...
        await xs.transact(fn)                         # fn(t) re-run on conflict (TryAgain)

Extras beyond DESIGN.md, for metrics and health: `xs.connected`, `xs.reconnects`, `xs.watch_events`.
"""

from xenblk.xenstore.client import Transaction, Watch, WatchEvent, XenStore
from xenblk.xenstore.errors import (
    AlreadyExists,
    ConnectionLost,
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
    "ConnectionLost",
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
