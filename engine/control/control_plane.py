"""The control plane: plans in, a running engine out, every result stamped with its plan.

It owns the plan store and the active `Runtime` (the plan, its loaded model and
its engine worker). Activating a plan that changes the model, weight format,
backend or KV geometry loads the new runtime first and switches only once it is
ready; requests in flight finish on the old one, which is then closed. A plan
that changes only policy, limits or execution settings is applied to the running worker
live, from its next step.

Load before commit: the store records a version as active only after its runtime
is loaded (`_activation`: load, then the store's write, then the switch), so a
kill at any moment leaves an active plan that loaded once. A load that fails
writes nothing but an "activation_failed" event; a store write that fails (a
lost compare-and-swap) discards the loaded runtime. At start, an active plan
that no longer loads (its file replaced, the server's backends changed) is
reported and the newest version that loads is served instead (`fallback`).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from engine import execution
from engine.control import names
from engine.control.limits import RequestLimits, check_request, check_text, prompt_byte_limit
from engine.control.metrics_hub import MetricsHub
from engine.control.plan_store import PlanEvent, PlanStore, label
from engine.control.plans import PlanEnvironment, PreparedPlan, prepare, validate
from engine.errors import DataLoss, EngineError, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from engine.model.gguf_file import ModelFile
from engine.runtime.constraints import ResponseFormat
from engine.runtime.engine import Engine, EngineSpec
from engine.runtime.generate import LoadedModel
from engine.runtime.sampling import InvalidSamplingParams, SamplingParams
from engine.runtime.tools import Tool, parse_output, tool_chat
from engine.runtime.worker import EngineWorker, Final, RequestHandle, RequestSpec, WorkerLimits
from engine.telemetry.energy import PowerMeter, default_meter
from engine.telemetry.tracing import PLAN_RELOAD, RequestTrace, engine_tracer, plan_apply_span
from protos.planengine.v1 import plan_pb2

log = logging.getLogger(__name__)


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


LONG_PROMPT_CHARS = 64 * 1024  # longer prompts are tokenized at low priority (ControlPlane._encode)


def _lower_thread_priority() -> None:
    """Make the calling thread yield the CPU to the engine (Linux: nice is per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass


def engine_spec(plan: plan_pb2.ExecutionPlan, path: Path) -> EngineSpec:
    """The engine core's plain-data view of a (normalized, validated) plan; `path`: its model file."""
    return EngineSpec(
        path=path, backend=names.BACKENDS[plan.backend], weights=names.WEIGHT_FORMATS[plan.weights],
        context_length=plan.limits.context_length or None, batch_invariant=plan.determinism.batch_invariant,
        execution=execution.resolve(plan.execution),
        kv_blocks=plan.kv_cache.num_blocks, kv_block_size=plan.kv_cache.block_size,
        kv_dtype=names.KV_DTYPES[plan.kv_cache.dtype], policy=names.POLICIES[plan.scheduler_policy],
        limits=WorkerLimits(max_batch_size=plan.batching.max_batch_size,
                            max_batched_tokens=plan.batching.max_batched_tokens,
                            max_queue=plan.batching.max_queue,
                            max_tokens_per_request=plan.limits.max_tokens_per_request,
                            max_watts=plan.limits.max_watts),
        # kv_cache.prefix_caching: unset means on
        prefix_caching=not plan.kv_cache.HasField("prefix_caching") or plan.kv_cache.prefix_caching,
        cache_salt=f"{plan.model}|{plan.backend}|{plan.weights}".encode(),
        profiling=plan.profiling, chat_template=plan.model_options.chat_template)


class Runtime:
    """The running plan and the engine it runs on (`engine/runtime/engine.py`)."""

    def __init__(self, plan: plan_pb2.ExecutionPlan, engine: Engine):
        self.plan = plan
        self.engine = engine

    @property
    def model(self) -> LoadedModel:
        return self.engine.model

    @property
    def worker(self) -> EngineWorker:
        return self.engine.worker

    @property
    def profile(self):  # backends.base.OpProfile | None: per-op timings when the plan profiles
        return self.engine.profile

    def retire(self, grace_s: float | None = None) -> None:
        self.engine.retire(grace_s)


FALLBACK_TRIES = 8  # stored versions a start tries to load when the active one cannot load


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
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, -100..100
    stop_token_ids: Sequence[int] = ()
    min_tokens: int = 0
    prompt_logprobs: int | None = None  # alternatives per prompt position (0..20); None: none
    n: int = 1  # completions of the prompt (each its own seed: seed + index)
    response_format: ResponseFormat | None = None  # structured output; None: free text
    tools: Sequence[Tool] = ()  # with chat messages: the model calls one or replies (engine/runtime/tools.py)
    tool_choice: str = "auto"


class ToolCallHandle:
    """A request with tools: each Final gets the tool calls (or the reply) parsed out of its text."""

    def __init__(self, handle: RequestHandle):
        self._handle = handle
        self.request_id = handle.request_id

    def events(self, poll_s: float = 0.1, alive=lambda: True):
        for event in self._handle.events(poll_s, alive):
            if isinstance(event, Final) and not event.error:
                event.content, event.tool_calls = parse_output(event.text)
            yield event

    def cancel(self) -> bool:
        return self._handle.cancel()


class ControlPlane:
    """Plans, the active runtime, and requests against it."""

    def __init__(self, store: PlanStore, env: PlanEnvironment,
                 on_serving: Callable[[bool], None] = lambda serving: None, meter: PowerMeter | None = None,
                 tracer_provider: Any = None, limits: RequestLimits = RequestLimits()):
        self.store = store
        self.limits = limits
        self._tracer = engine_tracer(tracer_provider)  # None: the global provider, a no-op unless one is set
        self.env = env
        self.meter = meter or default_meter()
        self.metrics = MetricsHub(self.meter, lambda: self._runtime)
        self._on_serving = on_serving
        self._on_finish = self.metrics.on_finish
        self._runtime: Runtime | None = None
        self._switch = threading.Lock()  # one activation at a time
        # long prompts are tokenized here, at a lower CPU priority than the engine's threads
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize",
                                              initializer=_lower_thread_priority)
        self._retiring: list[threading.Thread] = []
        self._watch = None  # follows activations made by other replicas, when the store is shared

    # --- lifecycle -----------------------------------------------------------------------
    def start(self, initial: plan_pb2.ExecutionPlan | None = None, actor: str = "server") -> plan_pb2.ExecutionPlan:
        """Load the active plan (storing and activating `initial` first if there is none or it is
        given: loaded first, stored only once it runs). An active plan that cannot load is
        reported and the newest stored version that loads is served instead (`self.fallback`
        says which and why); with none that loads, this raises, naming what failed."""
        self._on_serving(False)
        active = self.store.active()
        if initial is not None or active is None:
            plan = prepare(initial if initial is not None else plan_pb2.ExecutionPlan(id="default"), self.env)
            with plan_apply_span(self._tracer, None, plan, reload=True):
                runtime = self._load_or_record(plan, actor)
            try:
                active = self.store.submit(plan, actor=actor, activate=True)
            except BaseException:
                runtime.retire(0)
                raise
            runtime.plan = active
        else:
            try:
                with plan_apply_span(self._tracer, None, active, reload=True):
                    runtime = self._load_or_record(active, actor, check=True)
            except Exception as exc:  # noqa: BLE001 - any load failure: try the others, then report
                runtime, active = self._fall_back(active, exc, actor)
        self._runtime = runtime
        self._on_serving(True)
        log.info("serving plan %s (%s)", PlanStamp.of(active), active.model)
        # a store shared by replicas: apply what the others activate (None for a store of our own)
        self._watch = self.store.watch_active(self._follow)
        return active

    fallback: str | None = None  # set when start() serves another version than the stored active one

    def _fall_back(self, broken: plan_pb2.ExecutionPlan, error: Exception,
                   actor: str) -> tuple[Runtime, plan_pb2.ExecutionPlan]:
        """The newest stored version that loads, made active in the store, after `broken` (the
        active one) failed with `error`. Raises EngineError naming what failed when none loads."""
        log.error("the active plan %s cannot load: %s; looking for the newest version that loads",
                  label(broken), error)
        tried = [f"{label(broken)}: {error}"]
        for candidate in self._fallback_candidates(broken):
            if len(tried) > FALLBACK_TRIES:
                break
            try:
                runtime = self._load(candidate, check=True)
            except Exception as exc:  # noqa: BLE001
                log.error("fallback: %s cannot load either: %s", label(candidate), exc)
                tried.append(f"{label(candidate)}: {exc}")
                continue
            reason = f"{label(broken)} cannot load ({error})"
            try:
                now, _ = self.store.rollback(candidate.id, candidate.version,
                                             actor=f"{actor} (fallback: {reason})"[:500])
            except BaseException:
                runtime.retire(0)
                raise
            runtime.plan = now
            self.fallback = f"the active plan {reason}; serving {label(now)}, the newest version that loads"
            log.error("FALLBACK: %s", self.fallback)
            return runtime, now
        raise EngineError(f"no stored plan version loads: {'; '.join(tried)}"[:4000])

    def _fallback_candidates(self, broken: plan_pb2.ExecutionPlan):
        """Older versions of the broken plan's id, newest first, then the newest version of every other id."""
        for version in range(broken.version - 1, 0, -1):
            try:
                yield self.store.get(broken.id, version)
            except (DataLoss, NotFound) as exc:
                log.error("fallback: skipping %s@%d: %s", broken.id, version, exc)
        for plan in self.store.list_latest():
            if plan.id != broken.id:
                yield plan

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
        self._tokenizing.shutdown(wait=False, cancel_futures=True)

    def _worker_lost(self, reason: str) -> None:
        """The active runtime's engine thread stopped: health turns NOT_SERVING (new requests get
        UNAVAILABLE from the worker) until a restart or a new plan's runtime replaces it."""
        runtime = self._runtime
        if runtime is not None and runtime.worker.lost is None:
            return  # a retiring runtime's worker: not the one serving
        log.critical("engine worker lost (%s): reporting NOT_SERVING", reason)
        self._on_serving(False)

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise Unavailable("the engine is not serving (loading or shutting down)")
        return self._runtime

    # --- plans ---------------------------------------------------------------------------
    def submit_plan(self, plan: plan_pb2.ExecutionPlan | PreparedPlan, activate: bool = False,
                    actor: str = "") -> tuple[plan_pb2.ExecutionPlan, bool]:
        plan = self._prepared(plan)
        if not activate:
            return self.store.submit(plan, actor=actor), False
        with self._switch:
            def commit():
                stored = self.store.submit(plan, actor=actor, activate=True)
                return stored, stored
            return self._activation(plan, commit, actor), True

    def activate(self, plan_id: str, version: int = 0, actor: str = "") -> tuple[
            plan_pb2.ExecutionPlan, plan_pb2.ExecutionPlan | None]:
        with self._switch:
            target = self.store.get(plan_id, version)
            return self._activation(target, lambda: (target, self.store.activate(target.id, target.version,
                                                                                 actor=actor)),
                                    actor, check=True)

    def rollback(self, plan_id: str = "", version: int = 0, actor: str = "") -> tuple[
            plan_pb2.ExecutionPlan, plan_pb2.ExecutionPlan | None]:
        with self._switch:
            target = self.store.rollback_target(plan_id, version)
            return self._activation(target, lambda: (target, self.store.rollback(target.id, target.version,
                                                                                 actor=actor)),
                                    actor, check=True)

    def submit_if_active(self, plan: plan_pb2.ExecutionPlan | PreparedPlan, base_version: int,
                         actor: str = "") -> tuple[
            plan_pb2.ExecutionPlan, plan_pb2.ExecutionPlan]:
        """Store `plan` and make it active only if `plan.id`@`base_version` is still the active
        plan in the store, which replicas may share: of two racing on one base version, one wins
        and the other gets the store's stale FailedPrecondition (with `current_version`). The
        model loads first; the compare-and-swap commits only once it is ready (a loser's loaded
        runtime is discarded), and a plan that fails to load stores nothing."""
        plan = self._prepared(plan)
        with self._switch:
            def commit():
                stored, previous = self.store.submit_if_active(plan, base_version, actor=actor)
                return stored, (stored, previous)
            return self._activation(plan, commit, actor)

    def _prepared(self, plan: plan_pb2.ExecutionPlan | PreparedPlan) -> plan_pb2.ExecutionPlan:
        """A plan ready to store: as prepared already, or normalized and validated now."""
        return plan.plan if isinstance(plan, PreparedPlan) else prepare(plan, self.env)

    @property
    def active_plan(self) -> plan_pb2.ExecutionPlan:
        """The plan requests run under now."""
        return self.runtime.plan

    def get_plan(self, plan_id: str, version: int = 0) -> plan_pb2.ExecutionPlan:
        """A stored version (0: the newest); NotFound if there is none."""
        return self.store.get(plan_id, version)

    def inspect_model(self, name: str = "") -> dict[str, Any]:
        """What a model file holds and whether this engine runs it (`ModelFile.describe`); the
        active plan's model when `name` is empty. Never pulls a missing registry model."""
        path = self.env.resolve_model(name or self.active_plan.model, pull_missing=False)
        model = ModelFile(path)
        try:
            return model.describe()
        finally:
            model.close()

    def history(self, plan_id: str = "", limit: int = 100) -> list[PlanEvent]:
        return self.store.history(plan_id, limit or 100)

    def list_plans(self) -> tuple[list[plan_pb2.ExecutionPlan], plan_pb2.ExecutionPlan | None]:
        """The newest version of every plan (corrupt rows left out and logged) and the active plan
        (None, logged, when its row is corrupt): one damaged row never hides the others."""
        try:
            active = self.store.active()
        except DataLoss as exc:
            log.error("plan store: %s", exc)
            active = None
        return self.store.list_latest(), active

    def _follow(self, _plan: plan_pb2.ExecutionPlan | None) -> None:
        """The shared store says the active plan changed, maybe in another replica: run it.
        Raising makes the store's watcher call again at its next poll."""
        with self._switch:
            plan = self.store.active()  # re-read under the lock: a local activation may have committed since
            runtime = self._runtime
            if plan is None or runtime is None or PlanStamp.of(plan) == PlanStamp.of(runtime.plan):
                return
            log.info("following plan %s, activated by another replica", PlanStamp.of(plan))
            self._activation(plan, lambda: (plan, None), "", check=True, record=False)

    def _activation(self, target: plan_pb2.ExecutionPlan, commit: Callable[[], tuple[plan_pb2.ExecutionPlan, Any]],
                    actor: str, *, check: bool = False, record: bool = True) -> Any:
        """Make `target` the running plan, load before commit: its runtime is loaded (unless the
        change applies live) while the current one serves; then `commit()` writes the store and
        returns (the stored plan to run, the result); then the switch. A failed load raises after
        an "activation_failed" event (`record`); a failed commit discards the loaded runtime.
        `check`: validate a stored plan again (the server may have changed since). Holds _switch."""
        current = self.runtime
        with plan_apply_span(self._tracer, current.plan, target) as span:
            # the same model name is the same file: a live change never looks the model up again
            live = engine_spec(target, current.engine.spec.path) if target.model == current.plan.model else None
            reload = live is None or current.engine.spec.needs_new_engine(live)
            span.set_attribute(PLAN_RELOAD, reload)
            if reload:
                fresh = self._load_or_record(target, actor, check=check, record=record)
            else:
                self._check_or_record(target, actor, check, record)
                fresh = None
            try:
                plan, result = commit()
            except BaseException:
                if fresh is not None:
                    fresh.retire(0)
                raise
        if fresh is None:
            current.engine.apply(live)
            current.plan = plan
            return result
        fresh.plan = plan
        self._runtime = fresh
        self._on_serving(True)  # e.g. after a lost worker, a freshly loaded runtime serves again
        t = threading.Thread(target=current.retire, name="retire-runtime", daemon=True)
        t.start()
        self._retiring = [x for x in self._retiring if x.is_alive()] + [t]
        return result

    def _engine_spec(self, plan: plan_pb2.ExecutionPlan) -> EngineSpec:
        return engine_spec(plan, self.env.resolve_model(plan.model))

    def _load(self, plan: plan_pb2.ExecutionPlan, check: bool = False) -> Runtime:
        if check:
            validate(plan, self.env, stored=True)
        return Runtime(plan, Engine(self._engine_spec(plan), self.meter, self._on_finish, self._worker_lost))

    def _check_or_record(self, plan: plan_pb2.ExecutionPlan, actor: str, check: bool, record: bool = True) -> None:
        if not check:
            return
        try:
            validate(plan, self.env, stored=True)
        except Exception as exc:
            if record:
                self._activation_failed(plan, actor, exc)
            raise

    def _load_or_record(self, plan: plan_pb2.ExecutionPlan, actor: str, *, check: bool = False,
                        record: bool = True) -> Runtime:
        try:
            return self._load(plan, check)
        except Exception as exc:
            if record:
                self._activation_failed(plan, actor, exc)
            raise

    def _activation_failed(self, plan: plan_pb2.ExecutionPlan, actor: str, exc: Exception) -> None:
        """Log and audit a failed activation; the store is otherwise unchanged."""
        what = label(plan) if plan.version else f"{plan.id} (not stored)"
        detail = f"{type(exc).__name__}: {exc}"
        log.error("activation of %s failed: %s", what, detail)
        try:
            self.store.activation_failed(plan, actor, detail)
        except Exception:  # noqa: BLE001 - the original error is what the caller must see
            log.exception("could not record the failed activation of %s", what)

    # --- requests ------------------------------------------------------------------------
    def generate(self, req: GenerateInput) -> tuple[RequestHandle, PlanStamp]:
        runtime = self.runtime
        plan = runtime.plan
        if req.plan_id and (req.plan_id != plan.id or req.plan_version not in (0, plan.version)):
            wanted = f"{req.plan_id}@{req.plan_version or 'latest'}"
            raise FailedPrecondition(f"plan {wanted} is not the active plan ({PlanStamp.of(plan)}); activate it first")
        model = runtime.model
        # sizes first: a hostile request costs a length check, not seconds of tokenizer time
        check_request(self.limits, self._prompt_limit(model), req.request_id, req.text, req.messages, req.stop,
                      logit_bias=req.logit_bias or {}, stop_token_ids=req.stop_token_ids, n=req.n)
        parse_tools = False
        if req.messages is not None and (req.tools or any(m.get("role") == "tool" or m.get("tool_calls")
                                                          for m in req.messages)):
            messages, tool_format = tool_chat(req.messages, req.tools, req.tool_choice or "auto")
            if tool_format is not None and req.response_format is not None:
                raise InvalidArgument("tools and response_format cannot be combined: with tools, the answer's "
                                      "format is the tool-call format", field="response_format")
            req = replace(req, messages=messages, response_format=tool_format or req.response_format)
            parse_tools = tool_format is not None
        elif req.tools:
            raise InvalidArgument("tools need a chat prompt (messages)", field="tools")
        prompt_ids = self._encode(model, req)
        params = self._sampling(plan, req)
        request_id = req.request_id or f"req-{uuid.uuid4().hex[:16]}"
        stamp = PlanStamp.of(plan)
        # captures this RPC thread's trace context; the worker writes the spans as the request ends
        trace = RequestTrace.start(self._tracer, request_id=request_id, model=plan.model,
                                   operation="chat" if req.messages is not None else "text_completion",
                                   max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                                   top_k=params.top_k, seed=params.seed, plan=stamp)
        spec = RequestSpec(request_id, prompt_ids, params, priority=req.priority, ignore_eos=req.ignore_eos,
                           top_logprobs=req.top_logprobs, prompt_logprobs=req.prompt_logprobs, n=req.n,
                           response_format=req.response_format, tag=stamp,
                           on_final=trace.finish)
        handle = runtime.worker.submit(spec)
        return (ToolCallHandle(handle) if parse_tools else handle), spec.tag

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
        if req.prompt_logprobs is not None and not 0 <= req.prompt_logprobs <= 20:
            raise InvalidArgument(f"prompt_logprobs {req.prompt_logprobs} must be in 0..20", field="prompt_logprobs")
        try:
            return SamplingParams(**values, seed=seed, max_tokens=req.max_tokens or d.max_tokens, stop=tuple(req.stop),
                                  logit_bias=tuple(sorted((req.logit_bias or {}).items())),
                                  stop_token_ids=tuple(req.stop_token_ids), min_tokens=req.min_tokens)
        except InvalidSamplingParams as exc:
            field = exc.field if exc.field in ("logit_bias", "stop_token_ids", "min_tokens") else f"sampling.{exc.field}"
            raise InvalidArgument(str(exc), field=field) from None

    def cancel(self, request_id: str) -> bool:
        """Stop a queued or running request; NotFound for an id that is unknown, finished or already cancelled."""
        runtime = self._runtime
        if runtime is None or not runtime.worker.cancel(request_id):
            raise NotFound(f"no request {request_id!r} is queued or running (unknown, finished or already cancelled)")
        return True

    def _encode(self, model: LoadedModel, req: GenerateInput) -> list[int]:
        """The prompt's token ids. A long text is tokenized on a low-priority thread: with two cores
        and the engine's kernels on both, tokenizing a maximal prompt at normal priority took a core
        from every other client's decode steps."""
        size = len(req.text or "") + sum(len(m.get("content", "")) for m in req.messages or ())
        if size < LONG_PROMPT_CHARS:
            return model.encode_prompt(text=req.text, ids=req.ids, messages=req.messages)
        return self._tokenizing.submit(model.encode_prompt, text=req.text, ids=req.ids,
                                       messages=req.messages).result()

    def _prompt_limit(self, model: LoadedModel) -> int:
        return prompt_byte_limit(self.limits, model.context_length, model.tokenizer.max_token_bytes)

    def tokenize(self, text: str, parse_special: bool = False) -> tuple[list[int], list[str]]:
        model = self.runtime.model
        check_text(text, self._prompt_limit(model), field="text")
        return model.tokenize(text, parse_special)
