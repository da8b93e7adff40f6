"""Building and running the gRPC server.

`create_server(config)` is the factory tests call: it opens the plan store,
starts the control plane (loading the active plan's model while health says
NOT_SERVING), and returns a started server with the port it bound. `serve()`
adds signal handling: SIGTERM or SIGINT drains (health NOT_SERVING, no new
requests, in-flight ones finish within the grace period) and exits.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from engine.control.control_plane import ControlPlane
from engine.control.limits import RequestLimits
from engine.control.plan_store import PlanStore, open_plan_store
from engine.control.plans import PlanEnvironment
from engine.control.agents import AgentPolicy, SuggestionLog, SuggestionReviewer
from engine.control.trials import TrialLog, Trials
from engine.errors import InvalidArgument
from engine.model import registry
from services.agent_auth import AgentAuthInterceptor
from protos.planengine.v1 import control_plane_pb2, control_plane_pb2_grpc, plan_pb2
from services.auth import BearerTokenInterceptor
from services.errors import ErrorMappingInterceptor
from services.openai_api import HttpServer, create_app
from services.reflection import enable_server_reflection
from services.tracing import UNTRACED_SERVICES, server_interceptor
from services.servicer import ControlPlaneServicer
from services.streams import Closing, StreamLimitInterceptor, StreamLimits

log = logging.getLogger(__name__)

SERVICE_NAME = control_plane_pb2.DESCRIPTOR.services_by_name["ControlPlane"].full_name


def default_store_path() -> Path:
    from engine.model.registry import cache_dir
    return cache_dir().parent / "plans.sqlite3"


def open_store(target: str | Path) -> tuple[PlanStore, SuggestionLog]:
    """The plan store and the suggestion audit log, in one database: a SQLite file, or a
    postgresql:// URL for a database that replicas share (psycopg is imported only then)."""
    store = open_plan_store(target)
    return store, SuggestionLog(store.db)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    store_path: Path | str | None = None  # SQLite file or postgresql:// URL; default: SQLite next to the model cache
    initial_plan: plan_pb2.ExecutionPlan | None = None  # stored and activated at start if given
    initial_plan_if_none: bool = False  # ...only when no plan is active: a fleet's restarted replica overrides nothing
    max_message_bytes: int = 16 * 1024 * 1024
    max_workers: int = 64  # threads for RPCs (each open Generate, WatchMetrics or Suggest stream holds one)
    reserved_threads: int = 8  # never taken by streams: unary RPCs and health checks always find a thread
    max_idle_streams_per_client: int = 8  # WatchMetrics + Suggest streams per client (token or address)
    suggest_idle_s: float = 300.0  # a Suggest stream that sends nothing for this long is closed
    request_limits: RequestLimits = field(default_factory=RequestLimits)  # prompt, request_id, stop, chat sizes
    auth_tokens: list[str] = field(default_factory=list)  # bearer tokens; empty = no authentication
    agent_policy: Path | None = None  # WeOS agents' tokens and authority (JSON); None = no agent may suggest
    insecure_operator: bool = False  # allow an agent policy without operator tokens (every caller an operator)
    # Where plans' model paths may lie (directories, or single files); registry names are always
    # allowed. None: the model cache, plus the initial plan's model file. [] : registry names only.
    model_dirs: list[Path] | None = None
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, serve TLS
    tls_key: Path | None = None
    grace_s: float = 30.0  # how long a drain waits for in-flight requests
    tracer_provider: Any = None  # OpenTelemetry TracerProvider (tracing.configure_tracing); None = no tracing
    untraced_services: tuple[str, ...] = UNTRACED_SERVICES  # no span for these (health, reflection)
    metrics_port: int | None = None  # serve Prometheus /metrics on this port (0 picks one); None = off
    http_port: int | None = None  # serve the OpenAI-compatible HTTP API on this port (0 picks one); None = off


def allowed_model_dirs(config: ServerConfig) -> list[Path]:
    """`config.model_dirs`, or by default the model cache and the initial plan's own model file:
    what the operator started the server with, and nothing else of the host's files."""
    if config.model_dirs is not None:
        return [Path(d).expanduser() for d in config.model_dirs]
    dirs = [registry.cache_dir()]
    model = config.initial_plan.model if config.initial_plan is not None else ""
    if model and model not in registry.REGISTRY:
        dirs.append(Path(model).expanduser())
    return dirs


class PlanEngineServer:
    """A started server: its gRPC server, port, control plane and health servicer."""

    def __init__(self, grpc_server: grpc.Server, port: int, control: ControlPlane, health_servicer, store,
                 metrics_port: int | None = None, closing: Closing | None = None,
                 streams: StreamLimitInterceptor | None = None):
        self.grpc_server = grpc_server
        self.closing = closing or Closing()
        self.streams = streams
        self.port = port
        self.metrics_port = metrics_port
        self.control = control
        self.health = health_servicer
        self.store = store
        self.http: HttpServer | None = None  # the OpenAI-compatible API, when config.http_port is set
        self.trials: Trials | None = None

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    def stop(self, grace_s: float | None = None) -> None:
        """Drain: health NOT_SERVING, new Generate refused (UNAVAILABLE) and HTTP connections closed,
        in-flight requests finish within `grace_s`, then grpc stops taking any call."""
        deadline = time.monotonic() + (grace_s or 0.0)
        # first: once a client sees health leave SERVING, a new Generate is refused (UNAVAILABLE);
        # WatchMetrics and Suggest streams end now; Generate streams in flight finish below
        self.closing.set()
        self.health.enter_graceful_shutdown()
        if self.http is not None:
            self.http.begin_stop(grace_s)  # closes its socket; responses in flight go on
        # Generate streams in flight finish with the port still open, new ones refused by the
        # servicer with UNAVAILABLE: a call that grpc's own stop refuses can reach its client as
        # CANCELLED (the two-replica container test saw it). Then grpc stops with what is left of
        # the grace, which covers anything still running.
        while grace_s and self.streams is not None and self.streams.open_streams() and time.monotonic() < deadline:
            time.sleep(0.05)
        done = self.grpc_server.stop(None if grace_s is None else max(deadline - time.monotonic(), 0.0))
        if self.trials is not None:
            self.trials.close()  # before the control plane: a trial being judged may still roll back
        self.control.close(grace_s)
        done.wait()
        if self.http is not None:
            self.http.stop(grace_s)  # every request has its final event by now: the streams end
        self.store.close()


def create_server(config: ServerConfig) -> PlanEngineServer:
    interceptors: list[grpc.ServerInterceptor] = []
    if config.tracer_provider is not None:
        # first: its span then covers authentication and error mapping, continues the client's
        # traceparent, and stays open for a whole Generate stream
        interceptors.append(server_interceptor(config.tracer_provider, config.untraced_services))
    operators = BearerTokenInterceptor(config.auth_tokens) if config.auth_tokens else None
    agents = AgentPolicy.load(config.agent_policy) if config.agent_policy else AgentPolicy()
    if agents.agents and operators is None:
        if not config.insecure_operator:
            raise InvalidArgument("an agent policy without operator tokens would let any caller act as an operator "
                                  "(submit and activate plans, approve suggestions): give --token (or "
                                  "PLAN_ENGINE_TOKENS), or --insecure-operator to accept that", field="token")
        log.warning("INSECURE: --insecure-operator: agents are authenticated but every caller without an agent "
                    "token has operator rights (no --token)")
    if agents.agents:  # agent tokens open only the agent RPCs; other calls go on to the operator check
        interceptors.append(AgentAuthInterceptor(agents, operators))
    elif operators is not None:
        interceptors.append(operators)
    interceptors.append(ErrorMappingInterceptor())
    if config.max_workers <= config.reserved_threads:
        raise ValueError(f"max_workers {config.max_workers} must exceed reserved_threads {config.reserved_threads}")
    streams = StreamLimitInterceptor(StreamLimits(config.max_workers - config.reserved_threads,
                                                  config.max_idle_streams_per_client, config.suggest_idle_s))
    interceptors.append(streams)  # inside error mapping: its RESOURCE_EXHAUSTED is mapped like any other
    options = [("grpc.max_receive_message_length", config.max_message_bytes),
               ("grpc.max_send_message_length", config.max_message_bytes)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="rpc"),
                         interceptors=interceptors, options=options)

    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)

    def set_serving(serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, status)

    set_serving(False)
    store, suggestion_log = open_store(config.store_path or default_store_path())
    model_dirs = allowed_model_dirs(config)
    log.info("model paths allowed in: %s (and registry names)", ", ".join(map(str, model_dirs)) or "nothing")
    control = ControlPlane(store, PlanEnvironment(model_dirs=model_dirs), on_serving=set_serving,
                           tracer_provider=config.tracer_provider, limits=config.request_limits)
    closing = Closing()
    servicer = ControlPlaneServicer(control, closing, config.suggest_idle_s)
    trials = Trials(control, TrialLog(store.db))  # judges accepted suggestions whose plan objective asks for trials
    servicer.reviewer = SuggestionReviewer(control, agents, suggestion_log, trials=trials)
    control_plane_pb2_grpc.add_ControlPlaneServicer_to_server(servicer, server)
    enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME), server)  # v1 and v1alpha

    address = f"{config.host}:{config.port}"
    if config.tls_cert and config.tls_key:
        creds = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        trials.close()
        store.close()
        raise OSError(f"cannot bind {address}")
    server.start()  # health answers NOT_SERVING while the model loads
    http = None
    try:
        if config.http_port is not None:  # answers 503 while the model loads, as health does
            http = HttpServer(create_app(control, operators.tokens if operators else None,
                                         agents if agents.agents else None, max_streams=config.max_workers),
                              config.host, config.http_port).start()
        keep = config.initial_plan_if_none and store.active() is not None
        control.start(None if keep else config.initial_plan)
    except BaseException:
        if http is not None:
            http.stop(0)
        server.stop(0)
        trials.close()
        store.close()
        raise
    metrics_port = None
    if config.metrics_port is not None:
        metrics_port = control.metrics.serve_http(config.host, config.metrics_port)
    started = PlanEngineServer(server, port, control, health_servicer, store, metrics_port, closing, streams)
    started.http = http
    started.trials = trials
    return started


def serve(config: ServerConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain gracefully."""
    server = create_server(config)
    metrics = f", metrics on :{server.metrics_port}/metrics" if server.metrics_port is not None else ""
    if server.http_port is not None:
        metrics += f", OpenAI HTTP API on :{server.http_port}/v1"
    print(f"plan-engine serving on {config.host}:{server.port} "
          f"(plan {server.control.active_plan.id}@{server.control.active_plan.version}{metrics})", flush=True)
    if server.control.fallback:
        print(f"FALLBACK: {server.control.fallback}", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("draining...", flush=True)
    server.stop(config.grace_s)
