"""Build the two native modules with cffi (out-of-line API mode).

refimpl._kernels  <- csrc/kernels/*.c  (matmul, softmax, attention, norms, ...)
refimpl._clock    <- csrc/clock/*.c    (fenced cycle counter, timing loops, probes)

Metadata lives in pyproject.toml; this file only names the cffi builders.
"""
from setuptools import setup

setup(cffi_modules=["csrc/build.py:kernels_ffi", "csrc/build.py:clock_ffi"])
