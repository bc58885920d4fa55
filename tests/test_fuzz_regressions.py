"""Inputs the fuzzers (native/tests/fuzz_*) once crashed on, replayed through the Python layer.

Each file `native/tests/corpus/<name>/regress-*` is also replayed by `make test-c` under the
sanitizers; here each must get the clear refusal it gets since the fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from xenblk.storage import Image, StorageError

CORPUS = Path(__file__).resolve().parent.parent / "native" / "tests" / "corpus"

QCOW2_REFUSALS = {
    "regress-negative-refcount-order.qcow2": "refcount_order -252 out of range",
}


def test_every_qcow2_regression_has_an_expectation() -> None:
    assert {p.name for p in (CORPUS / "qcow2").glob("regress-*")} == set(QCOW2_REFUSALS)


@pytest.mark.parametrize(("name", "message"), sorted(QCOW2_REFUSALS.items()))
def test_qcow2_regression_is_refused(tmp_path: Path, name: str, message: str) -> None:
    image = tmp_path / name
    shutil.copy(CORPUS / "qcow2" / name, image)
    with pytest.raises(StorageError, match=message):
        Image.open(str(image), "qcow2")
