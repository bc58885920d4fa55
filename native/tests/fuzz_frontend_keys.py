"""Fuzzer of the frontend-key parser (xenblk/backend/frontend.py) and the `params`/`mode` parser
(xenblk/backend/imagespec.py): what a hostile frontend writes in `F/`, and what reaches `B/`.

An input is text, one XenStore node a line (see `decode`):

    ring-page-order=2            a key and its value (relative to F/); \\xNN in a value is that byte
    queue-1/event-channel        a key present with no value (None: read as absent)
    !limits=4,4,1                what the backend advertised (max ring order, max queues, persistent)
    @params=qcow2:$ROOT/allowed/a.img   B/params ($ROOT: the harness's scratch tree), @mode=w: B/mode

Invariants: `parse_frontend` returns a config whose every field lies within the advertised Limits
and comes from the key the frontend wrote (no grant or port used twice), or raises FrontendError
with a one-line message, never anything else; the keys `read_frontend` collects are all it needs.
`parse_params` returns exactly the spec its grammar gives (format only from the prefix, never
guessed) or raises ImageSpecError; `is_allowed` accepts a path only if it resolves inside an allowed directory.

    python fuzz_frontend_keys.py [libFuzzer flags] OUTPUT_CORPUS SEED_CORPUS...

runs under atheris (libFuzzer, with a structure-aware custom mutator) when it is installed, else
the fixed-seed mutation loop of fuzz_xenstore_wire.py with the same structure-aware mutator.
"""

from __future__ import annotations

import atexit
import importlib.util
import inspect
import os
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from xenblk.backend import frontend, imagespec
from xenblk.backend.frontend import (
    MAX_EVTCHN_PORT,
    MAX_GRANT_REF,
    TOP_KEYS,
    FrontendConfig,
    FrontendError,
    Limits,
    parse_frontend,
    parse_head,
    queue_key_names,
)
from xenblk.backend.imagespec import FORMAT_ALIASES, ImageSpec, ImageSpecError, parse_params

# The daemon's defaults (config.py: dataplane.max_ring_page_order 0..4, max_queues 1..16).
DEFAULT_LIMITS = Limits(max_ring_page_order=4, max_queues=4, persistent=True)
MAX_ORDER_CONFIG = 4
MAX_QUEUES_CONFIG = 16
PROTOCOLS = {"x86_64-abi", "x86_32-abi"}


# --- the input format ---------------------------------------------------------------------------


class Case:
    """One decoded input: the frontend's keys, the advertised limits, B/params and B/mode."""

    def __init__(self, keys: dict[str, str | None], limits: Limits, params: str | None, mode: str | None,
                 has_params: bool) -> None:  # fmt: skip
        self.keys = keys
        self.limits = limits
        self.params = params
        self.mode = mode
        self.has_params = has_params


_HEX_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})")


def _value(raw: bytes) -> str:
    """A value as read from XenStore; non-UTF-8 bytes survive as surrogates (the hostile case)."""
    raw = _HEX_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), raw)
    return raw.decode("utf-8", "surrogateescape")


def _limits(text: str) -> Limits:
    """`order,queues,persistent`, clamped into what the config accepts; junk gives the defaults."""
    parts = text.split(",")
    try:
        order, queues, persistent = (int(p) for p in parts[:3])
    except ValueError:
        return DEFAULT_LIMITS
    return Limits(min(max(order, 0), MAX_ORDER_CONFIG), min(max(queues, 1), MAX_QUEUES_CONFIG), persistent == 1)


def decode(data: bytes) -> Case:
    keys: dict[str, str | None] = {}
    limits = DEFAULT_LIMITS
    params: str | None = None
    mode: str | None = None
    has_params = False
    for line in data.split(b"\n"):
        key_b, eq, raw = line.partition(b"=")
        key = key_b.decode("utf-8", "surrogateescape")
        value = _value(raw) if eq else None
        if key == "!limits":
            limits = _limits(value or "")
        elif key == "@params":
            has_params = True
            params = value.replace("$ROOT", str(SCRATCH)) if value is not None else None
        elif key == "@mode":
            has_params = True
            mode = value
        elif key:
            keys[key] = value
    return Case(keys, limits, params, mode, has_params)


# --- the frontend-key invariants ----------------------------------------------------------------


def _check_message(e: Exception) -> None:
    """A refusal ends up as B/error: one non-empty line, nothing XenStore cannot store."""
    msg = str(e)
    assert msg and "\n" not in msg and "\0" not in msg, repr(msg)


def _expect_uint(keys: Mapping[str, str | None], name: str, value: int) -> None:
    """A returned number is the one the frontend wrote under that name (ASCII digits only)."""
    raw = keys.get(name)
    assert raw is not None and re.fullmatch(r"[0-9]+", raw) and int(raw) == value, (name, raw, value)


def check_config(cfg: FrontendConfig, keys: Mapping[str, str | None], limits: Limits) -> None:
    assert cfg.protocol in PROTOCOLS
    assert 0 <= cfg.ring_page_order <= limits.max_ring_page_order
    assert cfg.ring_pages == 1 << cfg.ring_page_order
    assert 1 <= len(cfg.queues) <= limits.max_queues
    assert cfg.persistent in (True, False) and (limits.persistent or not cfg.persistent)
    multi = len(cfg.queues) > 1
    if multi:
        _expect_uint(keys, "multi-queue-num-queues", len(cfg.queues))
    if cfg.ring_page_order:
        _expect_uint(keys, "ring-page-order", cfg.ring_page_order)
    ports = []
    for q, queue in enumerate(cfg.queues):
        prefix = f"queue-{q}/" if multi else ""
        assert len(queue.ring_refs) == cfg.ring_pages, (q, queue)
        assert len(set(queue.ring_refs)) == len(queue.ring_refs)
        for i, ref in enumerate(queue.ring_refs):
            assert 0 <= ref <= MAX_GRANT_REF
            if cfg.ring_page_order:
                _expect_uint(keys, f"{prefix}ring-ref{i}", ref)
            else:
                legacy, numbered = keys.get(prefix + "ring-ref"), keys.get(prefix + "ring-ref0")
                _expect_uint(keys, prefix + ("ring-ref" if legacy is not None else "ring-ref0"), ref)
                assert legacy is not None or numbered is not None
        assert 1 <= queue.event_channel <= MAX_EVTCHN_PORT
        _expect_uint(keys, prefix + "event-channel", queue.event_channel)
        ports.append(queue.event_channel)
    assert len(set(ports)) == len(ports)
    # Each ring page is one queue's: two queues on one grant would both consume its requests.
    refs = [ref for queue in cfg.queues for ref in queue.ring_refs]
    assert len(set(refs)) == len(refs), refs


def check_frontend(keys: Mapping[str, str | None], limits: Limits) -> None:
    try:
        cfg = parse_frontend(keys, limits)
    except FrontendError as e:
        _check_message(e)
        return
    check_config(cfg, keys, limits)
    # read_frontend reads only TOP_KEYS and queue_key_names(head): they must be enough.
    head = parse_head(keys, limits)
    needed = set(TOP_KEYS) | set(queue_key_names(head))
    assert parse_frontend({k: v for k, v in keys.items() if k in needed}, limits) == cfg


# --- the params/mode invariants -----------------------------------------------------------------


def _make_scratch() -> Path:
    """allowed/ (the one allowed dir) with an image, a file holding a planted qcow2 header and a
    symlink out; outside/ and allowed-evil/ (shares the allowed dir's name as a string prefix)."""
    root = Path(tempfile.mkdtemp(prefix="xenblk-fuzz-params-"))
    atexit.register(shutil.rmtree, root, True)
    for d in ("allowed/sub", "outside", "allowed-evil"):
        (root / d).mkdir(parents=True)
    (root / "allowed/a.img").write_bytes(bytes(512))
    (root / "allowed/planted.img").write_bytes(b"QFI\xfb\0\0\0\3" + bytes(504))
    (root / "outside/secret.img").write_bytes(bytes(512))
    (root / "allowed-evil/b.img").write_bytes(bytes(512))
    (root / "allowed/escape").symlink_to("../outside")
    (root / "allowed/escape.img").symlink_to(root / "outside/secret.img")
    (root / "allowed/loop").symlink_to("loop")
    (root / "allowed/inside").symlink_to("sub")
    return root


SCRATCH = _make_scratch()
ALLOWED = [str(SCRATCH / "allowed")]
_ALLOWED_REAL = Path(os.path.realpath(SCRATCH / "allowed"))


def expected_spec(params: str | None, mode: str | None) -> ImageSpec | None:
    """The grammar of params/mode, restated: None where a refusal is due."""
    if not params or "\0" in params or "\n" in params:
        return None
    fmt: str | None = None
    path = params
    if not params.startswith("/"):
        name, colon, rest = params.partition(":")
        if not colon or name not in FORMAT_ALIASES:
            return None
        fmt, path = FORMAT_ALIASES[name], rest
    readonly = {"r": True, "ro": True, "w": False, "rw": False, "w!": False}.get(mode or "")
    if fmt == "rbd":  # POOL/IMAGE[@SNAP], each a Ceph name; a snapshot is served read-only
        pool, slash, rest = path.partition("/")
        image, at, snap = rest.partition("@")
        names = [pool, image] + ([snap] if at else [])
        if not slash or not all(re.fullmatch(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]{0,126}", n) for n in names):
            return None
        return None if readonly is None else ImageSpec(path, fmt, readonly or bool(at))
    if not path.startswith("/"):
        return None
    return None if readonly is None else ImageSpec(path, fmt, readonly)


def _inside_allowed(path: str) -> bool:
    try:
        Path(os.path.realpath(path)).relative_to(_ALLOWED_REAL)
    except ValueError:
        return False
    return True


def check_params(params: str | None, mode: str | None) -> None:
    want = expected_spec(params, mode)
    try:
        spec = parse_params(params, mode)
    except ImageSpecError as e:
        _check_message(e)
        assert want is None, (params, mode, want)
        return
    assert spec == want, (params, mode, spec, want)
    allowed = imagespec.is_allowed(spec.path, ALLOWED)
    assert allowed == _inside_allowed(spec.path), (spec.path, allowed)
    try:
        imagespec.check_allowed(spec.path, ALLOWED)
    except ImageSpecError as e:
        _check_message(e)
        assert not allowed
    else:
        assert allowed
        # Without a prefix the format comes from the file type, never from the contents.
        if spec.format is None and os.path.isfile(spec.path):
            assert spec.resolved_format() == "raw", spec


def check_input(data: bytes) -> None:
    case = decode(data)
    check_frontend(case.keys, case.limits)
    if case.has_params:
        check_params(case.params, case.mode)


# --- the structure-aware mutator ----------------------------------------------------------------

KEY_NAMES = (
    ["protocol", "ring-page-order", "multi-queue-num-queues", "feature-persistent", "state", "event-channel",
     "ring-ref", "!limits", "@params", "@mode"]
    + [f"ring-ref{i}" for i in range(18)]
    + [f"queue-{q}/{k}" for q in range(6) for k in ("ring-ref", "ring-ref0", "ring-ref1", "ring-ref3", "event-channel")]
    + ["queue-16/event-channel", "queue--1/ring-ref", "queue-0//ring-ref", "ring-ref00", "ring-ref-1"]
)  # fmt: skip
NUMBERS = [
    "0", "1", "2", "3", "4", "5", "8", "16", "17", "255", "4095", "4096", "2147483647", "2147483648",
    "4294967295", "4294967296", "9999999999", "99999999999", "18446744073709551616", "1" + "0" * 400,
    "-1", "-0", "+1", "0x10", "0X1", "1e3", "1.0", "1_0", " 1", "1 ", "\t2", "1\n", "1\0", "0001",
    "0" * 11, "\u0661", "\uff11", "\u00b2", "", " ",
]  # fmt: skip
PROTOCOL_TEXTS = ["x86_64-abi", "x86_32-abi", "native", "X86_64-ABI", "x86_64-abi\0", "arm-abi", "x86_64-abi ",
                  "\udcff\udcfe", ""]  # fmt: skip
LIMITS_TEXTS = ["4,4,1", "0,1,0", "4,16,1", "9,99,1", "-3,0,1", "2,2", "x"]
MODES = ["w", "r", "ro", "rw", "w!", "W", "r ", "rw\0", "", "\udcff"]
PARAMS = [
    "qcow2:$ROOT/allowed/a.img", "raw:$ROOT/allowed/a.img", "$ROOT/allowed/planted.img", "$ROOT/allowed-evil/b.img",
    "$ROOT/allowed/escape/secret.img", "$ROOT/allowed/../outside/secret.img", "//$ROOT/allowed/a.img",
    "phy:/dev/null", "aio:/etc/shadow", "file:/etc/passwd", "QCOW2:/x", "qcow2:relative.img", "qcow2:",
    "raw:qcow2:/x", "vhd:/x", "/x:y", "/a\r\x1b[2J", "/\udcff", "",
]  # fmt: skip
PREFIXES = ["", "", "raw:", "aio:", "qcow2:", "block:", "phy:", "file:", "tap:aio:", ":", "Raw:"]
COMPONENTS = ["allowed", "allowed", "allowed-evil", "allowed-", "outside", "..", ".", "", "escape", "escape.img",
              "inside", "loop", "sub", "a.img", "planted.img", "secret.img", "b.img", "\udcff", "a:b"]  # fmt: skip
TEXTS = PROTOCOL_TEXTS + LIMITS_TEXTS + MODES + PARAMS


TARGETS = [
    "allowed/a.img", "allowed/planted.img", "allowed/sub", "allowed/escape/secret.img", "allowed/escape.img",
    "allowed/inside/../a.img", "allowed-evil/b.img", "outside/secret.img", "allowed/loop/x", "allowed",
]  # fmt: skip


def _params_path(rng: random.Random) -> str:
    """A params aimed at the scratch tree: a real file, then a detour or two (.., ., //, symlinks)."""
    parts = rng.choice(TARGETS).split("/")
    for _ in range(rng.choice([0, 0, 1, 2])):
        at = rng.randrange(len(parts) + 1)
        if rng.random() < 0.5:
            parts.insert(at, rng.choice([".", "..", "", "allowed", "escape", "inside"]))
        elif at < len(parts):
            parts[at] = rng.choice(COMPONENTS)
    return rng.choice(PREFIXES) + rng.choice(["$ROOT/", "$ROOT/", "$ROOT/", "/", ""]) + "/".join(parts)


ODD_BYTES = [0, 0x0A, 0x20, 0x2D, 0x30, 0x39, 0x3D, 0x5C, 0x7F, 0x80, 0xC3, 0xE2, 0xF0, 0xFF]


def _escape(value: str) -> bytes:
    out = bytearray()
    for b in value.encode("utf-8", "surrogateescape"):
        out += bytes([b]) if 0x20 <= b < 0x7F and b != 0x5C else b"\\x%02x" % b
    return bytes(out)


def encode(pairs: list[tuple[str, str | None]]) -> bytes:
    lines = [k.encode("utf-8", "surrogateescape") + (b"" if v is None else b"=" + _escape(v)) for k, v in pairs]
    return b"\n".join(lines)


def _pairs(data: bytes) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for line in data.split(b"\n"):
        key_b, eq, raw = line.partition(b"=")
        if key_b:
            out.append((key_b.decode("utf-8", "surrogateescape"), _value(raw) if eq else None))
    return out


def _consistent(rng: random.Random) -> list[tuple[str, str | None]]:
    """A well-formed key set of a random shape, so mutations start deep in the parser."""
    order, nq = rng.choice([0, 0, 1, 2, 4, 5]), rng.choice([1, 1, 2, 4, 5])
    pairs: list[tuple[str, str | None]] = [("protocol", rng.choice(["x86_64-abi", "x86_32-abi", "native"]))]
    if order:
        pairs.append(("ring-page-order", str(order)))
    if nq > 1:
        pairs.append(("multi-queue-num-queues", str(nq)))
    ref = rng.randrange(8, 1 << 20)
    for q in range(nq):
        prefix = f"queue-{q}/" if nq > 1 else ""
        names = [prefix + rng.choice(["ring-ref", "ring-ref0"])] if order == 0 else [
            f"{prefix}ring-ref{i}" for i in range(1 << order)]  # fmt: skip
        for name in names:
            pairs.append((name, str(ref)))
            ref += 1
        pairs.append((prefix + "event-channel", str(rng.randrange(1, 4096) + q * 4096)))
    pairs.append(("feature-persistent", rng.choice(["0", "1"])))
    pairs.append(("state", "3"))
    return pairs


def _mutate_value(rng: random.Random, key: str, value: str | None) -> str | None:
    # The params tree is a search of its own: mostly well-formed paths, rarely byte junk.
    choice = 0 if key in ("@params", "@mode") and rng.random() < 0.6 else rng.randrange(6)
    if choice == 0:
        if key == "@params":
            return _params_path(rng) if rng.random() < 0.7 else rng.choice(PARAMS)
        return rng.choice({"@mode": MODES, "protocol": PROTOCOL_TEXTS, "!limits": LIMITS_TEXTS}.get(key, NUMBERS))
    if choice == 1:
        return rng.choice(NUMBERS + TEXTS)
    if choice == 2:
        return None
    raw = bytearray((value or "").encode("utf-8", "surrogateescape"))
    if choice == 3 and raw:
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    elif choice == 4:
        raw.insert(rng.randrange(len(raw) + 1), rng.choice(ODD_BYTES))
    elif raw:
        at = rng.randrange(len(raw))
        del raw[at : at + rng.randint(1, 4)]
    return raw.decode("utf-8", "surrogateescape")


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    pairs = _pairs(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(10)
        if choice == 9 and pairs:  # one key's value copied to another: repeated grants and ports
            src, dst = rng.randrange(len(pairs)), rng.randrange(len(pairs))
            pairs[dst] = (pairs[dst][0], pairs[src][1])
        elif choice == 8:  # a fresh, well-formed params/mode pair
            pairs = [p for p in pairs if p[0] not in ("@params", "@mode")]
            pairs += [("@params", _params_path(rng)), ("@mode", rng.choice(["r", "w", "ro", "rw", "w!"]))]
        elif choice == 0 or not pairs:
            pairs = _consistent(rng) if rng.random() < 0.5 else pairs + _consistent(rng)[:3]
        elif choice == 1:
            del pairs[rng.randrange(len(pairs))]
        elif choice in (2, 3):
            at = rng.randrange(len(pairs))
            pairs[at] = (pairs[at][0], _mutate_value(rng, pairs[at][0], pairs[at][1]))
        elif choice == 4:
            key = rng.choice(KEY_NAMES)
            pairs.append((key, _mutate_value(rng, key, rng.choice(NUMBERS + TEXTS))))
        elif choice == 5:
            at = rng.randrange(len(pairs))
            pairs[at] = (rng.choice(KEY_NAMES), pairs[at][1])
        elif choice == 6 and pool:
            pairs += rng.sample(_pairs(rng.choice(pool)) or [("state", "1")], 1)
        else:  # raw bytes, for what the line format itself does with junk
            b = bytearray(encode(pairs))
            b.insert(rng.randrange(len(b) + 1), rng.choice(ODD_BYTES))
            return bytes(b)
    return encode(pairs)


# --- the drivers --------------------------------------------------------------------------------


def _wire_harness() -> ModuleType:
    """fuzz_xenstore_wire.py's fixed-seed loop and crash saving, reused as they are."""
    path = Path(__file__).with_name("fuzz_xenstore_wire.py")
    spec = importlib.util.spec_from_file_location("fuzz_xenstore_wire", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def mutation_loop(seeds: list[bytes], *, runs: int, seconds: float, seed: int = 1, artifact_prefix: str = "") -> int:
    harness = _wire_harness()
    setattr(harness, "mutate", mutate)  # noqa: B010 - the loop calls its module's mutate: this one instead
    n: int = harness.mutation_loop(check_input, seeds, runs=runs, seconds=seconds, seed=seed,
                                   artifact_prefix=artifact_prefix)  # fmt: skip
    return n


def _fallback_main(argv: list[str]) -> None:
    opts = {a[1:].split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.startswith("-") and "=" in a}
    dirs = [Path(a) for a in argv if not a.startswith("-")]
    seeds = [p.read_bytes() for d in dirs if d.is_dir() for p in sorted(d.iterdir()) if p.is_file()]
    seconds = float(opts.get("max_total_time", "10"))
    runs = int(opts.get("runs", str(1 << 62)))
    n = mutation_loop(seeds, runs=runs, seconds=seconds, artifact_prefix=opts.get("artifact_prefix", ""))
    print(f"Done {n} runs (fixed-seed mutation loop; atheris is not installed)")


def main() -> None:
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        _fallback_main(sys.argv[1:])
        return

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.3:
            out: bytes = atheris.Mutate(data, max_size)
            return out
        return mutate(rng, data, [])[:max_size]

    # Coverage from the two parsers only: instrument_all() would spend most of a short run
    # instrumenting everything else that xenblk imports.
    for mod in (frontend, imagespec):
        for obj in list(vars(mod).values()):
            if inspect.isfunction(obj) and obj.__module__ == mod.__name__:
                atheris.instrument_func(obj)
    atheris.Setup(sys.argv, check_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
