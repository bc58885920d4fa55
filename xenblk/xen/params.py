"""The backend node `params` = `[format:]path`, as the toolstack writes it and the daemon reads it."""

from __future__ import annotations

import re

from xenblk.errors import XenblkError

FORMAT_ALIASES = {"raw": "raw", "aio": "raw", "qcow2": "qcow2", "vhd": "vhd", "block": "block", "phy": "block"}
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
