"""Numeric backends behind one contract (`backends.base.Backend`)."""

from __future__ import annotations

from backends.base import Backend, KernelSettings
from engine.errors import InvalidArgument

BACKENDS = ("cpu", "cuda")


def create_backend(name: str, settings: KernelSettings) -> Backend:
    """The backend a plan names, with its kernel settings; a clear error if it cannot run here."""
    if name == "cpu":
        from backends.cpu.backend import CpuBackend
        return CpuBackend(settings)
    if name == "cuda":
        from backends.cuda import cuda_available
        ok, reason = cuda_available()
        if not ok:
            raise InvalidArgument(f"backend 'cuda' cannot run here: {reason}", field="backend")
        from backends.cuda.backend import CudaBackend
        # activations and the runtime's own caches stay in device memory: one host round trip a
        # step instead of one an op (the same kernels, the same numbers; docs/04_cuda_backend.md)
        return CudaBackend(settings, resident=True)
    raise InvalidArgument(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})", field="backend")
