"""Per-disk and per-group QoS limits (README, "QoS"; docs/DESIGN.md, "QoS").

A limit is a rate per second (IOPS or bytes) for reads, writes or both ("total"), each with a burst;
0 means unlimited. The data plane enforces them (C token buckets, `xenblk.dataplane.Limiter`); this
module names them, parses them from hostile text (XenStore, the command line) and keeps the groups.

Where a disk's limits come from, the later winning key by key: `[qos]` in xenblk.toml, then the
`qos/` subtree of its backend node (written by a toolstack, `xenblk attach --iops-limit ...` or
`xenblk qos`). A group's: `[qos_group]`, then `/local/domain/<self>/xenblk/qos-groups/<name>/`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from xenblk.errors import XenblkError
from xenblk.xen.paths import domain_path

KINDS = ("read", "write", "total")
UNITS = ("iops", "bps")
MAX_LIMIT = 1 << 50  # the data plane's XB_QOS_MAX_RATE: 1 PiB/s, 10^15 IOPS
GROUP_KEY = "group"
DOMAIN_GROUP = "domain"  # qos/group = domain: the domain's disks share the group "dom<DOMID>"
_GROUP_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_MAX_NODES = 64  # keys looked at under one qos/ node: a toolstack bug cannot make us read thousands


def key_name(unit: str, kind: str, burst: bool = False) -> str:
    """The XenStore key: iops, read-iops, write-bps-burst ... (total has no prefix)."""
    return ("" if kind == "total" else f"{kind}-") + unit + ("-burst" if burst else "")


# In the order of struct xb_qos_limits: iops[read, write, total], bps[...], iops_burst[...], bps_burst[...]
KEYS = tuple(key_name(u, k, b) for b in (False, True) for u in UNITS for k in KINDS)


class QosError(XenblkError):
    """A limit or group name that cannot be used; the message names it."""


def parse_limit(key: str, text: str) -> int:
    """A limit as XenStore holds it: decimal digits only, at most MAX_LIMIT."""
    t = text.strip()
    if not t.isdigit() or not t.isascii() or len(t) > 20:
        raise QosError(f"qos {key} = {text[:40]!r}: not a decimal number (0 = unlimited)")
    v = int(t)
    if v > MAX_LIMIT:
        raise QosError(f"qos {key} = {v}: beyond the maximum {MAX_LIMIT}")
    return v


_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_cli_limit(key: str, text: str) -> int:
    """A limit on the command line: a number, for bytes also with K, M, G or T (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d{1,20})\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m or ((m.group(2) or text.strip().lower().endswith("b")) and "bps" not in key):
        unit = "a number, K/M/G/T allowed" if "bps" in key else "a number"
        raise QosError(f"--{key}: {text!r} is not {unit}")
    return parse_limit(key, str(int(m.group(1)) * _SUFFIX[m.group(2).lower()]))


def check_group(name: str) -> str:
    if not _GROUP_RE.fullmatch(name):
        raise QosError(f"qos group {name[:80]!r}: 1..64 of A-Z a-z 0-9 _ . -")
    return name


def group_of(value: str | None, domid: int) -> str | None:
    """The group a disk's qos/group names (None: none); "domain" is its domain's own group."""
    if value is None or value == "":
        return None
    if value == DOMAIN_GROUP:
        return f"dom{domid}"
    return check_group(value)


def groups_path(self_domid: int) -> str:
    """Where a toolstack writes the limits of named groups: one directory per group."""
    return f"{domain_path(self_domid)}/xenblk/qos-groups"


@dataclass(frozen=True)
class Limits:
    """Every limit, in KEYS order (0: unlimited; a burst of 0: a tenth of the rate)."""

    values: tuple[int, ...] = (0,) * len(KEYS)

    @classmethod
    def from_dict(cls, d: Mapping[str, int]) -> Limits:
        return cls().overlay(d)

    def overlay(self, d: Mapping[str, int]) -> Limits:
        return Limits(tuple(int(d.get(k, v)) for k, v in zip(KEYS, self.values, strict=True)))

    def get(self, key: str) -> int:
        return self.values[KEYS.index(key)]

    @property
    def active(self) -> bool:
        return any(v for k, v in zip(KEYS, self.values, strict=True) if not k.endswith("-burst"))

    def as_dict(self) -> dict[str, int]:
        """The limits that are set (non-zero)."""
        return {k: v for k, v in zip(KEYS, self.values, strict=True) if v}

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.as_dict().items()) or "unlimited"


def config_limits(section: Any) -> Limits:
    """[qos] or [qos_group] of xenblk.toml: the same keys with underscores."""
    return Limits.from_dict({k: int(getattr(section, k.replace("-", "_"))) for k in KEYS})


@dataclass
class NodeLimits:
    """What one qos/ node holds: the keys set there, the group, and what was wrong with the rest."""

    limits: dict[str, int]
    group: str | None
    problems: list[str]


async def read_node(xs: Any, base: str, *, with_group: bool) -> NodeLimits:
    """Read a qos/ node written by a toolstack (hostile: every bad key or value is a problem to log,
    skipped; nothing raises but a XenStore failure)."""
    from xenblk.xenstore import NoEntry

    out = NodeLimits({}, None, [])
    try:
        names = await xs.directory(base)
    except NoEntry:
        return out
    if len(names) > _MAX_NODES:
        out.problems.append(f"{base}: {len(names)} keys, only the first {_MAX_NODES} are read")
    for name in sorted(names)[:_MAX_NODES]:
        value = await xs.try_read(f"{base}/{name}")
        if value is None:
            continue
        if name in KEYS:
            try:
                out.limits[name] = parse_limit(name, value)
            except QosError as e:
                out.problems.append(str(e))
        elif name == GROUP_KEY and with_group:
            try:
                out.group = value if value in ("", DOMAIN_GROUP) else check_group(value)
            except QosError as e:
                out.problems.append(str(e))
        else:
            out.problems.append(f"{base}/{name[:64]}: unknown qos key (known: {', '.join(KEYS)}"
                                + (f", {GROUP_KEY})" if with_group else ")"))  # fmt: skip
    return out
