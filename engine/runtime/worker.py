"""The engine loop: continuous batching of many requests over one loaded model.

A background thread runs steps. Each step the plan's scheduling policy picks,
from metadata only, which sequences compute how many tokens (and which give
their KV blocks back when the arena is short); the worker runs them as ONE
`Transformer.forward` (every weight GEMM sees all their tokens), samples a
token for each sequence whose pending tokens are all computed, and pushes
events to the request's queue. Requests join and leave between steps.

A preempted sequence keeps its tokens and its sampler; its cache is recomputed
when it is scheduled again, so it streams the same tokens it would have.
Cancellation (by RPC, client disconnect or deadline) is taken at the next step
boundary: the sequence's blocks return to the arena before the next forward.
After each step the power governor idles as long as the plan's cap requires.

The loop never dies of one request: an exception while sampling a sequence (e.g.
non-finite logits) ends that request with an error; an exception in a step's
forward pass ends that step's requests; the loop goes on. Should the thread
itself ever stop, `lost` says why, `on_lost` is told (health turns NOT_SERVING)
and new requests are refused as UNAVAILABLE.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import numpy as np

from engine.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from engine.memory.paged import HOLE, BlockArena, PagedKV, block_hashes
from engine.runtime.constraints import ResponseFormat, compile_format
from engine.runtime.generate import LoadedModel, TokenEvent, TokenStream
from engine.runtime.model import Segment
from engine.runtime.sampling import SamplingParams
from engine.scheduler.base import Policy, SeqView, StepLimits
from engine.scheduler.power import PowerGovernor
from engine.telemetry.energy import CpuTimeEstimator, EnergyAccount

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerLimits:
    """The plan's batching and request limits, as the worker enforces them."""

    max_batch_size: int = 32
    max_batched_tokens: int = 2048
    max_queue: int = 256
    max_tokens_per_request: int = 4096
    max_watts: float = 0.0  # 0 = no power cap


@dataclass
class RequestSpec:
    """A request as the engine sees it: token ids in, sampling settings, an opaque tag echoed back."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: int = 0
    ignore_eos: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None  # alternatives per prompt position; None: no prompt logprobs
    n: int = 1  # completions of this prompt; choice i > 0 samples with seed + i and shares the prompt's blocks
    response_format: ResponseFormat | None = None  # structured output: compiled at submit, before queueing
    tag: Any = None  # e.g. the plan stamp; echoed in the Final event
    on_final: Callable[[Final], None] | None = None  # e.g. its trace; runs on the engine thread, must not raise


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
    energy_j: float = 0.0
    energy_source: str = ""
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive tokens
    preemptions: int = 0
    # prompt token i+1 given tokens 0..i: (token id, logprob, [(alternative, logprob), ...]), if asked
    prompt_logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    index: int = 0  # which of the request's n completions
    content: str | None = None  # with tools: the reply parsed out of `text` (engine/runtime/tools.py)
    tool_calls: list[Any] = field(default_factory=list)  # with tools: the calls parsed out of `text`


class RequestHandle:
    """The caller's side of a request: iterate its events (TokenEvents, then a Final, per
    completion; `index` tells the request's n completions apart)."""

    def __init__(self, request_id: str, worker: "EngineWorker", n: int = 1):
        self.request_id = request_id
        self._events: queue.Queue[TokenEvent | Final] = queue.Queue()
        self._worker = worker
        self._n = n

    def events(self, poll_s: float = 0.1, alive=lambda: True) -> Iterator[TokenEvent | Final]:
        """Events until every completion's Final; cancels the request if `alive()` turns false (client gone)."""
        finals = 0
        while True:
            try:
                event = self._events.get(timeout=poll_s)
            except queue.Empty:
                if not alive():
                    self.cancel()
                continue
            yield event
            if isinstance(event, Final):
                finals += 1
                if finals == self._n:
                    return

    def cancel(self) -> bool:
        return self._worker.cancel(self.request_id)

    def deliver(self, event: TokenEvent | Final) -> None:
        """The worker's side: hand the caller one event."""
        self._events.put(event)


# A request asking for prompt logprobs needs every prompt position's logits: (n, vocab) float32,
# 49152 x 4 bytes a token for SmolLM2. Its prompt runs in chunks of at most this many tokens.
PROMPT_LOGPROBS_CHUNK = 256


class _Sequence:
    """Engine-side state of one request."""

    def __init__(self, spec: RequestSpec, stream: TokenStream, kv: PagedKV, handle: RequestHandle, index: int = 0):
        self.spec = spec
        self.index = index  # which of the request's completions; 0 computes the prompt, others fork from it
        # its key in _waiting/_running: request ids have no control characters (engine/control/limits.py)
        self.key = spec.request_id if index == 0 else f"{spec.request_id}\x1f{index}"
        self.forked = False
        self.stream = stream
        self.kv = kv
        self.handle = handle
        self.tokens = list(spec.prompt_ids)  # prompt + generated
        self.num_computed = 0
        self.arrival = time.monotonic()
        self.first_scheduled: float | None = None
        self.token_times: list[float] = []
        self.cancelled = False
        self.preemptions = 0
        self.prompt_logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []  # filled as the prompt runs
        self.block_hashes: list[bytes] = []  # prefix hashes of the full blocks of `tokens` (prefix caching)
        self.registered = 0  # how many of kv.blocks are offered to the prefix cache

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Still collecting prompt logprobs: one per prompt position after the first."""
        return self.spec.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.spec.prompt_ids) - 1

    def view(self) -> SeqView:
        return SeqView(self.key, self.spec.priority, self.arrival, len(self.spec.prompt_ids),
                       len(self.tokens), self.num_computed, len(self.kv.blocks))


class EngineWorker:
    """Runs requests on one model with a scheduling policy and a KV arena; `close()` stops it."""

    def __init__(self, model: LoadedModel, policy: Policy, limits: WorkerLimits = WorkerLimits(), *,
                 arena: BlockArena, governor: PowerGovernor | None = None,
                 on_finish: Callable[[Final], None] = lambda final: None,
                 on_lost: Callable[[str], None] = lambda reason: None,
                 prefix_caching: bool = False, cache_salt: bytes = b""):
        self.model = model
        self._policy = policy
        self._limits = limits
        c = model.config
        self.arena = arena  # the plan's kv_cache section, sized by the control plane
        # a model whose every layer slides reads no key older than its widest window: the blocks
        # behind it go back to the arena after each step (0: some layer attends to everything)
        self._window_horizon = max(c.layer_windows) if c.layer_windows and min(c.layer_windows) > 0 else 0
        self.governor = governor or PowerGovernor(CpuTimeEstimator(), limits.max_watts)
        self.energy = EnergyAccount(self.governor.meter)
        self._on_finish = on_finish
        self._on_lost = on_lost
        # Automatic prefix caching (engine/memory/paged.py): full computed blocks are offered to the
        # arena under a hash of their tokens and all before them, salted with the model and weights.
        self.prefix_caching = prefix_caching
        self._cache_salt = cache_salt
        self.prefix_queries = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
        self.prefix_hits = 0  # of those, tokens found cached (prefix_cache_hits)
        self.lost: str | None = None  # why the loop stopped, if it ever stops by itself
        self.failed_requests = 0  # ended by an error in their step (see the module docstring)
        self.preemptions = 0
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
    @property
    def policy(self) -> Policy:
        return self._policy

    def set_policy(self, policy: Policy) -> None:
        with self._lock:
            self._policy = policy

    def set_limits(self, limits: WorkerLimits) -> None:
        with self._lock:
            self._limits = limits
            self.governor.max_watts = limits.max_watts

    # --- requests ------------------------------------------------------------------------
    def submit(self, spec: RequestSpec) -> RequestHandle:
        """Admit a request or refuse it (queue full, over a limit, too long for the context)."""
        limits = self._limits
        if spec.params.max_tokens > limits.max_tokens_per_request:
            raise InvalidArgument(f"max_tokens {spec.params.max_tokens} exceeds the plan's limit "
                                  f"{limits.max_tokens_per_request}", field="max_tokens")
        constraint = None if spec.response_format is None else compile_format(self.model.tokenizer,
                                                                              spec.response_format)
        stream = TokenStream(self.model, spec.prompt_ids, spec.params, spec.ignore_eos, spec.top_logprobs,
                             constraint=constraint)
        with self._lock:
            if self.lost is not None:
                raise Unavailable(f"the engine worker stopped ({self.lost}); the server needs a restart")
            if not self._accepting:
                raise FailedPrecondition("the engine is draining; no new requests")
            if not spec.request_id:
                spec.request_id = f"req-{next(self._ids)}"
            if spec.request_id in self._waiting or spec.request_id in self._running:
                raise InvalidArgument(f"request id {spec.request_id!r} is already in use", field="request_id")
            if len(self._waiting) >= limits.max_queue:
                wait = self._retry_hint_s()
                raise ResourceExhausted(f"the queue is full ({len(self._waiting)} waiting, plan max_queue "
                                        f"{limits.max_queue}); retry in {wait:.1f} s", retry_after_s=wait)
            positions = len(spec.prompt_ids) + stream.budget
            # held at once: every position, or for an all-sliding model its window and one step's chunk
            held = positions if not self._window_horizon else \
                min(positions, self._window_horizon + limits.max_batched_tokens + self.arena.block_size)
            if -(-held // self.arena.block_size) > self.arena.num_blocks:
                raise ResourceExhausted(f"the request needs {held} cache positions; the plan's KV arena holds "
                                        f"{self.arena.num_blocks * self.arena.block_size}: ask for fewer tokens")
            handle = RequestHandle(spec.request_id, self, spec.n)
            self._waiting[spec.request_id] = _Sequence(spec, stream, PagedKV(self.arena, positions), handle)
            self._lock.notify()
        return handle

    def _retry_hint_s(self) -> float:
        return max(0.5, 0.05 * len(self._running))

    def cancel(self, request_id: str) -> bool:
        """Cancel a request (all its completions); False if none of them is queued or running."""
        with self._lock:
            seqs = [s for s in list(self._waiting.values()) + list(self._running.values())
                    if s.spec.request_id == request_id and not s.cancelled]
            for s in seqs:
                s.cancelled = True
            if seqs:
                self._lock.notify()
            return bool(seqs)

    def stats(self) -> dict[str, Any]:
        """Requests, KV blocks and bytes in use, power: what metrics and tests look at."""
        with self._lock:
            arena = self.arena.stats()
            return {"running": len(self._running), "waiting": len(self._waiting), "kv_bytes": arena["bytes_used"],
                    "kv_blocks_used": arena["blocks_used"], "kv_blocks_total": arena["blocks_total"],
                    "kv_usage": arena["blocks_used"] / arena["blocks_total"], "steps": self.steps,
                    "preemptions": self.preemptions, "power_w": self.governor.watts(),
                    "prefix_cache_queries": self.prefix_queries, "prefix_cache_hits": self.prefix_hits,
                    "prefix_cache_blocks": arena["blocks_cached"], "prefix_cache_evictions": arena["evictions"],
                    "energy_source": self.governor.source}

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
        try:
            while True:
                with self._lock:
                    while not self._stopped and not self._waiting and not self._running:
                        self._lock.wait()
                    if self._stopped:
                        return
                self._reap()
                try:
                    self._step()
                except Exception as exc:  # a bug outside one sequence's forward or sampling
                    log.exception("engine step failed; failing every request it held")
                    self._fail(self._all_sequences(), exc)
        except BaseException as exc:  # the loop itself broke: say so loudly, refuse new work
            self.lost = f"{type(exc).__name__}: {exc}"
            log.critical("the engine worker stopped: %s", self.lost, exc_info=True)
            with self._lock:
                self._accepting = False
            self._fail(self._all_sequences(), exc)
            self._on_lost(self.lost)
            raise

    def _reap(self, force: bool = False) -> None:
        """Drop cancelled sequences: free their cache and send their final event."""
        with self._lock:
            gone = [s for s in list(self._waiting.values()) + list(self._running.values()) if s.cancelled or force]
            for s in gone:
                self._waiting.pop(s.key, None)
                self._running.pop(s.key, None)
            if gone:
                self._lock.notify_all()
        for s in gone:
            with self._lock:
                s.kv.release()  # the blocks go back now, not when the handle does
            tail = s.stream.finish("cancelled")
            if tail:
                s.handle.deliver(TokenEvent(None, tail, 0.0, index=s.index))
            self._finish(s)

    def _step(self) -> None:
        with self._lock:
            limits = self._limits
            step_limits = StepLimits(limits.max_batch_size, limits.max_batched_tokens, self.arena.free_blocks,
                                     self.arena.block_size, time.monotonic())
            out = self._policy.schedule([s.view() for s in self._running.values()],
                                        [s.view() for s in self._waiting.values()], step_limits)
            for seq_id in out.preempted:  # give the blocks back; recompute this sequence later
                seq = self._running.pop(seq_id)
                seq.kv.release()  # its registered blocks stay cached: the recompute may find them
                seq.num_computed = seq.registered = 0
                seq.preemptions += 1
                self.preemptions += 1
                self._waiting[seq_id] = seq
            now = time.monotonic()
            batch: list[tuple[_Sequence, int]] = []
            for seq_id, n in out.scheduled:
                seq = self._running.get(seq_id) or self._waiting.get(seq_id)
                if seq is None:
                    continue
                # prompt logprobs need every prompt position computed here: no cached prefix for them
                adopted = (self.prefix_caching and seq.num_computed == 0 and seq.spec.prompt_logprobs is None
                           and self._adopt_cached_prefix(seq))
                n = min(n, len(seq.tokens) - seq.num_computed)  # a cached prefix leaves fewer to compute
                if seq.wants_prompt_logprobs:
                    n = min(n, PROMPT_LOGPROBS_CHUNK)
                if not seq.kv.reserve(seq.num_computed + n):
                    if adopted:  # don't pin cached blocks while waiting for room
                        seq.kv.release()
                        seq.num_computed = seq.registered = 0
                    continue  # the policy over-committed the arena; try again next step
                if seq_id in self._waiting:
                    self._running[seq_id] = self._waiting.pop(seq_id)
                if seq.first_scheduled is None:
                    seq.first_scheduled = now
                batch.append((seq, n))
        if not batch:
            time.sleep(0.001)  # the policy chose to wait (e.g. for a fuller batch); don't spin
            return

        segments = []
        for seq, n in batch:
            chunk = seq.tokens[seq.num_computed:seq.num_computed + n]
            done = seq.num_computed + n == len(seq.tokens)
            want = "all" if seq.wants_prompt_logprobs else "last" if done else "none"
            segments.append(Segment(seq.kv, np.asarray(chunk), seq.num_computed, want))
        start, j0 = time.monotonic(), self.energy.meter.energy_j()
        try:
            logits = self.model.transformer.forward(segments)
        except Exception as exc:  # noqa: BLE001 - this step's requests fail; the loop goes on
            log.exception("forward pass failed for %d sequences", len(batch))
            self._fail([seq for seq, _ in batch], exc)
            return
        step_j = self.energy.meter.energy_j() - j0
        self.energy.record_step(step_j, {seq.key: n for seq, n in batch})
        self.steps += 1

        finished, failed = [], []
        for (seq, n), seg_logits in zip(batch, logits):
            if seq.wants_prompt_logprobs:
                self._collect_prompt_logprobs(seq, seq.num_computed, seg_logits)
            seq.num_computed += n
        if self.prefix_caching:
            with self._lock:
                for seq, _ in batch:
                    self._offer_computed_blocks(seq)
        for (seq, n), seg_logits in zip(batch, logits):
            if len(seg_logits) == 0 or seq.num_computed < len(seq.tokens):
                continue  # a prompt chunk (or a recomputed prefix); more to compute first
            choices = [seq]
            if seq.spec.n > 1 and not seq.forked:  # the prompt is done: its other completions start here
                with self._lock:
                    choices += self._fork(seq)
            for s in choices:
                try:
                    event = s.stream.accept(seg_logits[-1])
                except Exception as exc:  # noqa: BLE001 - e.g. non-finite logits: this request fails
                    log.warning("request %s failed while sampling: %s", s.key, exc)
                    failed.append((s, exc))
                    continue
                s.token_times.append(time.monotonic())
                if event is not None:
                    event.index = s.index
                    if event.token_id is not None:
                        s.tokens.append(event.token_id)
                    s.handle.deliver(event)
                if s.stream.finish_reason is not None:
                    finished.append(s)
        if self._window_horizon:  # every layer slides: blocks out of every window go back
            with self._lock:
                for seq, _ in batch:
                    if seq.stream.finish_reason is None:
                        seq.kv.forget_before(seq.num_computed - self._window_horizon + 1)
        if finished:
            with self._lock:
                for seq in finished:
                    self._running.pop(seq.key, None)
                    seq.kv.release()
                self._lock.notify_all()
            for seq in finished:
                self._finish(seq)
        if failed:
            for seq, exc in failed:
                self._fail([seq], exc)
        self.governor.after_step(step_j, time.monotonic() - start)

    def _fork(self, parent: _Sequence) -> list[_Sequence]:
        """Start the other n - 1 completions of `parent`, whose prompt is computed: each shares the
        prompt's full blocks (read-only, reference-counted) and gets its own copy of the partial
        last block (copy on write), and samples its first token from the parent's logits now. One
        the arena has no block for waits instead, and computes its prompt itself (the prefix cache
        may give it most). Returns those that sample now. Under the lock."""
        parent.forked = True
        bs = self.arena.block_size
        computed = parent.num_computed
        full, partial = divmod(computed, bs)
        shared = parent.kv.blocks[:full]  # with holes where an all-sliding model gave blocks back
        now = []
        for i in range(1, parent.spec.n):
            params = replace(parent.spec.params, seed=(parent.stream.sampler.seed + i) % (1 << 63))
            spec = replace(parent.spec, params=params, on_final=None, prompt_logprobs=None, n=1)  # forks no further
            constraint = None if spec.response_format is None else compile_format(self.model.tokenizer,
                                                                                  spec.response_format)
            stream = TokenStream(self.model, spec.prompt_ids, params, spec.ignore_eos, spec.top_logprobs,
                                 constraint=constraint)  # a structured-output choice gets its own matcher
            child = _Sequence(spec, stream, PagedKV(self.arena, parent.kv.max_positions), parent.handle, index=i)
            child.arrival, child.first_scheduled = parent.arrival, parent.first_scheduled
            child.block_hashes, child.registered = parent.block_hashes[:full], min(parent.registered, full)
            self.arena.share([b for b in shared if b != HOLE])
            child.kv.adopt(shared)
            if partial and child.kv.reserve(computed):
                self.arena.copy_block(parent.kv.blocks[full], child.kv.blocks[full])
            elif partial:  # no block for its tail: wait, and compute the prompt later
                child.kv.release()
                child.registered = 0
                self._waiting[child.key] = child
                continue
            child.num_computed = computed
            self._running[child.key] = child
            now.append(child)
        return now

    def _finish(self, seq: _Sequence, error: str = "") -> None:
        """Send `seq`'s Final; a request that ends before forking ends its other completions too."""
        seq.handle.deliver(self._final(seq, error))
        if seq.index == 0 and seq.spec.n > 1 and not seq.forked:
            seq.forked = True
            for i in range(1, seq.spec.n):
                sibling = Final(seq.spec.request_id, "error" if error else seq.stream.finish_reason or "cancelled",
                                len(seq.spec.prompt_ids), 0, (seq.stream.sampler.seed + i) % (1 << 63),
                                {k: 0.0 for k in ("queue_s", "ttft_s", "decode_s", "total_s")}, seq.spec.tag,
                                error=error, index=i)
                seq.handle.deliver(sibling)

    def _collect_prompt_logprobs(self, seq: _Sequence, start: int, rows: np.ndarray) -> None:
        """Logprobs of the prompt tokens that the logits `rows` (positions start.. of this chunk) predict."""
        n_prompt = len(seq.spec.prompt_ids)
        first = len(seq.prompt_logprobs) - start  # rows already collected (a recompute after preemption)
        last = min(len(rows), n_prompt - 1 - start)
        if first >= last:
            return
        rows = np.asarray(rows[first:last], dtype=np.float32)
        log_z = self.model.backend.logsumexp(rows)
        nxt = np.asarray(seq.spec.prompt_ids[start + first + 1:start + last + 1])
        chosen = rows[np.arange(len(rows)), nxt].astype(np.float64) - log_z
        k = seq.spec.prompt_logprobs or 0
        sampler = seq.stream.sampler
        for i in range(len(rows)):
            top = sampler.logprobs_top(rows[i], k, float(log_z[i])) if k else []
            seq.prompt_logprobs.append((int(nxt[i]), float(chosen[i]), top))

    def _adopt_cached_prefix(self, seq: _Sequence) -> bool:
        """Start `seq` from the longest cached prefix of its tokens (whole blocks, always leaving at
        least one token to compute, whose logits it needs). Under the lock."""
        bs = self.arena.block_size
        seq.block_hashes = block_hashes(seq.tokens, bs, self._cache_salt, seq.block_hashes)
        blocks = self.arena.lookup(seq.block_hashes[:(len(seq.tokens) - 1) // bs])
        self.prefix_queries += len(seq.tokens)
        self.prefix_hits += len(blocks) * bs
        if not blocks:
            return False
        seq.kv.adopt(blocks)
        seq.num_computed = len(blocks) * bs
        seq.registered = len(blocks)
        return True

    def _offer_computed_blocks(self, seq: _Sequence) -> None:
        """Register the blocks `seq` has filled since the last step with the prefix cache. Under the lock."""
        bs = self.arena.block_size
        full = seq.num_computed // bs
        if full <= seq.registered:
            return
        seq.block_hashes = block_hashes(seq.tokens[:full * bs], bs, self._cache_salt, seq.block_hashes[:full])
        for i in range(seq.registered, full):
            self.arena.register(seq.kv.blocks[i], seq.block_hashes[i])
        seq.registered = full

    def _final(self, seq: _Sequence, error: str = "") -> Final:
        end = time.monotonic()
        first = seq.token_times[0] if seq.token_times else end
        timings = {"queue_s": (seq.first_scheduled or end) - seq.arrival, "ttft_s": first - seq.arrival,
                   "decode_s": end - first, "total_s": end - seq.arrival}
        reason = "error" if error else seq.stream.finish_reason or "cancelled"
        final = Final(seq.spec.request_id, reason, len(seq.spec.prompt_ids),
                      len(seq.stream.ids), seq.stream.sampler.seed, timings, seq.spec.tag, seq.stream.text,
                      list(seq.stream.ids), energy_j=self.energy.pop(seq.key),
                      energy_source=self.energy.source, itl_s=list(np.diff(seq.token_times)),
                      preemptions=seq.preemptions, error=error, prompt_logprobs=list(seq.prompt_logprobs),
                      index=seq.index)
        try:
            self._on_finish(final)
            if seq.spec.on_final is not None:
                seq.spec.on_final(final)
        except Exception:  # noqa: BLE001 - metrics or tracing must never keep a Final from its client
            log.exception("a finish hook failed for request %s", seq.spec.request_id)
        return final

    def _all_sequences(self) -> list[_Sequence]:
        with self._lock:
            return list(self._waiting.values()) + list(self._running.values())

    def _fail(self, seqs: list[_Sequence], exc: BaseException) -> None:
        """End `seqs` with an error (their cache freed, a Final carrying the cause); others go on."""
        message = f"{type(exc).__name__}: {exc}"
        with self._lock:
            for s in seqs:
                self._waiting.pop(s.key, None)
                self._running.pop(s.key, None)
                s.kv.release()
            self.failed_requests += len(seqs)
            self._lock.notify_all()
        for s in seqs:
            self._finish(s, error=message)
