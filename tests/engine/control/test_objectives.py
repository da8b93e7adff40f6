"""Objectives and load traces as data: measurement arithmetic, trial judgements, hostile values,
trace files (good, bogus, hostile) and the shipped traces. No server, no clock."""

from __future__ import annotations

import json
import math

import pytest
from paths import REPO

from engine.control.objectives import (
    Measurement,
    Objective,
    RequestSample,
    busy_seconds,
    check,
    gain,
    judge,
    measure,
)
from engine.errors import InvalidArgument
from services import load_trace


def sample(start, end, ttft=0.1, itl=(0.05,), tokens=10, energy=1.0, failed=False):
    return RequestSample(start, end, ttft, tuple(itl), tokens, energy, failed)


def test_busy_time_is_the_union_of_request_intervals():
    assert busy_seconds([(0, 2), (1, 3), (10, 11)]) == 4
    assert busy_seconds([(0, 5), (1, 2)]) == 5
    assert busy_seconds([]) == 0


def test_measure_counts_tokens_per_busy_second_and_joules_per_token():
    m = measure([sample(0, 2, tokens=20, energy=4), sample(1, 4, tokens=10, energy=2), sample(100, 101, tokens=10,
                                                                                            energy=2)])
    assert m.requests == 3 and m.failed == 0 and m.tokens == 40
    assert m.busy_s == 5 and m.tokens_per_s == 8
    assert m.joules_per_token == pytest.approx(0.2) and m.watts == pytest.approx(1.6)
    assert measure([]) == Measurement()


def test_failed_requests_count_and_break_the_trial():
    obj = Objective("max_tokens_per_s", min_requests=2)
    m = measure([sample(0, 1), sample(0, 1, failed=True, ttft=None, tokens=0)])
    assert m.failed == 1
    j = judge(obj, None, m)
    assert not j.keep and "1 of 2 requests failed" in j.reason


def test_judge_keeps_better_rolls_back_worse_and_broken_constraints():
    obj = Objective("max_tokens_per_s", max_ttft_p99_s=1.0, min_requests=2, tolerance=0.05)
    base = measure([sample(0, 1, tokens=10), sample(1, 2, tokens=10)])  # 10 tok/s
    better = measure([sample(0, 1, tokens=20), sample(1, 2, tokens=20)])
    worse = measure([sample(0, 1, tokens=8), sample(1, 2, tokens=8)])
    slow = measure([sample(0, 1, tokens=40, ttft=3.0), sample(1, 2, tokens=40, ttft=3.0)])
    j = judge(obj, base, better, base_label="v1")
    assert j.keep and j.gain == 2 and "20.0 tok/s against 10.0 tok/s for v1 (x2.00)" in j.reason
    j = judge(obj, base, worse)
    assert not j.keep and j.reason.startswith("worse:") and j.gain == pytest.approx(0.8)
    assert judge(obj, base, measure([sample(0, 1, tokens=10), sample(1, 2, tokens=9)])).keep  # within 5 %
    j = judge(obj, base, slow)
    assert not j.keep and "p99 TTFT 3 s > 1 s" in j.reason


def test_minimising_joules_per_token_is_a_gain_when_lower():
    obj = Objective("min_joules_per_token")
    base, trial = Measurement(requests=9, joules_per_token=2.0), Measurement(requests=9, joules_per_token=1.0)
    assert gain(obj, base, trial) == 2
    assert gain(obj, trial, base) == 0.5


def test_an_open_window_rolls_back_early_only_on_evidence():
    obj = Objective("max_tokens_per_s", max_itl_p99_s=0.1, min_requests=3)
    few = measure([sample(0, 1, itl=(5.0,))])
    assert judge(obj, None, few, final=False) is None  # one request proves nothing yet
    bad = measure([sample(i, i + 1, itl=(5.0,)) for i in range(3)])
    j = judge(obj, None, bad, final=False)
    assert not j.keep and "p99 ITL" in j.reason
    good = measure([sample(i, i + 1) for i in range(3)])
    assert judge(obj, None, good, final=False) is None  # good so far: the window decides
    j = judge(obj, None, measure([]), final=True)
    assert not j.keep and j.reason.startswith("inconclusive")
    j = judge(obj, None, good, final=True)
    assert j.keep and "no baseline" in j.reason


@pytest.mark.parametrize("obj, field", [
    (Objective("max_tokens_per_s", max_ttft_p99_s=math.nan), "max_ttft_p99_s"),
    (Objective("max_tokens_per_s", max_itl_p99_s=-1.0), "max_itl_p99_s"),
    (Objective("max_tokens_per_s", max_watts=math.inf), "max_watts"),
    (Objective("max_tokens_per_s", max_watts=0.0), "max_watts"),
    (Objective("max_tokens_per_s", trial_seconds=1e12), "trial_seconds"),
    (Objective("max_tokens_per_s", trial_requests=10**9), "trial_requests"),
    (Objective("max_tokens_per_s", tolerance=1.0), "tolerance"),
    (Objective("max_tokens_per_s", tolerance=math.nan), "tolerance"),
    (Objective("max_tokens_per_s", min_requests=0), "min_requests"),
    (Objective("", trial_requests=5), "goal"),
    (Objective("fastest"), "goal"),
])
def test_hostile_objective_values_are_named(obj, field):
    assert field in [f for f, _ in check(obj)]


def test_a_sound_objective_has_no_problems():
    assert check(Objective("min_joules_per_token", 2.0, 0.5, 100.0, 8, 30.0, 0.1, 4)) == []
    assert Objective("max_tokens_per_s", trial_requests=4).trials
    assert not Objective("max_tokens_per_s").trials


# --------------------------------------------------------------------------- traces


def test_generated_traces_are_deterministic_and_round_trip():
    a = load_trace.generate("bursty_batch", seed=3, duration_s=30, burst=4, period_s=10)
    b = load_trace.generate("bursty_batch", seed=3, duration_s=30, burst=4, period_s=10)
    assert a == b and len(a.requests) == 16
    assert load_trace.loads(a.dumps()) == a
    c = load_trace.generate("steady_chat", seed=3, duration_s=30, rate=1.0)
    assert [r.at for r in c.requests] == sorted(r.at for r in c.requests)
    assert load_trace.prompt_ids(3, 5, 7, 100) == load_trace.prompt_ids(3, 5, 7, 100)
    assert all(0 <= i < 8 for i in load_trace.prompt_ids(3, 5, 50, 8))


@pytest.mark.parametrize("name", ["steady_chat", "bursty_batch"])
def test_shipped_traces_are_what_their_documented_command_makes(name):
    """deploy/traces/*.jsonl are exactly what `make traces` writes (the command is in each header)."""
    path = REPO / "deploy" / "traces" / f"{name}.jsonl"
    trace = load_trace.load(path)
    args = trace.generator.split()
    assert args[:3] == ["plan-engine", "trace", "generate"]
    opts = dict(zip(args[3::2], args[4::2]))
    again = load_trace.generate(opts["--kind"], int(opts["--seed"]), float(opts["--duration"]),
                                **({"rate": float(opts["--rate"])} if "--rate" in opts else
                                   {"burst": int(opts["--burst"]), "period_s": float(opts["--period"])}))
    assert again.dumps() == path.read_text()
    assert f"--seed {trace.seed}" in (REPO / "Makefile").read_text() or trace.generator in (REPO / "Makefile").read_text()


HEADER = json.dumps({"format": "planengine.load_trace", "version": 1, "name": "t", "seed": 1})


@pytest.mark.parametrize("text, words", [
    ("", "empty"),
    ("[1, 2]\n", "JSON object"),
    ('{"format": "other", "version": 1, "seed": 1}\n{"at": 0, "prompt_tokens": 1, "max_tokens": 1}', "header"),
    (HEADER + "\n", "no requests"),
    (HEADER + '\n{"at": 0, "prompt_tokens": 1}', "max_tokens must be an integer"),
    (HEADER + '\n{"at": 0, "prompt_tokens": 0, "max_tokens": 1}', "prompt_tokens 0 must be in"),
    (HEADER + '\n{"at": -1, "prompt_tokens": 1, "max_tokens": 1}', "at must be seconds"),
    (HEADER + '\n{"at": NaN, "prompt_tokens": 1, "max_tokens": 1}', "at must be seconds"),
    (HEADER + '\n{"at": 2, "prompt_tokens": 1, "max_tokens": 1}\n{"at": 1, "prompt_tokens": 1, "max_tokens": 1}',
     "before the previous"),
    (HEADER + '\n{"at": 0, "prompt_tokens": 1, "max_tokens": 1, "prompt": "x"}', "unknown keys"),
    (HEADER + '\n{"at": 0, "prompt_tokens": true, "max_tokens": 1}', "must be an integer"),
    (HEADER + '\n{"at": 0, "prompt_tokens": 1, "max_tokens": 99999999999}', "max_tokens 99999999999"),
    (HEADER + "\nnot json", "line 2 is not JSON"),
    (HEADER + '\n{"at": 0, "prompt_tokens": 1, "max_tokens": 1, "priority": "high"}', "priority must be"),
])
def test_bogus_traces_are_refused_with_the_line_and_the_rule(text, words):
    with pytest.raises(InvalidArgument, match=words):
        load_trace.loads(text)


def test_unreadable_and_binary_trace_files_are_refused(tmp_path):
    with pytest.raises(InvalidArgument, match="cannot read"):
        load_trace.load(tmp_path / "missing.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InvalidArgument, match="not UTF-8"):
        load_trace.load(tmp_path / "bin.jsonl")


def test_bad_generator_arguments_are_refused():
    for kwargs in ({"kind": "spiky"}, {"kind": "steady_chat", "rate": 0}, {"kind": "bursty_batch", "burst": 0},
                   {"kind": "steady_chat", "duration_s": math.inf}):
        with pytest.raises(InvalidArgument):
            load_trace.generate(**kwargs)
