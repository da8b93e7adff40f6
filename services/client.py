"""A Python client for the ControlPlane service."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import grpc
from google.protobuf import json_format

from protos.planengine.v1 import control_plane_pb2 as pb
from protos.planengine.v1 import control_plane_pb2_grpc as pb_grpc
from protos.planengine.v1 import plan_pb2
from protos.planengine.v1 import suggestion_pb2 as sg


def plan_from_json(text: str) -> plan_pb2.ExecutionPlan:
    """A plan from its protobuf JSON form (field names as in plan.proto, enums by name)."""
    return json_format.Parse(text, plan_pb2.ExecutionPlan())


def plan_to_json(plan: plan_pb2.ExecutionPlan) -> str:
    return json_format.MessageToJson(plan, preserving_proto_field_name=True, indent=2)


def response_format_pb(value: pb.ResponseFormat | dict) -> pb.ResponseFormat:
    """A ResponseFormat from one key of: json_schema (a dict or its JSON text), json_object (True),
    regex, lark, gbnf (strings), choice (a list of strings); or the message itself."""
    if isinstance(value, pb.ResponseFormat):
        return value
    if not isinstance(value, dict) or len(value) != 1:
        raise ValueError("response_format takes one key: json_schema, json_object, regex, lark, gbnf or choice")
    (kind, v), = value.items()
    if kind == "json_schema" and not isinstance(v, str):
        v = json.dumps(v)
    if kind == "choice":
        return pb.ResponseFormat(choice=pb.Choices(values=list(v)))
    return pb.ResponseFormat(**{kind: v})


class PlanEngineClient:
    """Thin wrapper over the generated stub: keyword arguments in, protobuf messages out."""

    def __init__(self, target: str = "localhost:50051", token: str | None = None, tls_ca: Path | None = None,
                 timeout: float | None = None):
        if tls_ca is not None:
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(tls_ca.read_bytes()))
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.ControlPlaneStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.timeout = timeout

    def _call(self, method: str, request: Any) -> Any:
        return getattr(self.stub, method)(request, metadata=self.metadata, timeout=self.timeout)

    def generate(self, text: str | None = None, ids: Sequence[int] | None = None,
                 messages: Sequence[dict] | None = None, **fields: Any) -> Iterator[pb.GenerateResponse]:
        """Stream GenerateResponses. `fields` are GenerateRequest fields (max_tokens, seed, stop, sampling=...);
        `response_format` may be a dict such as {"json_schema": {...}} or {"regex": "[0-9]+"} (response_format_pb)."""
        sampling = fields.pop("sampling", None)
        if fields.get("response_format") is not None:
            fields["response_format"] = response_format_pb(fields["response_format"])
        request = pb.GenerateRequest(**fields)
        if sampling:
            request.sampling.CopyFrom(pb.SamplingParams(**sampling))
        if text is not None:
            request.text = text
        elif ids is not None:
            request.token_ids.ids.extend(ids)
        elif messages is not None:
            request.chat.messages.extend(pb.ChatMessage(**m) for m in messages)
        return self.stub.Generate(request, metadata=self.metadata, timeout=self.timeout)

    def cancel(self, request_id: str) -> bool:
        """True once the request is being stopped; an unknown or finished id raises RpcError NOT_FOUND."""
        return self._call("Cancel", pb.CancelRequest(request_id=request_id)).cancelled

    def list_suggestions(self, agent_id: str = "", plan_id: str = "", decision: str = "",
                         limit: int = 0) -> list[sg.SuggestionRecord]:
        """Audit-log records, newest first; `decision` e.g. "accepted", "pending_review" ("" for all)."""
        request = pb.ListSuggestionsRequest(agent_id=agent_id, plan_id=plan_id, limit=limit,
                                            decision=f"DECISION_{decision.upper()}" if decision else 0)
        return list(self._call("ListSuggestions", request).suggestions)

    def decide_suggestion(self, audit_id: int, approve: bool, note: str = "") -> sg.SuggestionRecord:
        action = pb.DecideSuggestionRequest.ACTION_APPROVE if approve else pb.DecideSuggestionRequest.ACTION_REJECT
        return self._call("DecideSuggestion", pb.DecideSuggestionRequest(id=audit_id, action=action, note=note))

    def submit_plan(self, plan: plan_pb2.ExecutionPlan | dict | str, activate: bool = False) -> pb.SubmitPlanResponse:
        if isinstance(plan, dict):
            plan = plan_from_json(json.dumps(plan))
        elif isinstance(plan, str):
            plan = plan_from_json(plan)
        return self._call("SubmitPlan", pb.SubmitPlanRequest(plan=plan, activate=activate))

    def get_plan(self, plan_id: str, version: int = 0) -> plan_pb2.ExecutionPlan:
        return self._call("GetPlan", pb.GetPlanRequest(id=plan_id, version=version))

    def active_plan(self) -> plan_pb2.ExecutionPlan:
        return self._call("GetActivePlan", pb.GetActivePlanRequest())

    def list_plans(self) -> pb.ListPlansResponse:
        return self._call("ListPlans", pb.ListPlansRequest())

    def activate(self, plan_id: str, version: int = 0) -> pb.ActivatePlanResponse:
        return self._call("ActivatePlan", pb.ActivatePlanRequest(id=plan_id, version=version))

    def rollback(self, plan_id: str = "", version: int = 0) -> pb.ActivatePlanResponse:
        return self._call("RollbackPlan", pb.RollbackPlanRequest(id=plan_id, version=version))

    def history(self, plan_id: str = "", limit: int = 0) -> pb.PlanHistoryResponse:
        return self._call("PlanHistory", pb.PlanHistoryRequest(id=plan_id, limit=limit))

    def tokenize(self, text: str, parse_special: bool = False) -> pb.TokenizeResponse:
        return self._call("Tokenize", pb.TokenizeRequest(text=text, parse_special=parse_special))

    def list_models(self) -> pb.ListModelsResponse:
        return self._call("ListModels", pb.ListModelsRequest())

    def inspect_model(self, model: str = "") -> pb.InspectModelResponse:
        return self._call("InspectModel", pb.InspectModelRequest(model=model))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "PlanEngineClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
