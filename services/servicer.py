"""ControlPlane servicer: protobuf → domain → protobuf, nothing else.

Errors are not handled here: `services.errors.ErrorMappingInterceptor` maps every
domain exception. Streaming methods are generators; the interceptor wraps the
whole stream.
"""

from __future__ import annotations

import json
import math
from typing import Iterator

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from engine.control.control_plane import ControlPlane, GenerateInput, PlanStamp
from engine.control.agents import DECISIONS, SuggestionRecord, SuggestionReviewer, Verdict
from engine.errors import FailedPrecondition, InvalidArgument, RequestFailed, Unavailable
from engine.model import registry
from engine.runtime.constraints import ResponseFormat
from engine.runtime.generate import TokenEvent
from engine.runtime.tools import Tool, ToolCall
from engine.runtime.worker import Final
from protos.planengine.v1 import control_plane_pb2 as pb
from protos.planengine.v1 import control_plane_pb2_grpc as pb_grpc
from protos.planengine.v1 import suggestion_pb2 as sg
from services.agent_auth import bearer_token
from services.streams import Closing, requests_until_idle

SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty")


def _stamp(stamp: PlanStamp) -> pb.PlanStamp:
    return pb.PlanStamp(id=stamp.id, version=stamp.version, hash=stamp.hash)


def _timestamp(unix: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(unix * 1e9))
    return ts


def generate_input(request: pb.GenerateRequest) -> GenerateInput:
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise InvalidArgument("the prompt is empty: set text, token_ids or chat", field="prompt")
    return GenerateInput(
        request_id=request.request_id,
        text=request.text if kind == "text" else None,
        ids=list(request.token_ids.ids) if kind == "token_ids" else None,
        messages=[_message(m) for m in request.chat.messages] if kind == "chat" else None,
        sampling={f: getattr(request.sampling, f) for f in SAMPLING_FIELDS if request.sampling.HasField(f)},
        max_tokens=request.max_tokens,
        stop=list(request.stop),
        seed=request.seed if request.HasField("seed") else None,
        priority=request.priority,
        plan_id=request.plan.id,
        plan_version=request.plan.version,
        top_logprobs=request.top_logprobs if request.logprobs else 0,
        ignore_eos=request.ignore_eos,
        logit_bias=dict(request.logit_bias),
        stop_token_ids=list(request.stop_token_ids),
        min_tokens=request.min_tokens,
        prompt_logprobs=request.prompt_logprobs if request.HasField("prompt_logprobs") else None,
        n=request.n or 1,
        tools=[Tool(t.name, t.description, t.parameters or '{"type": "object"}') for t in request.tools],
        tool_choice=request.tool_choice or "auto",
        response_format=response_format(request.response_format) if request.HasField("response_format") else None,
    )


def response_format(fmt: pb.ResponseFormat) -> ResponseFormat:
    kind = fmt.WhichOneof("format")
    if kind is None:
        raise InvalidArgument("response_format is set but empty: set one of json_schema, json_object, regex, "
                              "lark, gbnf, choice", field="response_format")
    if kind == "json_object":
        if not fmt.json_object:
            raise InvalidArgument("response_format.json_object must be true (or leave response_format unset)",
                                  field="response_format.json_object")
        return ResponseFormat("json_object")
    if kind == "choice":
        return ResponseFormat("choice", tuple(fmt.choice.values))
    return ResponseFormat(kind, getattr(fmt, kind))


def _message(m: pb.ChatMessage) -> dict:
    out = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [ToolCall(c.name, c.arguments, c.id) for c in m.tool_calls]
    if m.role == "tool":
        out["name"], out["tool_call_id"] = m.name, m.tool_call_id
    return out


class ControlPlaneServicer(pb_grpc.ControlPlaneServicer):
    def __init__(self, control: ControlPlane, closing: Closing | None = None, suggest_idle_s: float = 300.0):
        self.control = control
        self.closing = closing or Closing()  # set by the server when it stops: waiting streams end at once
        self.suggest_idle_s = suggest_idle_s

    # --- plans ---------------------------------------------------------------------------
    def SubmitPlan(self, request: pb.SubmitPlanRequest, context: grpc.ServicerContext) -> pb.SubmitPlanResponse:
        plan, activated = self.control.submit_plan(request.plan, activate=request.activate, actor=_actor(context))
        return pb.SubmitPlanResponse(plan=plan, activated=activated)

    def GetPlan(self, request: pb.GetPlanRequest, context: grpc.ServicerContext):
        return self.control.get_plan(request.id, request.version)

    def GetActivePlan(self, request: pb.GetActivePlanRequest, context: grpc.ServicerContext):
        return self.control.active_plan

    def ListPlans(self, request: pb.ListPlansRequest, context: grpc.ServicerContext) -> pb.ListPlansResponse:
        plans, active = self.control.list_plans()
        return pb.ListPlansResponse(plans=plans, active_id=active.id if active else "",
                                    active_version=active.version if active else 0)

    def ActivatePlan(self, request: pb.ActivatePlanRequest, context: grpc.ServicerContext):
        plan, previous = self.control.activate(request.id, request.version, actor=_actor(context))
        return pb.ActivatePlanResponse(plan=plan, previous=previous)

    def RollbackPlan(self, request: pb.RollbackPlanRequest, context: grpc.ServicerContext):
        plan, previous = self.control.rollback(request.id, request.version, actor=_actor(context))
        return pb.ActivatePlanResponse(plan=plan, previous=previous)

    def PlanHistory(self, request: pb.PlanHistoryRequest, context: grpc.ServicerContext) -> pb.PlanHistoryResponse:
        return pb.PlanHistoryResponse(events=[
            pb.PlanEvent(seq=e.seq, action=e.action, plan_id=e.plan_id, version=e.version, hash=e.hash,
                         actor=e.actor, at=_timestamp(e.at), detail=e.detail)
            for e in self.control.history(request.id, request.limit)])

    # --- generation ----------------------------------------------------------------------
    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        if self.closing.is_set():  # draining: the port stays open for the streams in flight (server.stop)
            raise Unavailable("the server is draining (shutting down): send the request to another replica")
        handle, stamp = self.control.generate(generate_input(request))
        # a client disconnect or an expired deadline cancels the request at once
        context.add_callback(handle.cancel)
        for event in handle.events(alive=context.is_active):
            if isinstance(event, TokenEvent):
                delta = pb.TokenDelta(text=event.text)
                if event.token_id is not None:
                    delta.token_ids.append(event.token_id)
                    if request.logprobs:
                        delta.logprobs.append(event.logprob)
                        delta.top_logprobs.extend(pb.TopLogprob(token_id=t, logprob=lp)
                                                  for t, lp in event.top_logprobs)
                yield pb.GenerateResponse(request_id=handle.request_id, delta=delta, index=event.index)
            elif isinstance(event, Final):
                if event.error:  # the engine ended this request (alone) with an error: an error status
                    raise RequestFailed(f"request {handle.request_id} failed in the engine: {event.error}")
                yield pb.GenerateResponse(request_id=handle.request_id, index=event.index,
                                          final=_final(event, include_text=request.include_text))

    def Cancel(self, request: pb.CancelRequest, context: grpc.ServicerContext) -> pb.CancelResponse:
        return pb.CancelResponse(cancelled=self.control.cancel(request.request_id))

    def Tokenize(self, request: pb.TokenizeRequest, context: grpc.ServicerContext) -> pb.TokenizeResponse:
        ids, pieces = self.control.tokenize(request.text, request.parse_special)
        return pb.TokenizeResponse(ids=ids, pieces=pieces)

    # --- models --------------------------------------------------------------------------
    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[
            pb.ModelInfo(name=r["name"], cached=r["cached"], path=r["path"], size=r["size"] or 0,
                         source=r["source"], description=r["description"]) for r in registry.list_models()])

    def InspectModel(self, request: pb.InspectModelRequest, context: grpc.ServicerContext):
        info = self.control.inspect_model(request.model)
        details = {k: info[k] for k in ("name", "config", "tensor_types", "tokenizer", "metadata")}
        return pb.InspectModelResponse(
            path=info["path"], architecture=info["architecture"], supported=info["supported"],
            parameters=info["parameters"], file_size=info["file_size"], details_json=json.dumps(details, default=str),
            tensors=[pb.TensorInfo(name=t["name"], type=t["type"], shape=t["shape"], bytes=t["bytes"])
                     for t in info["tensors"]])

    # --- metrics -------------------------------------------------------------------------
    def GetMetrics(self, request: pb.GetMetricsRequest, context: grpc.ServicerContext) -> pb.MetricsSnapshot:
        return metrics_snapshot(self.control.metrics.snapshot())

    def WatchMetrics(self, request: pb.WatchMetricsRequest, context: grpc.ServicerContext):
        interval = request.interval_s or 1.0
        if not 0.05 <= interval <= 3600:
            raise InvalidArgument(f"interval_s {interval} must be in 0.05..3600", field="interval_s")
        # wakes at once when the client goes (cancel, deadline) or the server stops
        wake, key = self.closing.waiter(context)
        try:
            while context.is_active() and not self.closing.is_set():
                yield metrics_snapshot(self.control.metrics.snapshot())
                wake.wait(interval)
        finally:
            self.closing.unsubscribe(key)

    # --- WeOS agents ---------------------------------------------------------------------
    # Set by create_server; without one the suggestion RPCs answer FAILED_PRECONDITION.
    reviewer: SuggestionReviewer | None = None

    def _reviewer(self) -> SuggestionReviewer:
        if self.reviewer is None:
            raise FailedPrecondition("this server keeps no suggestion log")
        return self.reviewer

    def Suggest(self, request_iterator: Iterator[sg.Suggestion],
                context: grpc.ServicerContext) -> Iterator[sg.SuggestionVerdict]:
        reviewer = self._reviewer()
        agent = reviewer.authenticate(bearer_token(context.invocation_metadata()))
        # one verdict each, in order; an idle stream is closed, and every stream when the server stops
        for suggestion in requests_until_idle(request_iterator, self.suggest_idle_s, self.closing):
            yield _verdict(reviewer.review(agent, suggestion))

    def ListSuggestions(self, request: pb.ListSuggestionsRequest,
                        context: grpc.ServicerContext) -> pb.ListSuggestionsResponse:
        reviewer = self._reviewer()
        agent = reviewer.policy.authenticate(bearer_token(context.invocation_metadata()))
        decision = _DECISIONS.get(request.decision)
        if decision is None:
            raise InvalidArgument(f"unknown decision {request.decision}", field="decision")
        records = reviewer.list(agent.id if agent else request.agent_id,  # an agent sees only its own
                                decision, request.plan_id, request.limit)
        return pb.ListSuggestionsResponse(suggestions=[_suggestion_record(r) for r in records])

    def DecideSuggestion(self, request: pb.DecideSuggestionRequest, context: grpc.ServicerContext) -> sg.SuggestionRecord:
        if request.action not in (pb.DecideSuggestionRequest.ACTION_APPROVE, pb.DecideSuggestionRequest.ACTION_REJECT):
            raise InvalidArgument("action must be ACTION_APPROVE or ACTION_REJECT", field="action")
        record = self._reviewer().decide(request.id, request.action == pb.DecideSuggestionRequest.ACTION_APPROVE,
                                         actor=_actor(context), note=request.note)
        return _suggestion_record(record)


def _final(f: Final, include_text: bool = False) -> pb.GenerateFinal:
    return pb.GenerateFinal(
        finish_reason=f.finish_reason, reason=_FINISH_REASONS.get(f.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        text=f.text if include_text else "",
        usage=pb.Usage(prompt_tokens=f.prompt_tokens, completion_tokens=f.completion_tokens),
        timings=pb.Timings(queue_s=f.timings["queue_s"], time_to_first_token_s=f.timings["ttft_s"],
                           decode_s=f.timings["decode_s"], total_s=f.timings["total_s"]),
        plan=_stamp(f.tag), seed=f.seed, energy_j=f.energy_j,
        joules_per_token=f.energy_j / f.completion_tokens if f.completion_tokens else 0.0,
        energy_source=f.energy_source,
        prompt_logprobs=[pb.PromptLogprob(token_id=t, logprob=lp, top_logprobs=[
            pb.TopLogprob(token_id=a, logprob=alp) for a, alp in top]) for t, lp, top in f.prompt_logprobs],
        tool_calls=[pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in f.tool_calls],
        content=f.content or "")


_FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
                   "cancelled": pb.FINISH_REASON_CANCELLED, "error": pb.FINISH_REASON_ERROR}


def _latency(summary: dict | None) -> pb.LatencySummary:
    return pb.LatencySummary(**summary) if summary else pb.LatencySummary()


def metrics_snapshot(snap: dict) -> pb.MetricsSnapshot:
    plan = snap.get("plan")
    return pb.MetricsSnapshot(
        at=_timestamp(snap["at"]), plan=_stamp(PlanStamp.of(plan)) if plan is not None else None,
        running=snap["running"], waiting=snap["waiting"], generation_tokens_per_s=snap["generation_tokens_per_s"],
        ttft=_latency(snap["ttft"]), itl=_latency(snap["itl"]), e2e=_latency(snap["e2e"]),
        kv_cache_usage=snap["kv_cache_usage"], power_w=snap["power_w"], energy_j=snap["energy_j"],
        energy_source=snap["energy_source"], prompt_tokens_total=snap["prompt_tokens_total"],
        generation_tokens_total=snap["generation_tokens_total"], requests_total=snap["requests_total"])


def _actor(context: grpc.ServicerContext) -> str:
    return context.peer()


# --- WeOS agents: domain verdicts and records -> protobuf ----------------------------------
_DECISIONS = {0: "", **{sg.SuggestionVerdict.Decision.Value("DECISION_" + d.upper()): d for d in DECISIONS}}


def _verdict(v: Verdict) -> sg.SuggestionVerdict:
    out = sg.SuggestionVerdict(
        suggestion_id=v.suggestion_id, decision=sg.SuggestionVerdict.Decision.Value("DECISION_" + v.decision.upper()),
        reason=v.reason, resulting_version=v.resulting_version, resulting_hash=v.resulting_hash,
        current_version=v.current_version, decided_at=_timestamp(v.decided_at), audit_id=v.audit_id,
        rejection=sg.Rejection.Value("REJECTION_" + v.rejection.upper()) if v.rejection else 0)
    if v.resulting_plan is not None:
        out.resulting_plan.CopyFrom(v.resulting_plan)
    return out


def _suggestion_record(r: SuggestionRecord) -> sg.SuggestionRecord:
    out = sg.SuggestionRecord(id=r.id, agent_id=r.agent_id, suggestion=r.suggestion,
                              received_at=_timestamp(r.received_at), mode=r.mode, decided_by=r.decided_by,
                              patch_json=r.patch_json)
    if r.verdict is not None:
        out.verdict.CopyFrom(_verdict(r.verdict))
    if r.trial is not None:
        out.trial.CopyFrom(_trial(r.trial))
    return out


def _trial(t) -> sg.TrialOutcome:
    out = sg.TrialOutcome(state=sg.TrialOutcome.State.Value("STATE_" + t.state.upper()), base_version=t.base_version,
                          version=t.version, started_at=_timestamp(t.started_at),
                          window_requests=t.objective.trial_requests, window_s=t.objective.trial_seconds,
                          reason=t.reason)
    if t.ended_at is not None:
        out.ended_at.CopyFrom(_timestamp(t.ended_at))
    for name, m in (("base", t.base), ("trial", t.trial)):
        if m is not None:
            getattr(out, name).CopyFrom(sg.TrialMeasurement(
                requests=m.requests, failed=m.failed, tokens=m.tokens, busy_s=m.busy_s, tokens_per_s=m.tokens_per_s,
                joules_per_token=m.joules_per_token, watts=m.watts, ttft_p99_s=m.ttft_p99_s, itl_p99_s=m.itl_p99_s))
    if t.gain is not None and math.isfinite(t.gain):
        out.gain = t.gain
    return out
