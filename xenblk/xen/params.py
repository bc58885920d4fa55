"""The backend node `params` = `[format:]path` (or `rbd:POOL/IMAGE[@SNAP]`), as the toolstack writes it and the
daemon reads it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from xenblk.errors import XenblkError

FORMAT_ALIASES = {
    "raw": "raw",
    "aio": "raw",
    "qcow2": "qcow2",
    "vhd": "vhd",
    "block": "block",
    "phy": "block",
    "rbd": "rbd",
}
# Formats whose "path" names no file (a Ceph pool/image): never made absolute, never stat'ed.
NETWORK_FORMATS = frozenset({"rbd"})
_PREFIX = re.compile(r"([a-z0-9]+):(.*)", re.DOTALL)


class ParamsError(XenblkError):
    """An image and format that do not make one `params`."""


def split_prefix(params: str) -> tuple[str | None, str]:
    """(prefix, rest) when `params` starts with a lower-case word and a colon (known or not), else (None, params)."""
    m = _PREFIX.fullmatch(params)
    return (m.group(1), m.group(2)) if m is not None else (None, params)


def split_known(params: str) -> tuple[str | None, str]:
    """(prefix, path) when the prefix is one of FORMAT_ALIASES, else (None, params): anything else is a path."""
    prefix, rest = split_prefix(params)
    return (prefix, rest) if prefix in FORMAT_ALIASES else (None, params)


def join_params(fmt: str | None, path: str) -> str:
    return f"{fmt}:{path}" if fmt else path


# Ceph accepts more, but these names travel through XenStore from a toolstack and into log lines:
# letters, digits and `_.+-`, not starting with a dot (no `..`, no `/`, no `@`).
RBD_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]{0,126}")


@dataclass(frozen=True)
class RbdName:
    """What follows `rbd:` in params: a Ceph pool, an image in it, and maybe one of its snapshots."""

    pool: str
    image: str
    snap: str | None

    def __str__(self) -> str:
        return f"{self.pool}/{self.image}" + (f"@{self.snap}" if self.snap else "")


def parse_rbd(text: str) -> RbdName:
    """`POOL/IMAGE[@SNAP]`; raises ParamsError with the reason."""
    pool, sep, rest = text.partition("/")
    if not sep:
        raise ParamsError(f"rbd image {text[:200]!r} is not POOL/IMAGE[@SNAP]")
    image, at, snap = rest.partition("@")
    for what, v in (("pool", pool), ("image", image)) + ((("snapshot", snap),) if at else ()):
        if not RBD_NAME.fullmatch(v):
            raise ParamsError(
                f"rbd {what} name {v[:200]!r} in {text[:200]!r}: use letters, digits and _.+- (at most 127)"
            )
    return RbdName(pool, image, snap if at else None)
