"""Hostile qcow2 images (a guest can write an image's contents): refused at open
or failing the request with a clear StorageError; never a crash, never I/O outside the file."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.storage import qemu_check, qemu_io, qemu_raw
from xenblk.storage import Image, StorageError

MiB = 1 << 20


def _patch(p: Path, off: int, fmt: str, *vals: int) -> None:
    with open(p, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, *vals))


def _header(p: Path) -> dict[str, int]:
    h = p.read_bytes()[:104]
    return {"l1_off": struct.unpack(">Q", h[40:48])[0], "rt_off": struct.unpack(">Q", h[48:56])[0]}


@pytest.fixture
def img(make_qcow2: Callable[..., Path]) -> Path:
    p: Path = make_qcow2("h.qcow2", "4M", cluster_size=65536)
    qemu_io(p, "qcow2", "write -P 0xab 0 128k", "write -P 0xcd 2M 64k")
    return p


@pytest.mark.parametrize(
    ("off", "fmt", "val", "msg"),
    [
        (0, ">I", 0x12345678, "not a qcow2 image"),
        (4, ">I", 7, "version 7"),
        (20, ">I", 30, "cluster_bits"),
        (32, ">I", 1, "encrypted"),
        (36, ">I", 0x10000000, "L1 table too large"),
        (36, ">I", 0, "L1 table too small"),
        (40, ">Q", 1 << 40, "L1 table offset"),
        (40, ">Q", 65536 + 8, "L1 table offset"),
        (48, ">Q", 1 << 40, "refcount table offset"),
        (56, ">I", 0, "refcount table size"),
        (72, ">Q", 1 << 2, "external data file"),
        (72, ">Q", 1 << 4, "extended L2"),
        (72, ">Q", 1 << 9, "bit 9"),
        (96, ">I", 7, "refcount_order"),
        (100, ">I", 1 << 30, "header length"),
        (24, ">Q", 1 << 62, "virtual size"),
    ],
)
def test_bad_header_refused(img: Path, off: int, fmt: str, val: int, msg: str) -> None:
    _patch(img, off, fmt, val)
    with pytest.raises(StorageError, match=msg):
        Image.open(str(img), "qcow2")


def test_unknown_compression_type(img: Path) -> None:
    _patch(img, 72, ">Q", 1 << 3)
    _patch(img, 104, ">B", 9)
    with pytest.raises(StorageError, match="compression type 9"):
        Image.open(str(img), "qcow2")


def test_dirty_bit_refused_for_writing(img: Path) -> None:
    _patch(img, 72, ">Q", 1)
    with pytest.raises(StorageError, match=r"dirty.*qemu-img check -r all"):
        Image.open(str(img), "qcow2")
    with Image.open(str(img), "qcow2", readonly=True) as ro:  # reads do not depend on refcounts
        assert ro.read(0, 4) == b"\xab" * 4


def test_truncated_file(img: Path) -> None:
    data = img.read_bytes()
    img.write_bytes(data[:50])
    with pytest.raises(StorageError, match="too short"):
        Image.open(str(img), "qcow2")
    img.write_bytes(data[: 3 * 65536])  # header, L1, reftable survive; L2/data do not
    try:
        with Image.open(str(img), "qcow2") as im, pytest.raises(StorageError):
            im.read(0, im.size)
    except StorageError:
        pass


def test_l2_pointer_past_eof_and_unaligned(img: Path) -> None:
    l1 = _header(img)["l1_off"]
    for bad in (1 << 40, 65536 * 3 + 512):
        _patch(img, l1, ">Q", bad | (1 << 63))
        with Image.open(str(img), "qcow2") as im:
            with pytest.raises(StorageError, match="Input/output error"):
                im.read(0, 4096)
            with pytest.raises(StorageError):
                im.write(0, b"x" * 10)


def test_refblock_past_eof_fails_allocating_writes(img: Path) -> None:
    rt = _header(img)["rt_off"]
    _patch(img, rt, ">Q", 1 << 40)
    with Image.open(str(img), "qcow2") as im:
        assert im.read(0, 4) == b"\xab" * 4
        with pytest.raises(StorageError):
            im.write(3 * MiB, b"y" * 100)


def test_backing_loop_refused(make_qcow2: Callable[..., Path], tmp_path: Path) -> None:
    make_qcow2("b.qcow2", "1M")
    a = make_qcow2("a.qcow2", "1M", backing=tmp_path / "b.qcow2")
    b2 = make_qcow2("b2.qcow2", "1M", backing=a)
    (tmp_path / "b.qcow2").unlink()
    b2.rename(tmp_path / "b.qcow2")  # a -> b -> a
    with pytest.raises(StorageError, match="deeper than 16"):
        Image.open(str(a), "qcow2", backing_dirs=[str(tmp_path)])


def test_backing_format_never_guessed(make_qcow2: Callable[..., Path], tmp_path: Path) -> None:
    base = make_qcow2("base.qcow2", "1M")
    qemu_io(base, "qcow2", "write -P 0x77 0 4k")
    # no backing-format extension: the backing file is read as raw, i.e. its qcow2 header shows through
    top = tmp_path / "top.qcow2"
    from tests.fixtures.storage import qemu_img

    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", str(base), "-F", "raw", str(top), "1M")
    with Image.open(str(top), "qcow2", backing_dirs=[str(tmp_path)]) as im:
        assert im.info()["backing_format"] == "raw"
        assert im.read(0, 4) == b"QFI\xfb"


def test_random_corruption_never_crashes(img: Path) -> None:
    pristine = img.read_bytes()
    rnd = random.Random(42)
    for _ in range(150):
        data = bytearray(pristine)
        for _ in range(rnd.randrange(1, 8)):
            pos = rnd.choice([rnd.randrange(0, 128), rnd.randrange(65536, 4 * 65536)])
            if pos < len(data):
                data[pos] = rnd.randrange(256)
        img.write_bytes(bytes(data))
        try:
            with Image.open(str(img), "qcow2") as im:
                im.read(0, im.size)
                im.write(rnd.randrange(0, im.size - 5000), b"z" * 5000)
                im.discard(0, 65536)
                im.flush()
                im.check()
        except StorageError:
            pass
        assert img.stat().st_size < 64 * MiB


@pytest.mark.parametrize(
    "case", ["l2_is_l1", "l2_is_header", "l2_is_reftable", "refblock_is_l1", "refblock_is_reftable"]
)
def test_overlapping_metadata_stays_inside_the_file(img: Path, case: str) -> None:
    h = _header(img)
    table, target = {
        "l2_is_l1": (h["l1_off"], h["l1_off"]),
        "l2_is_header": (h["l1_off"], 0),
        "l2_is_reftable": (h["l1_off"], h["rt_off"]),
        "refblock_is_l1": (h["rt_off"], h["l1_off"]),
        "refblock_is_reftable": (h["rt_off"], h["rt_off"]),
    }[case]
    _patch(img, table, ">Q", target | (1 << 63) if target else 65536 * 5 + 1)
    size_before = img.stat().st_size
    try:
        with Image.open(str(img), "qcow2") as im:
            for off in (0, 65536, 3 * MiB):
                try:
                    im.read(off, 65536)
                    im.write(off + 100, b"q" * 70000)
                    im.discard(off, 65536)
                    im.flush()
                except StorageError:
                    pass
            im.check()
    except StorageError:
        pass
    assert img.stat().st_size < size_before + 16 * MiB


# Issue 14 item 2: a guest that never flushes must not grow its image without bound. Freed clusters
# are reclaimed without waiting for a guest flush, and the file never exceeds virtual size + metadata
# + a small slack (the reserve of metadata write-through and a few clusters).
@pytest.mark.parametrize("meta_wt", [False, True], ids=["writeback", "meta_writethrough"])
@pytest.mark.parametrize("cluster", [512, 65536])
def test_flush_starved_discard_loop_stays_bounded(make_qcow2: Callable[..., Path], meta_wt: bool, cluster: int) -> None:
    p = make_qcow2("loop.qcow2", "1M", cluster_size=cluster)
    with Image.open(str(p), "qcow2", meta_writethrough=meta_wt) as im:
        for k in range(max(2000, 3 * MiB // cluster)):  # more rounds than the disk has clusters, thrice
            im.write(0, bytes([k & 0xFF]) * cluster)
            im.discard(0, cluster)
        im.write(0, b"\x5a" * cluster)
        # virtual size + its metadata (header, L1, L2, refcounts: under 256 KiB here) + the reserve of
        # metadata write-through (64 clusters at most); unfixed, each round grew it by a cluster
        bound = MiB + 256 * 1024 + 64 * cluster
        assert p.stat().st_size <= bound, f"the image grew to {p.stat().st_size / MiB:.1f} MiB unflushed"
        assert im.read(0, cluster) == b"\x5a" * cluster
        assert im.read(cluster, cluster) == bytes(cluster)
    rc, report = qemu_check(p)
    assert rc == 0, report
    assert qemu_raw(p)[:cluster] == b"\x5a" * cluster


def test_discard_everything_unflushed_then_refill(make_qcow2: Callable[..., Path]) -> None:
    """A whole-disk write/discard cycle, never flushed, reuses the freed clusters."""
    p = make_qcow2("fill.qcow2", "4M", cluster_size=65536)
    with Image.open(str(p), "qcow2") as im:
        for k in range(20):
            im.write(0, bytes([k + 1]) * (4 * MiB))
            im.discard(0, 4 * MiB)
        im.write(MiB, b"\x77" * 65536)
        assert p.stat().st_size <= 4 * MiB + MiB
    rc, report = qemu_check(p)
    assert rc == 0, report
    data = qemu_raw(p)
    assert data[MiB : MiB + 65536] == b"\x77" * 65536 and data[:MiB] == bytes(MiB)


@pytest.mark.parametrize("table", ["l2", "refblock"])
def test_metadata_cluster_with_refcount_zero_is_never_handed_out(img: Path, table: str) -> None:
    """Issue 14 item 5: a crafted image gives an L2 table (or a refcount block) refcount 0; the
    allocator must not hand that cluster out as data (the guest's data would overwrite the table)."""
    h = _header(img)
    raw = img.read_bytes()
    l2_off = struct.unpack(">Q", raw[h["l1_off"] : h["l1_off"] + 8])[0] & 0x00FFFFFFFFFFFE00
    rb_off = struct.unpack(">Q", raw[h["rt_off"] : h["rt_off"] + 8])[0] & 0x00FFFFFFFFFFFE00
    victim = l2_off if table == "l2" else rb_off
    _patch(img, rb_off + 2 * (victim // 65536), ">H", 0)  # 16-bit refcounts
    with Image.open(str(img), "qcow2") as im:
        for k in range(8):  # new clusters: the lowest free one would be the table
            im.write(MiB + k * 65536, bytes([0x10 + k]) * 65536)
        assert im.read(0, 65536) == b"\xab" * 65536
        assert im.read(2 * MiB, 65536) == b"\xcd" * 65536
    with Image.open(str(img), "qcow2", readonly=True) as im:  # through the tables on disk
        assert im.read(0, 65536) == b"\xab" * 65536
        assert im.read(2 * MiB, 65536) == b"\xcd" * 65536
        for k in range(8):
            assert im.read(MiB + k * 65536, 65536) == bytes([0x10 + k]) * 65536


def _zstd_cluster(make_qcow2: Callable[..., Path]) -> tuple[Path, int]:
    """A zstd qcow2 whose first cluster is compressed (by qemu-io); returns (path, host offset of its data)."""
    p = make_qcow2("z.qcow2", "1M", cluster_size=65536, compression_type="zstd")
    qemu_io(p, "qcow2", "write -c -P 0x33 0 64k")
    h = _header(p)
    raw = p.read_bytes()
    l2 = struct.unpack(">Q", raw[h["l1_off"] : h["l1_off"] + 8])[0] & 0x00FFFFFFFFFFFE00
    e = struct.unpack(">Q", raw[l2 : l2 + 8])[0]
    assert e & (1 << 62), "compressed"
    return p, e & ((1 << (62 - 8)) - 1)


@pytest.mark.parametrize("window_log", [17, 27, 31])
def test_zstd_frame_with_a_huge_window_is_refused(make_qcow2: Callable[..., Path], window_log: int) -> None:
    """Issue 14 item 5: a compressed cluster inflates to one cluster, so a zstd frame may not ask for a
    window beyond it (up to 2 GiB: memory a guest-made image could make the daemon allocate per read)."""
    p, off = _zstd_cluster(make_qcow2)
    with Image.open(str(p), "qcow2") as im:
        assert im.read(0, 65536) == b"\x33" * 65536  # what qemu wrote reads back
    # magic, no content size, a window descriptor (exponent window_log - 10), one last RLE block of 64 KiB
    frame = struct.pack("<IBB", 0xFD2FB528, 0, (window_log - 10) << 3)
    frame += ((65536 << 3) | (1 << 1) | 1).to_bytes(3, "little") + b"\x5a"
    _patch(p, off, f"{len(frame)}s", frame)
    with Image.open(str(p), "qcow2") as im:
        if window_log <= 17:  # within a 64 KiB cluster (2^16, rounded up to zstd's next window): fine
            assert im.read(0, 65536) == b"\x5a" * 65536
        else:
            with pytest.raises(StorageError):
                im.read(0, 65536)
            assert im.read(65536, 512) == bytes(512), "the rest of the image still reads"
