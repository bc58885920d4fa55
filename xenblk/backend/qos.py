"""QoS in the daemon: each disk's limiter and the shared groups' (README, "QoS").

A disk's limits are [qos] overlaid by its backend node's qos/ keys; they are applied when the device
connects and again whenever qos/ changes (a XenStore watch), on the running device at once: the C
limiter changes in place and throttled queues look again. A group's limiter is shared by the disks
in it; its limits are [qos_group] overlaid by /local/domain/<self>/xenblk/qos-groups/<name>/, watched
by the daemon. Everything under qos/ is hostile input: a bad key or value is logged and skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xenblk import qos
from xenblk.config import Config
from xenblk.xenstore import XenStore

Kick = Callable[[], None]


def _limiter() -> Any:
    from xenblk.dataplane import Limiter  # the C module, only once a limiter is needed

    return Limiter()


@dataclass
class GroupView:
    """A group as the exporter sees it at scrape time."""

    name: str
    limits: dict[str, int]
    disks: int
    throttled: int
    throttled_ns: int
    queued: int


@dataclass
class _Group:
    limiter: Any
    users: dict[int, Kick] = field(default_factory=dict)  # id(user) -> tell its running device of a change
    problems: list[str] = field(default_factory=list)


class QosGroups:
    """The groups some device is in: created at a device's first connect into it, dropped with its last."""

    def __init__(self, xs: XenStore, cfg: Config, self_domid: int, log: Any) -> None:
        self.xs = xs
        self.cfg = cfg
        self.self_domid = self_domid
        self.log = log
        self._groups: dict[str, _Group] = {}

    async def join(self, name: str, user: object, kick: Kick) -> Any:
        """The group's limiter for `user` (its limits read first if the group is new)."""
        g = self._groups.get(name)
        if g is None:
            g = self._groups[name] = _Group(_limiter())
            await self.refresh(name)
        g.users[id(user)] = kick
        return g.limiter

    def leave(self, name: str, user: object) -> None:
        g = self._groups.get(name)
        if g is None:
            return
        g.users.pop(id(user), None)
        if not g.users:
            del self._groups[name]  # the devices hold their own C references until they are freed

    async def refresh(self, name: str | None = None) -> None:
        """Read the limits of one group (or of every group in use) and apply what changed."""
        for n in [name] if name is not None else list(self._groups):
            g = self._groups.get(n)
            if g is None:
                continue
            node = await qos.read_node(self.xs, f"{qos.groups_path(self.self_domid)}/{n}", with_group=False)
            if node.problems != g.problems:
                g.problems = node.problems
                for p in node.problems:
                    self.log.warning("qos.group_invalid", group=n, error=p)
            limits = qos.config_limits(self.cfg.qos_group).overlay(node.limits)
            if limits != g.limiter.limits:
                g.limiter.set(limits)
                self.log.info("qos.group_limits", group=n, limits=limits.describe(), disks=len(g.users))
                for kick in list(g.users.values()):
                    kick()

    def views(self) -> list[GroupView]:
        out = []
        for n, g in list(self._groups.items()):
            st = g.limiter.stats()
            out.append(GroupView(n, g.limiter.limits.as_dict(), len(g.users), st.throttled, st.throttled_ns,
                                 st.queued))  # fmt: skip
        return out


class DiskQos:
    """One disk's limiter (kept across its connections, so a reconnect finds its limits and its debt)
    and the group it is in while connected."""

    def __init__(self, domid: int, bpath: str, log: Any) -> None:
        self.domid = domid
        self.node = f"{bpath}/qos"
        self.log = log
        self.limiter: Any = None
        self.group: str | None = None  # joined, for the running connection
        self.wanted_group: str | None = None  # what qos/group (or [qos] group) says now
        self._problems: list[str] = []

    async def apply(self, xs: XenStore, cfg: Config, kick: Kick | None) -> None:
        """Read qos/ and set what changed on the limiter; kick: tell the running device."""
        node = await qos.read_node(xs, self.node, with_group=True)
        if node.problems != self._problems:
            self._problems = node.problems
            for p in node.problems:
                self.log.warning("device.qos_invalid", error=p)
        limits = qos.config_limits(cfg.qos).overlay(node.limits)
        try:
            wanted = qos.group_of(node.group if node.group is not None else cfg.qos.group, self.domid)
        except qos.QosError as e:  # checked by read_node and the config already; kept as a guard
            self.log.warning("device.qos_invalid", error=str(e))
            wanted = None
        if wanted != self.wanted_group:
            self.wanted_group = wanted
            if self.group is not None or kick is not None:
                # The queue threads read their limiters without a lock: a group is fixed per connection.
                self.log.info("device.qos_group", group=wanted, applies="at the next connection")
        if self.limiter is None:
            self.limiter = _limiter()
        if limits != self.limiter.limits:
            self.limiter.set(limits)
            self.log.info("device.qos", limits=limits.describe())
            if kick is not None:
                kick()

    async def join(self, groups: QosGroups, user: object, kick: Kick) -> tuple[Any, Any]:
        """The (disk, group) limiters for a new connection."""
        self.leave(groups, user)
        group = None
        if self.wanted_group is not None:
            group = await groups.join(self.wanted_group, user, kick)
            self.group = self.wanted_group
        return self.limiter, group

    def leave(self, groups: QosGroups, user: object) -> None:
        if self.group is not None:
            groups.leave(self.group, user)
            self.group = None
