"""cffi build script for xenblk._simguest: the simulated blkfront's data path."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _build import make_ffi

ffibuilder = make_ffi(
    "xenblk._simguest",
    areas=["common", "simguest"],
    libraries=[],
    header='#include "xb_blkif.h"\n#include "simguest_api.h"\n',
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
