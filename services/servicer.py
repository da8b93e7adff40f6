"""ControlPlane servicer: protobuf → domain → protobuf, nothing else.

Errors are not handled here: `services.errors.ErrorMappingInterceptor` maps every
domain exception. Streaming methods are generators; the interceptor wraps the
whole stream.
"""

from __future__ import annotations

import json
from typing import Iterator

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from engine.control.control_plane import ControlPlane, GenerateInput, PlanStamp
from engine.errors import InvalidArgument
from engine.model import registry
from engine.model.gguf_file import ModelFile
from engine.runtime.generate import TokenEvent
from engine.runtime.worker import Final
from services.api.planengine.v1 import control_plane_pb2 as pb
from services.api.planengine.v1 import control_plane_pb2_grpc as pb_grpc

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
        messages=[{"role": m.role, "content": m.content} for m in request.chat.messages] if kind == "chat" else None,
        sampling={f: getattr(request.sampling, f) for f in SAMPLING_FIELDS if request.sampling.HasField(f)},
        max_tokens=request.max_tokens,
        stop=list(request.stop),
        seed=request.seed if request.HasField("seed") else None,
        priority=request.priority,
        plan_id=request.plan.id,
        plan_version=request.plan.version,
        top_logprobs=request.top_logprobs if request.logprobs else 0,
        ignore_eos=request.ignore_eos,
    )


class ControlPlaneServicer(pb_grpc.ControlPlaneServicer):
    def __init__(self, control: ControlPlane):
        self.control = control

    # --- plans ---------------------------------------------------------------------------
    def SubmitPlan(self, request: pb.SubmitPlanRequest, context: grpc.ServicerContext) -> pb.SubmitPlanResponse:
        plan, activated = self.control.submit_plan(request.plan, activate=request.activate, actor=_actor(context))
        return pb.SubmitPlanResponse(plan=plan, activated=activated)

    def GetPlan(self, request: pb.GetPlanRequest, context: grpc.ServicerContext):
        return self.control.store.get(request.id, request.version)

    def GetActivePlan(self, request: pb.GetActivePlanRequest, context: grpc.ServicerContext):
        return self.control.runtime.plan

    def ListPlans(self, request: pb.ListPlansRequest, context: grpc.ServicerContext) -> pb.ListPlansResponse:
        active = self.control.store.active()
        return pb.ListPlansResponse(plans=self.control.store.list_latest(), active_id=active.id if active else "",
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
                yield pb.GenerateResponse(request_id=handle.request_id, delta=delta)
            elif isinstance(event, Final):
                yield pb.GenerateResponse(request_id=handle.request_id, final=_final(event))

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
        name = request.model or self.control.runtime.plan.model
        info = ModelFile(registry.resolve(name, pull_missing=False)).describe()
        details = {k: info[k] for k in ("name", "config", "tensor_types", "tokenizer", "metadata")}
        return pb.InspectModelResponse(
            path=info["path"], architecture=info["architecture"], supported=info["supported"],
            parameters=info["parameters"], file_size=info["file_size"], details_json=json.dumps(details, default=str),
            tensors=[pb.TensorInfo(name=t["name"], type=t["type"], shape=t["shape"], bytes=t["bytes"])
                     for t in info["tensors"]])

    # GetMetrics, WatchMetrics and Suggest are declared in the contract and answer UNIMPLEMENTED
    # (the generated base class) until their issues build them.


def _final(f: Final) -> pb.GenerateFinal:
    return pb.GenerateFinal(
        finish_reason=f.finish_reason,
        usage=pb.Usage(prompt_tokens=f.prompt_tokens, completion_tokens=f.completion_tokens),
        timings=pb.Timings(queue_s=f.timings["queue_s"], time_to_first_token_s=f.timings["ttft_s"],
                           decode_s=f.timings["decode_s"], total_s=f.timings["total_s"]),
        plan=_stamp(f.tag), seed=f.seed)


def _actor(context: grpc.ServicerContext) -> str:
    return context.peer()
