"""The fault-injection layer is for tests only: no daemon code path (config, XenStore `params`,
guest request) can create a FaultImage or set a fault rule."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import xenblk
from tests.fixtures.fault_image import FaultImage
from xenblk import storage
from xenblk.backend.imagespec import ImageSpecError, parse_params

PACKAGE = Path(xenblk.__file__).parent


def test_no_product_module_names_the_fault_layer() -> None:
    """FaultImage lives in tests/fixtures/fault_image.py."""
    pattern = re.compile(r"FaultImage|xb_fault_|inject_fault|XB_FAULT_")
    users = sorted(
        str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text(errors="replace"))
    )
    assert users == []


def test_the_product_modules_do_not_carry_it() -> None:
    """fault.c is built into the test-only tests._xbfault, not into xenblk._storage (nor the package)."""
    assert not hasattr(storage.lib, "xb_fault_wrap")
    native = PACKAGE.parent / "native"
    assert "testing" not in (native / "build_storage.py").read_text()
    assert "build_testfault" not in (PACKAGE.parent / "setup.py").read_text()


@pytest.mark.parametrize("params", ["fault:/srv/x.raw", "faulty:/srv/x.raw", "FaultImage:/srv/x.raw"])
def test_params_cannot_name_it(params: str) -> None:
    with pytest.raises(ImageSpecError):
        parse_params(params, "w")


def test_no_image_format_opens_it(tmp_path: Path) -> None:
    assert set(storage.FORMATS) == {"raw", "block", "qcow2", "vhd"}
    p = tmp_path / "x.raw"
    p.write_bytes(bytes(4096))
    with pytest.raises(storage.StorageError, match="unknown image format"):
        storage.Image.open(str(p), "fault")
    with storage.Image.open(str(p)) as img:
        assert not isinstance(img, FaultImage)
