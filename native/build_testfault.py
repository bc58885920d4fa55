"""cffi build script for tests._xbfault: the storage fault-injection wrapper (native/testing/).

Test-only: built in place by native/build.py for the test suite, never by setup.py or the Debian
package, so no product module can reach it. It wraps any struct xb_image through its ops table."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _build import make_ffi

ffibuilder = make_ffi(
    "tests._xbfault",
    areas=["testing"],
    libraries=[],
    header='#include "xb_storage.h"\n#include "fault_api.h"\n',
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
