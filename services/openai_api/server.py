"""The HTTP API's server: uvicorn on a thread of the serve process, beside the gRPC server."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI


class HttpServer:
    """Serves `app` on host:port (0 picks a free port) from a daemon thread; `stop()` drains it."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError:
            self._sock.close()
            raise
        self.port = self._sock.getsockname()[1]
        # no lifespan: the control plane's lifetime belongs to the PlanEngineServer, not to the app
        self._server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="http-api", daemon=True)

    def start(self, timeout_s: float = 10.0) -> "HttpServer":
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the HTTP API did not start on port {self.port}")
            time.sleep(0.01)
        return self

    def begin_stop(self, grace_s: float | None = None) -> None:
        """Stop accepting connections; responses in flight get `grace_s` (None: as long as they take)."""
        self._server.config.timeout_graceful_shutdown = grace_s
        self._server.should_exit = True

    def stop(self, grace_s: float | None = None) -> None:
        self.begin_stop(grace_s)
        self._thread.join()
