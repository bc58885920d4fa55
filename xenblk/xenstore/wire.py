"""XenStore wire format: a 16-byte header (type, req_id, tx_id, len; native little-endian u32) + payload.

Only framing and payload encoding live here; nothing does I/O. Every decoder treats its input as hostile
and raises ProtocolError on anything the protocol does not allow.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from xenblk.xenstore.errors import KNOWN_ERRNO_NAMES, InvalidArgument, ProtocolError, TooBig

HEADER = struct.Struct("<IIII")
PAYLOAD_MAX = 4096  # XENSTORE_PAYLOAD_MAX: larger messages are a protocol violation in both directions
ABS_PATH_MAX = 3072  # XENSTORE_ABS_PATH_MAX


class Op(enum.IntEnum):
    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESTRICT = 20
    RESET_WATCHES = 21
    DIRECTORY_PART = 22


@dataclass(frozen=True)
class Header:
    type: int
    req_id: int
    tx_id: int
    length: int


def encode(op: Op, req_id: int, tx_id: int, payload: bytes) -> bytes:
    """One whole message; TooBig before anything is sent if the payload exceeds the protocol limit."""
    if len(payload) > PAYLOAD_MAX:
        raise TooBig(f"xenstore {op.name.lower()}: request payload of {len(payload)} bytes exceeds {PAYLOAD_MAX}")
    return HEADER.pack(op, req_id, tx_id, len(payload)) + payload


def decode_header(data: bytes) -> Header:
    if len(data) != HEADER.size:
        raise ProtocolError(f"xenstore: truncated header ({len(data)} of {HEADER.size} bytes)")
    h = Header(*HEADER.unpack(data))
    if h.length > PAYLOAD_MAX:
        raise ProtocolError(f"xenstore: reply declares {h.length} payload bytes, over the limit of {PAYLOAD_MAX}")
    return h


def path_arg(path: str) -> bytes:
    """A path as xenstored wants it: UTF-8, NUL-terminated, no embedded NUL."""
    raw = path.encode()
    if b"\0" in raw or not raw:
        raise InvalidArgument(f"xenstore: invalid path {path!r}", path=path)
    if len(raw) > ABS_PATH_MAX:
        raise TooBig(f"xenstore: path of {len(raw)} bytes exceeds {ABS_PATH_MAX}", path=path[:64] + "...")
    return raw + b"\0"


def strings(*items: str) -> bytes:
    """NUL-terminated strings, as most requests carry them."""
    out = b""
    for item in items:
        raw = item.encode()
        if b"\0" in raw:
            raise InvalidArgument(f"xenstore: argument {item!r} contains NUL")
        out += raw + b"\0"
    return out


def split_strings(payload: bytes, what: str) -> list[str]:
    """Decode a list of NUL-terminated strings (directory, perms, watch event). Empty payload: empty list."""
    if not payload:
        return []
    if not payload.endswith(b"\0"):
        raise ProtocolError(f"xenstore: {what} reply is not NUL-terminated")
    try:
        return [part.decode() for part in payload[:-1].split(b"\0")]
    except UnicodeDecodeError as e:
        raise ProtocolError(f"xenstore: {what} reply is not valid UTF-8") from e


def one_string(payload: bytes, what: str) -> str:
    """A single string reply; xenstored NUL-terminates some ("OK\\0", domain paths) and not others."""
    raw = payload[:-1] if payload.endswith(b"\0") else payload
    if b"\0" in raw:
        raise ProtocolError(f"xenstore: {what} reply has an embedded NUL")
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        raise ProtocolError(f"xenstore: {what} reply is not valid UTF-8") from e


def error_name(payload: bytes) -> str:
    """The errno name of an XS_ERROR reply ("ENOENT\\0")."""
    name = one_string(payload, "error")
    if name not in KNOWN_ERRNO_NAMES:
        raise ProtocolError(f"xenstore: error reply with unknown errno name {name[:32]!r}")
    return name


def watch_event(payload: bytes) -> tuple[str, str]:
    """(path, token) of an XS_WATCH_EVENT."""
    parts = split_strings(payload, "watch event")
    # Only the first two fields carry meaning; Linux's xenbus device may append more.
    if len(parts) < 2 or not parts[0]:
        raise ProtocolError("xenstore: malformed watch event")
    return parts[0], parts[1]
