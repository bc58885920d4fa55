"""Inputs the fuzzers (native/tests/fuzz_*) once crashed on, replayed through the Python layer.

Each file `native/tests/corpus/<name>/regress-*` is also replayed by `make test-c` under the
sanitizers; here each must get the clear refusal it gets since the fix."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from xenblk.backend import imagespec
from xenblk.backend.frontend import FrontendError, Limits, parse_frontend
from xenblk.backend.imagespec import ImageSpec, ImageSpecError, check_allowed, parse_params
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


# --- the frontend-key and params/mode parsers (native/tests/fuzz_frontend_keys.py) ---------------

FRONTEND_KEYS_REFUSALS = {
    # Found by the fuzzer: two queues on one ring page were accepted (each queue's refs were distinct).
    "regress-queues-share-a-ring-grant": r"frontend queues share ring grants: \[8\]",
}


@functools.cache
def _frontend_keys_harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_frontend_keys", CORPUS.parent / "fuzz_frontend_keys.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _frontend_keys_seeds() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((CORPUS / "frontend_keys").iterdir())}


def test_frontend_keys_corpus_checks_cleanly() -> None:
    harness = _frontend_keys_harness()
    seeds = _frontend_keys_seeds()
    assert len(seeds) >= 12
    for data in seeds.values():
        harness.check_input(data)


def test_frontend_keys_corpus_holds_the_real_blkfront_shapes() -> None:
    """The replay is not vacuous: Linux blkfront's legacy single ring and multi-queue layouts are
    accepted with the values written, a params outside the allowed dir is refused."""
    harness = _frontend_keys_harness()
    seeds = _frontend_keys_seeds()
    legacy = harness.decode(seeds["blkfront-legacy-single-ring"])
    cfg = harness.parse_frontend(legacy.keys, legacy.limits)
    assert (cfg.ring_page_order, cfg.queues[0].ring_refs, cfg.queues[0].event_channel) == (0, (8,), 5)
    multi = harness.decode(seeds["blkfront-multi-queue"])
    cfg = harness.parse_frontend(multi.keys, multi.limits)
    assert [q.ring_refs for q in cfg.queues] == [(8, 9), (10, 11), (12, 13), (14, 15)]
    assert [q.event_channel for q in cfg.queues] == [5, 6, 7, 8]
    escape = harness.decode(seeds["params-symlink-escape"])
    spec = harness.parse_params(escape.params, escape.mode)
    with pytest.raises(ImageSpecError, match=r"outside storage\.allowed_dirs"):
        check_allowed(spec.path, harness.ALLOWED)


def test_every_frontend_keys_regression_has_an_expectation() -> None:
    assert {name for name in _frontend_keys_seeds() if name.startswith("regress-")} == set(FRONTEND_KEYS_REFUSALS)


@pytest.mark.parametrize(("name", "message"), sorted(FRONTEND_KEYS_REFUSALS.items()))
def test_frontend_keys_regression_is_refused(name: str, message: str) -> None:
    harness = _frontend_keys_harness()
    case = harness.decode(_frontend_keys_seeds()[name])
    with pytest.raises(FrontendError, match=message):
        parse_frontend(case.keys, case.limits)


def test_frontend_keys_fixed_seed_mutations() -> None:
    """The bounded, reproducible version of `make fuzz` for the frontend-key and params parsers."""
    harness = _frontend_keys_harness()
    seeds = list(_frontend_keys_seeds().values())
    assert harness.mutation_loop(seeds, runs=5000, seconds=3600) == 5000


def test_frontend_keys_mutations_find_a_parser_that_ignores_the_limits(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The invariants have teeth: a parser checking against bigger limits than were advertised is
    caught, and the failing input is saved and fails again on replay."""
    harness = _frontend_keys_harness()
    monkeypatch.setattr(harness, "parse_frontend", lambda keys, _limits: parse_frontend(keys, Limits(8, 64, True)))
    seeds = [harness.encode([("!limits", "1,1,0"), ("ring-ref", "8"), ("event-channel", "5")])]
    with pytest.raises(AssertionError):
        harness.mutation_loop(seeds, runs=20000, seconds=3600, artifact_prefix=str(tmp_path) + "/")
    (saved,) = tmp_path.glob("crash-*")
    with pytest.raises(AssertionError):
        harness.check_input(saved.read_bytes())


def test_frontend_keys_mutations_find_a_string_prefix_allowed_dir_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """`allowed` as a plain string prefix would let `allowed-evil/` through: the loop finds it."""
    harness = _frontend_keys_harness()

    def prefix_only(path: str, allowed_dirs: list[str]) -> bool:
        return any(os.path.realpath(path).startswith(os.path.realpath(d)) for d in allowed_dirs)

    monkeypatch.setattr(imagespec, "is_allowed", prefix_only)
    seeds = [harness.encode([("@params", "raw:$ROOT/allowed/a.img"), ("@mode", "w")])]
    with pytest.raises(AssertionError):
        harness.mutation_loop(seeds, runs=20000, seconds=3600)


def test_frontend_keys_mutations_find_a_format_guessed_from_contents(monkeypatch: pytest.MonkeyPatch) -> None:
    """A params parser that sniffs a qcow2 header out of an unprefixed image is caught."""
    harness = _frontend_keys_harness()

    def sniffing(params: str | None, mode: str | None) -> ImageSpec:
        spec = parse_params(params, mode)
        if spec.format is None and os.path.isfile(spec.path):
            with open(spec.path, "rb") as f:
                if f.read(4) == b"QFI\xfb":
                    return dataclasses.replace(spec, format="qcow2")
        return spec

    monkeypatch.setattr(harness, "parse_params", sniffing)
    seeds = [harness.encode([("@params", "raw:$ROOT/allowed/a.img"), ("@mode", "r")])]
    with pytest.raises(AssertionError):
        harness.mutation_loop(seeds, runs=20000, seconds=3600)
