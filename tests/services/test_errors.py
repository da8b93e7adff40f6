"""Domain errors map to gRPC statuses with the right google.rpc details."""

from __future__ import annotations

from google.rpc import code_pb2, error_details_pb2

from engine.errors import InvalidArgument, NotFound, ResourceExhausted
from services.errors import to_status


def _unpack(status, kind):
    out = []
    for detail in status.details:
        msg = kind()
        if detail.Unpack(msg):
            out.append(msg)
    return out


def test_retry_info_only_when_waiting_can_help():
    status = to_status(ResourceExhausted("queue is full", retry_after_s=2.5))
    assert status.code == code_pb2.RESOURCE_EXHAUSTED
    (info,) = _unpack(status, error_details_pb2.RetryInfo)
    assert info.retry_delay.seconds == 2 and info.retry_delay.nanos == 500_000_000
    assert _unpack(to_status(ResourceExhausted("larger than the arena")), error_details_pb2.RetryInfo) == []


def test_field_violation_and_plain_codes():
    status = to_status(InvalidArgument("top_p must be in (0, 1]", field="sampling.top_p"))
    (bad,) = _unpack(status, error_details_pb2.BadRequest)
    assert status.code == code_pb2.INVALID_ARGUMENT and bad.field_violations[0].field == "sampling.top_p"
    status = to_status(NotFound("no plan 'x'"))
    assert status.code == code_pb2.NOT_FOUND and not status.details
