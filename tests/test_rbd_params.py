"""`rbd:POOL/IMAGE[@SNAP]` in params and the daemon's rules for it (no cluster needed)."""

from __future__ import annotations

import pytest

from xenblk.backend.imagespec import ImageSpecError, open_image, parse_params
from xenblk.config import RbdConfig
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
