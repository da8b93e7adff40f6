"""Numeric backends behind one contract (`backends.base.Backend`)."""

from __future__ import annotations

from backends.base import Backend
from engine.errors import InvalidArgument

BACKENDS = ("cpu", "cuda")


def create_backend(name: str) -> Backend:
    """The backend a plan names; a clear error if it cannot run here."""
    if name == "cpu":
        from backends.cpu.backend import CpuBackend
        return CpuBackend()
    if name == "cuda":
        raise InvalidArgument("backend 'cuda' is not available in this build yet (see docs/)", field="backend")
    raise InvalidArgument(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})", field="backend")
