"""setuptools glue: cffi_modules makes `pip install .` compile native/."""

from pathlib import Path

from setuptools import setup

MODULES = [
    "native/build_storage.py:ffibuilder",
    "native/build_dataplane.py:ffibuilder",
    "native/build_simguest.py:ffibuilder",
]
# The RBD driver only where librbd-dev is installed: everything else works without it.
if Path("/usr/include/rbd/librbd.h").exists():
    MODULES.append("native/build_rbd.py:ffibuilder")

setup(cffi_modules=MODULES)
