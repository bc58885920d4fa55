"""cffi build script for xenblk._rbd: the Ceph RBD image driver, linked against librbd/librados.

A module of its own, not part of xenblk._storage: a host without librbd1 (most of them) still
loads the file drivers; only opening an `rbd:` image needs this one (xenblk/rbd.py imports it then).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _build import make_ffi

ffibuilder = make_ffi(
    "xenblk._rbd",
    areas=["common", "rbd"],
    libraries=["rbd", "rados"],
    header='#include "xb_storage.h"\n#include "rbd_api.h"\n',
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
