"""The control plane: plans in, a running engine out, every result stamped with its plan.

It owns the plan store and the active `Runtime` (the plan, its loaded model and
its engine worker). Activating a plan that changes the model, weight format,
backend or KV geometry loads the new runtime first and switches only once it is
ready; requests in flight finish on the old one, which is then closed. A plan
that changes only policy or limits is applied to the running worker live.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from backends.base import OpProfile, ProfiledBackend
from engine.control.metrics_hub import MetricsHub
from engine.control.plan_store import PlanEvent, PlanStore
from engine.control.plans import PlanEnvironment, changes_require_reload, prepare, validate
from engine.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from engine.memory.paged import BlockArena
from engine.model.registry import resolve
from engine.runtime.generate import LoadedModel
from engine.runtime.sampling import InvalidSamplingParams, SamplingParams
from engine.runtime.worker import EngineWorker, Final, RequestHandle, RequestSpec, WorkerLimits
from engine.scheduler.base import create_policy
from engine.scheduler.power import PowerGovernor
from engine.telemetry.energy import PowerMeter, default_meter
from engine.telemetry.tracing import PLAN_RELOAD, RequestTrace, engine_tracer, plan_apply_span
from protos.planengine.v1 import plan_pb2

log = logging.getLogger(__name__)

BACKEND_NAMES = {plan_pb2.BACKEND_CPU: "cpu", plan_pb2.BACKEND_CUDA: "cuda"}
WEIGHT_NAMES = {plan_pb2.WEIGHT_FORMAT_NATIVE: "native", plan_pb2.WEIGHT_FORMAT_F32: "f32",
                plan_pb2.WEIGHT_FORMAT_F16: "f16", plan_pb2.WEIGHT_FORMAT_Q8_0: "q8_0"}
POLICY_NAMES = {plan_pb2.SCHEDULER_POLICY_FIFO: "fifo", plan_pb2.SCHEDULER_POLICY_LATENCY: "latency",
                plan_pb2.SCHEDULER_POLICY_THROUGHPUT: "throughput",
                plan_pb2.SCHEDULER_POLICY_ENERGY_BALANCED: "energy_balanced"}


@dataclass(frozen=True)
class PlanStamp:
    """Which plan produced a result: id@version#hash."""

    id: str
    version: int
    hash: str
    model: str = ""  # for metric labels; not part of the stamp's identity

    @classmethod
    def of(cls, plan: plan_pb2.ExecutionPlan) -> "PlanStamp":
        return cls(plan.id, plan.version, plan.hash, plan.model)

    def __str__(self) -> str:
        return f"{self.id}@{self.version}#{self.hash[:12]}"


KV_DTYPES = {plan_pb2.KV_CACHE_DTYPE_F32: np.float32, plan_pb2.KV_CACHE_DTYPE_F16: np.float16}


def worker_limits(plan: plan_pb2.ExecutionPlan) -> WorkerLimits:
    return WorkerLimits(max_batch_size=plan.batching.max_batch_size,
                        max_batched_tokens=plan.batching.max_batched_tokens,
                        max_queue=plan.batching.max_queue,
                        max_tokens_per_request=plan.limits.max_tokens_per_request,
                        max_watts=plan.limits.max_watts)


class Runtime:
    """One plan made real: its model loaded on its backend, its KV arena, and a worker running it."""

    def __init__(self, plan: plan_pb2.ExecutionPlan, meter: PowerMeter,
                 on_finish: Callable[[Final], None] = lambda final: None):
        self.plan = plan
        self.model = LoadedModel(resolve(plan.model), backend=BACKEND_NAMES[plan.backend],
                                 weights=WEIGHT_NAMES[plan.weights],
                                 context_length=plan.limits.context_length or None,
                                 batch_invariant=plan.determinism.batch_invariant)
        c = self.model.config
        arena = BlockArena(c.n_layers, c.n_kv_heads, c.head_dim, plan.kv_cache.num_blocks, plan.kv_cache.block_size,
                           dtype=KV_DTYPES[plan.kv_cache.dtype])
        self.profile: OpProfile | None = None
        self.set_profiling(plan.profiling)
        self.worker = EngineWorker(self.model, create_policy(POLICY_NAMES[plan.scheduler_policy]),
                                   worker_limits(plan), arena=arena,
                                   governor=PowerGovernor(meter, plan.limits.max_watts), on_finish=on_finish)

    def set_profiling(self, enabled: bool) -> None:
        """Time every backend op (plan.profiling); the profile restarts when it is switched on."""
        transformer = self.model.transformer
        inner = getattr(transformer.backend, "_inner", transformer.backend)
        if enabled:
            self.profile = OpProfile()
            transformer.backend = ProfiledBackend(inner, self.profile)
        else:
            self.profile = None
            transformer.backend = inner

    def retire(self, grace_s: float | None = None) -> None:
        """Finish in-flight requests (up to `grace_s`), then release the model."""
        self.worker.drain(grace_s)
        self.worker.close()
        self.model.close()


@dataclass
class GenerateInput:
    """A Generate request in domain terms (the servicer builds it from protobuf)."""

    request_id: str = ""
    text: str | None = None
    ids: Sequence[int] | None = None
    messages: Sequence[dict] | None = None
    sampling: dict[str, Any] | None = None  # only the fields the client set
    max_tokens: int = 0
    stop: Sequence[str] = ()
    seed: int | None = None
    priority: int = 0
    plan_id: str = ""
    plan_version: int = 0
    top_logprobs: int = 0
    ignore_eos: bool = False


class ControlPlane:
    """Plans, the active runtime, and requests against it."""

    def __init__(self, store: PlanStore, env: PlanEnvironment,
                 on_serving: Callable[[bool], None] = lambda serving: None, meter: PowerMeter | None = None,
                 tracer_provider: Any = None):
        self.store = store
        self._tracer = engine_tracer(tracer_provider)  # None: the global provider, a no-op unless one is set
        self.env = env
        self.meter = meter or default_meter()
        self.metrics = MetricsHub(self.meter, lambda: self._runtime)
        self._on_serving = on_serving
        self._on_finish = self.metrics.on_finish
        self._runtime: Runtime | None = None
        self._switch = threading.Lock()  # one activation at a time
        self._retiring: list[threading.Thread] = []
        self._watch = None  # follows activations made by other replicas, when the store is shared

    # --- lifecycle -----------------------------------------------------------------------
    def start(self, initial: plan_pb2.ExecutionPlan | None = None, actor: str = "server") -> plan_pb2.ExecutionPlan:
        """Load the active plan (storing and activating `initial` first if there is none or it is given)."""
        active = self.store.active()
        if initial is not None or active is None:
            plan = prepare(initial if initial is not None else plan_pb2.ExecutionPlan(id="default"), self.env)
            active = self.store.submit(plan, actor=actor, activate=True)
        self._on_serving(False)
        with plan_apply_span(self._tracer, None, active, reload=True):
            self._runtime = Runtime(active, self.meter, self._on_finish)
        self._on_serving(True)
        log.info("serving plan %s (%s)", PlanStamp.of(active), active.model)
        watch = getattr(self.store, "watch_active", None)
        if watch is not None:  # a store shared by replicas: apply what the others activate
            self._watch = watch(self._follow)
        return active

    def close(self, grace_s: float | None = None) -> None:
        if self._watch is not None:
            self._watch.stop()
        self._on_serving(False)
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            runtime.retire(grace_s)
        for t in self._retiring:
            t.join()
        self.metrics.close()

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise Unavailable("the engine is not serving (loading or shutting down)")
        return self._runtime

    # --- plans ---------------------------------------------------------------------------
    def submit_plan(self, plan: plan_pb2.ExecutionPlan, activate: bool = False, actor: str = "") -> tuple[
            plan_pb2.ExecutionPlan, bool]:
        plan = prepare(plan, self.env)
        stored = self.store.submit(plan, actor=actor)
        if activate:
            self.activate(stored.id, stored.version, actor=actor)
        return stored, activate

    def activate(self, plan_id: str, version: int = 0, actor: str = "") -> tuple[
            plan_pb2.ExecutionPlan, plan_pb2.ExecutionPlan | None]:
        with self._switch:
            target = self.store.get(plan_id, version)
            self._apply(target)
            return self.store.activate(target.id, target.version, actor=actor)

    def rollback(self, plan_id: str = "", version: int = 0, actor: str = "") -> tuple[
            plan_pb2.ExecutionPlan, plan_pb2.ExecutionPlan | None]:
        with self._switch:
            target = self.store.rollback_target(plan_id, version)
            self._apply(target)
            return self.store.rollback(target.id, target.version, actor=actor)

    def submit_if_active(self, plan: plan_pb2.ExecutionPlan, base_version: int, actor: str = "") -> tuple[
            plan_pb2.ExecutionPlan, plan_pb2.ExecutionPlan]:
        """Store `plan` and make it active only if `plan.id`@`base_version` is still the active
        plan in the store, which replicas may share: of two racing on one base version, one wins
        and the other gets the store's stale FailedPrecondition (with `current_version`). It
        commits before loading; a plan that then fails to load is rolled back in the store."""
        plan = prepare(plan, self.env)
        with self._switch:
            stored, previous = self.store.submit_if_active(plan, base_version, actor=actor)
            try:
                self._apply(stored)
            except BaseException:
                if self.store.active() == stored:  # undo ours, not a later activation by another replica
                    self.store.rollback(actor=f"{actor} (load failed)".strip())
                raise
            return stored, previous

    def history(self, plan_id: str = "", limit: int = 100) -> list[PlanEvent]:
        return self.store.history(plan_id, limit or 100)

    def _follow(self, _plan: plan_pb2.ExecutionPlan | None) -> None:
        """The shared store says the active plan changed, maybe in another replica: run it.
        Raising makes the store's watcher call again at its next poll."""
        with self._switch:
            plan = self.store.active()  # re-read under the lock: a local activation may have committed since
            runtime = self._runtime
            if plan is None or runtime is None or PlanStamp.of(plan) == PlanStamp.of(runtime.plan):
                return
            log.info("following plan %s, activated by another replica", PlanStamp.of(plan))
            self._apply(plan)

    def _apply(self, target: plan_pb2.ExecutionPlan) -> None:
        """Make `target` the running plan: live if possible, else load-then-switch."""
        current = self.runtime
        with plan_apply_span(self._tracer, current.plan, target) as span:
            validate(target, self.env, stored=True)  # the server may have changed since it was stored
            reload = changes_require_reload(current.plan, target)
            span.set_attribute(PLAN_RELOAD, reload)
            if not reload:
                current.worker.set_policy(create_policy(POLICY_NAMES[target.scheduler_policy]))
                current.worker.set_limits(worker_limits(target))
                if target.profiling != current.plan.profiling:
                    current.set_profiling(target.profiling)
                current.plan = target
                return
            fresh = Runtime(target, self.meter, self._on_finish)  # loads while the current runtime keeps serving
        self._runtime = fresh
        t = threading.Thread(target=current.retire, name="retire-runtime", daemon=True)
        t.start()
        self._retiring = [x for x in self._retiring if x.is_alive()] + [t]

    # --- requests ------------------------------------------------------------------------
    def generate(self, req: GenerateInput) -> tuple[RequestHandle, PlanStamp]:
        runtime = self.runtime
        plan = runtime.plan
        if req.plan_id and (req.plan_id != plan.id or req.plan_version not in (0, plan.version)):
            wanted = f"{req.plan_id}@{req.plan_version or 'latest'}"
            raise FailedPrecondition(f"plan {wanted} is not the active plan ({PlanStamp.of(plan)}); activate it first")
        model = runtime.model
        prompt_ids = model.encode_prompt(text=req.text, ids=req.ids, messages=req.messages)
        params = self._sampling(plan, req)
        request_id = req.request_id or f"req-{uuid.uuid4().hex[:16]}"
        stamp = PlanStamp.of(plan)
        # captures this RPC thread's trace context; the worker writes the spans as the request ends
        trace = RequestTrace.start(self._tracer, request_id=request_id, model=plan.model,
                                   operation="chat" if req.messages is not None else "text_completion",
                                   max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                                   top_k=params.top_k, seed=params.seed, plan=stamp)
        spec = RequestSpec(request_id, prompt_ids, params, priority=req.priority, ignore_eos=req.ignore_eos,
                           top_logprobs=req.top_logprobs, tag=stamp, on_final=trace.finish)
        return runtime.worker.submit(spec), spec.tag

    @staticmethod
    def _sampling(plan: plan_pb2.ExecutionPlan, req: GenerateInput) -> SamplingParams:
        d = plan.sampling
        values = {"temperature": d.temperature, "top_k": d.top_k, "top_p": d.top_p, "min_p": d.min_p,
                  "repetition_penalty": d.repetition_penalty}
        values.update(req.sampling or {})
        seed = req.seed
        if seed is None and plan.determinism.seeded:
            seed = plan.determinism.default_seed
        if req.top_logprobs > 20:
            raise InvalidArgument(f"top_logprobs {req.top_logprobs} must be at most 20", field="top_logprobs")
        try:
            return SamplingParams(**values, seed=seed, max_tokens=req.max_tokens or d.max_tokens, stop=tuple(req.stop))
        except InvalidSamplingParams as exc:
            raise InvalidArgument(str(exc), field=f"sampling.{exc.field}") from None

    def cancel(self, request_id: str) -> bool:
        """Stop a queued or running request; NotFound for an id that is unknown, finished or already cancelled."""
        runtime = self._runtime
        if runtime is None or not runtime.worker.cancel(request_id):
            raise NotFound(f"no request {request_id!r} is queued or running (unknown, finished or already cancelled)")
        return True

    def tokenize(self, text: str, parse_special: bool = False) -> tuple[list[int], list[str]]:
        tok = self.runtime.model.tokenizer
        ids = tok.encode(text, parse_special=parse_special)
        return ids, [tok.id_to_piece(i) for i in ids]
