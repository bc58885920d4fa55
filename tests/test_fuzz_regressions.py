"""Inputs the fuzzers (native/tests/fuzz_*) once crashed on, replayed through the Python layer.

Each file `native/tests/corpus/<name>/regress-*` is also replayed by `make test-c` under the
sanitizers; here each must get the clear refusal it gets since the fix."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

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


def _wire_harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_xenstore_wire", CORPUS.parent / "fuzz_xenstore_wire.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _wire_seeds() -> list[bytes]:
    return [p.read_bytes() for p in sorted((CORPUS / "xenstore_wire").iterdir())]


def test_xenstore_wire_corpus_decodes_cleanly() -> None:
    harness = _wire_harness()
    seeds = _wire_seeds()
    assert len(seeds) >= 10
    for data in seeds:
        harness.check_stream(data)


def test_xenstore_wire_fixed_seed_mutations() -> None:
    """The bounded, reproducible version of `make fuzz` for the XenStore decoder."""
    harness = _wire_harness()
    assert harness.mutation_loop(harness.check_stream, _wire_seeds(), runs=5000, seconds=3600) == 5000


def test_xenstore_wire_mutation_loop_finds_and_saves_a_failure(tmp_path: Path) -> None:
    """The fallback loop is a real search: a planted bug (a check that rejects an ERROR frame whose
    length field was mutated) is found and its input saved for replay."""
    harness = _wire_harness()

    def planted(data: bytes) -> None:
        assert not (len(data) >= 16 and data[0] == 16 and data[12] != 7)

    with pytest.raises(AssertionError):
        harness.mutation_loop(planted, [b"\x10" + bytes(11) + b"\x07\0\0\0ENOENT\0"], runs=20000, seconds=3600,
                              artifact_prefix=str(tmp_path) + "/")  # fmt: skip
    (saved,) = tmp_path.glob("crash-*")
    with pytest.raises(AssertionError):
        planted(saved.read_bytes())
