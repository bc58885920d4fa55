"""Virtual-device names <-> blkif device ids (`virtual-device`), as the Xen toolstack numbers them.

Only whole xvd disks: `xvdX` with index i < 16 is `202 << 8 | i << 4`; i >= 16 uses the extended
scheme `1 << 28 | i << 8`. Letters go on like spreadsheet columns (xvdz, xvdaa, ...). Partitions
(`xvdb1`) and other families (hd, sd) are refused: they are not disks xenblk attaches.
"""

from __future__ import annotations

import re

from xenblk.errors import XenblkError

XVD_MAJOR = 202
EXTENDED_FLAG = 1 << 28
MAX_DISK_INDEX = (1 << 20) - 1  # the extended scheme keeps 20 bits for the disk index
_NAME = re.compile(r"xvd([a-z]+)")


class VdevError(XenblkError):
    pass


def _letters_to_index(letters: str) -> int:
    n = 0
    for c in letters:
        n = n * 26 + (ord(c) - ord("a") + 1)
    return n - 1


def _index_to_letters(i: int) -> str:
    out = ""
    i += 1
    while i > 0:
        i, r = divmod(i - 1, 26)
        out = chr(ord("a") + r) + out
    return out


def vdev_to_devid(vdev: str) -> int:
    """`xvdb` -> 51728. Refuses partitions, other names and out-of-range disks."""
    m = _NAME.fullmatch(vdev)
    if m is None:
        if re.fullmatch(r"xvd[a-z]+\d+", vdev):
            raise VdevError(f"{vdev!r} is a partition; attach whole disks (e.g. {vdev.rstrip('0123456789')})")
        raise VdevError(f"bad virtual device name {vdev!r}: expected xvdX (xvda, xvdb, ..., xvdaa, ...)")
    i = _letters_to_index(m.group(1))
    if i > MAX_DISK_INDEX:
        raise VdevError(f"virtual device {vdev!r} is beyond the last disk index {MAX_DISK_INDEX}")
    return XVD_MAJOR << 8 | i << 4 if i < 16 else EXTENDED_FLAG | i << 8


def devid_to_vdev(devid: int) -> str:
    """51728 -> `xvdb`. Refuses ids of partitions or of non-xvd majors."""
    if devid < 0 or devid >= 1 << 29:
        raise VdevError(f"device id {devid} out of range")
    if devid & EXTENDED_FLAG:
        i, part = (devid >> 8) & MAX_DISK_INDEX, devid & 0xFF
        if i < 16:
            raise VdevError(f"device id {devid}: disk index {i} must use the short xvd scheme")
    else:
        if devid >> 8 != XVD_MAJOR:
            raise VdevError(f"device id {devid} is not an xvd disk (major {devid >> 8}, want {XVD_MAJOR})")
        i, part = (devid >> 4) & 0xF, devid & 0xF
    if part:
        raise VdevError(f"device id {devid} is partition {part} of a disk, not a disk")
    return "xvd" + _index_to_letters(i)
