"""The plan's `execution` section: schema evolution keeps stored hashes, settings validate,
and a new version's settings reach the running engine without a reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import json_format

from engine import execution
from engine.control.control_plane import ControlPlane
from engine.control.plan_store import SqlitePlanStore
from engine.control.plans import LATER_FIELDS, InvalidPlan, PlanEnvironment, normalize, plan_hash, prepare
from protos.planengine.v1 import plan_pb2

FIXTURES = Path(__file__).parents[2] / "fixtures"


def _stored_v1() -> dict[str, tuple[plan_pb2.ExecutionPlan, str]]:
    cases = json.loads((FIXTURES / "plan_hashes_v1.json").read_text())
    return {name: (json_format.ParseDict(c["plan"], plan_pb2.ExecutionPlan()), c["hash"]) for name, c in cases.items()}


@pytest.mark.parametrize("name", sorted(_stored_v1()))
def test_plans_stored_before_the_execution_section_keep_their_hash(name):
    plan, stored_hash = _stored_v1()[name]
    assert plan_hash(plan) == stored_hash
    # normalize now writes every execution default in; the canonical form leaves them out
    filled = normalize(plan)
    assert filled.HasField("execution") and filled.execution.HasField("f32_kernel_rows")
    if name != "empty":  # the others were stored normalized
        assert plan_hash(filled) == stored_hash


def test_every_execution_field_is_a_later_field_with_its_introduction_value():
    fields = {f.name for f in plan_pb2.Execution.DESCRIPTOR.fields}
    assert {p.split(".")[1] for p in LATER_FIELDS if p.startswith("execution.")} == fields == set(execution.FIELDS)
    assert all(f.has_presence for f in plan_pb2.Execution.DESCRIPTOR.fields)  # proto3 optional: set vs unset


def test_a_changed_execution_setting_changes_the_hash_and_its_default_does_not():
    base = normalize(plan_pb2.ExecutionPlan(id="p"))
    explicit = plan_pb2.ExecutionPlan()
    explicit.CopyFrom(base)
    explicit.execution.f32_kernel_rows = 64  # the introduction value, said out loud
    assert plan_hash(explicit) == plan_hash(base)
    explicit.execution.f32_kernel_rows = 16
    assert plan_hash(explicit) != plan_hash(base)
    explicit.execution.f32_kernel_rows = 0  # 0 (OpenBLAS always) is a value, not "unset"
    assert len({plan_hash(explicit), plan_hash(base)}) == 2


def test_execution_settings_out_of_bounds_are_refused_by_name(tiny):
    env = PlanEnvironment()
    plan = plan_pb2.ExecutionPlan(id="p", model=str(tiny))
    plan.execution.threads = 5000
    plan.execution.energy_min_batch = 0
    with pytest.raises(InvalidPlan) as err:
        prepare(plan, env)
    assert {v.field for v in err.value.violations} == {"execution.threads", "execution.energy_min_batch"}


def test_resolve_takes_each_set_field_and_the_default_for_the_rest():
    section = plan_pb2.Execution(f32_kernel_rows=0, energy_max_wait_ms=200)
    got = execution.resolve(section)
    assert got.f32_kernel_rows == 0 and got.energy_max_wait_ms == 200
    assert got.gemm_rows_x8 == execution.DEFAULT_EXECUTION.gemm_rows_x8
    assert got.kernels.f32_kernel_rows == 0


def test_a_new_versions_execution_settings_reach_the_running_engine_without_a_reload(tiny, tmp_path):
    control = ControlPlane(SqlitePlanStore(tmp_path / "plans.db"), PlanEnvironment())
    try:
        first = control.start(plan_pb2.ExecutionPlan(id="default", model=str(tiny), weights=plan_pb2.WEIGHT_FORMAT_NATIVE,
                                                     scheduler_policy=plan_pb2.SCHEDULER_POLICY_ENERGY_BALANCED))
        runtime = control.runtime
        assert runtime.model.backend.settings == execution.DEFAULT_EXECUTION.kernels
        patch = plan_pb2.ExecutionPlan()
        patch.CopyFrom(first)
        for name in ("version", "hash", "created_at"):
            patch.ClearField(name)
        patch.execution.gemm_rows_x8 = 4
        patch.execution.threads = 1
        patch.execution.energy_min_batch = 2
        second, _ = control.submit_plan(patch, activate=True, actor="op")
        assert control.runtime is runtime  # applied live: same model, same worker
        assert runtime.model.backend.settings.gemm_rows_x8 == 4
        assert runtime.model.backend.settings.threads == 1
        assert runtime.worker.policy.min_batch == 2
        assert second.hash != first.hash and second.version == first.version + 1
        # and the engine still answers, on the new settings
        assert control.runtime.plan.execution.gemm_rows_x8 == 4
    finally:
        control.close(1)
