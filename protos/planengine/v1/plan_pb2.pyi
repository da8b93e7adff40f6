import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Backend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_UNSPECIFIED: _ClassVar[Backend]
    BACKEND_CPU: _ClassVar[Backend]
    BACKEND_CUDA: _ClassVar[Backend]

class WeightFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WEIGHT_FORMAT_UNSPECIFIED: _ClassVar[WeightFormat]
    WEIGHT_FORMAT_NATIVE: _ClassVar[WeightFormat]
    WEIGHT_FORMAT_F32: _ClassVar[WeightFormat]
    WEIGHT_FORMAT_F16: _ClassVar[WeightFormat]
    WEIGHT_FORMAT_Q8_0: _ClassVar[WeightFormat]

class SchedulerPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCHEDULER_POLICY_UNSPECIFIED: _ClassVar[SchedulerPolicy]
    SCHEDULER_POLICY_FIFO: _ClassVar[SchedulerPolicy]
    SCHEDULER_POLICY_LATENCY: _ClassVar[SchedulerPolicy]
    SCHEDULER_POLICY_THROUGHPUT: _ClassVar[SchedulerPolicy]
    SCHEDULER_POLICY_ENERGY_BALANCED: _ClassVar[SchedulerPolicy]

class KVCacheDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_CACHE_DTYPE_UNSPECIFIED: _ClassVar[KVCacheDtype]
    KV_CACHE_DTYPE_F32: _ClassVar[KVCacheDtype]
    KV_CACHE_DTYPE_F16: _ClassVar[KVCacheDtype]
BACKEND_UNSPECIFIED: Backend
BACKEND_CPU: Backend
BACKEND_CUDA: Backend
WEIGHT_FORMAT_UNSPECIFIED: WeightFormat
WEIGHT_FORMAT_NATIVE: WeightFormat
WEIGHT_FORMAT_F32: WeightFormat
WEIGHT_FORMAT_F16: WeightFormat
WEIGHT_FORMAT_Q8_0: WeightFormat
SCHEDULER_POLICY_UNSPECIFIED: SchedulerPolicy
SCHEDULER_POLICY_FIFO: SchedulerPolicy
SCHEDULER_POLICY_LATENCY: SchedulerPolicy
SCHEDULER_POLICY_THROUGHPUT: SchedulerPolicy
SCHEDULER_POLICY_ENERGY_BALANCED: SchedulerPolicy
KV_CACHE_DTYPE_UNSPECIFIED: KVCacheDtype
KV_CACHE_DTYPE_F32: KVCacheDtype
KV_CACHE_DTYPE_F16: KVCacheDtype

class Batching(_message.Message):
    __slots__ = ("max_batch_size", "max_batched_tokens", "max_queue")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_batched_tokens: int
    max_queue: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_batched_tokens: _Optional[int] = ..., max_queue: _Optional[int] = ...) -> None: ...

class KVCache(_message.Message):
    __slots__ = ("num_blocks", "block_size", "dtype", "prefix_caching")
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHING_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    block_size: int
    dtype: KVCacheDtype
    prefix_caching: bool
    def __init__(self, num_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., dtype: _Optional[_Union[KVCacheDtype, str]] = ..., prefix_caching: _Optional[bool] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_watts", "max_tokens_per_request", "context_length")
    MAX_WATTS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    max_watts: float
    max_tokens_per_request: int
    context_length: int
    def __init__(self, max_watts: _Optional[float] = ..., max_tokens_per_request: _Optional[int] = ..., context_length: _Optional[int] = ...) -> None: ...

class Determinism(_message.Message):
    __slots__ = ("seeded", "default_seed", "batch_invariant")
    SEEDED_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SEED_FIELD_NUMBER: _ClassVar[int]
    BATCH_INVARIANT_FIELD_NUMBER: _ClassVar[int]
    seeded: bool
    default_seed: int
    batch_invariant: bool
    def __init__(self, seeded: _Optional[bool] = ..., default_seed: _Optional[int] = ..., batch_invariant: _Optional[bool] = ...) -> None: ...

class SamplingDefaults(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_tokens")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    max_tokens: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class Execution(_message.Message):
    __slots__ = ("threads", "f32_kernel_rows", "gemm_rows_x8", "cuda_prefill_tokens", "energy_min_batch", "energy_max_wait_ms", "prefetch_next_kib")
    THREADS_FIELD_NUMBER: _ClassVar[int]
    F32_KERNEL_ROWS_FIELD_NUMBER: _ClassVar[int]
    GEMM_ROWS_X8_FIELD_NUMBER: _ClassVar[int]
    CUDA_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_MIN_BATCH_FIELD_NUMBER: _ClassVar[int]
    ENERGY_MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_NEXT_KIB_FIELD_NUMBER: _ClassVar[int]
    threads: int
    f32_kernel_rows: int
    gemm_rows_x8: int
    cuda_prefill_tokens: int
    energy_min_batch: int
    energy_max_wait_ms: int
    prefetch_next_kib: int
    def __init__(self, threads: _Optional[int] = ..., f32_kernel_rows: _Optional[int] = ..., gemm_rows_x8: _Optional[int] = ..., cuda_prefill_tokens: _Optional[int] = ..., energy_min_batch: _Optional[int] = ..., energy_max_wait_ms: _Optional[int] = ..., prefetch_next_kib: _Optional[int] = ...) -> None: ...

class Objective(_message.Message):
    __slots__ = ("goal", "max_ttft_p99_s", "max_itl_p99_s", "max_watts", "trial_requests", "trial_seconds", "tolerance", "min_requests")
    class Goal(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        GOAL_UNSPECIFIED: _ClassVar[Objective.Goal]
        GOAL_MAX_TOKENS_PER_S: _ClassVar[Objective.Goal]
        GOAL_MIN_JOULES_PER_TOKEN: _ClassVar[Objective.Goal]
    GOAL_UNSPECIFIED: Objective.Goal
    GOAL_MAX_TOKENS_PER_S: Objective.Goal
    GOAL_MIN_JOULES_PER_TOKEN: Objective.Goal
    GOAL_FIELD_NUMBER: _ClassVar[int]
    MAX_TTFT_P99_S_FIELD_NUMBER: _ClassVar[int]
    MAX_ITL_P99_S_FIELD_NUMBER: _ClassVar[int]
    MAX_WATTS_FIELD_NUMBER: _ClassVar[int]
    TRIAL_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    TRIAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    goal: Objective.Goal
    max_ttft_p99_s: float
    max_itl_p99_s: float
    max_watts: float
    trial_requests: int
    trial_seconds: float
    tolerance: float
    min_requests: int
    def __init__(self, goal: _Optional[_Union[Objective.Goal, str]] = ..., max_ttft_p99_s: _Optional[float] = ..., max_itl_p99_s: _Optional[float] = ..., max_watts: _Optional[float] = ..., trial_requests: _Optional[int] = ..., trial_seconds: _Optional[float] = ..., tolerance: _Optional[float] = ..., min_requests: _Optional[int] = ...) -> None: ...

class ModelOptions(_message.Message):
    __slots__ = ("chat_template",)
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    chat_template: str
    def __init__(self, chat_template: _Optional[str] = ...) -> None: ...

class ExecutionPlan(_message.Message):
    __slots__ = ("id", "version", "hash", "model", "backend", "weights", "scheduler_policy", "batching", "kv_cache", "limits", "determinism", "sampling", "profiling", "description", "created_at", "execution", "objective", "model_options")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_POLICY_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    DETERMINISM_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PROFILING_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    MODEL_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: int
    hash: str
    model: str
    backend: Backend
    weights: WeightFormat
    scheduler_policy: SchedulerPolicy
    batching: Batching
    kv_cache: KVCache
    limits: Limits
    determinism: Determinism
    sampling: SamplingDefaults
    profiling: bool
    description: str
    created_at: _timestamp_pb2.Timestamp
    execution: Execution
    objective: Objective
    model_options: ModelOptions
    def __init__(self, id: _Optional[str] = ..., version: _Optional[int] = ..., hash: _Optional[str] = ..., model: _Optional[str] = ..., backend: _Optional[_Union[Backend, str]] = ..., weights: _Optional[_Union[WeightFormat, str]] = ..., scheduler_policy: _Optional[_Union[SchedulerPolicy, str]] = ..., batching: _Optional[_Union[Batching, _Mapping]] = ..., kv_cache: _Optional[_Union[KVCache, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., determinism: _Optional[_Union[Determinism, _Mapping]] = ..., sampling: _Optional[_Union[SamplingDefaults, _Mapping]] = ..., profiling: _Optional[bool] = ..., description: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., execution: _Optional[_Union[Execution, _Mapping]] = ..., objective: _Optional[_Union[Objective, _Mapping]] = ..., model_options: _Optional[_Union[ModelOptions, _Mapping]] = ...) -> None: ...
