"""The kernels on an OpenCL CPU device: PoCL to execute them, Oclgrind to look for races.

Used by the kernel checks (`kernel_check.py`, tests) so that CI, which has no GPU, still runs the
very kernel sources, launch geometry and argument order of the CUDA backend. A CUDA grid
(gx, gy) of groups of `group` threads becomes the NDRange (gx * group, gy) with local size
(group, 1). Arrays are `pyopencl.array.Array`s, always contiguous and starting at their buffer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from backends.cuda.dialect import render
from backends.cuda.kernels import ProgramSpec

PLATFORMS = {"pocl": "Portable Computing Language", "oclgrind": "Oclgrind"}


def opencl_available(platform: str = "pocl") -> tuple[bool, str]:
    """Whether pyopencl and the named platform (PoCL or Oclgrind) can be used here, and why not."""
    try:
        import pyopencl as cl
    except ImportError:
        return False, "pyopencl is not installed (pip install 'plan-engine[kernels-check]')"
    try:
        names = [p.name for p in cl.get_platforms()]
    except cl.Error as e:  # no ICD at all
        return False, f"no OpenCL platform: {e}"
    if not any(PLATFORMS[platform] in n for n in names):
        return False, f"OpenCL platform {PLATFORMS[platform]!r} not found (have: {names or 'none'})"
    return True, PLATFORMS[platform]


class OpenCLDevice:
    has_gemm = False

    def __init__(self, platform: str = "pocl"):
        import pyopencl as cl
        import pyopencl.array as cla
        self.cl, self.cla = cl, cla
        found = [p for p in cl.get_platforms() if PLATFORMS[platform] in p.name]
        if not found:
            raise RuntimeError(opencl_available(platform)[1])
        self.platform = platform
        # Oclgrind's uninitialised-value checker stops at LLVM's `freeze`, which the optimiser
        # inserts (e.g. pairing a division with its remainder); unoptimised code has none.
        self.build_options = ["-cl-opt-disable"] if platform == "oclgrind" else []
        dev = found[0].get_devices()[0]
        self.name = f"{found[0].name} / {dev.name}"
        self.ctx = cl.Context([dev])
        self.queue = cl.CommandQueue(self.ctx)
        self._programs: dict[str, Any] = {}
        self._kernels: dict[tuple[str, str], Any] = {}
        self.build_seconds: dict[str, float] = {}

    def upload(self, a: np.ndarray) -> Any:
        return self.cla.to_device(self.queue, np.ascontiguousarray(a))

    def empty(self, shape: Sequence[int], dtype: Any) -> Any:
        return self.cla.empty(self.queue, tuple(shape), dtype)

    def to_host(self, a: Any) -> np.ndarray:
        return a.get()

    def is_array(self, a: Any) -> bool:
        return isinstance(a, self.cla.Array)

    def program(self, spec: ProgramSpec) -> Any:
        prg = self._programs.get(spec.name)
        if prg is None:
            start = time.perf_counter()
            prg = self.cl.Program(self.ctx, render(spec.source, "opencl", spec.defines)).build(self.build_options)
            self.build_seconds[spec.name] = time.perf_counter() - start
            self._programs[spec.name] = prg
        return prg

    def launch(self, program: ProgramSpec, kernel: str, grid: tuple[int, int], group: int,
               args: Sequence[Any]) -> None:
        fn = self._kernels.get((program.name, kernel))
        if fn is None:
            fn = self._kernels[(program.name, kernel)] = self.cl.Kernel(self.program(program), kernel)
        cl_args = [a.base_data if isinstance(a, self.cla.Array) else a for a in args]
        for a in args:
            if isinstance(a, self.cla.Array) and a.offset:
                raise ValueError("OpenCL kernel arguments must start at their buffer (offset 0)")
        fn(self.queue, (grid[0] * group, grid[1]), (group, 1), *cl_args)

    def synchronize(self) -> None:
        self.queue.finish()


class MirroredOpenCLDevice(OpenCLDevice):
    """Arrays in host memory (numpy) standing in for CUDA device memory, kernels on OpenCL.

    Each launch copies the bytes from every array argument's first element to the end of its
    buffer to the OpenCL device, and copies back the bytes the kernel changed. So an argument may
    be any view, as a CUDA pointer may point into the middle of an allocation: this runs the CUDA
    backend's resident mode (`cp` is numpy here) on the CPU, views into the KV cache and strided
    q/k slices included. Slow, and for tests only.
    """

    def __init__(self, platform: str = "pocl"):
        super().__init__(platform)
        self.cp = np  # the backend's array module in resident mode

    def upload(self, a: np.ndarray) -> np.ndarray:
        return np.array(a, order="C")

    def empty(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        return np.empty(tuple(shape), dtype=dtype)

    def to_host(self, a: Any) -> np.ndarray:
        return np.array(a)

    def is_array(self, a: Any) -> bool:
        return isinstance(a, np.ndarray)

    @staticmethod
    def _tail_bytes(a: np.ndarray) -> np.ndarray:
        """The bytes of a's allocation from a's first element on (what a CUDA pointer to it reaches)."""
        base = a
        while isinstance(base.base, np.ndarray):
            base = base.base
        assert base.flags.c_contiguous, "a mirrored array must view a contiguous allocation"
        start = a.__array_interface__["data"][0] - base.__array_interface__["data"][0]
        return base.reshape(-1).view(np.uint8)[start:]

    def launch(self, program: ProgramSpec, kernel: str, grid: tuple[int, int], group: int,
               args: Sequence[Any]) -> None:
        host = [self._tail_bytes(a) if isinstance(a, np.ndarray) else None for a in args]
        mirrored = [self.cla.to_device(self.queue, h) if h is not None else a for h, a in zip(host, args)]
        super().launch(program, kernel, grid, group, mirrored)
        for h, m in zip(host, mirrored):
            if h is not None:
                after = m.get()
                changed = after != h
                h[changed] = after[changed]
