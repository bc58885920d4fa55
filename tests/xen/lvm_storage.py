"""xenblk's block-device driver on real LVM logical volumes (run by tests/xen/lvm-storage.sh in Dom0).

Every property the driver reports is compared with what the kernel says about the same
device (blockdev, sysfs, the ioctls themselves, lvs), and every write is read back through
an independent file descriptor. Prints one `LVM ok:` / `LVM FAIL:` line per check and exits
with the number of failures.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import stat
import subprocess
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from xenblk.storage import Image, StorageError

MiB = 1 << 20
BLKDISCARD = 0x1277  # _IO(0x12, 119)
BLKSECDISCARD = 0x127D  # _IO(0x12, 125)
LVM_CONF = os.environ.get("LVM_CONF_ARGS", "")

failures = 0


def check(ok: bool, what: str, detail: str = "") -> None:
    global failures
    if ok:
        print(f"LVM ok: {what}", flush=True)
    else:
        failures += 1
        print(f"LVM FAIL: {what}{': ' + detail if detail else ''}", flush=True)


def raises(fn: Callable[[], object], err: int) -> bool:
    try:
        fn()
    except StorageError as e:
        return e.errno == err
    return False


def lvm(*args: str) -> str:
    cmd = [*args, "--config", LVM_CONF] if LVM_CONF else list(args)
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def blockdev(opt: str, dev: str) -> int:
    return int(subprocess.run(["blockdev", opt, dev], check=True, capture_output=True, text=True).stdout)


def queue_attr(dev: str, attr: str) -> int:
    rdev = os.stat(dev).st_rdev
    with open(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/queue/{attr}") as f:
        return int(f.read())


def dev_attr(dev: str, attr: str) -> int:
    """A device-level sysfs number (a partition or dm device has its own discard_alignment)."""
    rdev = os.stat(dev).st_rdev
    with open(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/{attr}") as f:
        return int(f.read())


def data_percent(lv: str) -> float:
    return float(lvm("lvs", "--noheadings", "-o", "data_percent", lv).strip())


def read_back(dev: str, off: int, n: int) -> bytes:
    """Read through a separate, buffered fd (not the driver's)."""
    fd = os.open(dev, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def ioctl_range(dev: str, req: int, off: int, n: int) -> int:
    """Issue a discard ioctl directly; 0 or the errno."""
    fd = os.open(dev, os.O_RDWR)
    try:
        fcntl.ioctl(fd, req, off.to_bytes(8, "little") + n.to_bytes(8, "little"))
        return 0
    except OSError as e:
        return e.errno or -1
    finally:
        os.close(fd)


def check_geometry(img: Image, dev: str, name: str) -> None:
    print(
        f"LVM {name}: size={img.size} logical_block={img.logical_block} physical_block={img.physical_block} "
        f"direct={img.direct} readonly={img.readonly} flush={img.can_flush} discard={img.can_discard} "
        f"discard_granularity={img.discard_granularity} discard_alignment={img.discard_alignment} "
        f"secure_discard={img.can_secure_discard}",
        flush=True,
    )
    check(img.format == "block", f"{name}: format block", img.format)
    check(img.size == blockdev("--getsize64", dev), f"{name}: size = BLKGETSIZE64", str(img.size))
    check(img.logical_block == blockdev("--getss", dev), f"{name}: logical block = BLKSSZGET")
    check(img.physical_block == blockdev("--getpbsz", dev), f"{name}: physical block = BLKPBSZGET")
    check(img.direct, f"{name}: O_DIRECT by default")
    check(not img.readonly and img.can_flush, f"{name}: writable, flush advertised")
    dmax = queue_attr(dev, "discard_max_bytes")
    check(img.can_discard == (dmax > 0), f"{name}: discard advertised iff the device has it", f"dmax={dmax}")
    if img.can_discard:
        gran = queue_attr(dev, "discard_granularity")
        check(
            img.discard_granularity == gran,
            f"{name}: discard granularity = sysfs",
            f"{img.discard_granularity} vs {gran}",
        )
        align = dev_attr(dev, "discard_alignment")
        check(
            img.discard_alignment == (align if align < gran else 0),
            f"{name}: discard alignment = sysfs",
            f"{img.discard_alignment} vs {align}",
        )


def test_offset_linear(vg: str) -> None:
    """A dm-linear target one sector into the LV: its first whole discard unit is not at 0, and the
    backend must say where it is (blkif's discard-alignment), as blkback does."""
    lv = f"/dev/{vg}/lin"
    sectors = blockdev("--getsz", lv) - 64
    name, dev = "xb-offset", "/dev/mapper/xb-offset"
    subprocess.run(["dmsetup", "create", name, "--table", f"0 {sectors} linear {lv} 1"], check=True)
    try:
        subprocess.run(["udevadm", "settle"], check=False, capture_output=True)
        if not os.path.exists(dev):  # no udev in this Dom0: make the node from the kernel's numbers
            out = subprocess.run(["dmsetup", "info", "-c", "--noheadings", "-o", "major,minor", name],
                                 check=True, capture_output=True, text=True).stdout  # fmt: skip
            major, minor = (int(x) for x in out.strip().split(":"))
            dev = "/run/xb-offset"
            os.mknod(dev, 0o600 | stat.S_IFBLK, os.makedev(major, minor))
        with Image.open(dev) as img:
            check_geometry(img, dev, "offset-linear")
    finally:
        if dev.startswith("/run/"):
            os.unlink(dev)
        subprocess.run(["dmsetup", "remove", name], check=False)


def check_secure_discard(img: Image, dev: str, name: str) -> None:
    """Secure discard is advertised exactly when the device accepts BLKSECDISCARD."""
    last = img.size - MiB
    rc = ioctl_range(dev, BLKSECDISCARD, last, MiB)
    check(
        img.can_secure_discard == (rc == 0),
        f"{name}: secure discard advertised iff BLKSECDISCARD works",
        os.strerror(rc),
    )
    if not img.can_secure_discard:
        check(
            raises(lambda: img.discard(last, MiB, secure=True), errno.EOPNOTSUPP),
            f"{name}: secure discard refused (EOPNOTSUPP)",
        )


def check_io(img: Image, dev: str, name: str, off: int) -> bytes:
    data = os.urandom(MiB)
    img.write(off, data)
    odd = os.urandom(1000)
    img.write(off + MiB + 7, odd)  # unaligned: the driver bounces it through an aligned buffer
    img.flush()
    check(img.read(off, MiB) == data, f"{name}: 1 MiB written reads back through the driver")
    check(read_back(dev, off, MiB) == data, f"{name}: 1 MiB written reads back through another fd")
    check(read_back(dev, off + MiB + 7, 1000) == odd, f"{name}: unaligned 1000 bytes at +7 read back")
    return odd


def test_linear(vg: str) -> None:
    dev, name = f"/dev/{vg}/lin", "linear"
    with Image.open(dev) as img:
        check_geometry(img, dev, name)
        odd = check_io(img, dev, name, 4 * MiB)
        if img.can_discard:
            img.discard(4 * MiB, MiB)
            # dm-linear passes it to the loop device, which punches a hole in the tmpfs file
            check(img.read(4 * MiB, MiB) == bytes(MiB), f"{name}: discarded range reads zeros")
        check_secure_discard(img, dev, name)
        img.write_zeroes(6 * MiB, 64 * 1024)
        check(read_back(dev, 6 * MiB, 64 * 1024) == bytes(64 * 1024), f"{name}: write-zeroes reads zeros")

        # online resize: the open image sees the new size after refresh_size()
        lvm("lvextend", "-q", "-L", "+32M", f"{vg}/lin")
        new = blockdev("--getsize64", dev)
        got = img.refresh_size()
        check(
            new == 96 * MiB and got == new and img.size == new, f"{name}: refresh_size() after lvextend", f"{got} {new}"
        )
        tail = os.urandom(4096)
        img.write(new - 4096, tail)
        img.flush()
        check(read_back(dev, new - 4096, 4096) == tail, f"{name}: write in the grown tail reads back")
        check(img.read(5 * MiB + 7, 1000) == odd, f"{name}: data before the resize intact")

    with Image.open(dev, readonly=True) as img:
        check(img.readonly and not img.can_discard, f"{name}: readonly=True opens read-only, no discard")
        check(raises(lambda: img.write(0, bytes(4096)), errno.EROFS), f"{name}: write to a read-only open is EROFS")

    # a read-only LV is detected, not refused
    lvm("lvchange", "-q", "-p", "r", f"{vg}/lin")
    try:
        with Image.open(dev) as img:
            check(img.readonly, f"{name}: read-only LV (lvchange -pr) detected", f"caps={img.caps:#x}")
            check(not img.can_discard and not img.can_secure_discard, f"{name}: read-only LV advertises no discard")
            check(raises(lambda: img.write(0, bytes(4096)), errno.EROFS), f"{name}: write to a read-only LV is EROFS")
            check(img.read(5 * MiB + 7, 1000) == odd, f"{name}: read-only LV still reads")
    except StorageError as e:
        check(False, f"{name}: open a read-only LV", str(e))
    finally:
        lvm("lvchange", "-q", "-p", "rw", f"{vg}/lin")


def test_thin(vg: str) -> None:
    dev, name, lv = f"/dev/{vg}/thin", "thin", f"{vg}/thin"
    with Image.open(dev) as img:
        check_geometry(img, dev, name)
        check(img.size == 256 * MiB, f"{name}: virtual size 256 MiB (over-provisioned pool of 128 MiB)")
        check(img.can_discard, f"{name}: discard advertised")
        check_io(img, dev, name, 8 * MiB)
        before = data_percent(lv)
        chunk = os.urandom(MiB)
        for i in range(16):
            img.write(64 * MiB + i * MiB, chunk)
        img.flush()
        full = data_percent(lv)
        check(full > before, f"{name}: writing 16 MiB allocates pool space", f"{before}% -> {full}%")
        img.discard(64 * MiB, 16 * MiB)
        after = data_percent(lv)
        check(after < full, f"{name}: discard of those 16 MiB returns them to the pool", f"{full}% -> {after}%")
        check(read_back(dev, 64 * MiB, 16 * MiB) == bytes(16 * MiB), f"{name}: discarded range reads zeros")
        check(img.read(8 * MiB, 4096) != bytes(4096), f"{name}: data outside the discarded range intact")
        print(f"LVM {name}: data_percent {before} -> {full} after 16 MiB written -> {after} after discard", flush=True)
        check_secure_discard(img, dev, name)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vg", required=True)
    args = ap.parse_args()
    for t in (test_linear, test_offset_linear, test_thin):
        try:
            t(args.vg)
        except Exception as e:  # one broken case must not hide the others' results
            check(False, f"{t.__name__} raised", f"{type(e).__name__}: {e}")
    print(f"LVM failures={failures}", flush=True)
    return min(failures, 100)


if __name__ == "__main__":
    sys.exit(main())
