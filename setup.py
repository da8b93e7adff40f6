"""Builds the optional C extension `backends.cpu._ops_avx2`; the project metadata lives in pyproject.toml.

The extension is optional (`optional=True`): without a working C compiler the install
still succeeds, and the CPU backend falls back to numpy with a logged warning
(backends/cpu/quantized.py). It needs only the C compiler and Python headers: no numpy
headers, no OpenMP (its thread pool is plain pthreads).
"""

from setuptools import Extension, setup

SOURCES = ("module", "threadpool", "qmatmul", "qmatmul_vnni", "dequant", "ops", "fmatmul")
HEADERS = ("ops_avx2", "simd", "x8", "x8_kernels")

ops_avx2 = Extension(
    "backends.cpu._ops_avx2",
    sources=[f"backends/cpu/ops_avx2/{name}.c" for name in SOURCES],
    depends=[f"backends/cpu/ops_avx2/{name}.h" for name in HEADERS],
    # AVX2/FMA/F16C are enabled per kernel file with `#pragma GCC target`, not -mavx2, so the
    # module itself runs on any x86-64 and can report that the CPU lacks AVX2.
    # -ffp-contract=off keeps dequantization bit-exact with numpy (no implicit FMA).
    extra_compile_args=["-O3", "-pthread", "-ffp-contract=off"],
    extra_link_args=["-pthread"],
    optional=True,
)

setup(ext_modules=[ops_avx2])
