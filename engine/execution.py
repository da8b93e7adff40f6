"""The plan's `execution` section: how the engine computes a plan, with the measured defaults.

Every setting that changes speed but never the tokens lives here as data: the CPU kernels'
thread pool, which rows take which matmul path, the CUDA prefill threshold, the
energy-balanced policy's waiting rule. The proto (`Execution` in plan.proto) declares the
fields; `DEFAULT_EXECUTION` is what `normalize` writes into a plan that leaves one unset,
and `resolve(plan)` is the frozen value the control plane hands down: `kernels` to the
backend (`create_backend`, `Backend.configure`), `energy_*` to the scheduler's policy.

A leaf of the engine: it imports only the backend contract and the protos.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from backends.base import KernelSettings
from protos.planengine.v1 import plan_pb2


@dataclass(frozen=True)
class ExecutionSettings:
    """The `execution` section resolved: every field set. The defaults are measurements on
    the 2-core Zen 4 host (docs/02_performance.md, docs/03_quantized_cpu.md); each comment
    says what the setting trades."""

    # Kernel pool size; 0: every CPU this process may run on. Fewer leave cores to other
    # processes at the cost of throughput.
    threads: int = 0
    # f32 weights: the C float kernel takes 0.4-0.9x OpenBLAS's time up to 64 rows; OpenBLAS
    # is 3-15 % faster from 96 rows. 0: OpenBLAS for every batch.
    f32_kernel_rows: int = 64
    # x8 block weights (every block type): the int8 kernels beat dequantize + OpenBLAS at every
    # batch size measured (97 against 44-67 GMAC/s at 128-512 rows): 0, never GEMM.
    gemm_rows_x8: int = 0
    # CUDA: the fused dequantize-matvec kernel up to this many tokens, dequantize + GEMM above.
    cuda_prefill_tokens: int = 32
    # Energy-balanced policy: new prompts wait for this many to share a step ...
    energy_min_batch: int = 4
    # ... or until the oldest waited this long (ms): joules per token against time to first token.
    energy_max_wait_ms: int = 50
    # Decode streams every weight once a step: an idle kernel thread reads up to this many KiB of
    # the next matmul's weights while the caller runs the ops between matmuls (1B Q4_K_M decode:
    # +0-6 %, docs/03). More than the caches hold is read twice. 0: off.
    prefetch_next_kib: int = 8192

    @property
    def kernels(self) -> KernelSettings:
        return KernelSettings(threads=self.threads, f32_kernel_rows=self.f32_kernel_rows,
                              gemm_rows_x8=self.gemm_rows_x8,
                              cuda_prefill_tokens=self.cuda_prefill_tokens,
                              prefetch_next_kib=self.prefetch_next_kib)


DEFAULT_EXECUTION = ExecutionSettings()
FIELDS = tuple(f.name for f in fields(ExecutionSettings))
# Upper bounds validation applies (a plan outside them is refused, naming the field).
BOUNDS = {"threads": 1024, "f32_kernel_rows": 65536, "gemm_rows_x8": 65536,
          "cuda_prefill_tokens": 65536, "energy_min_batch": 1024, "energy_max_wait_ms": 60_000,
          "prefetch_next_kib": 1 << 20}


def resolve(execution: plan_pb2.Execution) -> ExecutionSettings:
    """The settings a plan's section declares, the default for each field it leaves unset."""
    return ExecutionSettings(**{name: getattr(execution, name) for name in FIELDS if execution.HasField(name)})


def fill_defaults(execution: plan_pb2.Execution) -> None:
    """Write the default into every unset field (what `normalize` stores)."""
    for name in FIELDS:
        if not execution.HasField(name):
            setattr(execution, name, getattr(DEFAULT_EXECUTION, name))


def kernel_settings(**overrides: int) -> KernelSettings:
    """The default kernel settings with some fields replaced (bench flags, tests)."""
    return replace(DEFAULT_EXECUTION, **overrides).kernels
