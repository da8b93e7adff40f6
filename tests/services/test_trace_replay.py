"""`plan-engine bench --trace` and `trace generate` end to end, on the tiny GGUF: a replay counts
every request and token, bogus files and values are refused before anything is sent."""

from __future__ import annotations

import json

import pytest
from paths import REPO

from protos.planengine.v1 import plan_pb2
from services import cli, load_trace
from services.client import PlanEngineClient
from services.server import ServerConfig, create_server
from services.trace_replay import replay


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replay")
    s = create_server(ServerConfig(port=0, store_path=tmp / "plans.sqlite3",
                                   initial_plan=plan_pb2.ExecutionPlan(id="tiny", model=str(tiny))))
    yield s
    s.stop(2)


def tiny_trace(n: int = 6) -> load_trace.Trace:
    return load_trace.Trace("tiny", 5, tuple(load_trace.TraceRequest(0.01 * i, 4, 3, i % 2) for i in range(n)))


def test_a_replay_sends_every_request_and_counts_every_token(server):
    result = replay(lambda: PlanEngineClient(f"127.0.0.1:{server.port}", timeout=60), tiny_trace())
    m = result.measurement
    assert m.requests == 6 and m.failed == 0 and m.tokens == 18
    assert result.plans == {"tiny@1": 6}
    assert m.busy_s > 0 and m.tokens_per_s > 0
    assert all(s.ttft_s is not None and len(s.itl_s) == 2 for s in result.samples)


def test_bench_trace_on_the_command_line(server, tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    path.write_text(tiny_trace(3).dumps())
    assert cli.main(["bench", "--trace", str(path), "--server", f"127.0.0.1:{server.port}", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["requests"] == 3 and out["failed"] == 0 and out["tokens"] == 9 and out["trace"] == "tiny"


def test_a_bogus_trace_file_is_refused_before_anything_is_sent(server, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"format": "planengine.load_trace", "version": 1, "seed": 1}\n{"at": -5}\n')
    before = server.control.metrics.snapshot()["requests_total"]
    assert cli.main(["bench", "--trace", str(path), "--server", f"127.0.0.1:{server.port}"]) == 1
    err = capsys.readouterr().err
    assert "line 2" in err and "at must be seconds" in err and "Traceback" not in err
    assert server.control.metrics.snapshot()["requests_total"] == before
    assert cli.main(["bench", "--trace", str(tmp_path / "missing.jsonl")]) == 1
    assert "cannot read the trace" in capsys.readouterr().err


def test_trace_generate_writes_what_trace_show_reads(tmp_path, capsys):
    out = tmp_path / "chat.jsonl"
    assert cli.main(["trace", "generate", "--kind", "steady_chat", "--seed", "4", "--duration", "10",
                     "-o", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["trace", "show", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "steady_chat" and shown["seed"] == 4 and shown["requests"] >= 1
    assert cli.main(["trace", "generate", "--kind", "steady_chat", "--rate", "-1"]) == 1
    assert "rate -1" in capsys.readouterr().err


@pytest.mark.parametrize("args, words", [
    (["--max-ttft", "nan"], "max_ttft_p99_s nan"),
    (["--max-itl", "-1"], "max_itl_p99_s -1"),
    (["--tolerance", "2"], "tolerance 2"),
    (["--trial-requests", "0", "--trial-seconds", "0"], "trial window"),
    (["--max-trials", "0"], "--max-trials 0"),
])
def test_tune_refuses_hostile_objectives_before_starting_anything(args, words, capsys):
    trace = REPO / "deploy" / "traces" / "steady_chat.jsonl"
    assert cli.main(["tune", "--trace", str(trace), *args]) == 1  # refused before a server starts
    assert words in capsys.readouterr().err


def test_a_trial_over_grpc_is_rolled_back_and_listed_by_the_cli(tiny, tmp_path, capsys):
    """End to end on the tiny GGUF: an agent's suggestion runs as a trial under an objective no
    request can meet; the server's own trial thread rolls it back; ListSuggestions and
    `plan-engine suggestions list` show why, and PlanHistory names the trial."""
    import time

    from protos.planengine.v1 import control_plane_pb2 as pb
    from protos.planengine.v1 import suggestion_pb2 as sg
    (tmp_path / "agents.json").write_text(json.dumps({"agents": {"tuner": {
        "token": "tt", "mode": "auto", "fields": {"batching.max_batch_size": {"min": 1, "max": 64}}}}}))
    plan = plan_pb2.ExecutionPlan(id="tiny", model=str(tiny))
    plan.objective.goal, plan.objective.max_ttft_p99_s = 1, 1e-9  # no first token is that fast
    plan.objective.trial_requests, plan.objective.min_requests = 2, 2
    server = create_server(ServerConfig(port=0, store_path=tmp_path / "plans.sqlite3", initial_plan=plan,
                                        agent_policy=tmp_path / "agents.json", insecure_operator=True))
    target = f"127.0.0.1:{server.port}"
    try:
        agent = PlanEngineClient(target, token="tt", timeout=60)
        s = sg.Suggestion(suggestion_id="b", agent_id="tuner", plan_id="tiny", base_version=1)
        s.update_mask.paths.append("batching.max_batch_size")
        s.patch.batching.max_batch_size = 1
        verdict = next(iter(agent.stub.Suggest(iter([s]), metadata=agent.metadata)))
        assert verdict.decision == sg.SuggestionVerdict.DECISION_ACCEPTED and "trial" in verdict.reason
        result = replay(lambda: PlanEngineClient(target, timeout=60), tiny_trace(2))
        assert result.plans == {"tiny@2": 2}
        for _ in range(600):  # the trial thread judges within a second or so; wait for it, don't time it
            [record] = agent._call("ListSuggestions", pb.ListSuggestionsRequest()).suggestions
            if record.trial.state != sg.TrialOutcome.STATE_RUNNING:
                break
            time.sleep(0.1)
        assert record.trial.state == sg.TrialOutcome.STATE_ROLLED_BACK
        assert "constraint violated: p99 TTFT" in record.trial.reason and record.trial.trial.requests == 2
        assert server.control.store.active().version == 1
        assert cli.main(["suggestions", "list", "--server", target]) == 0
        out = capsys.readouterr().out
        assert "trial v1 -> v2: ROLLED_BACK" in out and "p99 TTFT" in out
        history = PlanEngineClient(target).history("tiny").events
        assert history[0].action == "rollback" and "trial #1 of suggestion #1" in history[0].actor
    finally:
        server.stop(2)
