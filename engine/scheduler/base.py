"""The scheduler contract: plain data in, plain data out, no model.

Each engine step the worker describes every sequence by its metadata
(`SeqView`) and asks the plan's policy which sequences run and how many tokens
each computes (`SchedulerOutput`). Prefill and decode are the same arithmetic,
as in vLLM: a sequence computes `num_tokens - num_computed` more tokens, in
chunks bounded by the step's token budget, so a long prompt never starves the
decoding streams.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Sequence

from engine.errors import InvalidArgument


@dataclass(frozen=True)
class SeqView:
    """What a policy may know about a sequence."""

    seq_id: str
    priority: int  # higher first
    arrival: float  # monotonic seconds
    num_prompt: int
    num_tokens: int  # prompt + generated tokens known so far
    num_computed: int  # tokens whose keys/values are in the cache

    @property
    def pending(self) -> int:
        """Tokens still to compute before the next one can be sampled."""
        return self.num_tokens - self.num_computed


@dataclass(frozen=True)
class StepLimits:
    max_batch_size: int  # sequences in one step
    max_batched_tokens: int  # tokens in one step


@dataclass
class SchedulerOutput:
    """Which sequences run this step, and how many tokens each computes."""

    scheduled: list[tuple[str, int]] = field(default_factory=list)  # (seq_id, n_tokens), n >= 1
    preempted: list[str] = field(default_factory=list)  # give back their cache; recompute later

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Policy(ABC):
    """A scheduling policy. `running` holds sequences already started; `waiting`, the others."""

    name: str

    @abstractmethod
    def schedule(self, running: Sequence[SeqView], waiting: Sequence[SeqView], limits: StepLimits) -> SchedulerOutput:
        ...


def fill(order: Sequence[SeqView], limits: StepLimits, out: SchedulerOutput | None = None) -> SchedulerOutput:
    """Give each sequence in `order` its pending tokens while the step has room (chunking the last)."""
    out = out or SchedulerOutput()
    budget = limits.max_batched_tokens - out.num_tokens
    for seq in order:
        if len(out.scheduled) >= limits.max_batch_size or budget <= 0:
            break
        n = min(seq.pending, budget)
        if n > 0:
            out.scheduled.append((seq.seq_id, n))
            budget -= n
    return out


class FifoPolicy(Policy):
    """Arrival order (priority first): running sequences keep their place, then waiting ones start."""

    name = "fifo"

    def schedule(self, running: Sequence[SeqView], waiting: Sequence[SeqView], limits: StepLimits) -> SchedulerOutput:
        def key(s: SeqView) -> tuple[int, float]:
            return (-s.priority, s.arrival)
        return fill(sorted(running, key=key) + sorted(waiting, key=key), limits)


_POLICIES: dict[str, Callable[[], Policy]] = {"fifo": FifoPolicy}


def register_policy(name: str, factory: Callable[[], Policy]) -> None:
    """Make a policy selectable by plans, without editing the engine."""
    _POLICIES[name] = factory


def create_policy(name: str) -> Policy:
    if name not in _POLICIES:
        raise InvalidArgument(f"unknown scheduler policy {name!r} (known: {', '.join(sorted(_POLICIES))})",
                              field="scheduler_policy")
    return _POLICIES[name]()


def policy_names() -> list[str]:
    return sorted(_POLICIES)
