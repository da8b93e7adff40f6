"""A real Prometheus (Debian's `prometheus` package) scrapes a real server and answers a PromQL
query for every metric docs/06_observability.md documents, by its documented name; and
`promtool check metrics` passes on the page. The names are read from the doc's table, so the
doc, the exporter and this test cannot drift apart.

Skips, saying why, only where the binaries are absent (`.ci/prometheus.sh` installs them).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
from paths import REPO

from services.client import PlanEngineClient, plan_from_json
from services.server import ServerConfig, create_server

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="Debian's prometheus package (prometheus, promtool) is not installed: run .ci/prometheus.sh as root")


def documented_metrics() -> dict[str, str]:
    """{name: type} from the serving-metrics table of docs/06_observability.md."""
    rows = re.findall(r"^\| `(planengine_[a-z0-9_]+)(?:\{[a-z_]+\})?` \| (histogram|gauge|counter) \|",
                      (REPO / "docs" / "06_observability.md").read_text(), flags=re.M)
    return dict(rows)


def test_the_doc_lists_every_metric_the_server_exports():
    from engine.telemetry.metrics import ServingMetrics
    exported = {}
    for line in ServingMetrics().prometheus_text().decode().splitlines():
        if line.startswith("# TYPE"):
            _, _, name, kind = line.split()
            if not name.endswith("_created"):  # prometheus_client's creation times, not a metric of ours
                exported[name] = kind
    assert documented_metrics() == exported and len(exported) == 15


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


@pytest.fixture
def busy_server(tiny, tmp_path):
    """A server on the tiny model that has finished requests of every kind, with /metrics on."""
    plan = plan_from_json(json.dumps({"id": "tiny", "model": str(tiny)}))
    server = create_server(ServerConfig(port=0, metrics_port=0, store_path=tmp_path / "plans.sqlite3",
                                        initial_plan=plan))
    with PlanEngineClient(f"127.0.0.1:{server.port}") as client:
        for stop in ((), ("a", "b", "c", "d")):
            list(client.generate(text="abcd", max_tokens=6, ignore_eos=True, stop=stop, seed=1))
    server.control.metrics.tick()  # the gauges, without waiting for the ticker
    yield server
    server.stop(1)


@needs_prometheus
def test_promtool_accepts_the_metrics_page(busy_server):
    page = get(f"http://127.0.0.1:{busy_server.metrics_port}/metrics")
    assert b"planengine_request_success_total{" in page
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=page, capture_output=True, timeout=60)
    assert check.returncode == 0, (check.stdout + check.stderr).decode()


@needs_prometheus
def test_prometheus_stores_and_queries_every_documented_metric(busy_server, tmp_path):
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: plan-engine\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{busy_server.metrics_port}']}}]\n")
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    # a histogram is stored as its _bucket, _sum and _count series; the others under their own name
    queries = {name: [f"{name}_count", f"{name}_bucket"] if kind == "histogram" else [name]
               for name, kind in documented_metrics().items()}
    try:
        answers: dict[str, list] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(answers) < sum(len(q) for q in queries.values()):
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            for query in (q for qs in queries.values() for q in qs if q not in answers):
                try:
                    reply = json.loads(get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})))
                except OSError:
                    break  # not up yet
                if reply["status"] == "success" and reply["data"]["result"]:
                    answers[query] = reply["data"]["result"]
            time.sleep(0.5)
        missing = [q for qs in queries.values() for q in qs if q not in answers]
        assert not missing, f"Prometheus has no series for {missing}; it has " + \
            get(f"{base}/api/v1/label/__name__/values").decode()
        for query, result in answers.items():
            for series in result:
                assert series["metric"]["__name__"] == query
                assert series["metric"]["plan_id"] == "tiny" and series["metric"]["job"] == "plan-engine"
        reasons = {s["metric"]["finished_reason"]: float(s["value"][1])
                   for s in answers["planengine_request_success_total"]}
        assert reasons == {"length": 1.0, "stop": 1.0}
        tokens = sum(float(s["value"][1]) for s in answers["planengine_generation_tokens_total"])
        assert tokens == busy_server.control.metrics.snapshot()["generation_tokens_total"] > 0
        targets = json.loads(get(f"{base}/api/v1/targets"))["data"]["activeTargets"]
        assert [t["health"] for t in targets] == ["up"]
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
