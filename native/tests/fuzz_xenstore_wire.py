"""Fuzzer of the XenStore reply decoder (xenblk/xenstore/wire.py), as the client meets hostile bytes.

An input is a byte stream from "xenstored": frames are cut the way the connection's reader cuts
them (16-byte header, then `length` payload bytes) and each payload goes through the decoder the
client applies to that reply type. Only a XenStoreError may come out (the client turns it into a
refused request or a dropped connection); any other exception, or a broken round-trip property,
is a bug.

    python fuzz_xenstore_wire.py [libFuzzer flags] OUTPUT_CORPUS SEED_CORPUS...

runs under atheris (libFuzzer) when it is installed, else a fixed-seed mutation loop that takes
-max_total_time=, -runs= and -artifact_prefix= the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from xenblk.xenstore import wire
from xenblk.xenstore.errors import XenStoreError, error_from_reply
from xenblk.xenstore.perms import Perm

Op = wire.Op
OPS = {int(op) for op in Op}


def check_payload(op: int, payload: bytes) -> None:
    """Decode one reply payload of type `op` as the client does; check what comes out."""
    if op == Op.WATCH_EVENT:
        path, token = wire.watch_event(payload)
        assert path and "\0" not in path + token
    elif op == Op.ERROR:
        name = wire.error_name(payload)
        err = error_from_reply(name, "read", "/x")
        assert isinstance(err, XenStoreError) and err.errno > 0
    elif op in (Op.DIRECTORY, Op.GET_PERMS):
        parts = wire.split_strings(payload, "reply")
        assert wire.strings(*parts) == payload  # nothing lost or invented
        if op == Op.GET_PERMS:
            for text in parts:
                perm = Perm.parse(text)
                assert Perm.parse(str(perm)) == perm
    else:
        text = wire.one_string(payload, "reply")
        assert "\0" not in text
        assert wire.one_string(text.encode(), "reply") == text


def check_stream(data: bytes) -> None:
    """Feed `data` to the decoder frame by frame; only XenStoreError is an acceptable failure."""
    pos = 0
    while len(data) - pos >= wire.HEADER.size:
        try:
            header = wire.decode_header(data[pos : pos + wire.HEADER.size])
        except XenStoreError:
            return  # the client drops the connection here
        end = pos + wire.HEADER.size + header.length
        if end > len(data):
            return  # the reader would wait for the rest
        payload = data[pos + wire.HEADER.size : end]
        if header.type in OPS:
            assert wire.encode(Op(header.type), header.req_id, header.tx_id, payload) == data[pos:end]
        with contextlib.suppress(XenStoreError):  # a refused reply: the waiting request fails with it
            check_payload(header.type, payload)
        pos = end


# --- the fallback mutation loop (no atheris) ----------------------------------------------------

INTERESTING_U32 = [0, 1, 15, 16, 4095, 4096, 4097, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(6)
        if choice == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif choice == 1:
            b.insert(rng.randrange(len(b) + 1), rng.choice([0, 0xFF, 0x80, 0xC3, 0xE2, rng.randrange(256)]))
        elif choice == 2 and b:
            at = rng.randrange(len(b))
            del b[at : at + rng.randint(1, 8)]
        elif choice == 3 and len(b) >= 4:
            at = rng.randrange(len(b) - 3) & ~3
            b[at : at + 4] = struct.pack("<I", rng.choice(INTERESTING_U32))
        elif choice == 4 and pool:
            other = rng.choice(pool)
            cut = rng.randrange(len(b) + 1)
            b = b[:cut] + other[rng.randrange(len(other) + 1) :]
        else:
            b += wire.encode(rng.choice(list(Op)), rng.randrange(4), 0, bytes(rng.randrange(256) for _ in range(8)))
    return bytes(b)


def mutation_loop(check: Callable[[bytes], None], seeds: list[bytes], *, runs: int, seconds: float, seed: int = 1,
                  artifact_prefix: str = "") -> int:  # fmt: skip
    """Run `check` on `runs` mutated inputs (or until `seconds` pass); the number run. Re-raises a
    failure after saving the input to artifact_prefix + "crash-<sha1>"."""
    rng = random.Random(seed)
    pool = list(seeds) or [b""]
    deadline = time.monotonic() + seconds
    done = 0
    for data in pool[:]:
        _run_saving(check, data, artifact_prefix)
        done += 1
    while done < runs and time.monotonic() < deadline:
        data = mutate(rng, rng.choice(pool), pool)
        _run_saving(check, data, artifact_prefix)
        if len(pool) < 1000 and rng.random() < 0.05:
            pool.append(data)
        done += 1
    return done


def _run_saving(check: Callable[[bytes], None], data: bytes, artifact_prefix: str) -> None:
    try:
        check(data)
    except BaseException:
        if artifact_prefix:
            path = f"{artifact_prefix}crash-{hashlib.sha1(data).hexdigest()}"
            Path(path).write_bytes(data)
            print(f"crash input written to {path}", file=sys.stderr)
        raise


def _fallback_main(argv: list[str]) -> None:
    opts = {a[1:].split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.startswith("-") and "=" in a}
    dirs = [Path(a) for a in argv if not a.startswith("-")]
    seeds = [p.read_bytes() for d in dirs if d.is_dir() for p in sorted(d.iterdir()) if p.is_file()]
    seconds = float(opts.get("max_total_time", "10"))
    runs = int(opts.get("runs", str(1 << 62)))
    n = mutation_loop(check_stream, seeds, runs=runs, seconds=seconds, artifact_prefix=opts.get("artifact_prefix", ""))
    print(f"Done {n} runs (fixed-seed mutation loop; atheris is not installed)")


def main() -> None:
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        _fallback_main(sys.argv[1:])
        return
    atheris.instrument_all()  # coverage feedback from the decoder (and everything else loaded)
    atheris.Setup(sys.argv, check_stream)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
