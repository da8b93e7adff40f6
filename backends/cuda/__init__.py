"""The CUDA backend (CuPy + our own NVRTC kernels) and the cheap question: can it run here?

`cuda_available()` answers without compiling or allocating anything, so plan validation can call
it; `CudaBackend` (backends/cuda/backend.py) is imported only when a plan selects it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backends.cuda.backend import CudaBackend

__all__ = ["CudaBackend", "cuda_available"]

INSTALL_HINT = "pip install 'plan-engine[cuda]'"


def cuda_available() -> tuple[bool, str]:
    """(True, the device) when CuPy, NVRTC, a CUDA driver and a GPU are all present; else (False, why)."""
    try:
        import cupy
    except ImportError:
        return False, f"CuPy is not installed ({INSTALL_HINT})"
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
    except Exception as e:  # noqa: BLE001 -- the NVRTC library is missing or cannot load
        return False, f"NVRTC (the CUDA runtime compiler) cannot be loaded: {e} ({INSTALL_HINT})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as e:  # no driver, or a driver older than CuPy's CUDA
        return False, f"no usable CUDA driver: {e}"
    if n == 0:
        return False, "the CUDA driver reports no GPU"
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    if props["major"] < 7:
        return False, f"{name} is sm_{props['major']}{props['minor']}; the kernels need sm_70 or newer"
    return True, f"{name} (sm_{props['major']}{props['minor']}), {n} device(s)"


def __getattr__(name: str) -> Any:
    if name == "CudaBackend":
        from backends.cuda.backend import CudaBackend
        return CudaBackend
    raise AttributeError(name)
