"""Where the kernels run: a CUDA GPU through CuPy, or (for checks) an OpenCL device in `opencl.py`.

A `Device` owns memory and launches kernels of `kernels.ProgramSpec`s by name on a 2-D grid of
1-D groups, exactly as CUDA does. `ops.KernelOps` and `backend.CudaBackend` are written against
this interface only, so the same launch geometry and argument marshalling run on the GPU and, in CI,
on PoCL or Oclgrind.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from backends.cuda.dialect import render
from backends.cuda.kernels import ProgramSpec


class Device(Protocol):
    name: str
    has_gemm: bool  # a dense float32 GEMM (cuBLAS) for prefill

    def upload(self, a: np.ndarray) -> Any: ...

    def empty(self, shape: Sequence[int], dtype: Any) -> Any: ...

    def to_host(self, a: Any) -> np.ndarray: ...

    def is_array(self, a: Any) -> bool: ...

    def launch(self, program: ProgramSpec, kernel: str, grid: tuple[int, int], group: int,
               args: Sequence[Any]) -> None: ...

    def synchronize(self) -> None: ...


# Warning 177 is "declared but never referenced": every program carries all dialect helpers.
NVRTC_OPTIONS = ("-std=c++17", "--diag-suppress=177")


class CupyDevice:
    """One CUDA GPU; kernels compiled by NVRTC (through CuPy's RawModule, cached on disk by CuPy)."""

    has_gemm = True

    def __init__(self, device_id: int = 0):
        import cupy
        self.cp = cupy
        self.device_id = device_id
        self._device = cupy.cuda.Device(device_id)
        self._device.use()
        props = cupy.cuda.runtime.getDeviceProperties(device_id)
        self.name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        self.compute_capability = f"sm_{props['major']}{props['minor']}"
        self._modules: dict[str, Any] = {}
        self._functions: dict[tuple[str, str], Any] = {}

    def upload(self, a: np.ndarray) -> Any:
        return self.cp.asarray(np.ascontiguousarray(a))

    def empty(self, shape: Sequence[int], dtype: Any) -> Any:
        return self.cp.empty(tuple(shape), dtype=dtype)

    def to_host(self, a: Any) -> np.ndarray:
        return self.cp.asnumpy(a)

    def is_array(self, a: Any) -> bool:
        return isinstance(a, self.cp.ndarray)

    def _function(self, program: ProgramSpec, kernel: str) -> Any:
        fn = self._functions.get((program.name, kernel))
        if fn is None:
            module = self._modules.get(program.name)
            if module is None:
                code = render(program.source, "cuda", program.defines)
                module = self.cp.RawModule(code=code, options=NVRTC_OPTIONS, backend="nvrtc")
                self._modules[program.name] = module
            fn = self._functions[(program.name, kernel)] = module.get_function(kernel)
        return fn

    def launch(self, program: ProgramSpec, kernel: str, grid: tuple[int, int], group: int,
               args: Sequence[Any]) -> None:
        self._function(program, kernel)((grid[0], grid[1], 1), (group, 1, 1), tuple(args))

    def gemm_nt(self, x: Any, w: Any) -> Any:
        """x (n, k) @ w (m, k).T on cuBLAS."""
        return self.cp.matmul(x, w.T)

    def synchronize(self) -> None:
        self._device.synchronize()

    def memory_info(self) -> dict[str, int]:
        free, total = self.cp.cuda.runtime.memGetInfo()
        pool = self.cp.get_default_memory_pool()
        return {"device_total_bytes": int(total), "device_free_bytes": int(free),
                "pool_used_bytes": int(pool.used_bytes()), "pool_held_bytes": int(pool.total_bytes())}

    def release(self) -> None:
        self.synchronize()
        self.cp.get_default_memory_pool().free_all_blocks()
