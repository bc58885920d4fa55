"""setuptools glue: cffi_modules makes `pip install .` compile native/."""

from setuptools import setup

setup(
    cffi_modules=[
        "native/build_storage.py:ffibuilder",
        "native/build_dataplane.py:ffibuilder",
        "native/build_simguest.py:ffibuilder",
    ],
)
