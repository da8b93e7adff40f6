"""Execution Plans as data: defaults, every validation rule, the content hash, patches."""

from __future__ import annotations

import dataclasses
import math

import pytest
from google.protobuf import json_format

from engine.control.plans import (
    DEFAULTS,
    FieldViolation,
    InvalidPlan,
    ModelInfo,
    PlanEnvironment,
    apply_patch,
    canonical_json,
    normalize,
    plan_hash,
    prepare,
    validate,
)
from engine.errors import InvalidArgument, ModelFormatError
from engine.model.registry import DEFAULT_MODEL
from protos.planengine.v1 import plan_pb2

# SmolLM2-135M's geometry: 2 (k, v) x 30 layers x 3 kv heads x 64 = 11520 values per token.
SMOL = ModelInfo(context_length=8192, n_layers=30, n_kv_heads=3, head_dim=64)
SMOL_F32_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 4


@pytest.fixture
def env() -> PlanEnvironment:
    return PlanEnvironment.with_models({"smol": SMOL, DEFAULT_MODEL: SMOL},
                                       backends={"cpu": ("f32",)}, max_kv_bytes=4 << 30)


def good(env: PlanEnvironment, **fields) -> plan_pb2.ExecutionPlan:
    return normalize(plan_pb2.ExecutionPlan(id="default", model="smol", **fields), env)


def violations(plan, env, **kwargs) -> list[FieldViolation]:
    with pytest.raises(InvalidPlan) as info:
        validate(plan, env, **kwargs)
    return info.value.violations


# --------------------------------------------------------------------------- normalize


def test_normalize_fills_every_default_and_leaves_the_input_alone():
    submitted = plan_pb2.ExecutionPlan(id="p")
    plan = normalize(submitted)  # no environment: the context stays "the model's own"
    assert submitted == plan_pb2.ExecutionPlan(id="p")
    assert plan.model == DEFAULT_MODEL
    assert plan.backend == plan_pb2.BACKEND_CPU
    assert plan.weights == plan_pb2.WEIGHT_FORMAT_F32
    assert plan.scheduler_policy == plan_pb2.SCHEDULER_POLICY_FIFO
    assert (plan.batching.max_batch_size, plan.batching.max_batched_tokens, plan.batching.max_queue) == (32, 2048, 256)
    assert plan.kv_cache.block_size == 16 and plan.kv_cache.dtype == plan_pb2.KV_CACHE_DTYPE_F32
    assert plan.kv_cache.num_blocks == 32 * 2048 // 16  # max_batch_size sequences of 2048 tokens
    assert plan.limits.context_length == 0 and plan.limits.max_tokens_per_request == 4096
    assert plan.limits.max_watts == 0
    s = plan.sampling
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty, s.max_tokens) == (0, 0, 1, 0, 1, 256)
    assert not plan.determinism.seeded and plan.determinism.default_seed == 0


def test_normalize_resolves_the_context_from_the_model(env):
    plan = good(env)
    assert plan.limits.context_length == 8192
    assert plan.limits.max_tokens_per_request == 4096
    short = PlanEnvironment.with_models({"smol": ModelInfo(1024, 30, 3, 64)})
    plan = normalize(plan_pb2.ExecutionPlan(id="p", model="smol"), short)
    assert plan.limits.context_length == 1024
    assert plan.limits.max_tokens_per_request == 1024  # capped by the context
    assert plan.kv_cache.num_blocks == 32 * 1024 // 16  # sequences of the context, not 2048
    validate(plan, short)


def test_normalize_keeps_explicit_values(env):
    submitted = plan_pb2.ExecutionPlan(id="p", model="smol", scheduler_policy=plan_pb2.SCHEDULER_POLICY_LATENCY)
    submitted.batching.max_batch_size = 4
    submitted.kv_cache.num_blocks = 1000
    submitted.limits.context_length = 2048
    submitted.sampling.temperature = 0.7
    submitted.sampling.top_p = 0.9
    submitted.sampling.max_tokens = 10
    submitted.determinism.seeded = True
    submitted.determinism.default_seed = 7
    plan = normalize(submitted, env)
    assert plan.scheduler_policy == plan_pb2.SCHEDULER_POLICY_LATENCY
    assert plan.batching.max_batch_size == 4 and plan.batching.max_batched_tokens == 2048
    assert plan.kv_cache.num_blocks == 1000 and plan.limits.context_length == 2048
    assert plan.limits.max_tokens_per_request == 2048
    assert plan.sampling.temperature == pytest.approx(0.7) and plan.sampling.top_p == pytest.approx(0.9)
    assert plan.sampling.max_tokens == 10 and plan.determinism.default_seed == 7


def test_normalize_caps_the_default_kv_arena_by_the_server_budget():
    per_block = 16 * SMOL_F32_BYTES_PER_TOKEN
    small = PlanEnvironment.with_models({"smol": SMOL}, max_kv_bytes=600 * per_block + 5)
    plan = normalize(plan_pb2.ExecutionPlan(id="p", model="smol"), small)
    assert plan.kv_cache.num_blocks == 600
    validate(plan, small)


def test_the_default_plan_is_valid(env):
    plan = prepare(plan_pb2.ExecutionPlan(id="default"), env)
    assert plan.model == DEFAULT_MODEL and plan.limits.context_length == 8192


# --------------------------------------------------------------------------- validate


def test_validate_reports_every_violation_at_once(env):
    plan = good(env, backend=plan_pb2.BACKEND_CUDA)
    plan.version = 4  # one bad field in every section
    plan.batching.max_batch_size = 0
    plan.kv_cache.block_size = 24
    plan.limits.max_watts = -5
    plan.sampling.top_p = 1.5
    found = violations(plan, env)
    assert [v.field for v in found] == ["version", "backend", "batching.max_batch_size", "limits.max_watts",
                                        "kv_cache.block_size", "sampling.top_p"]
    error = InvalidPlan(found)
    assert isinstance(error, InvalidArgument) and error.code == "INVALID_ARGUMENT"
    message = str(error)
    assert "\n" not in message and message.startswith("invalid plan (6 violations): ")
    for text in ("version 4 is assigned by the server", "cuda is not available on this server (available: cpu)",
                 "max_batch_size 0 must be in 1..1024", "max_watts -5.0", "block_size 24 must be a power of two",
                 "top_p must be in (0, 1], got 1.5"):
        assert text in message


def _set(path: str, value):
    def mutate(plan):
        *parents, leaf = path.split(".")
        target = plan
        for p in parents:
            target = getattr(target, p)
        setattr(target, leaf, value)
    return mutate


CASES = [
    # (mutation, violated field, text in the message)
    (_set("id", ""), "id", "non-empty"),
    (_set("id", "a" * 65), "id", "65 characters, at most 64"),
    (_set("id", "no spaces"), "id", "'no spaces' may only contain"),
    (_set("version", 3), "version", "version 3 is assigned by the server"),
    (_set("hash", "abc"), "hash", "'abc' is assigned by the server"),
    (lambda p: p.created_at.FromSeconds(1), "created_at", "assigned by the server"),
    (_set("description", "x" * 1001), "description", "1001 characters, at most 1000"),
    (_set("model", "nonexistent"), "model", "'nonexistent' is neither a file nor a known model"),
    (_set("backend", plan_pb2.BACKEND_CUDA), "backend", "cuda is not available on this server (available: cpu)"),
    (_set("backend", 99), "backend", "unknown Backend value 99"),
    (_set("weights", plan_pb2.WEIGHT_FORMAT_F16), "weights", "f16 is not supported by the cpu backend (supported: f32)"),
    (_set("weights", 99), "weights", "unknown WeightFormat value 99"),
    (_set("weights", 0), "weights", "weights must be set, got WEIGHT_FORMAT_UNSPECIFIED"),
    (_set("scheduler_policy", 42), "scheduler_policy", "unknown SchedulerPolicy value 42"),
    (_set("batching.max_batch_size", 0), "batching.max_batch_size", "max_batch_size 0 must be in 1..1024"),
    (_set("batching.max_batch_size", 1025), "batching.max_batch_size", "max_batch_size 1025 must be in 1..1024"),
    (_set("batching.max_batched_tokens", 0), "batching.max_batched_tokens", "max_batched_tokens 0 must be in 1..65536"),
    (_set("batching.max_batched_tokens", 65537), "batching.max_batched_tokens", "65537 must be in 1..65536"),
    (_set("batching.max_batched_tokens", 16), "batching.max_batched_tokens", "16 is below max_batch_size 32"),
    (_set("batching.max_queue", 0), "batching.max_queue", "max_queue 0 must be in 1..100000"),
    (_set("batching.max_queue", 100_001), "batching.max_queue", "max_queue 100001 must be in 1..100000"),
    (_set("kv_cache.block_size", 0), "kv_cache.block_size", "block_size 0 must be a power of two in 1..256"),
    (_set("kv_cache.block_size", 48), "kv_cache.block_size", "block_size 48"),
    (_set("kv_cache.block_size", 512), "kv_cache.block_size", "block_size 512"),
    (_set("kv_cache.num_blocks", 0), "kv_cache.num_blocks", "num_blocks 0 must be >= 1"),
    (_set("kv_cache.num_blocks", 100), "kv_cache.num_blocks",
     "100 x block_size 16 = 1600 tokens cannot hold one sequence of context_length 8192"),
    (_set("kv_cache.num_blocks", 10_000), "kv_cache.num_blocks",
     (f"KV arena of {10_000 * 16 * SMOL_F32_BYTES_PER_TOKEN} bytes (6.87 GiB: 10000 blocks x 737280 bytes) "
      f"exceeds this server's limit of {4 << 30} bytes (4.00 GiB)")),
    (_set("kv_cache.dtype", 7), "kv_cache.dtype", "unknown KVCacheDtype value 7"),
    (_set("limits.max_watts", -1.0), "limits.max_watts", "max_watts -1.0 must be a finite number >= 0"),
    (_set("limits.max_watts", math.inf), "limits.max_watts", "max_watts inf"),
    (_set("limits.max_watts", math.nan), "limits.max_watts", "max_watts nan"),
    (_set("limits.context_length", 9000), "limits.context_length", "context_length 9000 exceeds the model's 8192"),
    (_set("limits.max_tokens_per_request", 0), "limits.max_tokens_per_request", "max_tokens_per_request 0 must be >= 1"),
    (_set("limits.max_tokens_per_request", 8193), "limits.max_tokens_per_request",
     "max_tokens_per_request 8193 exceeds the context length 8192"),
    (_set("sampling.temperature", -0.5), "sampling.temperature", "temperature must be >= 0, got -0.5"),
    (_set("sampling.temperature", math.nan), "sampling.temperature", "temperature must be a finite number"),
    (_set("sampling.top_p", 1.1), "sampling.top_p", "top_p must be in (0, 1], got 1.1"),
    (_set("sampling.min_p", 2.0), "sampling.min_p", "min_p must be in [0, 1], got 2.0"),
    (_set("sampling.repetition_penalty", -1.0), "sampling.repetition_penalty", "repetition_penalty must be > 0"),
    (_set("sampling.max_tokens", 5000), "sampling.max_tokens",
     "max_tokens 5000 exceeds limits.max_tokens_per_request 4096"),
    (_set("model_options.chat_template", "gemma3"), "model_options.chat_template",
     "unknown chat template 'gemma3' (llama.cpp's built-in names: chatml, gemma, llama2,"),
]


@pytest.mark.parametrize("mutate, field, text", CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_each_rule(env, mutate, field, text):
    plan = good(env)
    validate(plan, env)
    mutate(plan)
    found = violations(plan, env)
    assert [v.field for v in found] == [field], found
    assert text in found[0].description, found[0].description


def test_an_unknown_enum_number_from_the_wire_is_a_violation(env):
    plan = good(env)
    wire = plan.SerializeToString()
    # field 5 (backend), varint 99: what a newer client could send
    hostile = plan_pb2.ExecutionPlan.FromString(wire + bytes([5 << 3, 99]))
    assert hostile.backend == 99
    assert [v.field for v in violations(hostile, env)] == ["backend"]


def test_an_unreadable_model_is_a_violation_on_model():
    def reader(name):
        raise ModelFormatError(f"{name}: not a valid GGUF file (bad magic)")
    broken = PlanEnvironment({"cpu": ("f32",)}, 1 << 30, reader)
    found = violations(normalize(plan_pb2.ExecutionPlan(id="p", model="x.gguf"), broken), broken)
    assert [(v.field, v.description) for v in found] == [("model", "x.gguf: not a valid GGUF file (bad magic)")]


def test_a_stored_plan_must_carry_its_identity_and_a_matching_hash(env):
    plan = good(env)
    plan.version = 2
    plan.hash = plan_hash(plan)
    plan.created_at.FromSeconds(1_700_000_000)
    validate(plan, env, stored=True)
    with pytest.raises(InvalidPlan):
        validate(plan, env)  # as submitted, those are the server's to set
    plan.batching.max_queue = 7  # content changed after hashing
    found = violations(plan, env, stored=True)
    assert [v.field for v in found] == ["hash"] and plan.hash in found[0].description
    unversioned = good(env)
    assert {v.field for v in violations(unversioned, env, stored=True)} == {"version", "hash", "created_at"}


# --------------------------------------------------------------------------- hash


def test_canonical_json_is_the_documented_form(env):
    plan = plan_pb2.ExecutionPlan(id="ignored", description="ignored", version=9, hash="x",
                                  model="smol", backend=plan_pb2.BACKEND_CPU)
    plan.created_at.FromSeconds(5)
    plan.sampling.top_p = 0.95
    plan.determinism.default_seed = 2**64 - 1
    expected = (
        '{"backend":"BACKEND_CPU",'
        '"batching":{"max_batch_size":0,"max_batched_tokens":0,"max_queue":0},'
        '"determinism":{"batch_invariant":false,"default_seed":"18446744073709551615","seeded":false},'
        '"kv_cache":{"block_size":0,"dtype":"KV_CACHE_DTYPE_UNSPECIFIED","num_blocks":0},'
        '"limits":{"context_length":0,"max_tokens_per_request":0,"max_watts":0.0},'
        '"model":"smol","profiling":false,'
        '"sampling":{"max_tokens":0,"min_p":0.0,"repetition_penalty":0.0,"temperature":0.0,"top_k":0,"top_p":0.95},'
        '"scheduler_policy":"SCHEDULER_POLICY_UNSPECIFIED","weights":"WEIGHT_FORMAT_UNSPECIFIED"}'
    )
    assert canonical_json(plan).decode() == expected
    import hashlib
    assert plan_hash(plan) == hashlib.sha256(expected.encode()).hexdigest()


def test_hash_is_stable_across_reserialisation(env):
    plan = good(env)
    plan.sampling.temperature = 0.7
    plan.sampling.top_p = 0.95
    plan.limits.max_watts = 12.345
    plan.model = "modèle-ü"  # non-ASCII kept as UTF-8
    h = plan_hash(plan)
    assert plan_hash(plan_pb2.ExecutionPlan.FromString(plan.SerializeToString())) == h
    assert plan_hash(json_format.Parse(json_format.MessageToJson(plan), plan_pb2.ExecutionPlan())) == h
    assert plan_hash(json_format.Parse(canonical_json(plan), plan_pb2.ExecutionPlan())) == h
    assert len(h) == 64 and int(h, 16) >= 0
    # an absent sub-message and an empty one are the same plan
    bare = plan_pb2.ExecutionPlan(model="m")
    empty_subs = plan_pb2.ExecutionPlan(model="m")
    empty_subs.batching.SetInParent()
    empty_subs.determinism.SetInParent()
    assert plan_hash(bare) == plan_hash(empty_subs)


def test_identity_fields_do_not_change_the_hash(env):
    plan = good(env)
    h = plan_hash(plan)
    plan.id = "another"
    plan.version = 12
    plan.hash = "deadbeef"
    plan.description = "a note"
    plan.created_at.FromSeconds(123)
    assert plan_hash(plan) == h


def _content_leaves(descriptor, prefix=""):
    for field in descriptor.fields:
        if prefix == "" and field.name in ("id", "version", "hash", "description", "created_at"):
            continue
        if field.message_type is not None:
            yield from _content_leaves(field.message_type, prefix + field.name + ".")
        else:
            yield prefix + field.name, field


def test_changing_any_content_field_changes_the_hash(env):
    base = good(env)
    seen = {plan_hash(base)}
    leaves = list(_content_leaves(plan_pb2.ExecutionPlan.DESCRIPTOR))
    assert len(leaves) == 40  # model, backend, weights, policy, 3+4+3+3+6 sub-fields, profiling, 7 execution,
    # 8 objective, 1 model_options
    for path, field in leaves:
        plan = plan_pb2.ExecutionPlan()
        plan.CopyFrom(base)
        *parents, leaf = path.split(".")
        target = plan
        for p in parents:
            target = getattr(target, p)
        value = getattr(target, leaf)
        if field.enum_type is not None:
            changed = next(v.number for v in field.enum_type.values if v.number not in (0, value))
        elif isinstance(value, bool):
            changed = not value
        elif isinstance(value, str):
            changed = value + "x"
        else:
            changed = value + (0.5 if isinstance(value, float) else 1)
        setattr(target, leaf, changed)
        h = plan_hash(plan)
        assert h not in seen, path
        seen.add(h)


def test_an_unset_optional_field_leaves_the_hash_of_older_plans_alone(env):
    """kv_cache.prefix_caching came later: plans without it hash as they did before it existed."""
    from engine.control.plans import canonical_json
    plan = good(env)
    assert b"prefix_caching" not in canonical_json(plan)
    before = plan_hash(plan)
    plan.kv_cache.prefix_caching = True
    assert plan_hash(plan) != before  # set explicitly, it is content like any other field


# --------------------------------------------------------------------------- patches


def test_apply_patch_takes_only_the_listed_paths(env):
    base = good(env)
    base.version, base.hash = 3, plan_hash(base)
    base.created_at.FromSeconds(10)
    patch = plan_pb2.ExecutionPlan(id="other", backend=plan_pb2.BACKEND_CUDA)
    patch.sampling.top_p = 0.5
    patch.batching.max_batch_size = 8  # "batching" replaces the whole sub-message
    patched = apply_patch(base, patch, ["sampling.top_p", "batching"])
    assert patched.sampling.top_p == 0.5
    assert patched.sampling.max_tokens == base.sampling.max_tokens
    assert patched.batching == patch.batching
    assert patched.backend == base.backend and patched.id == base.id
    assert patched.version == 0 and patched.hash == "" and not patched.HasField("created_at")
    assert base.sampling.top_p == 1.0  # the base is not modified


@pytest.mark.parametrize("path, text", [
    ("id", "identity field"), ("version", "identity field"), ("hash", "identity field"),
    ("created_at", "identity field"), ("created_at.seconds", "identity field"),
    ("batching.max_batch", "Batching has no field 'max_batch'"),
    ("sampling.top_p.x", "sampling.top_p has no sub-fields"),
    ("nonsense", "ExecutionPlan has no field 'nonsense'"), ("", "has no field ''"),
])
def test_apply_patch_rejects_identity_and_unknown_paths(env, path, text):
    with pytest.raises(InvalidPlan) as info:
        apply_patch(good(env), plan_pb2.ExecutionPlan(), [path])
    (violation,) = info.value.violations
    assert violation.field == path and text in violation.description


def test_apply_patch_is_all_or_nothing(env):
    base = good(env)
    before = base.SerializeToString()
    patch = plan_pb2.ExecutionPlan(model="other")
    with pytest.raises(InvalidPlan) as info:
        apply_patch(base, patch, ["model", "version", "limits.bogus"])
    assert [v.field for v in info.value.violations] == ["version", "limits.bogus"]
    assert base.SerializeToString() == before
    with pytest.raises(InvalidPlan, match="at least one field"):
        apply_patch(base, patch, [])


# --------------------------------------------------------------------------- environment


def test_detect_finds_the_cpu_backend():
    env = PlanEnvironment.detect(max_kv_bytes=1 << 30)
    assert "cpu" in env.available_backends and "f32" in env.weight_formats("cpu")
    assert env.weight_formats("nope") == ()
    assert env.max_kv_bytes == 1 << 30
    default = PlanEnvironment()  # what the server builds: probed backends, half of physical memory
    assert default.available_backends == env.available_backends and default.max_kv_bytes > 0


def test_the_real_default_model_validates_and_its_header_is_cached(model_path, monkeypatch):
    import engine.model.gguf_file as gguf_file
    opened = []
    real = gguf_file.ModelFile
    monkeypatch.setattr(gguf_file, "ModelFile", lambda path: opened.append(path) or real(path))
    env = PlanEnvironment.detect()
    plan = prepare(plan_pb2.ExecutionPlan(id="default"), env)  # reads the GGUF header once
    info = env.model_info(DEFAULT_MODEL)
    assert (info.context_length, info.n_layers, info.n_kv_heads, info.head_dim) == (8192, 30, 3, 64)
    assert plan.limits.context_length == 8192
    for _ in range(20):
        assert env.model_info(DEFAULT_MODEL) is info
        validate(plan, env)
    assert env.model_info(str(model_path)) == info  # a path to the same file: one cache entry
    assert len(opened) == 1  # 20 validations and a second name for the file: no header parsed again
    assert env.model_context_length(DEFAULT_MODEL) == 8192


def test_defaults_are_in_one_place():
    assert DEFAULTS.max_batch_size == 32 and DEFAULTS.kv_block_size == 16 and DEFAULTS.sampling_max_tokens == 256
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULTS.max_batch_size = 1
