"""Only what pyproject.toml cannot say: the cffi extension (out-of-line API mode)."""

from setuptools import setup

setup(cffi_modules=["daemon/linux/_syscalls_build.py:ffibuilder"])
