"""QoS in the daemon's state machine, against the real xenstored with a fake data plane: where a disk's
and a group's limits come from ([qos], qos/, the groups' nodes, a reload), that a change reaches the
running device at once (its limiter changes and its queues are told), and that a group lives as long as
a connected disk is in it. The limits' effect on I/O is tests/test_qos.py's."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fixtures.backend import Harness, wait_state
from tests.fixtures.wait import await_until
from xenblk.qos import groups_path
from xenblk.xen.vdev import vdev_to_devid

pytestmark = pytest.mark.uvloop
XVDB = vdev_to_devid("xvdb")


def limit(limiter: Any, key: str) -> int:
    return int(limiter.limits.get(key))


async def test_limits_from_config_node_groups_and_reload(harness: Harness, tmp_path: Any) -> None:
    h = harness
    h.cfg.qos.iops = 1000
    h.cfg.qos_group.bps = 1 << 20
    await h.attach(3, "xvdb")
    b = h.b(3, "xvdb")
    await h.xs.write(f"{b}/qos/read-bps", "5000")
    await h.xs.write(f"{b}/qos/group", "domain")
    await h.connect(3, "xvdb")
    r = h.dp.running(3, XVDB)
    disk, group = r.qos
    assert limit(disk, "iops") == 1000 and limit(disk, "read-bps") == 5000
    assert group is not None and limit(group, "bps") == 1 << 20
    assert h.daemon.ctx is not None and h.daemon.ctx.qos_groups is not None
    [view] = h.daemon.ctx.qos_groups.views()
    assert (view.name, view.disks, view.limits) == ("dom3", 1, {"bps": 1 << 20})
    [row] = [d for d in h.daemon.devices.values() if d.domid == 3]
    assert row.describe()["qos"] == {"limits": {"iops": 1000, "read-bps": 5000}, "group": "dom3"}  # xenblk list

    # live: the node, then the group's node; the running device is told each time
    await h.xs.write(f"{b}/qos/iops", "300")
    await await_until(lambda: limit(disk, "iops") == 300 and r.qos_kicks >= 1, "qos/iops = 300 applied")
    kicks = r.qos_kicks
    await h.xs.write(f"{groups_path(0)}/dom3/iops", "50")
    await await_until(lambda: limit(group, "iops") == 50 and r.qos_kicks > kicks, "the group's iops applied")

    # hostile values: skipped (the key falls back to the config), the rest kept
    await h.xs.write(f"{b}/qos/iops", "many")
    await await_until(lambda: limit(disk, "iops") == 1000, "a bad qos/iops falls back to [qos] iops")
    assert limit(disk, "read-bps") == 5000

    # SIGHUP: the new [qos] applies to the connected disk at once
    conf = tmp_path / "reload.toml"
    conf.write_text(f'[storage]\nallowed_dirs = ["{h.images}"]\n[metrics]\nenabled = false\n[qos]\nwrite_iops = 77\n')
    h.daemon.config_path = conf
    h.daemon.reload()
    await await_until(lambda: limit(disk, "write-iops") == 77 and limit(disk, "iops") == 0, "the reload applied")
    await await_until(lambda: limit(group, "bps") == 0 and limit(group, "iops") == 50, "the group's reload")

    # the frontend closes: the group has no connected disk left
    await h.xs.write(f"{h.f(3, 'xvdb')}/state", "6")
    await wait_state(h.xs, b, 6)
    assert h.daemon.ctx.qos_groups.views() == []


async def test_a_new_group_applies_at_the_next_connection(harness: Harness) -> None:
    h = harness
    await h.attach(4, "xvdb")
    b = h.b(4, "xvdb")
    await h.connect(4, "xvdb")
    first = h.dp.running(4, XVDB)
    assert first.qos[1] is None
    await h.xs.write(f"{b}/qos/group", "tenant-a")
    await h.xs.write(f"{groups_path(0)}/tenant-a/iops", "10")
    await h.xs.write(f"{h.f(4, 'xvdb')}/state", "6")
    await wait_state(h.xs, b, 6)
    await h.xs.write(f"{h.f(4, 'xvdb')}/state", "1")
    await h.connect(4, "xvdb")
    second = h.dp.running(4, XVDB)
    assert second is not first and second.qos[0] is first.qos[0]  # the disk keeps its limiter
    assert second.qos[1] is not None and limit(second.qos[1], "iops") == 10
