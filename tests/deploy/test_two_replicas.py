"""Two replicas of the image on one shared PostgreSQL plan store, run as the Kubernetes
Deployment runs them: its container args (ports moved apart: both are on the host network),
its ConfigMap's plan, a read-only root file system, no capabilities, no privilege escalation,
its memory limit, the database URL from the environment, and its termination grace period.

PostgreSQL is Debian's, started on 127.0.0.1 as tests/postgres_server.py starts it. What is
checked: a plan activated through replica A is served by B within the documented propagation
bound; an agent suggestion accepted on B is served and listed on A; kill -9 of A in the middle
of a stream leaves B serving, and A restarted rejoins on the fleet's active plan (not its
--default-plan); SIGTERM drains an in-flight stream within the grace period. The measured
delays are printed (run with -s)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml

from grpc_health.v1 import health_pb2

from podman_cli import REPO, Container, free_port, grpc_health
from postgres_server import start_postgres, wait_served

# the first test to run builds the images (session fixture): minutes on a cold machine
pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

K8S = REPO / "deploy" / "k8s" / "base"
# docs/07_deploy.md: "a replica serves a plan activated elsewhere within 2 s plus the time to
# apply it" (the watcher's poll; LISTEN/NOTIFY is usually far faster). A live apply takes
# milliseconds; the margin covers a Generate on a loaded 2-core machine, never a lost change.
PROPAGATION_BOUND_S = 2.0
MARGIN_S = 10.0
AGENT_TOKEN = "tuner-token"
OPERATOR_TOKEN = "operator-token"  # what the Deployment's plan-engine-operator Secret gives PLAN_ENGINE_TOKENS
AGENT_POLICY = {"agents": {"tuner": {"token": AGENT_TOKEN, "mode": "auto", "rate_per_minute": 600,
                                     "fields": {"batching.max_batch_size": {"min": 1, "max": 64}}}}}


def deployment() -> tuple[list[str], int]:
    """The server container's args and the pod's termination grace period, from the manifest."""
    doc = yaml.safe_load((K8S / "deployment.yaml").read_text())
    pod = doc["spec"]["template"]["spec"]
    server = next(c for c in pod["containers"] if c["name"] == "plan-engine")
    return server["args"], pod["terminationGracePeriodSeconds"]


@dataclass
class Replica:
    name: str
    container: Container
    port: int
    metrics_port: int
    clients: list = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, token: str = OPERATOR_TOKEN):
        """A new channel (an old one may be backing off after the replica was killed)."""
        from services.client import PlanEngineClient
        client = PlanEngineClient(self.target, token=token, timeout=120)
        self.clients.append(client)
        return client

    def close_clients(self) -> None:
        for client in self.clients:
            client.close()
        self.clients.clear()


class Fleet:
    def __init__(self, image: str, dsn: str, config: Path):
        self.image, self.dsn, self.config = image, dsn, config
        self.args, self.grace_s = deployment()
        self.replicas: dict[str, Replica] = {}
        self.delays: dict[str, list[float]] = {}

    def start(self, name: str) -> Replica:
        port, metrics_port = free_port(), free_port()
        args = [a for a in self.args if not a.startswith(("--host=", "--port=", "--metrics-port=", "--http-port="))]
        args += ["--host=127.0.0.1", f"--metrics-port={metrics_port}", f"--http-port={free_port()}"]
        options = [
            "--network=host", "--env", f"PLAN_ENGINE_PORT={port}",
            "--env", "PLAN_ENGINE_STORE",  # its value from podman's environment, not a command line
            "--volume", f"{self.config}:/etc/plan-engine:ro",
            # the pod's securityContext and limits
            "--read-only", "--tmpfs", "/tmp", "--cap-drop=ALL", "--security-opt=no-new-privileges",
            "--memory=3g",
        ]
        options += ["--env", "PLAN_ENGINE_TOKENS"]  # as the Deployment takes it from its Secret
        container = Container.run(self.image, *args, options=options, prefix=f"pe-{name}",
                                  env={"PLAN_ENGINE_STORE": self.dsn, "PLAN_ENGINE_TOKENS": OPERATOR_TOKEN})
        self.replicas[name] = Replica(name, container, port, metrics_port)
        return self.replicas[name]

    def record(self, what: str, seconds: float) -> None:
        self.delays.setdefault(what, []).append(seconds)
        assert seconds < PROPAGATION_BOUND_S + MARGIN_S, f"{what}: {seconds:.2f} s, over the documented bound"

    def remove(self) -> None:
        for replica in self.replicas.values():
            replica.close_clients()
            replica.container.remove()


@pytest.fixture(scope="module")
def fleet(images, tmp_path_factory):
    """Two replicas started together on an empty database: one of them migrates it and stores
    and activates the ConfigMap's plan (--default-plan), the other finds it active."""
    pg = start_postgres()
    config = tmp_path_factory.mktemp("config")
    fleet = None
    try:
        shutil.copy(K8S / "plan.json", config / "plan.json")
        (config / "agent-policy.json").write_text(json.dumps(AGENT_POLICY))  # the base's admits no one
        for path in (config, *config.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)  # readable by the image's uid 10001
        fleet = Fleet(images.baked, pg.create_database(), config)
        t0 = time.monotonic()
        for name in ("a", "b"):
            fleet.start(name)
        starts = {}
        for name, replica in fleet.replicas.items():
            replica.container.wait_healthy(target=replica.target)
            starts[name] = time.monotonic() - t0
        print("\nfleet on an empty database: SERVING " + ", ".join(f"{k} {v:.1f} s" for k, v in starts.items())
              + " after the first podman run")
        yield fleet
    finally:
        if fleet is not None:
            if fleet.delays:
                print("\npropagation between the container replicas (from the answer to the change to the start of "
                      "the first Generate stamped with it; 0 = stamped at the first look): "
                      + "; ".join(f"{k}: " + ", ".join(f"{s * 1000:.0f}" for s in v) + " ms"
                                  for k, v in fleet.delays.items()))
            fleet.remove()
        pg.remove()


def served(client) -> "plan_pb2.PlanStamp":  # noqa: F821
    *_, last = client.generate(text="Hi", max_tokens=1, ignore_eos=True)
    return last.final.plan


def edited(plan, **changes):
    """A copy of `plan` to submit as its next version."""
    from protos.planengine.v1 import plan_pb2
    new = plan_pb2.ExecutionPlan()
    new.CopyFrom(plan)
    for name in ("version", "hash", "created_at"):
        new.ClearField(name)
    for path, value in changes.items():
        target = new
        *parents, leaf = path.split("__")
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, leaf, value)
    return new


class Stream:
    """A Generate stream read in a thread: its tokens as they come, its end or its error."""

    def __init__(self, client, max_tokens: int):
        self.tokens = 0
        self.final = None
        self.error: grpc.RpcError | None = None
        self.started = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(client, max_tokens), daemon=True)
        self._thread.start()

    def _read(self, client, max_tokens: int) -> None:
        try:
            for message in client.generate(text="Tell me a long story.", max_tokens=max_tokens, ignore_eos=True):
                if message.HasField("delta"):
                    self.tokens += len(message.delta.token_ids)
                    self.started.set()
                else:
                    self.final = message.final
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.started.set()

    def wait_tokens(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.tokens < n and self._thread.is_alive():
            assert time.monotonic() < deadline, f"{self.tokens} tokens after {timeout} s"
            time.sleep(0.02)

    def join(self, timeout: float = 180) -> "Stream":
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream neither ended nor failed"
        return self


def test_the_replicas_start_on_the_configmaps_plan(fleet):
    a, b = fleet.replicas["a"].client(), fleet.replicas["b"].client()
    active = a.active_plan()
    assert (active.id, active.version) == ("default", 1) and active.kv_cache.num_blocks == 1024  # plan.json
    assert served(a).hash == served(b).hash == active.hash
    history = [(e.action, e.plan_id, e.version) for e in b.history(limit=10).events]
    assert history == [("activate", "default", 1), ("submit", "default", 1)]  # stored once, not once per replica


def test_a_plan_activated_through_a_is_served_by_b_within_the_bound(fleet):
    from protos.planengine.v1 import plan_pb2
    a, b = fleet.replicas["a"].client(), fleet.replicas["b"].client()
    for policy in (plan_pb2.SCHEDULER_POLICY_LATENCY, plan_pb2.SCHEDULER_POLICY_THROUGHPUT,
                   plan_pb2.SCHEDULER_POLICY_FIFO):
        activated = a.submit_plan(edited(a.active_plan(), scheduler_policy=policy), activate=True).plan
        fleet.record("activate on A, served by B", wait_served(b, activated.hash))
        assert served(a).hash == activated.hash
    rolled = b.rollback().plan
    fleet.record("rollback on B, served by A", wait_served(a, rolled.hash))


def test_an_agent_suggestion_accepted_on_b_shows_on_a(fleet):
    from protos.planengine.v1 import control_plane_pb2, suggestion_pb2
    a, b = fleet.replicas["a"].client(), fleet.replicas["b"].client()
    agent = fleet.replicas["b"].client(token=AGENT_TOKEN)
    base = b.active_plan()
    suggestion = suggestion_pb2.Suggestion(suggestion_id="fleet-1", agent_id="tuner", plan_id=base.id,
                                           base_version=base.version, rationale="container fleet test")
    suggestion.update_mask.paths.append("batching.max_batch_size")
    suggestion.patch.batching.max_batch_size = 12
    [verdict] = agent.stub.Suggest(iter([suggestion]), metadata=agent.metadata, timeout=120)
    assert verdict.decision == suggestion_pb2.SuggestionVerdict.DECISION_ACCEPTED, verdict
    fleet.record("suggestion accepted on B, served by A", wait_served(a, verdict.resulting_hash))
    on_a = a.active_plan()
    assert on_a.hash == verdict.resulting_hash and on_a.batching.max_batch_size == 12
    # the audit log is the fleet's: A lists what B received and decided
    listed = a._call("ListSuggestions", control_plane_pb2.ListSuggestionsRequest(limit=50)).suggestions
    assert [(r.agent_id, r.suggestion.suggestion_id, r.verdict.decision) for r in listed] == [
        ("tuner", "fleet-1", suggestion_pb2.SuggestionVerdict.DECISION_ACCEPTED)]


def test_kill_9_of_a_mid_stream_leaves_b_serving_and_a_rejoins(fleet):
    replica_a, replica_b = fleet.replicas["a"], fleet.replicas["b"]
    a, b = replica_a.client(), replica_b.client()
    on_a, on_b = Stream(a, max_tokens=500), Stream(b, max_tokens=48)
    on_a.wait_tokens(4)
    replica_a.container.kill("KILL")
    assert replica_a.container.wait() == 137  # SIGKILL: no drain, no goodbye
    on_a.join()
    assert on_a.final is None and on_a.error is not None and on_a.error.code() in (
        grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL), on_a.error
    # B's stream is untouched, and B takes new work and plan changes with A down
    on_b.join()
    assert on_b.error is None and on_b.final.finish_reason == "length" and on_b.tokens == 48
    while_down = b.submit_plan(edited(b.active_plan(), batching__max_batch_size=24), activate=True).plan
    assert served(b).hash == while_down.hash
    replica_a.close_clients()

    # the same container started again: it serves what the fleet has active, not --default-plan
    replica_a.container.start()
    rejoin = replica_a.container.wait_healthy(target=replica_a.target)
    a = replica_a.client()
    assert served(a).hash == served(b).hash == while_down.hash
    assert a.active_plan().version == while_down.version > 1
    history = [(e.action, e.plan_id, e.version) for e in a.history(limit=50).events]
    assert history == [(e.action, e.plan_id, e.version) for e in b.history(limit=50).events]
    assert history.count(("submit", "default", 1)) == 1
    print(f"\nkill -9 of A: A's stream failed with {on_a.error.code().name} after {on_a.tokens} tokens; "
          f"B finished its {on_b.tokens}; A restarted SERVING after {rejoin:.1f} s on default@{while_down.version}")


def test_sigterm_drains_an_in_flight_stream_within_the_grace_period(fleet):
    replica_a, replica_b = fleet.replicas["a"], fleet.replicas["b"]
    a, b = replica_a.client(), replica_b.client()
    grace_arg = float(next(x for x in fleet.args if x.startswith("--grace=")).split("=")[1])
    in_flight = Stream(b, max_tokens=96)
    in_flight.wait_tokens(2)
    stopping: dict = {}
    stopper = threading.Thread(target=lambda: stopping.update(s=replica_b.container.stop(fleet.grace_s)))
    stopper.start()
    # draining: health turns NOT_SERVING (or the port closes) at once, before the stream ends
    deadline = time.monotonic() + 30
    while grpc_health(replica_b.target) == health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
        time.sleep(0.02)
    tokens_when_draining = in_flight.tokens
    refused = None
    try:
        b.generate(text="Hi", max_tokens=1).__next__()
    except grpc.RpcError as exc:
        refused = exc.code()
    stopper.join(fleet.grace_s + 60)
    in_flight.join()
    assert refused == grpc.StatusCode.UNAVAILABLE  # new work is turned away...
    # ...while the one in flight finishes
    assert in_flight.error is None and in_flight.final.finish_reason == "length" and in_flight.tokens == 96
    assert replica_b.container.state()["ExitCode"] == 0  # it exited by itself: podman never needed SIGKILL
    assert "draining..." in replica_b.container.logs(tail=20)
    assert served(a).hash  # A serves on
    print(f"\nSIGTERM to B with a stream in flight ({tokens_when_draining} of 96 tokens sent when health left "
          f"SERVING): drained and exited 0 in {stopping['s']:.1f} s (server grace {grace_arg:.0f} s, "
          f"podman stop -t {fleet.grace_s} as terminationGracePeriodSeconds)")
