"""The NBD export (xenblk.nbd.NbdExport, the C server in process) driven by libnbd itself through
`nbdsh` (Debian python3-libnbd): what the handshake offers and what a real client makes of it, the
data commands with their flags, the server's own errors once libnbd's client-side checks are off,
and NBD_CMD_DISC behind a queue of in-flight writes. The image file is the oracle (read from disk,
`qemu-img compare`/`check` for qcow2)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.wait import wait_until
from xenblk import storage
from xenblk.nbd import NbdExport

SIZE = 8 << 20
MiB = 1 << 20

# Runs inside nbdsh (the system python3 with libnbd's `nbd` module; `h` is its handle): one call's
# outcome, ("ok", value) or ("err", errno) for a server error.
PRELUDE = """
import errno, json
def outcome(f, *a):
    try:
        r = f(*a)
        return ["ok", r if isinstance(r, (int, bool, type(None))) else len(r)]
    except nbd.Error as e:
        return ["err", errno.errorcode.get(e.errno, e.errno)]
"""


def nbdsh_env() -> dict[str, str]:
    """nbdsh runs `python3 -m nbd` from PATH: the system python3 (libnbd's module), never the .venv's that
    `make test` puts first."""
    where = os.path.dirname(shutil.which("nbdsh") or "/usr/bin/nbdsh")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{where}:/usr/sbin:/usr/bin:/sbin:/bin"
    return env


@pytest.fixture(scope="module", autouse=True)
def have_nbdsh() -> None:
    if shutil.which("nbdsh") is None or subprocess.run(["nbdsh", "--version"], capture_output=True,
                                                       env=nbdsh_env()).returncode != 0:  # fmt: skip
        why = "NBDSH TESTS SKIPPED: nbdsh not installed (Debian: python3-libnbd; `make setup` installs it)"
        warnings.warn(why, stacklevel=1)
        pytest.skip(why)


def run_nbdsh(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nbdsh", "-c", code], capture_output=True, text=True, timeout=120, env=nbdsh_env())


def nbdsh(sock: Path | str, script: str) -> Any:
    """`script` run by nbdsh with `h` connected to the export at `sock`; returns what it printed (JSON)."""
    code = PRELUDE + f"h.connect_uri({f'nbd+unix:///?socket={sock}'!r})\n" + script
    r = run_nbdsh(code)
    assert r.returncode == 0, f"nbdsh failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout)


@pytest.fixture
def raw_export(short_dir: Path) -> Iterator[tuple[NbdExport, Path, bytes]]:
    img_path = short_dir / "d.raw"
    seed = random.Random(44).randbytes(SIZE)
    img_path.write_bytes(seed)
    img = storage.Image.open(str(img_path))
    exp = NbdExport(img, str(short_dir / "d.sock"), readonly=False)
    try:
        yield exp, img_path, seed
    finally:
        exp.close()
        img.close()


def test_handshake_as_libnbd_sees_it(raw_export: tuple[NbdExport, Path, bytes], short_dir: Path) -> None:
    """Options a real client sends (LIST, INFO, GO, STRUCTURED_REPLY, SET_META_CONTEXT): one export, the
    empty name; structured replies and block status declined (optional in the protocol, not offered)
    and libnbd carries on with simple replies; the flags and block sizes it was told."""
    exp, _, _ = raw_export
    uri = f"nbd+unix:///?socket={exp.path}"
    code = (
        "h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)\n"
        "h.set_opt_mode(True)\n"
        f"h.connect_uri({uri!r})\n"
        "names = []\n"
        "h.opt_list(lambda name, desc: names.append(name) or 0)\n"
        "h.opt_info()\n"
        "info_size = h.get_size()\n"
        "h.opt_go()\n"
        "print(json.dumps(dict(names=names, info_size=info_size, size=h.get_size(),\n"
        "    sr=h.get_structured_replies_negotiated(), meta=h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION),\n"
        "    ro=h.is_read_only(), flush=h.can_flush(), fua=h.can_fua(), trim=h.can_trim(), zero=h.can_zero(),\n"
        "    multi=h.can_multi_conn(), cache=h.can_cache(), fast_zero=h.can_fast_zero(), df=h.can_df(),\n"
        "    bs=[h.get_block_size(s) for s in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)],\n"
        "    block_status=outcome(h.block_status, 4096, 0, lambda *a: 0),\n"
        "    read=outcome(h.pread, 4096, 0))))\n"
        "h.shutdown()\n"
    )
    r = run_nbdsh(PRELUDE + code)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["names"] == [""] and got["info_size"] == got["size"] == SIZE
    assert not got["sr"] and not got["meta"]
    assert not got["ro"] and got["flush"] and got["fua"] and got["trim"] and got["zero"] and got["multi"]
    assert not got["cache"] and not got["fast_zero"] and not got["df"]
    assert got["bs"] == [1, 4096, 32 * MiB], got["bs"]  # byte-granular (a cached file), 32 MiB requests
    # libnbd itself refuses block status the server never agreed to; plain reads go on
    assert got["block_status"][0] == "err" and got["read"] == ["ok", 4096], got
    # another name than the one export is refused, and libnbd says so
    r = run_nbdsh(f"h.set_export_name('other')\nh.connect_unix({str(exp.path)!r})")
    # (libnbd 1.22 passes on the server's message, 1.14 says it in its own words)
    assert r.returncode != 0 and re.search(r"unknown export|no export named 'other'", r.stderr), r.stderr


def test_data_commands_with_their_flags(raw_export: tuple[NbdExport, Path, bytes]) -> None:
    """FUA writes, WRITE_ZEROES with NO_HOLE and FUA, TRIM, FLUSH, byte-granular writes, and a second
    connection (multi-conn) seeing the first's writes; the file holds exactly that, TRIM punched a hole
    and NO_HOLE zeroes kept their blocks."""
    exp, img_path, seed = raw_export
    blocks_full = os.stat(img_path).st_blocks
    got = nbdsh(
        exp.path,
        f"""
h.pwrite(b"\\xa5" * 65536, {1 * MiB}, nbd.CMD_FLAG_FUA)
h.zero({1 * MiB}, {2 * MiB}, nbd.CMD_FLAG_NO_HOLE)
h.zero(4096, {3 * MiB}, nbd.CMD_FLAG_FUA)
h.trim({1 * MiB}, {4 * MiB})
h.pwrite(b"xyz", {5 * MiB + 1})
h.flush()
h2 = nbd.NBD()
h2.connect_uri({f"nbd+unix:///?socket={exp.path}"!r})
seen = h2.pread(65536, {1 * MiB}) == b"\\xa5" * 65536 and h2.pread(3, {5 * MiB + 1}) == b"xyz"
h2.pwrite(b"\\x5a" * 512, {6 * MiB + 7}, nbd.CMD_FLAG_FUA)
back = h.pread(512, {6 * MiB + 7}) == b"\\x5a" * 512
zeroes = h.pread({MiB + 4096}, {2 * MiB}) == bytes({MiB + 4096})
h2.shutdown()
h.shutdown()
print(json.dumps(dict(seen=seen, back=back, zeroes=zeroes)))
""",
    )
    assert got == {"seen": True, "back": True, "zeroes": True}, got
    want = bytearray(seed)
    want[1 * MiB : 1 * MiB + 65536] = b"\xa5" * 65536
    want[2 * MiB : 3 * MiB + 4096] = bytes(MiB + 4096)
    want[4 * MiB : 5 * MiB] = bytes(MiB)
    want[5 * MiB + 1 : 5 * MiB + 4] = b"xyz"
    want[6 * MiB + 7 : 6 * MiB + 7 + 512] = b"\x5a" * 512
    assert img_path.read_bytes() == want
    # TRIM punched a hole (no data in its MiB); the NO_HOLE zeroes kept their blocks: had they punched too,
    # 2 MiB would be gone (the file system's own extent blocks move the count by a block or so)
    with open(img_path, "rb") as f:
        assert os.lseek(f.fileno(), 4 * MiB, os.SEEK_DATA) >= 5 * MiB
    freed = (blocks_full - os.stat(img_path).st_blocks) * 512
    assert MiB - 65536 <= freed <= MiB + 65536, freed
    st = exp.stats()
    assert st.errors == 0 and st.protocol_errors == 0 and st.connections == 2, st


def test_server_errors_past_libnbd_checks(raw_export: tuple[NbdExport, Path, bytes]) -> None:
    """With libnbd's strict mode off the requests reach the server: past the end (EINVAL for reads and
    trims, ENOSPC for writes and zeroes, as the protocol says), a flag that was not offered, too large a
    read; each answered with its errno and the connection goes on. FUA on a read or a flush is accepted
    (found by this test: the server refused it, which the protocol forbids once FUA is advertised)."""
    exp, img_path, seed = raw_export
    got = nbdsh(
        exp.path,
        f"""
h.set_strict_mode(0)
r = dict(
    read_past=outcome(h.pread, 4096, {SIZE - 1024}),
    write_past=outcome(h.pwrite, b"x" * 4096, {SIZE - 1024}),
    zero_past=outcome(h.zero, 8192, {SIZE - 4096}),
    trim_past=outcome(h.trim, 8192, {SIZE - 4096}),
    read_after_end=outcome(h.pread, 1, {SIZE}),
    read_huge=outcome(h.pread, {64 * MiB}, 0),
    fast_zero=outcome(h.zero, 4096, 0, nbd.CMD_FLAG_FAST_ZERO),
    read_fua=outcome(h.pread, 4096, 0, nbd.CMD_FLAG_FUA),
    flush_fua=outcome(h.flush, nbd.CMD_FLAG_FUA),
    still=outcome(h.pread, 4096, {SIZE - 4096}),
)
h.shutdown()
print(json.dumps(r))
""",
    )
    assert got == {
        "read_past": ["err", "EINVAL"],
        "write_past": ["err", "ENOSPC"],
        "zero_past": ["err", "ENOSPC"],
        "trim_past": ["err", "EINVAL"],
        "read_after_end": ["err", "EINVAL"],
        "read_huge": ["err", "EINVAL"],
        "fast_zero": ["err", "EINVAL"],
        "read_fua": ["ok", 4096],  # FUA once advertised is valid on every command (the spec: MUST accept)
        "flush_fua": ["ok", None],
        "still": ["ok", 4096],
    }, got
    assert img_path.read_bytes() == seed
    st = exp.stats()
    assert st.errors == 7 and st.protocol_errors == 0, st


def test_disconnect_behind_in_flight_writes(raw_export: tuple[NbdExport, Path, bytes]) -> None:
    """64 asynchronous 64 KiB writes queued, then NBD_CMD_DISC at once (nbd_shutdown): the server stops
    reading but finishes and answers what it had, so every write is in the file; the export goes on."""
    exp, img_path, seed = raw_export
    got = nbdsh(
        exp.path,
        """
cookies = [h.aio_pwrite(bytes([i % 251 + 1]) * 65536, i * 65536) for i in range(64)]
h.shutdown()
print(json.dumps(len(cookies)))
""",
    )
    assert got == 64
    want = bytearray(seed)
    for i in range(64):
        want[i * 65536 : (i + 1) * 65536] = bytes([i % 251 + 1]) * 65536
    assert img_path.read_bytes() == want
    wait_until(lambda: exp.stats().active == 0, "the export saw its client go")
    st = exp.stats()
    assert st.errors == 0 and st.protocol_errors == 0 and st.written_bytes == 64 * 65536, st
    assert nbdsh(exp.path, "print(json.dumps(outcome(h.pread, 65536, 65536)))\nh.shutdown()") == ["ok", 65536]


def test_readonly_export_with_libnbd(short_dir: Path) -> None:
    img_path = short_dir / "ro.raw"
    seed = random.Random(45).randbytes(MiB)
    img_path.write_bytes(seed)
    with storage.Image.open(str(img_path), readonly=True) as img:
        exp = NbdExport(img, str(short_dir / "ro.sock"), readonly=True)
        try:
            got = nbdsh(
                exp.path,
                """
flags = [h.is_read_only(), h.can_flush(), h.can_fua(), h.can_trim(), h.can_zero()]
data = h.pread(65536, 4096)
h.set_strict_mode(0)
r = [outcome(h.pwrite, b"x" * 4096, 0), outcome(h.trim, 4096, 0), outcome(h.zero, 4096, 0), outcome(h.flush)]
h.shutdown()
print(json.dumps(dict(flags=flags, data=data.hex(), r=r)))
""",
            )
        finally:
            exp.close()
    assert got["flags"] == [True, False, False, False, False]
    assert bytes.fromhex(got["data"]) == seed[4096 : 4096 + 65536]
    assert got["r"] == [["err", "EPERM"], ["err", "EPERM"], ["err", "EPERM"], ["err", "EINVAL"]]
    assert img_path.read_bytes() == seed


def test_qcow2_written_by_libnbd_equals_its_raw_twin(short_dir: Path) -> None:
    """An allocating qcow2 written, zeroed and trimmed by libnbd at scattered offsets: `qemu-img compare`
    with a raw twin given the same operations, `qemu-img check` clean."""
    qcow, twin = short_dir / "d.qcow2", short_dir / "twin.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow), str(SIZE)], check=True)
    ops = []
    rng = random.Random(46)
    for i in range(48):
        kind = ("write", "write", "zero", "trim")[i % 4]
        off, n = rng.randrange(0, SIZE - 200_000), rng.randrange(1, 200_000)
        if kind == "trim":  # whole clusters: what a TRIM leaves in a partial one is unspecified (kept here)
            off, n = rng.randrange(0, SIZE // 65536 - 4) * 65536, rng.randrange(1, 4) * 65536
        ops.append((kind, off, n, i % 250 + 1))
    twin_data = bytearray(SIZE)
    for kind, off, n, b in ops:
        twin_data[off : off + n] = bytes([b]) * n if kind == "write" else bytes(n)
    twin.write_bytes(twin_data)
    script = (
        "ops = "
        + json.dumps(ops)
        + "\n"
        + """
for kind, off, n, b in ops:
    if kind == "write":
        h.pwrite(bytes([b]) * n, off)
    elif kind == "zero":
        h.zero(n, off)
    else:
        h.trim(n, off)
h.flush()
h.shutdown()
print(json.dumps(len(ops)))
"""
    )
    with storage.Image.open(str(qcow), "qcow2") as img:
        exp = NbdExport(img, str(short_dir / "q.sock"), readonly=False)
        try:
            assert nbdsh(exp.path, script) == len(ops)
        finally:
            exp.close()
    r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(qcow), str(twin)], capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["qemu-img", "check", str(qcow)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
