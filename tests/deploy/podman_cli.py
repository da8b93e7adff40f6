"""Podman, driven from the tests: build the image (`make image`), run containers, look at them.

Everything goes through the `podman` command line, as an operator would type it. The runtime
is runc (/etc/containers/containers.conf, written by .ci/containers.sh: crun fails here).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
# what .ci/containers.sh makes with debootstrap; $PLAN_ENGINE_BASE_IMAGE overrides it
DEFAULT_BASE_IMAGE = "localhost/plan-engine-base:bookworm"
SERVICE = "planengine.v1.ControlPlane"


def podman(*args: str, check: bool = True, timeout: float = 300,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """`podman ARGS`; `env` adds variables to podman's environment (`--env NAME` passes one on
    to the container without putting its value on a command line)."""
    result = subprocess.run(["podman", *args], check=False, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **env} if env else None)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unavailable_reason() -> str | None:
    """Why the container tests cannot run here, or None."""
    if shutil.which("podman") is None:
        return "podman is not installed (as root: bash .ci/containers.sh installs podman, runc and debootstrap)"
    info = subprocess.run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"], check=False,
                          capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        return f"podman does not work here: {info.stderr.strip()[-300:]}"
    return None


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


def image_size(name: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", name).stdout)


def image_inspect(name: str) -> dict:
    [image] = json.loads(podman("image", "inspect", name).stdout)
    return image


def host_ca_mount() -> list[str]:
    """The host's CA bundle over the image's, as `make image` does for the build: pip then
    trusts what the host trusts (here, a proxy that re-signs TLS)."""
    return ["--volume", "/etc/ssl/certs:/etc/ssl/certs:ro"] if Path("/etc/ssl/certs/ca-certificates.crt").is_file() \
        else []


@dataclass
class Built:
    plain: str  # the image
    baked: str  # the image with the default model in it
    base: str
    seconds: float  # what `make image` took in this session (layers cached from earlier runs count as done)
    log: Path


def build(log: Path) -> Built:
    """`make image`: the plain and the baked-model image, on the debootstrap base where there is one."""
    version = next(line.split('"')[1] for line in (REPO / "pyproject.toml").read_text().splitlines()
                   if line.startswith("version = "))
    base = os.environ.get("PLAN_ENGINE_BASE_IMAGE") or (DEFAULT_BASE_IMAGE if image_exists(DEFAULT_BASE_IMAGE) else "")
    image = f"localhost/plan-engine:{version}"
    cmd = ["make", "--no-print-directory", "image", f"IMAGE={image}", "CONTAINER_ENGINE=podman"]
    if base:
        cmd.append(f"BASE_IMAGE={base}")
    t0 = time.monotonic()
    with open(log, "w") as out:
        result = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=1800, check=False)
    seconds = time.monotonic() - t0
    if result.returncode != 0:
        hint = "" if base else \
            f" (no {DEFAULT_BASE_IMAGE}, so the Dockerfile's registry base; .ci/containers.sh makes it)"
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}){hint}:\n" + log.read_text()[-4000:])
    return Built(plain=image, baked=image + "-model", base=base or "(the Dockerfile's default)", seconds=seconds,
                 log=log)


def grpc_health(target: str, timeout: float = 2) -> int | None:
    """grpc.health.v1 status of the ControlPlane service at `target`, or None when nobody answers."""
    try:
        with grpc.insecure_channel(target) as channel:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE),
                                                             timeout=timeout).status
    except grpc.RpcError:
        return None


class Container:
    """One container, by name; the test's `containers` fixture removes it."""

    def __init__(self, name: str, image: str):
        self.name = name
        self.image = image

    @classmethod
    def run(cls, image: str, *args: str, options: list[str], prefix: str = "pe",
            env: dict | None = None) -> "Container":
        """`podman run -d OPTIONS IMAGE ARGS`. No systemd here to run the HEALTHCHECK's timer, so
        its interval is off and the tests run the check themselves (`podman healthcheck run`)."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        podman("run", "--detach", "--name", name, "--health-interval=disable", *options, image, *args, env=env)
        return cls(name, image)

    def inspect(self, template: str) -> str:
        return podman("inspect", "--format", template, self.name).stdout.strip()

    def state(self) -> dict:
        return json.loads(self.inspect("{{json .State}}"))

    def running(self) -> bool:
        return self.state()["Running"]

    def logs(self, tail: int = 40) -> str:
        result = podman("logs", "--tail", str(tail), self.name, check=False)
        return result.stdout + result.stderr

    def healthcheck(self) -> subprocess.CompletedProcess:
        """The image's HEALTHCHECK command, run in the container; exit 0 = healthy."""
        return podman("healthcheck", "run", self.name, check=False, timeout=60)

    def wait_healthy(self, timeout: float = 300, target: str | None = None) -> float:
        """Seconds from now until the HEALTHCHECK passes. With `target` (a port on the host
        network) SERVING is first watched from the host every 50 ms, which times it more finely
        than a health-check process can; the HEALTHCHECK must then agree."""
        t0 = time.monotonic()
        while True:
            assert time.monotonic() - t0 < timeout, f"{self.name}: not healthy within {timeout} s:\n{self.logs()}"
            assert self.running(), f"{self.name} exited ({self.state()['ExitCode']}):\n{self.logs()}"
            if target is not None:
                if grpc_health(target) != health_pb2.HealthCheckResponse.SERVING:
                    time.sleep(0.05)
                    continue
                seconds = time.monotonic() - t0
                check = self.healthcheck()
                assert check.returncode == 0, \
                    f"SERVING on {target} but the HEALTHCHECK fails: {check.stdout}{check.stderr}"
                return seconds
            if self.healthcheck().returncode == 0:
                return time.monotonic() - t0
            time.sleep(0.2)

    def exec(self, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *cmd, timeout=timeout)

    def kill(self, signal: str = "KILL") -> None:
        podman("kill", "--signal", signal, self.name)

    def wait(self, timeout: float = 120) -> int:
        """The exit code once the container has stopped."""
        return int(podman("wait", self.name, timeout=timeout).stdout.strip().splitlines()[-1])

    def stop(self, grace_s: int) -> float:
        """`podman stop -t GRACE`: SIGTERM, then SIGKILL after GRACE s. Returns the seconds it took."""
        t0 = time.monotonic()
        podman("stop", "--time", str(grace_s), self.name, timeout=grace_s + 60)
        return time.monotonic() - t0

    def start(self) -> None:
        podman("start", self.name)

    def remove(self) -> None:
        """The container and its anonymous volume (the image's VOLUME: a copy of a baked model)."""
        podman("rm", "--force", "--volumes", "--time", "0", self.name, check=False)
