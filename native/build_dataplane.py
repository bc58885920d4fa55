"""cffi build script for xenblk._dataplane: blkif rings, platform (real/sim), io_uring, statistics, NBD export."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _build import make_ffi

ffibuilder = make_ffi(
    "xenblk._dataplane",
    areas=["common", "platform", "dataplane", "nbd"],
    libraries=["uring"],
    header='#include "xb_dataplane.h"\n#include "dataplane_api.h"\n#include "nbd_api.h"\n',
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
