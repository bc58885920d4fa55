"""The VHD driver against readers that are not xenblk: qemu-img/qemu-io (format vpc: fixed and dynamic
disks) and libvhdi (vhdiinfo and its Python binding: differencing chains, which no installed tool can
create, so tests/fixtures/vhd.py writes them from the specification).

libvhdi 20210425 reads a clear bitmap bit of an allocated differencing block from the block (zeros)
instead of from the parent, which the specification asks for (and xenblk, blktap and Hyper-V do): the
libvhdi comparisons below cover what both readings agree on (sectors the child wrote, blocks the
child does not have), and the rest is checked against the parent as QEMU reads it."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.e2e import Stack, stop
from tests.fixtures.storage import qemu_img, qemu_io, qemu_raw
from tests.fixtures.vhd import make_vhd, unique_id
from tests.fixtures.wait import proc_alive, wait_until
from xenblk.storage import Image, StorageError

pytestmark = pytest.mark.skipif(
    not shutil.which("qemu-img") or not shutil.which("vhdiinfo"), reason="qemu-utils and libvhdi-utils needed"
)
MiB = 1 << 20


def vpc(path: Path, size: str, fixed: bool = False) -> Path:
    qemu_img("create", "-q", "-f", "vpc", *(["-o", "subformat=fixed"] if fixed else []), str(path), size)
    return path


def vhdiinfo(path: Path) -> str:
    r = subprocess.run(["vhdiinfo", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


# libvhdi through its Python binding, run by the system interpreter (the .venv does not see Debian's
# python3-libvhdi). Not vhdimount: Debian 13 builds it without FUSE ("No sub system to mount VHDI format").
_LIBVHDI_LAYERS = r"""
import os, sys, pyvhdi
path, out = sys.argv[1], sys.argv[2]
chain = []
while True:
    f = pyvhdi.file()
    f.open(path)
    chain.append(f)
    if not f.parent_filename:
        break
    path = os.path.join(os.path.dirname(path), os.path.basename(f.parent_filename.replace("\\", "/")))
for child, parent in zip(chain, chain[1:]):
    child.set_parent(parent)
for i, f in enumerate(reversed(chain)):
    with open(os.path.join(out, "layer%d" % i), "wb") as w:
        w.write(f.read_buffer_at_offset(f.media_size, 0))
"""


def libvhdi_layers(path: Path, out: Path) -> list[bytes]:
    """libvhdi's view of `path`: what it reads through each layer of the chain, the base first, the image
    itself last (parents found as vhdimount finds them: the header's name, beside the child)."""
    if subprocess.run(["/usr/bin/python3", "-c", "import pyvhdi"], capture_output=True).returncode != 0:
        pytest.fail("python3-libvhdi (scripts/setup.sh installs it) is not importable by /usr/bin/python3")
    out.mkdir()
    r = subprocess.run(
        ["/usr/bin/python3", "-c", _LIBVHDI_LAYERS, str(path), str(out)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return [p.read_bytes() for p in sorted(out.iterdir(), key=lambda p: int(p.name[5:]))]


@pytest.mark.parametrize("fixed", [False, True], ids=["dynamic", "fixed"])
def test_qemu_images_read_and_random_writes_compare(tmp_path: Path, fixed: bool) -> None:
    """qemu-img made it, qemu-io wrote it, xenblk reads what QEMU reads; then a seeded workload through
    xenblk (unaligned writes, flushes, discards, write-zeroes) matches a raw twin for qemu-img compare,
    and vhdiinfo, libvhdi and xenblk's check accept the result."""
    p = vpc(tmp_path / "d.vhd", "24M", fixed)
    qemu_io(p, "vpc", "write -P 0x5a 1M 3M", "write -P 0x11 17M 512", "write -P 0x22 4095k 3k")
    data = qemu_raw(p, "vpc")
    rnd = random.Random(18)
    with Image.open(str(p), "vhd") as img:
        assert img.size == len(data) and img.format == "vhd"
        assert img.read(0, img.size) == data
        twin = bytearray(data)
        for i in range(250):
            off, n = rnd.randrange(img.size - 300_000), rnd.choice([512, 4096, 65536, rnd.randrange(1, 300_000)])
            b = rnd.randbytes(n)
            img.write(off, b)
            twin[off : off + n] = b
            if i % 23 == 0:
                off, n = rnd.randrange(img.size - 3 * MiB), rnd.randrange(1, 3 * MiB)
                img.discard(off, n)  # whole sectors read as zeros afterwards (the driver's choice)
                a0, a1 = (off + 511) // 512 * 512, (off + n) // 512 * 512
                if a1 > a0:
                    twin[a0:a1] = bytes(a1 - a0)
            if i % 31 == 0:
                off, n = rnd.randrange(img.size - MiB), rnd.randrange(1, MiB)
                img.write_zeroes(off, n)
                twin[off : off + n] = bytes(n)
            if i % 50 == 0:
                img.flush()
        assert img.read(0, img.size) == bytes(twin)
        assert img.check()["corruptions"] == 0
    raw = tmp_path / "twin.raw"
    raw.write_bytes(twin)
    r = qemu_img("compare", "-f", "vpc", "-F", "raw", str(p), str(raw), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("Fixed" if fixed else "Dynamic") in vhdiinfo(p)
    assert libvhdi_layers(p, tmp_path / "libvhdi")[-1] == bytes(twin)
    # `qemu-img check` has no vpc support ("This image format does not support checks"): the one oracle
    # that cannot be asked.
    assert qemu_img("check", "-f", "vpc", str(p), check=False).returncode == 63


def _chain(d: Path) -> tuple[Path, Path, Path, bytearray]:
    """base (qemu-img, qemu-io) <- mid (differencing, W2ru + W2ku + MacX) <- top (differencing, MacX
    only), with sectors in each; returns the paths and the top's expected contents."""
    base = vpc(d / "base.vhd", "16M")
    qemu_io(base, "vpc", "write -P 0x41 0 5M", "write -P 0x42 6M 1M")
    want = bytearray(qemu_raw(base, "vpc"))
    size = len(want)
    mid_secs = {s: bytes([0x60 + s % 11]) * 512 for s in (0, 1, 2, 100, 4095, 4096, 9000, 20000)}
    top_secs = {s: bytes([0x90 + s % 13]) * 512 for s in (2, 3, 4096 + 4095, 30000, size // 512 - 1)}
    make_vhd(
        d / "mid.vhd",
        size,
        parent=("base.vhd", unique_id(base)),
        locators={"W2ru": ".\\base.vhd", "W2ku": str(base).replace("/", "\\"), "MacX": "./base.vhd"},
        sectors=mid_secs,
    )
    make_vhd(
        d / "top.vhd",
        size,
        block_size=512 * 1024,
        parent=("mid.vhd", unique_id(d / "mid.vhd")),
        locators={"MacX": "./mid.vhd"},
        sectors=top_secs,
    )
    for secs in (mid_secs, top_secs):
        for s, b in secs.items():
            want[s * 512 : (s + 1) * 512] = b
    return base, d / "mid.vhd", d / "top.vhd", want


def test_differencing_chain_reads_writes_and_libvhdi_agrees(tmp_path: Path) -> None:
    d = tmp_path / "imgs"
    d.mkdir()
    base, mid, top, want = _chain(d)
    assert "Parent filename\t\t: mid.vhd" in vhdiinfo(top)
    with pytest.raises(StorageError, match="backing_dirs"):
        Image.open(str(top), "vhd")  # parents only from storage.backing_dirs, as qcow2 backing files
    with Image.open(str(top), "vhd", backing_dirs=[str(d)]) as img:
        info = img.info()
        assert info["vhd_type"] == "differencing" and info["backing_file"] == str(mid)
        assert info["backing"]["backing_file"] == str(base) and info["backing"]["backing"]["vhd_type"] == "dynamic"
        assert img.read(0, img.size) == bytes(want)
        # writes: a partial sector in a block the top has (the rest of the sector from the chain), a new
        # block (its other sectors still read from below), a write across two blocks
        rnd = random.Random(5)
        for off, n in ((3 * 512 + 100, 50), (5 * MiB + 7, 1000), (512 * 1024 - 700, 2000), (9 * MiB, 4096)):
            b = rnd.randbytes(n)
            img.write(off, b)
            want[off : off + n] = b
        img.discard(0, img.size)  # a hint a differencing disk ignores: nothing of the parent shows again
        img.flush()
        assert img.read(0, img.size) == bytes(want)
        assert img.check()["corruptions"] == 0
    with Image.open(str(top), "vhd", readonly=True, backing_dirs=[str(d)]) as img:
        assert img.read(0, img.size) == bytes(want)
    assert "Differential" in vhdiinfo(top)
    layers = libvhdi_layers(top, tmp_path / "libvhdi")
    assert [len(b) for b in layers] == [len(want)] * 3
    theirs = layers[-1]
    # where libvhdi and the specification agree: blocks of the top that it does not have, and sectors it wrote
    bs = 512 * 1024
    with Image.open(str(top), "vhd", readonly=True, backing_dirs=[str(d)]) as img:
        for blk in range(len(want) // bs):
            lo, hi = blk * bs, (blk + 1) * bs
            if theirs[lo:hi] == want[lo:hi]:
                continue
            # an allocated block: libvhdi shows zeros for the sectors the top never wrote
            for s in range(lo // 512, hi // 512):
                mine, lib = want[s * 512 : (s + 1) * 512], theirs[s * 512 : (s + 1) * 512]
                assert lib == mine or lib == bytes(512), f"sector {s}"
        assert img.read(0, img.size) == bytes(want)


@pytest.mark.parametrize("code", ["W2ru", "W2ku", "MacX"])
def test_each_locator_alone_resolves(tmp_path: Path, code: str) -> None:
    base = vpc(tmp_path / "base.vhd", "4M")
    qemu_io(base, "vpc", "write -P 0x33 0 1M")
    size = len(qemu_raw(base, "vpc"))
    name = {"W2ru": ".\\base.vhd", "W2ku": str(base).replace("/", "\\"), "MacX": "./base.vhd"}[code]
    # the header's own parent name is wrong: only the locator can find the parent
    make_vhd(tmp_path / "c.vhd", size, parent=("nope.vhd", unique_id(base)), locators={code: name})
    with Image.open(str(tmp_path / "c.vhd"), "vhd", backing_dirs=[str(tmp_path)]) as img:
        assert img.read(0, MiB) == b"\x33" * MiB


def test_hostile_parents_are_refused(tmp_path: Path) -> None:
    base = vpc(tmp_path / "base.vhd", "4M")
    size = len(qemu_raw(base, "vpc"))
    outside = tmp_path / "out"
    outside.mkdir()
    shutil.copy(base, outside / "base.vhd")
    ok = [str(tmp_path / "ok")]
    (tmp_path / "ok").mkdir()
    cases = {
        "wrong unique id": ({"W2ru": "base.vhd"}, b"\x01" * 16, [str(tmp_path)], "another unique id"),
        "outside backing_dirs": ({"W2ku": str(outside / "base.vhd").replace("/", "\\")}, None, ok, "outside"),
        "drive letter only": ({"W2ku": "C:\\base.vhd"}, None, [str(tmp_path)], "without a usable parent locator"),
        "dot-dot escape": ({"W2ru": "..\\..\\etc\\passwd"}, None, ok, "outside"),
    }
    for locs, puid, dirs, msg in cases.values():
        c = tmp_path / "ok" / "c.vhd" if dirs == ok else tmp_path / "c.vhd"
        make_vhd(c, size, parent=("", puid or unique_id(base)), locators=locs)
        with pytest.raises(StorageError, match=msg):
            Image.open(str(c), "vhd", backing_dirs=dirs)
    # a disk that is its own parent: the chain is cut at XB_MAX_BACKING_DEPTH
    uid = os.urandom(16)
    make_vhd(tmp_path / "loop.vhd", size, uid=uid, parent=("loop.vhd", uid), locators={"W2ru": "loop.vhd"})
    with pytest.raises(StorageError, match="deeper than"):
        Image.open(str(tmp_path / "loop.vhd"), "vhd", backing_dirs=[str(tmp_path)])


def _corrupt(p: Path, off: int, b: bytes) -> None:
    with open(p, "r+b") as f:
        f.seek(off, 0 if off >= 0 else 2)
        f.write(b)


def test_hostile_metadata_is_refused_and_a_lost_end_footer_repaired(tmp_path: Path) -> None:
    src = vpc(tmp_path / "src.vhd", "8M")
    qemu_io(src, "vpc", "write -P 0x77 0 3M")
    data = qemu_raw(src, "vpc")
    bat = 1536  # qemu: footer copy, header at 512, BAT at 1536
    cases = {
        "footer checksums": (-512 + 64, b"\x00\x00\x00\x01", "copy", "not a VHD image"),
        "header checksum": (512 + 36, b"\x00\x00\x00\x01", None, "dynamic header"),
        "block size": (512 + 32, b"\x00\x00\x03\x00", "header", "block size"),
        "BAT past the end": (bat, b"\x7f\xff\xff\xff", None, "outside the data area"),
        "BAT over the header": (bat, b"\x00\x00\x00\x01", None, "outside the data area"),
    }
    for what, (off, b, fix, msg) in cases.items():
        p = tmp_path / f"{what}.vhd"
        shutil.copy(src, p)
        _corrupt(p, off, b)
        if fix == "copy":  # the footer copy at 0 as well (with it alone, the disk opens: see below)
            _corrupt(p, 64, b"\x00\x00\x00\x01")
        if fix == "header":  # a valid checksum over the bad field: the bound, not the checksum, refuses it
            with open(p, "r+b") as f:
                f.seek(512)
                h = bytearray(f.read(1024))
                h[36:40] = bytes(4)
                h[36:40] = (~sum(h) & 0xFFFFFFFF).to_bytes(4, "big")
                f.seek(512)
                f.write(h)
        with pytest.raises(StorageError, match=msg):
            Image.open(str(p), "vhd", readonly=True)
    # the footer at the end torn (the footer copy at 0 stands in): read-only it reads, a writer puts it back
    p = tmp_path / "torn.vhd"
    shutil.copy(src, p)
    _corrupt(p, -512, bytes(512))
    with Image.open(str(p), "vhd", readonly=True) as img:
        assert img.read(0, img.size) == data
        assert img.check()["corruptions"] == 1
    with Image.open(str(p), "vhd") as img:
        assert img.check()["corruptions"] == 0
    assert qemu_raw(p, "vpc") == data and "Dynamic" in vhdiinfo(p)
    # more than a half-written block beyond the last one: a writer does not cut it
    with open(p, "ab") as f:
        f.write(bytes(512))
        f.truncate(f.tell() + 8 * MiB)
    with pytest.raises(StorageError, match="beyond the last block"):
        Image.open(str(p), "vhd")
    with Image.open(str(p), "vhd", readonly=True) as img:
        assert img.read(0, img.size) == data
    # the copy at 0 torn instead: the footer at the end serves, the check names the difference
    p = tmp_path / "torn0.vhd"
    shutil.copy(src, p)
    _corrupt(p, 0, b"x")
    with Image.open(str(p), "vhd", readonly=True) as img:
        assert img.read(0, img.size) == data
        assert img.check()["corruptions"] == 1


WORKLOAD = r"""
import os, sys
from xenblk.storage import Image
path, log = sys.argv[1], sys.argv[2]
img = Image.open(path, "vhd")
fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
slot = 3000
nslots = img.size // slot
done = []
for i in range(nslots):
    s = (i * 7919) % nslots  # scattered: allocations interleave with writes into allocated blocks
    img.write(s * slot, bytes([s % 251 + 1]) * slot)
    done.append(s)
    if len(done) >= 13:
        img.flush()
        os.write(fd, "".join(f"{d}\n" for d in done).encode())
        os.fsync(fd)
        done = []
while True:
    pass
"""


def test_kill9_mid_allocation_leaves_a_consistent_image(tmp_path: Path) -> None:
    """A writer killed anywhere: vhdiinfo, qemu and xenblk read the image, xenblk's check finds nothing,
    every write acknowledged by a completed flush is there. (native/tests/test_vhd_crash.c stops the
    driver after each single write instead; this is the real kill.)"""
    p = make_vhd_small(tmp_path)
    log = tmp_path / "acked.log"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", WORKLOAD, str(p), str(log)], env=env, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: log.exists() and log.stat().st_size > 3000, "some flushes acknowledged", interval=0.01,
                   alive=proc_alive(proc, "the writer"))  # fmt: skip
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert "Dynamic" in vhdiinfo(p)
    data = qemu_raw(p, "vpc")
    with Image.open(str(p), "vhd", readonly=True) as img:
        assert img.check()["corruptions"] == 0
        assert img.read(0, img.size) == data
    for s in (int(x) for x in log.read_text().split()):
        assert data[s * 3000 : (s + 1) * 3000] == bytes([s % 251 + 1]) * 3000, f"acknowledged slot {s} lost"


def make_vhd_small(d: Path) -> Path:
    """A dynamic disk with small blocks (64 KiB), so that a short workload allocates many."""
    p = d / "k.vhd"
    make_vhd(p, 8 * MiB, block_size=64 * 1024)
    return p


def test_cli_image_info_and_check(tmp_path: Path) -> None:
    d = tmp_path / "imgs"
    d.mkdir()
    _, _, top, _ = _chain(d)
    xb = [sys.executable, "-m", "xenblk", "image"]
    r = subprocess.run([*xb, "info", str(top), "-f", "vhd", "--backing-dir", str(d)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "vhd type: differencing, block size 524288" in r.stdout and f"backing file: {d}/mid.vhd" in r.stdout
    r = subprocess.run([*xb, "check", str(top), "-f", "vhd", "--backing-dir", str(d)], capture_output=True, text=True)
    assert r.returncode == 0 and "no errors found" in r.stdout, r.stdout + r.stderr


def test_differencing_vhd_through_the_daemon(stack: Stack) -> None:
    """`vhd:` params through the real rings of a simulated guest (a verified random read/write workload,
    several queues, indirect requests): the chain's parent from storage.backing_dirs, the image still
    accepted by vhdiinfo and xenblk's check afterwards."""
    base_dir = stack.images.parent / "base"  # the stack's storage.backing_dirs
    base = vpc(base_dir / "base.vhd", "64M")
    qemu_io(base, "vpc", "write -P 0x5a 0 8M")
    size = len(qemu_raw(base, "vpc"))
    child = stack.images / "child.vhd"
    make_vhd(child, size, parent=("base.vhd", unique_id(base)), locators={"MacX": "../base/base.vhd"})
    stack.attach(1, f"vhd:{child}", "xvdb")
    rc, result = stack.guest(1, "--rw", "randrw", "--bs", "4k", "--iodepth", "16", "--size", "16M", "--verify",
                             "--seed", "18", "--queues", "2", "--indirect")  # fmt: skip
    assert rc == 0, f"{result}\n{stack.log_tail()}"
    disks = result.get("disks", result) if isinstance(result, dict) else result
    for d in disks.values() if isinstance(disks, dict) else disks:
        assert d.get("errors", 0) == 0 and d.get("verify_errors", 0) == 0, d
    assert stop(stack.serve) == 0, stack.log_tail()
    assert "Differential" in vhdiinfo(child)
    with Image.open(str(child), "vhd", readonly=True, backing_dirs=[str(base_dir)]) as img:
        assert img.check()["corruptions"] == 0
