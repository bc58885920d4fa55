"""Reading and validating what a frontend wrote in `F/` — every value is hostile.

`parse_frontend` is a pure function over the key -> value map (so it can be fuzzed);
`read_frontend` collects exactly the keys it needs from XenStore, reading the per-queue
keys only once the number of queues is known to be within bounds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from xenblk.errors import XenblkError
from xenblk.xenstore import InvalidArgument
from xenblk.xenstore.ops import NodeOps

PROTOCOLS = {"x86_64-abi": "x86_64-abi", "x86_32-abi": "x86_32-abi", "native": "x86_64-abi"}
TOP_KEYS = ("protocol", "ring-page-order", "multi-queue-num-queues", "feature-persistent")
MAX_GRANT_REF = (1 << 32) - 1
MAX_EVTCHN_PORT = (1 << 31) - 1
_UINT = re.compile(r"[0-9]{1,10}")


class FrontendError(XenblkError):
    """The frontend's keys are missing, malformed or out of bounds (one line, for B/error)."""


@dataclass(frozen=True)
class Limits:
    """What the backend advertised in InitWait."""

    max_ring_page_order: int
    max_queues: int
    persistent: bool


@dataclass(frozen=True)
class QueueKeys:
    ring_refs: tuple[int, ...]
    event_channel: int


@dataclass(frozen=True)
class FrontendConfig:
    protocol: str  # x86_64-abi | x86_32-abi
    ring_page_order: int
    queues: tuple[QueueKeys, ...]
    persistent: bool

    @property
    def ring_pages(self) -> int:
        return 1 << self.ring_page_order


def _uint(keys: Mapping[str, str | None], key: str, lo: int, hi: int, default: int | None = None) -> int:
    raw = keys.get(key)
    if raw is None:
        if default is None:
            raise FrontendError(f"frontend key {key} is missing")
        return default
    if not _UINT.fullmatch(raw):
        raise FrontendError(f"frontend key {key} is not a number: {raw[:32]!r}")
    v = int(raw)
    if not lo <= v <= hi:
        raise FrontendError(f"frontend key {key}={v} is out of range {lo}..{hi}")
    return v


@dataclass(frozen=True)
class Head:
    protocol: str
    ring_page_order: int
    nr_queues: int
    persistent: bool


def parse_head(keys: Mapping[str, str | None], limits: Limits) -> Head:
    """The keys that decide which others to read: protocol, ring order, queue count, persistence."""
    proto_raw = keys.get("protocol")
    if proto_raw is None:
        protocol = "x86_64-abi"
    elif proto_raw in PROTOCOLS:
        protocol = PROTOCOLS[proto_raw]
    else:
        raise FrontendError(f"frontend protocol {proto_raw[:32]!r} is not supported (x86_64-abi, x86_32-abi)")
    order = _uint(keys, "ring-page-order", 0, limits.max_ring_page_order, default=0)
    nq = _uint(keys, "multi-queue-num-queues", 1, limits.max_queues, default=1)
    persistent = _uint(keys, "feature-persistent", 0, 1, default=0) == 1 and limits.persistent
    return Head(protocol, order, nq, persistent)


def queue_key_names(head: Head) -> list[str]:
    """Every per-queue key, relative to F: ring refs and event channel, under queue-<q>/ if multi-queue."""
    names = []
    for q in range(head.nr_queues):
        prefix = f"queue-{q}/" if head.nr_queues > 1 else ""
        if head.ring_page_order == 0:
            names += [prefix + "ring-ref", prefix + "ring-ref0"]
        else:
            names += [f"{prefix}ring-ref{i}" for i in range(1 << head.ring_page_order)]
        names.append(prefix + "event-channel")
    return names


def parse_frontend(keys: Mapping[str, str | None], limits: Limits) -> FrontendConfig:
    """Validate every key a frontend wrote (relative names, values as read; absent = None or missing)."""
    head = parse_head(keys, limits)
    queues = []
    for q in range(head.nr_queues):
        prefix = f"queue-{q}/" if head.nr_queues > 1 else ""
        if head.ring_page_order == 0:
            # Linux blkfront writes `ring-ref` for a one-page ring; some frontends write `ring-ref0`.
            name = prefix + ("ring-ref" if keys.get(prefix + "ring-ref") is not None else "ring-ref0")
            if keys.get(name) is None:
                name = prefix + "ring-ref"
            refs = [_uint(keys, name, 0, MAX_GRANT_REF)]
        else:
            refs = [_uint(keys, f"{prefix}ring-ref{i}", 0, MAX_GRANT_REF) for i in range(1 << head.ring_page_order)]
        if len(set(refs)) != len(refs):
            raise FrontendError(f"frontend {prefix or ''}ring refs repeat a grant: {refs}")
        port = _uint(keys, prefix + "event-channel", 1, MAX_EVTCHN_PORT)
        queues.append(QueueKeys(tuple(refs), port))
    # Across queues too: two queues on one ring page would both consume (and answer) its requests.
    all_refs = [ref for qk in queues for ref in qk.ring_refs]
    shared = sorted({ref for ref in all_refs if all_refs.count(ref) > 1})
    if shared:
        raise FrontendError(f"frontend queues share ring grants: {shared}")
    ports = [qk.event_channel for qk in queues]
    if len(set(ports)) != len(ports):
        raise FrontendError(f"frontend queues share an event channel: {ports}")
    return FrontendConfig(head.protocol, head.ring_page_order, tuple(queues), head.persistent)


async def read_frontend(ops: NodeOps, fpath: str, limits: Limits) -> FrontendConfig:
    """Read F's keys (ideally inside a transaction, for one consistent snapshot) and validate them."""
    keys: dict[str, str | None] = {}

    async def get(name: str) -> None:
        try:
            keys[name] = await ops.try_read(f"{fpath}/{name}")
        except InvalidArgument:
            raise FrontendError(f"frontend key {name} is not valid UTF-8") from None

    for name in TOP_KEYS:
        await get(name)
    head = parse_head(keys, limits)
    for name in queue_key_names(head):
        await get(name)
    return parse_frontend(keys, limits)
