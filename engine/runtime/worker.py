"""The engine loop: continuous batching of many requests over one loaded model.

A background thread runs steps. Each step the plan's scheduling policy picks,
from metadata only, which sequences compute how many tokens; the worker runs
them as ONE `Transformer.forward` (every weight GEMM sees all their tokens),
samples a token for each sequence whose pending tokens are all computed, and
pushes events to the request's queue. Requests join and leave between steps.

Cancellation (by RPC, client disconnect or deadline) is taken at the next step
boundary: the sequence and its KV cache are dropped before the next forward.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from engine.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from engine.memory.kv_cache import SequenceKV
from engine.runtime.generate import LoadedModel, TokenEvent, TokenStream
from engine.runtime.model import Segment
from engine.runtime.sampling import SamplingParams
from engine.scheduler.base import Policy, SeqView, StepLimits


@dataclass(frozen=True)
class WorkerLimits:
    """The plan's batching and request limits, as the worker enforces them."""

    max_batch_size: int = 32
    max_batched_tokens: int = 2048
    max_queue: int = 256
    max_tokens_per_request: int = 4096


@dataclass
class RequestSpec:
    """A request as the engine sees it: token ids in, sampling settings, an opaque tag echoed back."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: int = 0
    ignore_eos: bool = False
    top_logprobs: int = 0
    tag: Any = None  # e.g. the plan stamp; echoed in the Final event


@dataclass
class Final:
    request_id: str
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    seed: int
    timings: dict[str, float]
    tag: Any = None
    text: str = ""
    ids: list[int] = field(default_factory=list)
    error: str = ""


class RequestHandle:
    """The caller's side of a request: iterate its events (TokenEvent..., then one Final)."""

    def __init__(self, request_id: str, worker: "EngineWorker"):
        self.request_id = request_id
        self._events: queue.Queue[TokenEvent | Final] = queue.Queue()
        self._worker = worker

    def events(self, poll_s: float = 0.1, alive=lambda: True) -> Iterator[TokenEvent | Final]:
        """Events until the Final; cancels the request if `alive()` turns false (client gone)."""
        while True:
            try:
                event = self._events.get(timeout=poll_s)
            except queue.Empty:
                if not alive():
                    self.cancel()
                continue
            yield event
            if isinstance(event, Final):
                return

    def cancel(self) -> bool:
        return self._worker.cancel(self.request_id)


class _Sequence:
    """Engine-side state of one request."""

    def __init__(self, spec: RequestSpec, stream: TokenStream, kv: SequenceKV, handle: RequestHandle):
        self.spec = spec
        self.stream = stream
        self.kv = kv
        self.handle = handle
        self.tokens = list(spec.prompt_ids)  # prompt + generated
        self.num_computed = 0
        self.arrival = time.monotonic()
        self.first_scheduled: float | None = None
        self.first_token: float | None = None
        self.cancelled = False

    def view(self) -> SeqView:
        return SeqView(self.spec.request_id, self.spec.priority, self.arrival, len(self.spec.prompt_ids),
                       len(self.tokens), self.num_computed)


class EngineWorker:
    """Runs requests on one model with a scheduling policy; `close()` stops it."""

    def __init__(self, model: LoadedModel, policy: Policy, limits: WorkerLimits = WorkerLimits()):
        self.model = model
        self._policy = policy
        self._limits = limits
        self._lock = threading.Condition()
        self._waiting: dict[str, _Sequence] = {}
        self._running: dict[str, _Sequence] = {}
        self._accepting = True
        self._stopped = False
        self._ids = itertools.count(1)
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="engine-worker", daemon=True)
        self._thread.start()

    # --- live settings -----------------------------------------------------------------
    def set_policy(self, policy: Policy) -> None:
        with self._lock:
            self._policy = policy

    def set_limits(self, limits: WorkerLimits) -> None:
        with self._lock:
            self._limits = limits

    # --- requests ------------------------------------------------------------------------
    def submit(self, spec: RequestSpec) -> RequestHandle:
        """Admit a request or refuse it (queue full, over a limit, too long for the context)."""
        limits = self._limits
        if spec.params.max_tokens > limits.max_tokens_per_request:
            raise InvalidArgument(f"max_tokens {spec.params.max_tokens} exceeds the plan's limit "
                                  f"{limits.max_tokens_per_request}", field="max_tokens")
        stream = TokenStream(self.model, spec.prompt_ids, spec.params, spec.ignore_eos, spec.top_logprobs)
        with self._lock:
            if not self._accepting:
                raise FailedPrecondition("the engine is draining; no new requests")
            if not spec.request_id:
                spec.request_id = f"req-{next(self._ids)}"
            if spec.request_id in self._waiting or spec.request_id in self._running:
                raise InvalidArgument(f"request id {spec.request_id!r} is already in use", field="request_id")
            if len(self._waiting) >= limits.max_queue:
                raise ResourceExhausted(f"the queue is full ({len(self._waiting)} waiting, plan max_queue "
                                        f"{limits.max_queue}); retry in {self._retry_hint_s():.1f} s")
            handle = RequestHandle(spec.request_id, self)
            kv = self.model.transformer.new_kv(len(spec.prompt_ids) + stream.budget)
            self._waiting[spec.request_id] = _Sequence(spec, stream, kv, handle)
            self._lock.notify()
        return handle

    def _retry_hint_s(self) -> float:
        return max(0.5, 0.05 * len(self._running))

    def cancel(self, request_id: str) -> bool:
        with self._lock:
            seq = self._waiting.get(request_id) or self._running.get(request_id)
            if seq is None or seq.cancelled:
                return False
            seq.cancelled = True
            self._lock.notify()
            return True

    def stats(self) -> dict[str, int]:
        with self._lock:
            seqs = list(self._running.values()) + list(self._waiting.values())
            return {"running": len(self._running), "waiting": len(self._waiting),
                    "kv_bytes": sum(s.kv.nbytes for s in seqs)}

    def drain(self, timeout: float | None = None) -> bool:
        """Stop admitting; wait until every admitted request has finished. True if it emptied."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._accepting = False
            while self._waiting or self._running:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(timeout=left if left is not None else 0.5)
        return True

    def close(self) -> None:
        """Stop the loop; requests still present end with finish_reason 'cancelled'."""
        with self._lock:
            self._accepting = False
            for seq in list(self._waiting.values()) + list(self._running.values()):
                seq.cancelled = True
            self._stopped = True
            self._lock.notify_all()
        self._thread.join()
        self._reap(force=True)

    # --- the loop ------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopped and not self._waiting and not self._running:
                    self._lock.wait()
                if self._stopped:
                    return
            self._reap()
            try:
                self._step()
            except Exception as exc:  # a bug: fail the step's requests loudly rather than hang them
                self._fail_all(f"{type(exc).__name__}: {exc}")
                raise

    def _reap(self, force: bool = False) -> None:
        """Drop cancelled sequences: free their cache and send their final event."""
        with self._lock:
            gone = [s for s in list(self._waiting.values()) + list(self._running.values()) if s.cancelled or force]
            for s in gone:
                self._waiting.pop(s.spec.request_id, None)
                self._running.pop(s.spec.request_id, None)
            if gone:
                self._lock.notify_all()
        for s in gone:
            s.kv = None  # type: ignore[assignment]  # the cache goes now, not when the handle does
            tail = s.stream.finish("cancelled")
            if tail:
                s.handle._events.put(TokenEvent(None, tail, 0.0))
            s.handle._events.put(self._final(s))

    def _step(self) -> None:
        with self._lock:
            running = [s.view() for s in self._running.values()]
            waiting = [s.view() for s in self._waiting.values()]
            policy, limits = self._policy, self._limits
            out = policy.schedule(running, waiting, StepLimits(limits.max_batch_size, limits.max_batched_tokens))
            now = time.monotonic()
            batch: list[tuple[_Sequence, int]] = []
            for seq_id, n in out.scheduled:
                seq = self._running.get(seq_id) or self._waiting.pop(seq_id)
                if seq.first_scheduled is None:
                    seq.first_scheduled = now
                    self._running[seq_id] = seq
                batch.append((seq, n))
        if not batch:
            time.sleep(0.001)  # policy chose to idle (e.g. a power cap); don't spin
            return

        segments = []
        for seq, n in batch:
            chunk = seq.tokens[seq.num_computed:seq.num_computed + n]
            done = seq.num_computed + n == len(seq.tokens)
            segments.append(Segment(seq.kv, np.asarray(chunk), seq.num_computed, "last" if done else "none"))
        logits = self.model.transformer.forward(segments)
        self.steps += 1

        finished = []
        for (seq, n), seg_logits in zip(batch, logits):
            seq.num_computed += n
            if len(seg_logits) == 0:
                continue  # a prompt chunk; more to prefill
            event = seq.stream.accept(seg_logits[-1])
            if seq.first_token is None:
                seq.first_token = time.monotonic()
            if event is not None:
                if event.token_id is not None:
                    seq.tokens.append(event.token_id)
                seq.handle._events.put(event)
            if seq.stream.finish_reason is not None:
                finished.append(seq)
        if finished:
            with self._lock:
                for seq in finished:
                    self._running.pop(seq.spec.request_id, None)
                self._lock.notify_all()
            for seq in finished:
                seq.kv = None  # type: ignore[assignment]
                seq.handle._events.put(self._final(seq))

    def _final(self, seq: _Sequence) -> Final:
        end = time.monotonic()
        first = seq.first_token or end
        timings = {"queue_s": (seq.first_scheduled or end) - seq.arrival, "ttft_s": first - seq.arrival,
                   "decode_s": end - first, "total_s": end - seq.arrival}
        return Final(seq.spec.request_id, seq.stream.finish_reason or "cancelled", len(seq.spec.prompt_ids),
                     len(seq.stream.ids), seq.stream.sampler.seed, timings, seq.spec.tag, seq.stream.text,
                     list(seq.stream.ids))

    def _fail_all(self, message: str) -> None:
        with self._lock:
            seqs = list(self._waiting.values()) + list(self._running.values())
            self._waiting.clear()
            self._running.clear()
            self._stopped = True
            self._accepting = False
        for s in seqs:
            final = self._final(s)
            final.finish_reason, final.error = "error", message
            s.handle._events.put(final)
