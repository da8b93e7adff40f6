"""The scheduler contract: plain data in, plain data out, no model.

Each engine step the worker describes every sequence by its metadata
(`SeqView`) and the step's limits, KV blocks included (`StepLimits`); the plan's
policy answers which sequences compute how many tokens and which are preempted
(`SchedulerOutput`). Prefill and decode are the same arithmetic, as in vLLM: a
sequence computes `pending = num_tokens - num_computed` more tokens, in chunks
bounded by the step's token budget, so a long prompt never starves decoding
streams. A policy only chooses an order; `fill` turns an order into a step,
preempting the sequences that come last in it when KV blocks run out.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Sequence

from engine.errors import InvalidArgument
from engine.execution import DEFAULT_EXECUTION, ExecutionSettings


@dataclass(frozen=True)
class SeqView:
    """What a policy may know about a sequence."""

    seq_id: str
    priority: int  # higher first
    arrival: float  # monotonic seconds
    num_prompt: int
    num_tokens: int  # prompt + generated tokens known so far
    num_computed: int  # tokens whose keys/values are in the cache
    num_blocks: int = 0  # KV blocks it holds

    @property
    def pending(self) -> int:
        """Tokens still to compute before the next one can be sampled."""
        return self.num_tokens - self.num_computed

    @property
    def prefilling(self) -> bool:
        return self.pending > 1 or self.num_computed == 0


@dataclass(frozen=True)
class StepLimits:
    max_batch_size: int  # sequences in one step
    max_batched_tokens: int  # tokens in one step
    free_blocks: int = 1 << 62  # KV blocks free in the arena
    block_size: int = 16
    now: float = 0.0  # monotonic seconds, for policies that wait


@dataclass
class SchedulerOutput:
    """Which sequences run this step, and how many tokens each computes."""

    scheduled: list[tuple[str, int]] = field(default_factory=list)  # (seq_id, n_tokens), n >= 1
    preempted: list[str] = field(default_factory=list)  # give back their blocks; recompute later

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Policy(ABC):
    """A scheduling policy: `running` holds sequences already started (holding blocks), `waiting` the others."""

    name: str

    def __init__(self, settings: ExecutionSettings = DEFAULT_EXECUTION):
        """`settings`: the plan's execution section, for the policies that have parameters."""

    @abstractmethod
    def schedule(self, running: Sequence[SeqView], waiting: Sequence[SeqView], limits: StepLimits) -> SchedulerOutput:
        ...


def by_priority(s: SeqView) -> tuple[int, float]:
    return (-s.priority, s.arrival)


def fill(order: Sequence[SeqView], limits: StepLimits) -> SchedulerOutput:
    """Give each sequence in `order` its pending tokens while the step has room.

    The last sequence that fits may get a partial chunk (chunked prefill). When its
    KV blocks do not fit, sequences holding blocks that come later in `order` are
    preempted (lowest rank first) to make room; if that is not enough, it gets the
    chunk that fits, or waits.
    """
    out = SchedulerOutput()
    budget, free, bs = limits.max_batched_tokens, limits.free_blocks, limits.block_size
    rank = {s.seq_id: i for i, s in enumerate(order)}
    victims = sorted((s for s in order if s.num_blocks), key=lambda s: -rank[s.seq_id])
    scheduled: set[str] = set()

    def blocks_for(s: SeqView, n: int) -> int:
        return max(0, math.ceil((s.num_computed + n) / bs) - s.num_blocks)

    for seq in order:
        if seq.seq_id in out.preempted:
            continue
        if len(out.scheduled) >= limits.max_batch_size or budget <= 0:
            break
        n = min(seq.pending, budget)
        if n <= 0:
            continue
        while blocks_for(seq, n) > free:
            victim = next((v for v in victims if v.seq_id not in scheduled and v.seq_id not in out.preempted
                           and rank[v.seq_id] > rank[seq.seq_id]), None)
            if victim is None:
                break
            out.preempted.append(victim.seq_id)
            free += victim.num_blocks
        if blocks_for(seq, n) > free:
            n = (seq.num_blocks + free) * bs - seq.num_computed  # the chunk that fits
            if n <= 0:
                continue
        out.scheduled.append((seq.seq_id, n))
        scheduled.add(seq.seq_id)
        free -= blocks_for(seq, n)
        budget -= n
    return out


class FifoPolicy(Policy):
    """Arrival order within priority: running sequences keep their place, then waiting ones start."""

    name = "fifo"

    def schedule(self, running, waiting, limits):
        return fill(sorted(running, key=by_priority) + sorted(waiting, key=by_priority), limits)


class LatencyPolicy(Policy):
    """Time to first token first: prompts (waiting or mid-prefill) before decoding streams."""

    name = "latency"

    def schedule(self, running, waiting, limits):
        prefill = sorted([s for s in running if s.prefilling] + list(waiting), key=by_priority)
        decode = sorted((s for s in running if not s.prefilling), key=by_priority)
        return fill(prefill + decode, limits)


class ThroughputPolicy(Policy):
    """Largest batches: every decoding stream, then the shortest prompts first to admit the most."""

    name = "throughput"

    def schedule(self, running, waiting, limits):
        decode = sorted((s for s in running if not s.prefilling), key=by_priority)
        prefill = sorted([s for s in running if s.prefilling] + list(waiting),
                         key=lambda s: (-s.priority, s.pending, s.arrival))
        return fill(decode + prefill, limits)


class EnergyBalancedPolicy(Policy):
    """Fewest joules per token: fuller steps amortise the weights each step streams.

    A step's cost is dominated by reading every weight once, whatever its batch,
    so new prompts are held back up to `max_wait_s` until `min_batch` of them (or
    the running streams) can share a step (the plan's `execution.energy_max_wait_ms` and
    `execution.energy_min_batch`). The plan's power cap itself is enforced
    by the worker's governor for every policy.
    """

    name = "energy_balanced"

    def __init__(self, settings: ExecutionSettings = DEFAULT_EXECUTION):
        super().__init__(settings)
        self.min_batch = settings.energy_min_batch
        self.max_wait_s = settings.energy_max_wait_ms / 1000

    def schedule(self, running, waiting, limits):
        ready = list(waiting)
        if waiting and not running and len(waiting) < self.min_batch:
            oldest = min(s.arrival for s in waiting)
            if limits.now - oldest < self.max_wait_s:
                ready = []  # wait briefly for company
        decode = sorted((s for s in running if not s.prefilling), key=by_priority)
        prefill = sorted([s for s in running if s.prefilling] + ready, key=by_priority)
        return fill(decode + prefill, limits)


_POLICIES: dict[str, Callable[[ExecutionSettings], Policy]] = {
    p.name: p for p in (FifoPolicy, LatencyPolicy, ThroughputPolicy, EnergyBalancedPolicy)}


def register_policy(name: str, factory: Callable[[ExecutionSettings], Policy]) -> None:
    """Make a policy selectable by name, without editing the engine; `factory(settings)`
    gets the plan's execution section."""
    _POLICIES[name] = factory


def create_policy(name: str, settings: ExecutionSettings = DEFAULT_EXECUTION) -> Policy:
    if name not in _POLICIES:
        raise InvalidArgument(f"unknown scheduler policy {name!r} (known: {', '.join(sorted(_POLICIES))})",
                              field="scheduler_policy")
    return _POLICIES[name](settings)


def policy_names() -> list[str]:
    return sorted(_POLICIES)
