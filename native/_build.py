"""Shared helper for the per-library cffi build scripts.

Each C library of xenblk (storage, dataplane, simguest) has one build script
that names its source areas; a source area is a folder under native/ holding
*.c files and an api.cdef with the declarations Python may call.
"""

from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

NATIVE = Path(__file__).resolve().parent
ROOT = NATIVE.parent

CFLAGS = ["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-O2", "-g", "-D_GNU_SOURCE", "-fno-strict-aliasing"]


def _rel(p: Path) -> str:
    # setuptools wants source paths relative to the project root; the in-place
    # build (native/build.py) compiles from a temporary directory and wants them absolute.
    if os.environ.get("XENBLK_ABS_PATHS"):
        return str(p)
    try:
        return os.path.relpath(p, os.getcwd())
    except ValueError:
        return str(p)


def make_ffi(module: str, areas: list[str], libraries: list[str], header: str) -> FFI:
    ffi = FFI()
    cdef_parts = []
    sources: list[str] = []
    for area in areas:
        d = NATIVE / area
        cdef = d / "api.cdef"
        if cdef.exists():
            cdef_parts.append(cdef.read_text())
        sources += [_rel(c) for c in sorted(d.glob("*.c"))]
    ffi.cdef("\n".join(cdef_parts))
    extra = list(CFLAGS)
    link = []
    san = os.environ.get("XENBLK_SANITIZE")
    if san:
        extra += [f"-fsanitize={san}", "-fno-omit-frame-pointer"]
        link += [f"-fsanitize={san}"]
    ffi.set_source(
        module,
        header,
        sources=sources,
        include_dirs=[_rel(NATIVE / "include")] + [_rel(NATIVE / a) for a in areas],
        libraries=[*libraries, "pthread"],
        extra_compile_args=extra,
        extra_link_args=link,
    )
    return ffi
