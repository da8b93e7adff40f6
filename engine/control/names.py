"""The plan's enums by the names the engine, the CLI and the metrics use: BACKEND_CPU is "cpu".

One table per enum, derived from the proto, so a value added to plan.proto is named here
without an edit. Numbers the schema does not know have no name: `name(table, n)` shows them
as the bare number (validation reports them).
"""

from __future__ import annotations

from google.protobuf.descriptor import EnumDescriptor

from protos.planengine.v1 import plan_pb2


def short_names(enum_type: EnumDescriptor, prefix: str) -> dict[int, str]:
    """{number: name without the prefix, lower case}, UNSPECIFIED left out."""
    return {v.number: v.name.removeprefix(prefix).lower()
            for v in enum_type.values if not v.name.endswith("_UNSPECIFIED")}


BACKENDS = short_names(plan_pb2.Backend.DESCRIPTOR, "BACKEND_")  # "cpu", "cuda"
WEIGHT_FORMATS = short_names(plan_pb2.WeightFormat.DESCRIPTOR, "WEIGHT_FORMAT_")  # "native", "f32", ...
POLICIES = short_names(plan_pb2.SchedulerPolicy.DESCRIPTOR, "SCHEDULER_POLICY_")  # "fifo", ...
KV_DTYPES = short_names(plan_pb2.KVCacheDtype.DESCRIPTOR, "KV_CACHE_DTYPE_")  # "f32", "f16"


def name(table: dict[int, str], number: int) -> str:
    """The short name of an enum number, or the number itself when the schema has none."""
    return table.get(number, str(number))
