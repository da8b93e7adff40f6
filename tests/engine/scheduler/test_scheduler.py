"""Scheduling policies and preemption on hand-built inputs: no model."""

from __future__ import annotations

import pytest

from engine.errors import InvalidArgument
from engine.scheduler.base import (
    EnergyBalancedPolicy,
    FifoPolicy,
    LatencyPolicy,
    Policy,
    SchedulerOutput,
    SeqView,
    StepLimits,
    ThroughputPolicy,
    create_policy,
    fill,
    policy_names,
    register_policy,
)


def seq(sid, prompt=10, generated=0, computed=None, priority=0, arrival=0.0, blocks=None, bs=16):
    tokens = prompt + generated
    computed = tokens - 1 if computed is None and generated else (computed or 0)
    blocks = -(-computed // bs) if blocks is None else blocks
    return SeqView(sid, priority, arrival, prompt, tokens, computed, blocks)


LIMITS = StepLimits(max_batch_size=8, max_batched_tokens=32, block_size=16)


def test_fifo_decodes_running_then_prefills_waiting_in_chunks():
    running = [seq("a", generated=3, arrival=1), seq("b", generated=1, arrival=2)]
    waiting = [seq("c", prompt=50, arrival=3), seq("d", prompt=5, arrival=4)]
    out = FifoPolicy().schedule(running, waiting, LIMITS)
    assert out.scheduled == [("a", 1), ("b", 1), ("c", 30)]  # c's prompt chunked to the 32-token budget
    assert out.preempted == []


def test_priority_beats_arrival():
    out = FifoPolicy().schedule([], [seq("old", arrival=1), seq("vip", arrival=2, priority=5)], LIMITS)
    assert [s for s, _ in out.scheduled] == ["vip", "old"]


def test_latency_prefills_first_throughput_decodes_first():
    running = [seq("dec", generated=4, arrival=1)]
    waiting = [seq("new", prompt=40, arrival=2)]
    assert LatencyPolicy().schedule(running, waiting, LIMITS).scheduled == [("new", 32)]
    assert ThroughputPolicy().schedule(running, waiting, LIMITS).scheduled == [("dec", 1), ("new", 31)]


def test_throughput_admits_shortest_prompts_first():
    waiting = [seq("long", prompt=30, arrival=1), seq("s1", prompt=4, arrival=2), seq("s2", prompt=6, arrival=3)]
    out = ThroughputPolicy().schedule([], waiting, LIMITS)
    assert out.scheduled == [("s1", 4), ("s2", 6), ("long", 22)]


def test_max_batch_size():
    waiting = [seq(f"s{i}", prompt=2, arrival=i) for i in range(12)]
    assert len(FifoPolicy().schedule([], waiting, LIMITS).scheduled) == 8


def test_energy_balanced_waits_briefly_for_company():
    policy = EnergyBalancedPolicy()
    lonely = [seq("a", arrival=10.0)]
    assert policy.schedule([], lonely, StepLimits(8, 32, now=10.01)).scheduled == []
    assert policy.schedule([], lonely, StepLimits(8, 32, now=10.2)).scheduled == [("a", 10)]
    crowd = [seq(f"s{i}", prompt=4, arrival=10.0) for i in range(4)]
    assert len(policy.schedule([], crowd, StepLimits(8, 32, now=10.0)).scheduled) == 4


def test_out_of_blocks_preempts_the_lowest_ranked_running_sequence():
    # a and b hold 2 blocks each; the arena has none free; a's next token needs a third block
    a = seq("a", prompt=20, generated=13, arrival=1, blocks=2)  # 32 computed: the next token opens block 3
    b = seq("b", prompt=20, generated=5, arrival=2, blocks=2)
    out = FifoPolicy().schedule([a, b], [], StepLimits(8, 32, free_blocks=0, block_size=16))
    assert out.preempted == ["b"] and out.scheduled == [("a", 1)]


def test_waiting_sequence_does_not_preempt_higher_ranked_running():
    a = seq("a", prompt=20, generated=5, arrival=1, blocks=2)
    out = FifoPolicy().schedule([a], [seq("new", prompt=40, arrival=2)], StepLimits(8, 64, free_blocks=1))
    assert out.preempted == [] and out.scheduled == [("a", 1), ("new", 16)]  # new gets the chunk that fits


def test_fill_never_overcommits_blocks():
    order = [seq(f"s{i}", prompt=40, arrival=i) for i in range(4)]
    out = fill(order, StepLimits(8, 1000, free_blocks=5, block_size=16))
    assert out.scheduled == [("s0", 40), ("s1", 32)]  # 3 blocks + the 2-block chunk that fits
    assert sum(-(-n // 16) for _, n in out.scheduled) == 5 and out.preempted == []


def test_registry_and_unknown_policy():
    assert {"fifo", "latency", "throughput", "energy_balanced"} <= set(policy_names())

    class Reverse(Policy):
        name = "reverse"

        def schedule(self, running, waiting, limits):
            return fill(sorted(list(running) + list(waiting), key=lambda s: -s.arrival), limits)

    register_policy("reverse", Reverse)
    out = create_policy("reverse").schedule([], [seq("a", arrival=1), seq("b", arrival=2)], LIMITS)
    assert isinstance(out, SchedulerOutput) and out.scheduled[0][0] == "b"
    with pytest.raises(InvalidArgument, match="unknown scheduler policy 'nope'"):
        create_policy("nope")
