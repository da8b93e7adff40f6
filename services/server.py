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
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.control.control_plane import ControlPlane
from engine.control.plan_store import SqlitePlanStore
from engine.control.plans import PlanEnvironment
from services.api.planengine.v1 import control_plane_pb2, control_plane_pb2_grpc, plan_pb2
from services.auth import BearerTokenInterceptor
from services.errors import ErrorMappingInterceptor
from services.servicer import ControlPlaneServicer

log = logging.getLogger(__name__)

SERVICE_NAME = control_plane_pb2.DESCRIPTOR.services_by_name["ControlPlane"].full_name


def default_store_path() -> Path:
    from engine.model.registry import cache_dir
    return cache_dir().parent / "plans.sqlite3"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    store_path: Path | None = None  # default: next to the model cache
    initial_plan: plan_pb2.ExecutionPlan | None = None  # stored and activated at start if given
    max_message_bytes: int = 16 * 1024 * 1024
    max_workers: int = 64  # concurrent RPCs (each Generate stream holds one thread)
    auth_tokens: list[str] = field(default_factory=list)  # bearer tokens; empty = no authentication
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, serve TLS
    tls_key: Path | None = None
    grace_s: float = 30.0  # how long a drain waits for in-flight requests


class PlanEngineServer:
    """A started server: its gRPC server, port, control plane and health servicer."""

    def __init__(self, grpc_server: grpc.Server, port: int, control: ControlPlane, health_servicer, store):
        self.grpc_server = grpc_server
        self.port = port
        self.control = control
        self.health = health_servicer
        self.store = store

    def stop(self, grace_s: float | None = None) -> None:
        """Drain: health NOT_SERVING, refuse new RPCs, let in-flight requests finish within `grace_s`."""
        self.health.enter_graceful_shutdown()
        # grpc's grace covers RPCs already running (open Generate streams); it refuses new ones at once
        done = self.grpc_server.stop(grace_s)
        self.control.close(grace_s)
        done.wait()
        self.store.close()


def create_server(config: ServerConfig) -> PlanEngineServer:
    interceptors: list[grpc.ServerInterceptor] = []
    if config.auth_tokens:
        interceptors.append(BearerTokenInterceptor(config.auth_tokens))
    interceptors.append(ErrorMappingInterceptor())
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
    store = SqlitePlanStore(config.store_path or default_store_path())
    control = ControlPlane(store, PlanEnvironment(), on_serving=set_serving)
    control_plane_pb2_grpc.add_ControlPlaneServicer_to_server(ControlPlaneServicer(control), server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    address = f"{config.host}:{config.port}"
    if config.tls_cert and config.tls_key:
        creds = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        store.close()
        raise OSError(f"cannot bind {address}")
    server.start()  # health answers NOT_SERVING while the model loads
    try:
        control.start(config.initial_plan)
    except BaseException:
        server.stop(0)
        store.close()
        raise
    return PlanEngineServer(server, port, control, health_servicer, store)


def serve(config: ServerConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain gracefully."""
    server = create_server(config)
    print(f"plan-engine serving on {config.host}:{server.port} "
          f"(plan {server.control.runtime.plan.id}@{server.control.runtime.plan.version})", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("draining...", flush=True)
    server.stop(config.grace_s)
