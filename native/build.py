"""Build the native modules in place (xenblk/_*.so) for development and tests.

`pip install .` builds the same modules through setuptools' cffi_modules; this
script is the fast path `make native` uses: it rebuilds a module only when a
file it is made from changed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import sysconfig
from pathlib import Path

NATIVE = Path(__file__).resolve().parent
ROOT = NATIVE.parent
MODULES = {
    "_storage": ("build_storage.py", ["common", "storage"]),
    "_dataplane": ("build_dataplane.py", ["common", "platform", "dataplane", "nbd"]),
    "_simguest": ("build_simguest.py", ["common", "simguest"]),
    "_rbd": ("build_rbd.py", ["common", "rbd"]),
    # test-only (the storage fault layer): built into tests/, never packaged
    "_xbfault": ("build_testfault.py", ["testing"]),
}
PACKAGE_OF = {"_xbfault": "tests"}


def _digest(script: str, areas: list[str]) -> str:
    h = hashlib.sha256()
    files = [NATIVE / script, NATIVE / "_build.py", *sorted((NATIVE / "include").glob("*"))]
    for a in areas:
        files += sorted((NATIVE / a).glob("*"))
    for f in files:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    h.update(os.environ.get("XENBLK_SANITIZE", "").encode())
    return h.hexdigest()


def build(name: str, force: bool = False) -> None:
    os.environ["XENBLK_ABS_PATHS"] = "1"
    script, areas = MODULES[name]
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    target = ROOT / PACKAGE_OF.get(name, "xenblk") / f"{name}{suffix}"
    stamp = ROOT / "build" / f"{name}.stamp"
    digest = _digest(script, areas)
    if not force and target.exists() and stamp.exists() and stamp.read_text() == digest:
        return
    spec = importlib.util.spec_from_file_location(f"xb_build_{name}", NATIVE / script)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tmp = ROOT / "build" / "cffi" / name
    tmp.mkdir(parents=True, exist_ok=True)
    out = Path(mod.ffibuilder.compile(tmpdir=str(tmp), verbose=False))
    # Install as a new file, never over the old one: processes that have the old module mapped
    # (tests, daemons running while someone rebuilds) would crash at exit on rewritten pages.
    staged = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.copy2(out, staged)
    os.replace(staged, target)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(digest)
    print(f"built {target.relative_to(ROOT)}")


if __name__ == "__main__":
    names = [a for a in sys.argv[1:] if not a.startswith("-")] or list(MODULES)
    for n in names:
        build(n, force="--force" in sys.argv)
