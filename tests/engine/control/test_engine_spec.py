"""A plan as the engine core sees it (control_plane.engine_spec), and which changes of a new
version need the model loaded again (EngineSpec.needs_new_engine) and which apply live."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.control.control_plane import engine_spec
from engine.control.plans import ModelInfo, PlanEnvironment, normalize
from protos.planengine.v1 import plan_pb2

ENV = PlanEnvironment.with_models({"smol": ModelInfo(8192, 30, 3, 64)}, backends={"cpu": ("f32",)},
                                  max_kv_bytes=4 << 30)
BASE = normalize(plan_pb2.ExecutionPlan(id="default", model="smol"), ENV)


def _changed(path: str, value) -> plan_pb2.ExecutionPlan:
    plan = plan_pb2.ExecutionPlan()
    plan.CopyFrom(BASE)
    *parents, leaf = path.split(".")
    target = plan
    for p in parents:
        target = getattr(target, p)
    setattr(target, leaf, value)
    return plan


def _reload(plan: plan_pb2.ExecutionPlan, path: Path = Path("smol.gguf")) -> bool:
    return engine_spec(BASE, Path("smol.gguf")).needs_new_engine(engine_spec(plan, path))


def test_the_spec_carries_every_field_the_engine_needs():
    spec = engine_spec(BASE, Path("smol.gguf"))
    assert (spec.backend, spec.weights, spec.policy, spec.kv_dtype) == ("cpu", "f32", "fifo", "f32")
    assert spec.kv_blocks == BASE.kv_cache.num_blocks and spec.limits.max_queue == BASE.batching.max_queue
    assert spec.prefix_caching  # unset means on
    assert spec.execution.gemm_rows_x8 == BASE.execution.gemm_rows_x8


@pytest.mark.parametrize("path,value", [
    ("model", "other"), ("backend", plan_pb2.BACKEND_CUDA), ("weights", plan_pb2.WEIGHT_FORMAT_F16),
    ("kv_cache.num_blocks", 5), ("kv_cache.dtype", plan_pb2.KV_CACHE_DTYPE_F16), ("kv_cache.block_size", 32),
    ("kv_cache.prefix_caching", False), ("limits.context_length", 100), ("determinism.batch_invariant", True)])
def test_these_changes_load_a_new_engine(path, value):
    assert _reload(_changed(path, value)), path


@pytest.mark.parametrize("path,value", [
    ("batching.max_batch_size", 2), ("scheduler_policy", plan_pb2.SCHEDULER_POLICY_LATENCY), ("sampling.top_p", 0.5),
    ("limits.max_watts", 30.0), ("description", "x"), ("profiling", True), ("execution.threads", 1),
    ("execution.gemm_rows_x8", 8), ("execution.energy_max_wait_ms", 10)])
def test_these_changes_apply_live(path, value):
    assert not _reload(_changed(path, value)), path


def test_another_file_for_the_same_name_is_a_new_engine():
    assert _reload(BASE, Path("elsewhere/smol.gguf"))
