"""Issue 13, items 4-7 through a real gRPC server on the tiny model: every failure has its code
(never INTERNAL for bad input), a Suggest stream answers every suggestion, a failed activation
leaves only an audit event, a start falls back to a plan that loads, an agent policy needs an
operator token, and model paths are confined to the server's model directories."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3

import grpc
import pytest
from gguf import GGMLQuantizationType
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tiny_gguf import write_tiny_gguf

from engine.errors import DataLoss, InvalidArgument
from protos.planengine.v1 import control_plane_pb2 as pb
from protos.planengine.v1 import plan_pb2
from protos.planengine.v1 import suggestion_pb2 as sg
from services import cli
from services.client import PlanEngineClient
from services.server import ServerConfig, create_server

OPERATOR, AGENT = "operator-token", "agent-token"
POLICY = {"agents": {"tuner": {"token": AGENT, "mode": "auto", "rate_per_minute": 100,
                               "fields": {"model": {}, "scheduler_policy": {}}}}}
METHOD = "/planengine.v1.ControlPlane/"


@pytest.fixture
def models(tmp_path):
    allowed = tmp_path / "models"
    allowed.mkdir()
    good = write_tiny_gguf(allowed / "tiny.gguf")
    shutil.copy(good, allowed / "copy.gguf")
    write_tiny_gguf(allowed / "iq2.gguf", odd_tensor_type=GGMLQuantizationType.IQ2_XXS)
    (allowed / "notes.txt").write_text("not a model")
    return allowed


def start(tmp_path, models, **overrides):
    (tmp_path / "agents.json").write_text(json.dumps(POLICY))
    config = dict(port=0, store_path=tmp_path / "plans.sqlite3", auth_tokens=[OPERATOR],
                  agent_policy=tmp_path / "agents.json", model_dirs=[models],
                  initial_plan=plan_pb2.ExecutionPlan(id="default", model=str(models / "tiny.gguf")))
    config.update(overrides)
    return create_server(ServerConfig(**config))


@pytest.fixture
def served(tmp_path, models):
    server = start(tmp_path, models)
    operator = PlanEngineClient(f"127.0.0.1:{server.port}", token=OPERATOR, timeout=30)
    yield server, operator
    operator.close()
    server.stop(1)


def raw(server, method: str, payload: bytes, token: str = OPERATOR, stream: bool = False):
    """Call a method with raw request bytes (what a broken client sends)."""
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    metadata = [("authorization", f"Bearer {token}")]
    try:
        if stream:
            call = channel.stream_stream(METHOD + method)
            return list(call(iter([payload]), metadata=metadata, timeout=30))
        return channel.unary_unary(METHOD + method)(payload, metadata=metadata, timeout=30)
    finally:
        channel.close()


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def agent_suggestion(sid: str, base: int, **patch) -> sg.Suggestion:
    s = sg.Suggestion(suggestion_id=sid, agent_id="tuner", plan_id="default", base_version=base, rationale="r")
    for key, value in patch.items():
        s.update_mask.paths.append(key)
        setattr(s.patch, key, value)
    return s


# --------------------------------------------------------------------------- item 6


def test_malformed_protobuf_is_invalid_argument(served):
    server, _ = served
    code, details = code_of(lambda: raw(server, "SubmitPlan", b"\xff\xff\xff"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("malformed request")
    code, details = code_of(lambda: raw(server, "Suggest", b"\x0a\xff", token=AGENT, stream=True))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("malformed request")


def test_a_huge_echoed_value_is_truncated_in_the_error(served):
    _, operator = served
    code, details = code_of(lambda: operator.get_plan("x" * 100_000))
    assert code == grpc.StatusCode.NOT_FOUND and len(details) < 2000
    code, details = code_of(lambda: operator.submit_plan({"id": "p", "model": "/" + "m" * 100_000}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 2000


def test_a_model_path_over_255_characters_is_invalid_argument(served, models):
    _, operator = served
    long_path = str(models / ("a" * 300 + ".gguf"))
    code, details = code_of(lambda: operator.submit_plan({"id": "p", "model": long_path}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "too long" in details
    code, _ = code_of(lambda: operator.inspect_model(long_path))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_suggest_stream_answers_every_suggestion_and_goes_on(served, models):
    server, operator = served
    with PlanEngineClient(f"127.0.0.1:{server.port}", token=AGENT, timeout=30) as agent:
        verdicts = list(agent.stub.Suggest(iter([
            agent_suggestion("long", 1, model=str(models / ("a" * 300))),
            agent_suggestion("outside", 1, model="/etc/hostname"),
            agent_suggestion("policy", 1, scheduler_policy=plan_pb2.SCHEDULER_POLICY_LATENCY),
        ]), metadata=[("authorization", f"Bearer {AGENT}")], timeout=30))
    assert [v.suggestion_id for v in verdicts] == ["long", "outside", "policy"]
    assert [v.decision for v in verdicts] == [sg.SuggestionVerdict.DECISION_REJECTED] * 2 + \
        [sg.SuggestionVerdict.DECISION_ACCEPTED]
    assert "too long" in verdicts[0].reason
    records = operator._call("ListSuggestions", pb.ListSuggestionsRequest()).suggestions
    assert len(records) == 3 and all(r.HasField("verdict") for r in records)


def test_a_corrupt_row_is_data_loss_and_listing_goes_on(served, tmp_path, models):
    server, operator = served
    operator.submit_plan({"id": "other", "model": str(models / "tiny.gguf")})
    with sqlite3.connect(tmp_path / "plans.sqlite3") as conn:
        conn.execute("UPDATE plans SET body = x'0aff' WHERE id = 'other'")
    code, details = code_of(lambda: operator.get_plan("other"))
    assert code == grpc.StatusCode.DATA_LOSS and "other@1" in details
    listing = operator.list_plans()
    assert [p.id for p in listing.plans] == ["default"] and listing.active_id == "default"


def test_a_corrupt_store_file_is_named_at_start(tmp_path, models, capsys):
    path = tmp_path / "plans.sqlite3"
    path.write_bytes(b"garbage" * 1000)
    with pytest.raises(DataLoss, match=str(path)):
        start(tmp_path, models)
    assert cli.main(["serve", "--port", "0", "--store", str(path), "--token", OPERATOR]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and "internal error" not in err


# --------------------------------------------------------------------------- item 4


def test_activate_with_a_model_that_cannot_load_keeps_no_version(served, models):
    _, operator = served
    before = operator.list_plans()
    code, details = code_of(lambda: operator.submit_plan({"id": "default", "model": str(models / "iq2.gguf")},
                                                         activate=True))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "IQ2_XXS" in details
    assert operator.list_plans() == before
    event = operator.history(limit=1).events[0]
    assert (event.action, event.version) == ("activation_failed", 0) and "IQ2_XXS" in event.detail


def test_a_start_whose_active_plan_cannot_load_falls_back(tmp_path, models, caplog):
    server = start(tmp_path, models)
    with PlanEngineClient(f"127.0.0.1:{server.port}", token=OPERATOR, timeout=30) as operator:
        operator.submit_plan({"id": "default", "model": str(models / "copy.gguf")}, activate=True)
    server.stop(1)
    write_tiny_gguf(models / "copy.gguf", odd_tensor_type=GGMLQuantizationType.IQ2_XXS)  # broken while down
    with caplog.at_level(logging.ERROR):
        server = start(tmp_path, models, initial_plan=None)
    try:
        with PlanEngineClient(f"127.0.0.1:{server.port}", token=OPERATOR, timeout=30) as operator:
            assert operator.active_plan().version == 1
            actions = [(e.action, e.version) for e in operator.history(limit=2).events]
            assert actions == [("rollback", 1), ("activation_failed", 2)]
            health = health_pb2_grpc.HealthStub(operator.channel)
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        assert "default@2" in server.control.fallback
        assert any("default@2" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    finally:
        server.stop(1)


# --------------------------------------------------------------------------- item 7


def test_an_agent_policy_without_operator_tokens_needs_insecure_operator(tmp_path, models, caplog):
    with pytest.raises(InvalidArgument, match="--insecure-operator"):
        start(tmp_path, models, auth_tokens=[])
    assert not (tmp_path / "plans.sqlite3").exists()
    with caplog.at_level(logging.WARNING):
        server = start(tmp_path, models, auth_tokens=[], insecure_operator=True)
    server.stop(1)
    assert any("INSECURE" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    parser = cli.build_parser()
    assert parser.parse_args(["serve", "--insecure-operator"]).insecure_operator
    assert parser.parse_args(["serve", "--model-dir", "/a", "--model-dir", "/b"]).model_dir == ["/a", "/b"]


def test_model_paths_outside_the_model_dirs_cannot_probe_the_host(served, models, tmp_path):
    _, operator = served
    outside = tmp_path / "outside"
    outside.mkdir()
    exists = shutil.copy(models / "tiny.gguf", outside / "tiny.gguf")
    answers = []
    for path in (str(exists), str(outside / "missing.gguf"), "/etc/hostname", str(models / ".." / "outside" /
                                                                                  "tiny.gguf")):
        submit = code_of(lambda: operator.submit_plan({"id": "probe", "model": path}))
        inspect = code_of(lambda: operator.inspect_model(path))
        answers.append((submit[0], submit[1].replace(path, "PATH"), inspect[0], inspect[1].replace(path, "PATH")))
    # a plan naming it is invalid; inspecting it finds no such model (as for a missing file inside)
    assert (answers[0][0], answers[0][2]) == (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert len(set(answers)) == 1, answers  # the same answer whether or not the file exists
    (models / "link.gguf").symlink_to(exists)  # a link out of the model directory does not count
    assert code_of(lambda: operator.inspect_model(str(models / "link.gguf")))[0] == grpc.StatusCode.NOT_FOUND
    # inside the directories: works, and says what is wrong
    assert operator.inspect_model(str(models / "tiny.gguf")).architecture == "llama"
    assert code_of(lambda: operator.inspect_model(str(models / "notes.txt")))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: operator.inspect_model(str(models / "nope.gguf")))[0] == grpc.StatusCode.NOT_FOUND
    assert operator.submit_plan({"id": "inside", "model": str(models / "copy.gguf")}).plan.version == 1
