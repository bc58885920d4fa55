"""cffi build script for xenblk._storage: raw, block-device and qcow2 image drivers."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _build import make_ffi

ffibuilder = make_ffi(
    "xenblk._storage",
    areas=["common", "storage"],
    libraries=["z", "zstd"],
    header='#include "xb_storage.h"\n#include "storage_api.h"\n',
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
