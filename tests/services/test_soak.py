"""Soak (issue 13): hostile clients beside normal ones on one real server, for a bounded time.

Hostile: extreme-but-valid sampling, oversized prompts and stop lists, unknown chat roles, Generate
streams cancelled after their first token, idle and cancelled WatchMetrics streams beyond the
per-client cap, idle Suggest streams, and an agent flooding suggestions (valid, out of bounds,
unknown fields). Normal: greedy Generate clients whose tokens are known beforehand.
Must hold: every normal request completes with exactly its tokens; health answers SERVING
throughout; no RPC ends INTERNAL, UNKNOWN or UNAVAILABLE; the store is intact afterwards.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.planengine.v1 import control_plane_pb2 as pb
from protos.planengine.v1 import plan_pb2
from protos.planengine.v1 import suggestion_pb2 as sg
from services.client import PlanEngineClient
from services.server import ServerConfig, create_server

pytestmark = pytest.mark.slow

SOAK_S = 20.0
AGENT = "flood-token"
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS}
PROMPTS = ["abcd", "dcba", "aabbccdd", "cdcdab"]


@pytest.fixture
def server(tmp_path, tiny):
    (tmp_path / "agents.json").write_text(json.dumps({"agents": {"flood": {
        "token": AGENT, "mode": "auto", "rate_per_minute": 30,
        "fields": {"batching.max_batch_size": {"min": 2, "max": 64}}}}}))
    srv = create_server(ServerConfig(port=0, store_path=tmp_path / "plans.sqlite3", agent_policy=tmp_path / "agents.json",
                                     initial_plan=plan_pb2.ExecutionPlan(id="soak", model=str(tiny)),
                                     suggest_idle_s=2.0, max_idle_streams_per_client=4, insecure_operator=True))
    yield srv
    srv.stop(10)


class Soak:
    def __init__(self, port: int):
        self.port = port
        self.stop = threading.Event()
        self.codes: Counter = Counter()
        self.bad: list[str] = []  # what must never happen
        self.lock = threading.Lock()

    def client(self, token: str | None = None) -> PlanEngineClient:
        return PlanEngineClient(f"127.0.0.1:{self.port}", token=token, timeout=30)

    def record(self, who: str, err: grpc.RpcError) -> None:
        with self.lock:
            self.codes[err.code()] += 1
            if err.code() in NEVER:
                self.bad.append(f"{who}: {err.code().name} {err.details()[:200]}")

    def loop(self, who: str, action) -> threading.Thread:
        def run() -> None:
            rng = random.Random(who)
            with self.client() as c:
                while not self.stop.is_set():
                    try:
                        action(c, rng)
                    except grpc.RpcError as err:
                        self.record(who, err)
                    except Exception as exc:  # noqa: BLE001 - a test failure, reported below
                        with self.lock:
                            self.bad.append(f"{who}: {type(exc).__name__}: {exc}")
        t = threading.Thread(target=run, name=who, daemon=True)
        t.start()
        return t


def test_hostile_clients_never_hurt_normal_ones(server, tmp_path):
    soak = Soak(server.port)
    with soak.client() as c:  # the tokens each normal prompt must produce, before any load
        expected = {p: [i for r in c.generate(text=p, max_tokens=8, ignore_eos=True) for i in r.delta.token_ids]
                    for p in PROMPTS}
    completed = Counter()

    def normal(c, rng):
        prompt = rng.choice(PROMPTS)
        ids = [i for r in c.generate(text=prompt, max_tokens=8, ignore_eos=True) for i in r.delta.token_ids]
        if ids != expected[prompt]:
            soak.bad.append(f"normal {prompt!r}: {ids} != {expected[prompt]}")
        completed[prompt] += 1

    def extreme_sampling(c, rng):
        sampling = rng.choice([{"temperature": 1e-38}, {"temperature": 1e-45}, {"temperature": 1e30},
                               {"temperature": 0.8, "repetition_penalty": 1e-38},
                               {"temperature": 2.0, "repetition_penalty": 1e38, "top_p": 1e-9}])
        list(c.generate(text="abcd", max_tokens=rng.randint(1, 16), sampling=sampling, ignore_eos=True))

    def oversized(c, rng):
        kind = rng.randrange(4)
        if kind == 0:
            list(c.generate(text="ab" * 2_500_000, max_tokens=2))
        elif kind == 1:
            list(c.generate(text="ab", stop=["x"] * 50_000, max_tokens=2))
        elif kind == 2:
            list(c.generate(messages=[{"role": "wizard" * 1000, "content": "hi"}], max_tokens=2))
        else:
            c.tokenize("cd" * 2_000_000)

    def cancelled(c, rng):
        stream = c.generate(text="abcdabcd", max_tokens=64, ignore_eos=True)
        next(stream)
        stream.cancel()

    def watchers(c, rng):
        streams = [c.stub.WatchMetrics(pb.WatchMetricsRequest(interval_s=3600)) for _ in range(6)]  # over the cap
        for s in streams:
            try:
                next(s)  # a snapshot, or RESOURCE_EXHAUSTED beyond the per-client cap
            except grpc.RpcError as err:
                soak.record("watchers", err)
        time.sleep(rng.uniform(0.1, 0.5))
        for s in streams:
            s.cancel()

    def idle_agent(c, rng):
        def nothing():
            soak.stop.wait(5)  # the server closes the stream after its 2 s idle limit
            return
            yield
        list(c.stub.Suggest(nothing(), timeout=10, metadata=[("authorization", f"Bearer {AGENT}")]))

    def flooding_agent(c, rng):
        active = c.active_plan()

        def suggestions():
            for k in range(20):
                s = sg.Suggestion(suggestion_id=f"s{k}", agent_id="flood", plan_id="soak",
                                  base_version=active.version, rationale="r" * rng.choice([10, 100_000]))
                kind = rng.randrange(4)
                if kind == 0:  # valid (accepted, or rejected once stale or over the rate)
                    s.update_mask.paths.append("batching.max_batch_size")
                    s.patch.batching.max_batch_size = rng.randint(2, 64)
                elif kind == 1:  # out of the policy's bounds
                    s.update_mask.paths.append("batching.max_batch_size")
                    s.patch.batching.max_batch_size = 10_000
                elif kind == 2:  # a field that does not exist
                    s.update_mask.paths.append("no.such.field")
                else:  # a field the agent may not touch, pointing at a host file
                    s.update_mask.paths.append("model")
                    s.patch.model = "/etc/passwd"
                yield s
        for verdict in c.stub.Suggest(suggestions(), timeout=30, metadata=[("authorization", f"Bearer {AGENT}")]):
            if not verdict.reason:
                soak.bad.append(f"a verdict without a reason: {verdict}")

    health_answers: list[int] = []

    def health(c, rng):
        status = health_pb2_grpc.HealthStub(c.channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        health_answers.append(status)
        if status != health_pb2.HealthCheckResponse.SERVING:
            soak.bad.append(f"health said {status}")
        time.sleep(0.2)

    threads = [soak.loop(f"normal-{i}", normal) for i in range(3)]
    threads += [soak.loop(name, action) for name, action in [
        ("extreme", extreme_sampling), ("oversized", oversized), ("cancelled", cancelled), ("watchers", watchers),
        ("idle-agent", idle_agent), ("flooding-agent", flooding_agent), ("health", health)]]
    time.sleep(SOAK_S)
    soak.stop.set()
    for t in threads:
        t.join(60)
    print(f"\nsoak {SOAK_S:.0f} s: normal requests {sum(completed.values())}, health checks {len(health_answers)}, "
          f"refusals {dict((k.name, v) for k, v in soak.codes.items())}")
    assert not soak.bad, soak.bad[:10]
    assert sum(completed.values()) >= 10 and len(health_answers) >= 10
    # the store is intact: every stored version reads back, and SQLite's own check passes
    with soak.client() as c:
        plans = c.list_plans().plans
        assert plans and all(c.get_plan(p.id, v) for p in plans for v in range(1, p.version + 1))
    db = sqlite3.connect(tmp_path / "plans.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
