"""`rbd:POOL/IMAGE[@SNAP]` in params, the [rbd] and [rbd.pools.NAME] config, and the daemon's rules for
them (no cluster needed)."""

from __future__ import annotations

import tomllib

import pytest

from xenblk import config
from xenblk.backend.imagespec import ImageSpecError, open_image, parse_params
from xenblk.config import RbdConfig, RbdTarget
from xenblk.errors import ConfigError
from xenblk.toolstack import image_params
from xenblk.xen.params import ParamsError, RbdName, parse_rbd


def test_names() -> None:
    assert parse_rbd("vms/disk-1") == RbdName("vms", "disk-1", None)
    assert parse_rbd("vms/disk.1@before_upgrade") == RbdName("vms", "disk.1", "before_upgrade")
    assert str(parse_rbd("a/b@c")) == "a/b@c"


@pytest.mark.parametrize(
    "bad", ["vms", "/img", "vms/", "vms/a/b", "vms/../x", "vms/.hidden", "vms/a@", "vms/a@b@c", "v ms/a", "vms/a\nb",
            "vms/" + "x" * 128, "vms/a;rm"],
)  # fmt: skip
def test_hostile_names_refused(bad: str) -> None:
    with pytest.raises(ParamsError):
        parse_rbd(bad)
    with pytest.raises(ImageSpecError):
        parse_params(f"rbd:{bad}", "w")


def test_snapshot_is_read_only_whatever_the_mode() -> None:
    assert parse_params("rbd:vms/a@s", "w").readonly
    assert not parse_params("rbd:vms/a", "w").readonly
    assert parse_params("rbd:vms/a", "r").readonly
    spec = parse_params("rbd:vms/a", "w")
    assert (spec.format, spec.path) == ("rbd", "vms/a")


def test_pool_must_be_allowed() -> None:
    spec = parse_params("rbd:other/a", "w")
    with pytest.raises(ImageSpecError, match=r"not in rbd\.allowed_pools"):
        open_image(spec, [], "writeback", rbd=RbdConfig(allowed_pools=["vms"]))
    with pytest.raises(ImageSpecError, match="none configured"):
        open_image(spec, [], "writeback", rbd=RbdConfig())


def test_attach_keeps_the_name() -> None:
    assert image_params("rbd:vms/a@s", None) == "rbd:vms/a@s"
    assert image_params("vms/a", "rbd") == "rbd:vms/a"


POOLS = """
[rbd]
allowed_pools = ["vms"]
client_id = "xenblk"
keyring = "/etc/ceph/ceph.client.xenblk.keyring"
op_timeout = 5

[rbd.pools.dr-vms]
pool = "vms"
conf_file = "/etc/ceph/dr.conf"
op_timeout = 60

[rbd.pools."gold.ssd"]
client_id = "gold"
"""


def test_pool_tables_select_their_settings_and_inherit_the_rest() -> None:
    rbd = config.from_dict(tomllib.loads(POOLS)).rbd
    assert rbd.names() == ["vms", "dr-vms", "gold.ssd"]
    assert rbd.target("vms") == RbdTarget("vms", "/etc/ceph/ceph.conf", "xenblk",
                                          "/etc/ceph/ceph.client.xenblk.keyring", 30, 5)  # fmt: skip
    assert rbd.target("dr-vms") == RbdTarget("vms", "/etc/ceph/dr.conf", "xenblk",
                                             "/etc/ceph/ceph.client.xenblk.keyring", 30, 60)  # fmt: skip
    assert rbd.target("gold.ssd") == RbdTarget("gold.ssd", "/etc/ceph/ceph.conf", "gold",
                                               "/etc/ceph/ceph.client.xenblk.keyring", 30, 5)  # fmt: skip
    # what XenStore says only selects a table: anything else is not configured
    for name in ("other", "pools", "__class__", "DR-VMS", "dr-vms.", "vms "):
        assert rbd.target(name) is None
    spec = parse_params("rbd:__class__/a", "w")
    with pytest.raises(ImageSpecError, match=r"configured: vms, dr-vms, gold\.ssd"):
        open_image(spec, [], "writeback", rbd=rbd)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[rbd.pools."a/b"]\n', "[rbd.pools.a/b]: the name is what params says"),
        ('[rbd.pools.".x"]\n', "[rbd.pools..x]: the name is what params says"),
        ("[rbd]\npools = 3\n", "expected [rbd.pools.NAME] tables"),
        ('[rbd.pools]\nx = "y"\n', "'rbd.pools.x': expected a table"),
        ("[rbd.pools.p]\nallowed_pools = []\n", "unknown config key 'rbd.pools.p.allowed_pools'"),
        ('[rbd.pools.p]\nconf_file = "ceph.conf"\n', "'rbd.pools.p.conf_file': 'ceph.conf' is not an absolute"),
        ('[rbd.pools.p]\nkeyring = "/' + "k" * 1100 + '"\n', "'rbd.pools.p.keyring': the path is longer"),
        ('[rbd.pools.p]\nclient_id = "a b"\n', "'rbd.pools.p.client_id': 'a b' is not a cephx user id"),
        ('[rbd.pools.p]\npool = "../x"\n', "'rbd.pools.p.pool': '../x' is not a pool name"),
        ("[rbd.pools.p]\nop_timeout = -1\n", "'rbd.pools.p.op_timeout': -1 is out of range"),
        ('[rbd.pools.p]\nconnect_timeout = "5"\n', "'rbd.pools.p.connect_timeout': expected int"),
        ('[rbd]\nallowed_pools = ["p"]\n[rbd.pools.p]\n', "'p' is both in rbd.allowed_pools and an [rbd.pools.p]"),
        ('[rbd]\nallowed_pools = ["a@b"]\n', "'rbd.allowed_pools': 'a@b' is not a pool name"),
        ('[rbd]\nclient_id = "x;y"\n', "'rbd.client_id': 'x;y' is not a cephx user id"),
    ],
)
def test_hostile_pool_config_is_refused_naming_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config.from_dict(tomllib.loads(text))
    assert message in str(exc.value)
