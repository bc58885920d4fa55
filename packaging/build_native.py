"""Compile xenblk's native modules for the interpreter running this script (the target release's
system python3, e.g. /usr/bin/python3) into OUTDIR/xenblk/, for the Debian package.

Not native/build.py: that one installs into this checkout's xenblk/ for the .venv's interpreter,
which the tests use; a package build must not replace modules other processes have mapped.
The modules are named with this interpreter's EXT_SUFFIX (e.g. .cpython-311-x86_64-linux-gnu.so):
a package built on Debian 12 (Python 3.11) is for Debian 12 only; build it again on Debian 13.

`python3 packaging/build_native.py OUTDIR [MODULE...]`: the xenblk package's modules by default; `_rbd`
(librbd, for the xenblk-rbd package) only when named.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

NATIVE = Path(__file__).resolve().parent.parent / "native"
SCRIPTS = {"_storage": "build_storage.py", "_dataplane": "build_dataplane.py", "_simguest": "build_simguest.py",
           "_rbd": "build_rbd.py"}  # fmt: skip
DEFAULT = ["_storage", "_dataplane", "_simguest"]


def main(outdir: Path, names: list[str]) -> None:
    os.environ["XENBLK_ABS_PATHS"] = "1"  # sources named by absolute path: cffi compiles in a temporary dir
    os.environ.pop("XENBLK_SANITIZE", None)  # a package never carries sanitizer builds
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    dest = outdir / "xenblk"
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        script = SCRIPTS[name]
        spec = importlib.util.spec_from_file_location(f"xb_pkg_{name}", NATIVE / script)
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        with tempfile.TemporaryDirectory(prefix=f"xenblk-deb-{name}-") as tmp:
            out = Path(mod.ffibuilder.compile(tmpdir=tmp, verbose=False))
            shutil.copyfile(out, dest / f"{name}{suffix}")
        print(f"built {dest / (name + suffix)}")


if __name__ == "__main__":
    if len(sys.argv) < 2 or not set(sys.argv[2:]) <= set(SCRIPTS):
        sys.exit(f"usage: python3 packaging/build_native.py OUTDIR [{'|'.join(SCRIPTS)}...]")
    main(Path(sys.argv[1]), sys.argv[2:] or DEFAULT)
