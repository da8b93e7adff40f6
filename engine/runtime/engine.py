"""The engine core one plan runs on, built from plain data: a model on its backend, its KV
arena, and a worker (scheduler policy + KV manager + executor) stepping requests.

The control plane converts a stored plan into an `EngineSpec` and asks for an `Engine`; it
never reaches below this module. A new plan version that changes only live settings
(policy, limits, execution settings, profiling, the chat template) is applied with `Engine.apply` between two
steps; anything else (model, backend, weights, arena, context) is a new Engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from backends import BACKENDS, create_backend
from backends.base import OpProfile, ProfiledBackend
from engine.errors import InvalidArgument
from engine.execution import DEFAULT_EXECUTION, ExecutionSettings
from engine.memory.paged import BlockArena
from engine.runtime.generate import LoadedModel
from engine.runtime.worker import EngineWorker, Final, WorkerLimits
from engine.scheduler.base import create_policy
from engine.scheduler.power import PowerGovernor
from engine.telemetry.energy import PowerMeter

KV_DTYPES = {"f32": np.float32, "f16": np.float16}


def available_backends() -> dict[str, tuple[str, ...]]:
    """The backends that can run on this machine, each with its weight formats."""
    available: dict[str, tuple[str, ...]] = {}
    for name in BACKENDS:
        try:
            backend = create_backend(name, DEFAULT_EXECUTION.kernels)
        except InvalidArgument:
            continue
        available[name] = tuple(backend.weight_formats)
        backend.close()
    return available


@dataclass(frozen=True)
class EngineSpec:
    """Everything an Engine is built from; each field is one plan field, resolved."""

    path: Path  # the GGUF file
    backend: str  # "cpu", "cuda"
    weights: str  # "f32", "native", ...
    context_length: int | None  # None: the model's own
    batch_invariant: bool
    execution: ExecutionSettings
    kv_blocks: int
    kv_block_size: int
    kv_dtype: str  # a key of KV_DTYPES
    policy: str  # a scheduler policy name
    limits: WorkerLimits
    prefix_caching: bool
    cache_salt: bytes  # what cached KV blocks are keyed by besides their tokens
    profiling: bool
    chat_template: str = ""  # a llama.cpp built-in template name; "": the file's own

    def needs_new_engine(self, other: EngineSpec) -> bool:
        """Whether going to `other` needs the model loaded again (else `Engine.apply`)."""
        keep = ("path", "backend", "weights", "context_length", "batch_invariant", "kv_blocks", "kv_block_size",
                "kv_dtype", "prefix_caching", "cache_salt")
        return any(getattr(self, name) != getattr(other, name) for name in keep)


class Engine:
    """One EngineSpec made real. `retire()` finishes what is in flight and releases the model."""

    def __init__(self, spec: EngineSpec, meter: PowerMeter,
                 on_finish: Callable[[Final], None] = lambda final: None,
                 on_lost: Callable[[str], None] = lambda reason: None):
        self.spec = spec
        self.model = LoadedModel(spec.path, backend=spec.backend, weights=spec.weights,
                                 context_length=spec.context_length, batch_invariant=spec.batch_invariant,
                                 settings=spec.execution.kernels, chat_template=spec.chat_template)
        arena = BlockArena.for_model(self.model.config, spec.kv_blocks, spec.kv_block_size, KV_DTYPES[spec.kv_dtype])
        self.profile: OpProfile | None = None
        self._backend = self.model.transformer.backend  # unprofiled
        self._set_profiling(spec.profiling)
        self.worker = EngineWorker(self.model, create_policy(spec.policy, spec.execution), spec.limits, arena=arena,
                                   governor=PowerGovernor(meter, spec.limits.max_watts), on_finish=on_finish,
                                   on_lost=on_lost, prefix_caching=spec.prefix_caching, cache_salt=spec.cache_salt)

    def apply(self, spec: EngineSpec) -> None:
        """Take a spec that differs only in live settings; they apply from the next step."""
        assert not self.spec.needs_new_engine(spec), "apply() takes live settings only"
        self._backend.configure(spec.execution.kernels)
        self.worker.set_policy(create_policy(spec.policy, spec.execution))
        self.worker.set_limits(spec.limits)
        if spec.chat_template != self.spec.chat_template:
            self.model.set_chat_template(spec.chat_template)
        if spec.profiling != self.spec.profiling:
            self._set_profiling(spec.profiling)
        self.spec = spec

    def _set_profiling(self, enabled: bool) -> None:
        """Time every backend op; the profile restarts when it is switched on."""
        if enabled:
            self.profile = OpProfile()
            self.model.transformer.backend = ProfiledBackend(self._backend, self.profile)
        else:
            self.profile = None
            self.model.transformer.backend = self._backend

    def retire(self, grace_s: float | None = None) -> None:
        """Finish in-flight requests (up to `grace_s`), then release the model."""
        self.worker.drain(grace_s)
        self.worker.close()
        self.model.close()
