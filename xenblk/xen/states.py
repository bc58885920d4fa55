"""XenbusState as written in a device's `state` node (xen/include/public/io/xenbus.h)."""

from __future__ import annotations

import enum


class XenbusState(enum.IntEnum):
    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


NAMES = {s.value: s.name.title().replace("_", "") for s in XenbusState}


def parse_state(value: str | None) -> int | None:
    """A state node's value as an int; None if absent; -1 if it is not a XenbusState at all."""
    if value is None:
        return None
    v = value.strip("\0")
    if not (v.isascii() and v.isdigit() and len(v) <= 2):
        return -1
    n = int(v)
    return n if n <= XenbusState.RECONFIGURED else -1


def name(state: int | None) -> str:
    if state is None:
        return "absent"
    return NAMES.get(state, f"invalid({state})")
