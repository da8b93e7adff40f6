"""The image's HEALTHCHECK: exit 0 when the server answers grpc.health.v1 SERVING, else 1.

    python healthcheck.py [HOST:PORT]   (default 127.0.0.1:$PLAN_ENGINE_PORT, the port `serve` takes
                                         when --port is not given, else 50051;
                                         $PLAN_ENGINE_HEALTH_SERVICE names the service, default
                                         planengine.v1.ControlPlane)

Docker and Compose use it; Kubernetes uses its native gRPC probes instead. Plaintext only:
a server started with --tls-cert needs a TLS-aware check (so do Kubernetes' gRPC probes).
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "planengine.v1.ControlPlane"


def main(argv: list[str]) -> int:
    target = argv[1] if len(argv) > 1 else f"127.0.0.1:{os.environ.get('PLAN_ENGINE_PORT', '50051')}"
    service = os.environ.get("PLAN_ENGINE_HEALTH_SERVICE", SERVICE)
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=3)
    except grpc.RpcError as exc:
        print(f"{target}: unhealthy: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target} {service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
