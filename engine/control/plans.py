"""Execution Plans as data: defaults, validation, the content hash, patches.

The server takes a plan through three steps before storing it:

    plan = normalize(submitted, env)   # fill what the client left unset (DEFAULTS, below)
    validate(plan, env)                # every rule, every violation at once -> InvalidPlan
    store.submit(plan)                 # assigns version, hash (plan_hash) and created_at

`prepare(submitted, env)` does the first two.

Canonical serialisation and the plan hash
-----------------------------------------
`plan_hash(plan)` is the lowercase hex sha256 of `canonical_json(plan)`. Any client can
recompute it from a plan it got back:

1. Take the plan without its identity fields: `id`, `version`, `hash`, `description`,
   `created_at` (they must not appear in the JSON, not even as zero values). What remains are
   the content fields, `model` through `profiling`.
2. Mark every content sub-message present (`batching`, `kv_cache`, `limits`, `determinism`,
   `sampling`): an absent sub-message and an empty one are the same plan.
3. Convert it to a JSON object by the proto3 JSON mapping with the proto field names
   (snake_case) and *every* field printed, zero values included: enums as their names
   ("BACKEND_CPU"; a number the schema does not know as a bare integer), 64-bit integers
   (`default_seed`) as decimal strings, other integers as numbers, bools as true/false,
   `float` fields as the shortest decimal that round-trips the 32-bit value (0.95, not
   0.949999988079071), `double` fields as the shortest decimal that round-trips the 64-bit
   value; NaN and infinities as the strings "NaN", "Infinity", "-Infinity".
   In Python: `MessageToDict(plan, preserving_proto_field_name=True,
   always_print_fields_with_no_presence=True)`.
4. Serialise with object keys sorted, no whitespace (separators "," and ":"), non-ASCII
   characters written as themselves, encoded as UTF-8. Numbers are written as Python's
   `json` writes a float: the shortest repr, always with a fraction or exponent
   (`1.0`, `0.95`, `1e-05`, `1e+16`); integers without one (`32`).

So changing any content field changes the hash, and renaming a plan, re-describing it or
storing it again does not.

Schema evolution: adding fields without changing a stored plan's hash
----------------------------------------------------------------------
Fields added after the first schema follow one more rule, so that every plan stored before a
field existed keeps its hash:

5. A later field is a proto3 `optional` scalar inside a later section (today: `execution`,
   field 16, `objective`, field 17, and `model_options`, field 18). The canonical JSON leaves it out when it is unset *or*
   holds the value it was introduced with (`LATER_FIELDS` below; None: no value is left out
   once set), and leaves the section out when nothing of it is left. Those introduction values are part of this rule and never change; `normalize`
   may write a different (newly measured) default into new plans, which is then hashed.
   `kv_cache.prefix_caching`, added before this rule, is printed whenever it is set.

A plan stored before the `execution` section therefore hashes exactly as it did; a plan
that declares every execution setting at its introduction value hashes like one that
declares none (`tests/engine/control/test_plan_execution.py` holds plans hashed
by the first schema).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import descriptor as _descriptor
from google.protobuf import field_mask_pb2, json_format
from google.protobuf.internal import type_checkers

from engine import execution
from engine.control import names
from engine.control.objectives import check as check_objective
from engine.control.objectives import objective_of
from engine.errors import InvalidArgument, ModelFormatError, ModelNotFound, shown
from engine.model import registry
from engine.model.chat import unknown_builtin
from engine.model.chat_builtins import BUILTIN_TEMPLATES
from engine.runtime.engine import available_backends
from engine.runtime.sampling import InvalidSamplingParams, SamplingParams
from protos.planengine.v1 import plan_pb2

ExecutionPlan = plan_pb2.ExecutionPlan

__all__ = [
    "DEFAULTS",
    "FieldViolation",
    "InvalidPlan",
    "ModelInfo",
    "PlanDefaults",
    "PlanEnvironment",
    "PreparedPlan",
    "apply_patch",
    "backend_name",
    "canonical_json",
    "field_at",
    "normalize",
    "plan_hash",
    "prepare",
    "validate",
    "value_at",
    "weight_format_name",
]


# --------------------------------------------------------------------------- defaults


@dataclass(frozen=True)
class PlanDefaults:
    """What `normalize` fills where a client leaves a field unset, zero or UNSPECIFIED.

    Derived values:
      - `limits.context_length` 0 becomes the model's own context length when the model can be
        read, so the hash names the context the plan really runs with; it stays 0 ("the
        model's own", as the proto says) only when the model cannot be read (validate then
        reports the model).
      - `limits.max_tokens_per_request` 0 becomes `max_tokens_per_request`, capped by that
        context length.
      - `kv_cache.num_blocks` 0 becomes enough blocks for `max_batch_size` sequences of
        `kv_tokens_per_sequence` tokens each (fewer when the context is shorter), capped by what
        fits in the server's KV memory budget (`PlanEnvironment.max_kv_bytes`).
      - `sampling.max_tokens` 0 becomes `sampling_max_tokens`, capped by max_tokens_per_request.
    Temperature, top_k and min_p 0 are meaningful (greedy / disabled) and stay as given; so do
    `determinism` and `profiling`.
    """

    model: str = registry.DEFAULT_MODEL
    backend: int = plan_pb2.BACKEND_CPU
    weights: int = plan_pb2.WEIGHT_FORMAT_F32
    scheduler_policy: int = plan_pb2.SCHEDULER_POLICY_FIFO
    max_batch_size: int = 32
    max_batched_tokens: int = 2048
    max_queue: int = 256
    kv_block_size: int = 16
    kv_tokens_per_sequence: int = 2048
    kv_dtype: int = plan_pb2.KV_CACHE_DTYPE_F32
    max_tokens_per_request: int = 4096
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    sampling_max_tokens: int = 256


DEFAULTS = PlanDefaults()

# Validation ranges, (low, high) inclusive.
MAX_BATCH_SIZE = (1, 1024)
MAX_BATCHED_TOKENS = (1, 65536)
MAX_QUEUE = (1, 100_000)
KV_BLOCK_SIZE = (1, 256)  # and a power of two
MAX_ID_LENGTH = 64
MAX_DESCRIPTION_LENGTH = 1000
_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]+")

# Fields outside the hash, which only the server sets (description is client-set but unhashed).
IDENTITY_FIELDS = ("id", "version", "hash", "created_at")
UNHASHED_FIELDS = IDENTITY_FIELDS + ("description",)
_CONTENT_MESSAGES = ("batching", "kv_cache", "limits", "determinism", "sampling")

# Rule 5 of the canonical form (module docstring): every later field, with the value it was
# introduced with. Frozen: changing one would change the hash of stored plans that hold it.
LATER_FIELDS: dict[str, object] = {
    "execution.threads": 0,
    "execution.f32_kernel_rows": 64,
    "execution.gemm_rows_x8": 0,
    "execution.cuda_prefill_tokens": 32,
    "execution.energy_min_batch": 4,
    "execution.energy_max_wait_ms": 50,
    "execution.prefetch_next_kib": 8192,
    # the objective (engine/control/objectives.py); None: no value is a default, a set one is always hashed
    "objective.goal": 0,
    "objective.max_ttft_p99_s": None,
    "objective.max_itl_p99_s": None,
    "objective.max_watts": None,
    "objective.trial_requests": 0,
    "objective.trial_seconds": 0.0,
    "objective.tolerance": 0.05,
    "objective.min_requests": 4,
    # how the model is used; "": the file's own chat template
    "model_options.chat_template": "",
}
LATER_SECTIONS = ("execution", "objective", "model_options")

KV_DTYPE_BYTES = {plan_pb2.KV_CACHE_DTYPE_F32: 4, plan_pb2.KV_CACHE_DTYPE_F16: 2}


def backend_name(plan: ExecutionPlan) -> str:
    """The plan's backend as the backends package names it ("cpu", "cuda")."""
    return names.name(names.BACKENDS, plan.backend)


def weight_format_name(plan: ExecutionPlan) -> str:
    """The plan's weight format as backends name it ("native", "f32", "f16", "q8_0")."""
    return names.name(names.WEIGHT_FORMATS, plan.weights)


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class FieldViolation:
    """One broken rule: `field` is a dotted path ("batching.max_batch_size"), `description`
    says what is wrong and shows the value."""

    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


class InvalidPlan(InvalidArgument):
    """A plan (or a patch) that breaks one or more rules; `violations` lists every one."""

    def __init__(self, violations: Sequence[FieldViolation]):
        self.violations: list[FieldViolation] = list(violations)
        n = len(self.violations)
        summary = "; ".join(str(v) for v in self.violations)
        super().__init__(f"invalid plan ({n} violation{'s' if n != 1 else ''}): {summary}",
                         field=self.violations[0].field if n == 1 else None)


# --------------------------------------------------------------------------- environment


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about a model: its context and KV geometry."""

    context_length: int
    n_layers: int
    n_kv_heads: int
    head_dim: int
    path: str = ""

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Keys and values of one position across all layers."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * dtype_bytes


class GgufModelReader:
    """name -> ModelInfo from the GGUF header, cached by resolved path (and its size and mtime,
    so a replaced file is read again). Reading a header takes ~1 s for the default model,
    which validation must not pay on every submit. Thread-safe."""

    def __init__(self, model_dirs: Sequence[os.PathLike[str] | str] | None = None) -> None:
        self._cache: dict[tuple[str, int, int], ModelInfo] = {}
        self._lock = threading.Lock()
        self.model_dirs = model_dirs

    def __call__(self, name: str) -> ModelInfo:
        from engine.model.gguf_file import (
            ModelFile,  # the gguf reader is only needed here
        )

        path = registry.resolve(name, pull_missing=False, allowed=self.model_dirs)
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        try:
            model = ModelFile(path)
        except OSError as exc:  # unreadable (permissions, I/O): as unusable as a corrupt file
            raise ModelFormatError(f"{path}: cannot read the model file ({exc})") from None
        try:
            config = model.config()
        finally:
            model.close()
        info = ModelInfo(config.context_length, config.n_layers, config.n_kv_heads, config.head_dim,
                         str(path))
        with self._lock:
            self._cache[key] = info
        return info


def _default_max_kv_bytes() -> int:
    """Half of physical memory: room for the weights and everything else beside the arena."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 4 << 30


class PlanEnvironment:
    """What this server can run, against which plans are validated; built once at startup.

    `backends` maps each available backend ("cpu") to the weight formats it supports
    ("f32",); None probes the backends package. `max_kv_bytes` bounds a plan's KV arena
    (None: half of physical memory). `model_reader(name) -> ModelInfo` raises ModelNotFound /
    InvalidArgument (ModelFormatError, UnsupportedModel, a path it refuses); the default reads
    (and caches) GGUF headers. `model_dirs`: where model paths may lie (directories, or single
    files); None: anywhere (local use; a server always sets it). Tests use
    `PlanEnvironment.with_models({...})`.
    """

    def __init__(self, backends: Mapping[str, Iterable[str]] | None = None, max_kv_bytes: int | None = None,
                 model_reader: Callable[[str], ModelInfo] | None = None,
                 model_dirs: Sequence[os.PathLike[str] | str] | None = None):
        backends = available_backends() if backends is None else backends
        self._backends = {name: tuple(formats) for name, formats in backends.items()}
        self.max_kv_bytes = _default_max_kv_bytes() if max_kv_bytes is None else int(max_kv_bytes)
        self.model_dirs = None if model_dirs is None else tuple(Path(d) for d in model_dirs)
        self._read_model = model_reader or GgufModelReader(self.model_dirs)

    def resolve_model(self, name: str, pull_missing: bool = True) -> Path:
        """The file of a plan's model, within `model_dirs`."""
        return registry.resolve(name, pull_missing=pull_missing, allowed=self.model_dirs)

    @classmethod
    def detect(cls, max_kv_bytes: int | None = None) -> PlanEnvironment:
        """Probe the backends package: a backend is available when it can be created here."""
        return cls(None, max_kv_bytes)

    @classmethod
    def with_models(cls, models: Mapping[str, ModelInfo],
                    backends: Mapping[str, Iterable[str]] | None = None,
                    max_kv_bytes: int = 8 << 30) -> PlanEnvironment:
        """An environment with a fixed model table (no files): for tests and dry runs."""
        table = dict(models)

        def read(name: str) -> ModelInfo:
            if name not in table:
                raise ModelNotFound(f"model {name!r} is neither a file nor a known model "
                                    f"(known: {', '.join(table)})")
            return table[name]

        return cls(backends if backends is not None else {"cpu": ("f32",)}, max_kv_bytes, read)

    @property
    def available_backends(self) -> tuple[str, ...]:
        return tuple(self._backends)

    def weight_formats(self, backend: str) -> tuple[str, ...]:
        """Weight formats `backend` can hold; () for a backend that is not available."""
        return self._backends.get(backend, ())

    def model_info(self, name: str) -> ModelInfo:
        return self._read_model(name)

    def model_context_length(self, name: str) -> int:
        return self.model_info(name).context_length


def _try_model_info(env: PlanEnvironment | None, name: str) -> ModelInfo | None:
    if env is None:
        return None
    try:
        return env.model_info(name)
    except (ModelNotFound, InvalidArgument):  # ModelFormatError, UnsupportedModel, a refused path
        return None


# --------------------------------------------------------------------------- normalize


def normalize(plan: ExecutionPlan, env: PlanEnvironment | None = None,
              defaults: PlanDefaults = DEFAULTS) -> ExecutionPlan:
    """A copy of `plan` with server defaults where the client left a field unset (see
    PlanDefaults). With `env`, context-dependent defaults use the model's header; without it,
    or when the model cannot be read, `limits.context_length` stays 0. Never raises for bad
    values: it leaves them for `validate` to report."""
    out = ExecutionPlan()
    out.CopyFrom(plan)
    for name in _CONTENT_MESSAGES:
        getattr(out, name).SetInParent()

    out.model = out.model or defaults.model
    out.backend = out.backend or defaults.backend
    out.weights = out.weights or defaults.weights
    out.scheduler_policy = out.scheduler_policy or defaults.scheduler_policy

    b = out.batching
    b.max_batch_size = b.max_batch_size or defaults.max_batch_size
    b.max_batched_tokens = b.max_batched_tokens or defaults.max_batched_tokens
    b.max_queue = b.max_queue or defaults.max_queue

    model = _try_model_info(env, out.model)
    limits = out.limits
    if limits.context_length == 0 and model is not None:
        limits.context_length = model.context_length
    context = limits.context_length  # 0: unknown here
    if limits.max_tokens_per_request == 0:
        limits.max_tokens_per_request = min(defaults.max_tokens_per_request, context or math.inf)

    kv = out.kv_cache
    kv.block_size = kv.block_size or defaults.kv_block_size
    kv.dtype = kv.dtype or defaults.kv_dtype
    if kv.num_blocks == 0:
        tokens = min(defaults.kv_tokens_per_sequence, context or math.inf)
        blocks = b.max_batch_size * -(-tokens // kv.block_size)
        if context:  # at least one sequence of the full context, which validation requires
            blocks = max(blocks, -(-context // kv.block_size))
        if model is not None and env is not None and kv.dtype in KV_DTYPE_BYTES:
            per_block = kv.block_size * model.kv_bytes_per_token(KV_DTYPE_BYTES[kv.dtype])
            blocks = min(blocks, max(1, env.max_kv_bytes // per_block))
        kv.num_blocks = min(blocks, 2**32 - 1)

    execution.fill_defaults(out.execution)

    s = out.sampling
    s.top_p = s.top_p or defaults.top_p
    s.repetition_penalty = s.repetition_penalty or defaults.repetition_penalty
    if s.max_tokens == 0:
        s.max_tokens = min(defaults.sampling_max_tokens, limits.max_tokens_per_request)
    return out


# --------------------------------------------------------------------------- validate


def _enum_label(enum_type: _descriptor.EnumDescriptor, value: int) -> str:
    v = enum_type.values_by_number.get(value)
    return v.name if v else str(value)


def _check_enum(violations: list[FieldViolation], field: str, enum_type: _descriptor.EnumDescriptor,
                value: int) -> bool:
    """True when `value` is a known, set value of `enum_type`."""
    if value not in enum_type.values_by_number:
        known = ", ".join(v.name for v in enum_type.values if v.number)
        violations.append(FieldViolation(field, f"unknown {enum_type.name} value {value} (known: {known})"))
        return False
    if value == 0:
        violations.append(FieldViolation(
            field, f"{field.rsplit('.', 1)[-1]} must be set, got {_enum_label(enum_type, value)}"))
        return False
    return True


def _check_range(violations: list[FieldViolation], field: str, value: int, bounds: tuple[int, int]) -> bool:
    low, high = bounds
    if not low <= value <= high:
        violations.append(FieldViolation(field, f"{field.rsplit('.', 1)[-1]} {value} must be in {low}..{high}"))
        return False
    return True


def _as_float32_shortest(x: float) -> float:
    """The float32 value as its shortest decimal (0.95, not 0.949999988...): readable messages,
    and the same side of every bound SamplingParams checks."""
    return float(type_checkers.ToShortestFloat(x)) if math.isfinite(x) else x


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def validate(plan: ExecutionPlan, env: PlanEnvironment, *, stored: bool = False) -> None:
    """Check every field of a normalized plan; raise InvalidPlan listing *all* violations.

    `stored=False` (a plan as submitted): version, hash and created_at must be unset, the
    server assigns them. `stored=True` (a plan read back from a store): they must be set and
    the hash must match the content.
    """
    v: list[FieldViolation] = []

    # identity
    if not plan.id:
        v.append(FieldViolation("id", "id must be non-empty"))
    elif len(plan.id) > MAX_ID_LENGTH:
        v.append(FieldViolation("id", f"id is {len(plan.id)} characters, at most {MAX_ID_LENGTH} allowed"))
    elif not _ID_PATTERN.fullmatch(plan.id):
        v.append(FieldViolation("id", f"id {plan.id!r} may only contain letters, digits, '.', '_' and '-'"))
    if len(plan.description) > MAX_DESCRIPTION_LENGTH:
        v.append(FieldViolation("description", f"description is {len(plan.description)} characters, "
                                               f"at most {MAX_DESCRIPTION_LENGTH} allowed"))
    if stored:
        if plan.version < 1:
            v.append(FieldViolation("version", f"a stored plan has a version >= 1, got {plan.version}"))
        if plan.hash != (want := plan_hash(plan)):
            v.append(FieldViolation("hash", f"hash {shown(plan.hash)} does not match the content ({want})"))
        if not plan.HasField("created_at"):
            v.append(FieldViolation("created_at", "a stored plan has created_at set"))
    else:
        if plan.version:
            v.append(FieldViolation("version", f"version {plan.version} is assigned by the server; leave it 0"))
        if plan.hash:
            v.append(FieldViolation("hash", f"hash {shown(plan.hash)} is assigned by the server; leave it empty"))
        if plan.HasField("created_at"):
            v.append(FieldViolation("created_at", "created_at is assigned by the server; leave it unset"))

    # model
    model: ModelInfo | None = None
    if not plan.model:
        v.append(FieldViolation("model", "model must be set (a registry name or a GGUF path)"))
    else:
        try:
            model = env.model_info(plan.model)
        except (ModelNotFound, InvalidArgument) as exc:  # ModelFormatError, UnsupportedModel, a refused path
            v.append(FieldViolation("model", str(exc)))

    template = plan.model_options.chat_template
    if template and template not in BUILTIN_TEMPLATES:
        v.append(FieldViolation("model_options.chat_template", unknown_builtin(template)))

    # backend and weights
    backend_ok = _check_enum(v, "backend", plan_pb2.Backend.DESCRIPTOR, plan.backend)
    weights_ok = _check_enum(v, "weights", plan_pb2.WeightFormat.DESCRIPTOR, plan.weights)
    backend = backend_name(plan)
    if backend_ok and backend not in env.available_backends:
        backend_ok = False
        v.append(FieldViolation("backend", f"{backend} is not available on this server "
                                           f"(available: {', '.join(env.available_backends) or 'none'})"))
    if backend_ok and weights_ok and weight_format_name(plan) not in (formats := env.weight_formats(backend)):
        v.append(FieldViolation("weights", f"{weight_format_name(plan)} is not supported by the "
                                           f"{backend} backend (supported: {', '.join(formats)})"))
    _check_enum(v, "scheduler_policy", plan_pb2.SchedulerPolicy.DESCRIPTOR, plan.scheduler_policy)

    # batching
    b = plan.batching
    size_ok = _check_range(v, "batching.max_batch_size", b.max_batch_size, MAX_BATCH_SIZE)
    tokens_ok = _check_range(v, "batching.max_batched_tokens", b.max_batched_tokens, MAX_BATCHED_TOKENS)
    if size_ok and tokens_ok and b.max_batched_tokens < b.max_batch_size:
        # a full decode step needs one token per sequence
        v.append(FieldViolation("batching.max_batched_tokens",
                                f"max_batched_tokens {b.max_batched_tokens} is below max_batch_size "
                                f"{b.max_batch_size}: a full batch could not decode one token each"))
    _check_range(v, "batching.max_queue", b.max_queue, MAX_QUEUE)

    # limits (before the KV cache, which must hold one sequence of the effective context)
    lim = plan.limits
    if not (math.isfinite(lim.max_watts) and lim.max_watts >= 0):
        v.append(FieldViolation("limits.max_watts", f"max_watts {lim.max_watts} must be a finite number >= 0 "
                                                    f"(0 = no cap)"))
    context = lim.context_length or (model.context_length if model else 0)
    if model is not None and lim.context_length > model.context_length:
        v.append(FieldViolation("limits.context_length",
                                f"context_length {lim.context_length} exceeds the model's {model.context_length}"))
        context = model.context_length
    if lim.max_tokens_per_request < 1:
        v.append(FieldViolation("limits.max_tokens_per_request",
                                f"max_tokens_per_request {lim.max_tokens_per_request} must be >= 1"))
    elif context and lim.max_tokens_per_request > context:
        v.append(FieldViolation("limits.max_tokens_per_request",
                                f"max_tokens_per_request {lim.max_tokens_per_request} exceeds the context "
                                f"length {context}"))

    # KV cache
    kv = plan.kv_cache
    bs = kv.block_size
    block_ok = KV_BLOCK_SIZE[0] <= bs <= KV_BLOCK_SIZE[1] and bs & (bs - 1) == 0
    if not block_ok:
        v.append(FieldViolation("kv_cache.block_size", f"block_size {bs} must be a power of two in "
                                                       f"{KV_BLOCK_SIZE[0]}..{KV_BLOCK_SIZE[1]}"))
    blocks_ok = kv.num_blocks >= 1
    if not blocks_ok:
        v.append(FieldViolation("kv_cache.num_blocks", f"num_blocks {kv.num_blocks} must be >= 1"))
    dtype_ok = _check_enum(v, "kv_cache.dtype", plan_pb2.KVCacheDtype.DESCRIPTOR, kv.dtype)
    if block_ok and blocks_ok:
        if context and kv.num_blocks * bs < context:
            # a request of the full context could never be scheduled
            v.append(FieldViolation("kv_cache.num_blocks",
                                    f"num_blocks {kv.num_blocks} x block_size {bs} = {kv.num_blocks * bs} tokens "
                                    f"cannot hold one sequence of context_length {context}"))
        if model is not None and dtype_ok:
            per_block = bs * model.kv_bytes_per_token(KV_DTYPE_BYTES[kv.dtype])
            arena = kv.num_blocks * per_block
            if arena > env.max_kv_bytes:
                v.append(FieldViolation("kv_cache.num_blocks",
                                        f"KV arena of {arena} bytes ({_gib(arena)}: {kv.num_blocks} blocks x "
                                        f"{per_block} bytes) exceeds this server's limit of {env.max_kv_bytes} "
                                        f"bytes ({_gib(env.max_kv_bytes)})"))

    # sampling defaults: each field checked alone through SamplingParams, so all are reported
    s = plan.sampling
    values = {"temperature": _as_float32_shortest(s.temperature), "top_k": s.top_k,
              "top_p": _as_float32_shortest(s.top_p), "min_p": _as_float32_shortest(s.min_p),
              "repetition_penalty": _as_float32_shortest(s.repetition_penalty), "max_tokens": s.max_tokens}
    for name, value in values.items():
        try:
            SamplingParams(**{name: value})
        except InvalidSamplingParams as exc:
            v.append(FieldViolation(f"sampling.{exc.field}", str(exc)))
    if s.max_tokens > lim.max_tokens_per_request >= 1:
        v.append(FieldViolation("sampling.max_tokens", f"max_tokens {s.max_tokens} exceeds "
                                                       f"limits.max_tokens_per_request {lim.max_tokens_per_request}"))

    # execution settings: whole numbers within their bounds (0 has a meaning for most)
    for name in execution.FIELDS:
        value = getattr(plan.execution, name)
        if value > (high := execution.BOUNDS[name]):
            v.append(FieldViolation(f"execution.{name}", f"{name} {value} exceeds {high}"))
    if plan.execution.HasField("energy_min_batch") and plan.execution.energy_min_batch < 1:
        v.append(FieldViolation("execution.energy_min_batch", "energy_min_batch must be >= 1"))
    # objective: what "better" means and the trial window (engine/control/objectives.py)
    if plan.HasField("objective"):
        v += [FieldViolation(f"objective.{name}", problem) for name, problem in check_objective(objective_of(plan))]

    if v:
        raise InvalidPlan(v)


def prepare(plan: ExecutionPlan, env: PlanEnvironment) -> ExecutionPlan:
    """normalize + validate a submitted plan: what the server stores (before version and hash)."""
    out = normalize(plan, env)
    validate(out, env)
    return out


@dataclass(frozen=True)
class PreparedPlan:
    """A submitted plan after `prepare` (normalized, every rule checked against this server's
    environment), not yet stored. Made only by `PreparedPlan.of`; the control plane stores and
    activates one without validating it again, so a suggestion is validated once on its way
    to a version."""

    plan: ExecutionPlan

    @classmethod
    def of(cls, plan: ExecutionPlan, env: PlanEnvironment) -> PreparedPlan:
        return cls(prepare(plan, env))


# --------------------------------------------------------------------------- hash


def _content(plan: ExecutionPlan) -> ExecutionPlan:
    out = ExecutionPlan()
    out.CopyFrom(plan)
    for name in UNHASHED_FIELDS:
        out.ClearField(name)
    for name in _CONTENT_MESSAGES:
        getattr(out, name).SetInParent()
    return out


def canonical_json(plan: ExecutionPlan) -> bytes:
    """The content fields as canonical JSON (UTF-8); the rule is in the module docstring."""
    obj = json_format.MessageToDict(_content(plan), preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True)
    for name in UNHASHED_FIELDS:  # printed as zero values by the line above; not content
        obj.pop(name, None)
    _drop_later_defaults(plan, obj)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _drop_later_defaults(plan: ExecutionPlan, obj: dict) -> None:
    """Rule 5: leave out later fields at their introduction value, then empty later sections."""
    for path, introduced in LATER_FIELDS.items():
        section, name = path.split(".")
        message = getattr(plan, section)
        if section in obj and (not message.HasField(name) or getattr(message, name) == introduced):
            obj[section].pop(name, None)
    for section in LATER_SECTIONS:
        if obj.get(section) == {}:
            del obj[section]


def plan_hash(plan: ExecutionPlan) -> str:
    """sha256 hex of canonical_json(plan): identical for identical content, whatever the id."""
    return hashlib.sha256(canonical_json(plan)).hexdigest()


# --------------------------------------------------------------------------- patches


def field_at(path: str) -> _descriptor.FieldDescriptor:
    """The descriptor of the plan field a dotted path ("sampling.top_p") names; ValueError
    saying which part names nothing."""
    parts = path.split(".")
    message, found = ExecutionPlan.DESCRIPTOR, None
    for i, part in enumerate(parts):
        if message is None:
            raise ValueError(f"unknown field path {shown(path)}: {'.'.join(parts[:i])} has no sub-fields")
        found = message.fields_by_name.get(part)
        if found is None:
            raise ValueError(f"unknown field path {shown(path)}: {message.name} has no field {shown(part)}")
        message = found.message_type
    return found


def value_at(plan: ExecutionPlan, path: str) -> tuple[Any, _descriptor.FieldDescriptor]:
    """(value, descriptor) of the field a dotted path names in `plan`; ValueError as field_at."""
    fd = field_at(path)
    value: Any = plan
    for part in path.split("."):
        value = getattr(value, part)
    return value, fd


def _check_path(path: str) -> FieldViolation | None:
    if path.split(".")[0] in IDENTITY_FIELDS:
        return FieldViolation(path, f"{shown(path)} is an identity field, assigned by the server; a patch "
                                    f"cannot change it")
    try:
        field_at(path)
    except ValueError as exc:
        return FieldViolation(path, str(exc))
    return None


def apply_patch(base: ExecutionPlan, patch: ExecutionPlan, paths: Sequence[str]) -> ExecutionPlan:
    """A copy of `base` with the fields named in `paths` (a field mask: "sampling.top_p",
    "batching", ...) taken from `patch`. A path naming a sub-message replaces it whole.

    All or nothing: any unknown path, identity path (id, version, hash, created_at) or an empty
    mask raises InvalidPlan naming each bad path, and nothing is applied. The result carries
    base's id and no version, hash or created_at: it is a plan ready to submit.

    The chat template (`model_options.chat_template`) belongs to the model: a patch that
    changes `model` without naming it clears it, so the new model is sent its own file's
    template, not one declared for another file's turn format.
    """
    violations = [bad for path in paths if (bad := _check_path(path)) is not None]
    if not paths:
        violations.append(FieldViolation("paths", "a patch must name at least one field"))
    if violations:
        raise InvalidPlan(violations)
    out = ExecutionPlan()
    out.CopyFrom(base)
    field_mask_pb2.FieldMask(paths=list(paths)).MergeMessage(
        patch, out, replace_message_field=True, replace_repeated_field=True)
    for name in ("version", "hash", "created_at"):
        out.ClearField(name)
    if out.model != base.model and not any(p in ("model_options", "model_options.chat_template") for p in paths):
        out.model_options.ClearField("chat_template")
    return out
