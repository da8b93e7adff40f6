"""Serving metrics: /metrics scraped over real HTTP, and exact snapshot percentiles."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.errors import InvalidArgument
from engine.telemetry.metrics import PlanLabels, ServingMetrics

PLAN_A = PlanLabels("chat", 3, "smollm2-135m")
PLAN_B = PlanLabels("batch", 1, "smollm2-135m")


def labels(plan: PlanLabels, **extra) -> dict[str, str]:
    return {"model_name": plan.model, "plan_id": plan.plan_id, "plan_version": str(plan.plan_version), **extra}


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples, name, **label_values) -> float:
    return samples[(name, frozenset(label_values.items()))]


def observe(metrics, plan, i, *, finish_reason="stop"):
    metrics.observe_request(plan, queue_s=0.01 * i, ttft_s=0.1 * i, itl_s=[0.02, 0.03, 0.04],
                            e2e_s=1.0 + i, prompt_tokens=10 + i, generation_tokens=4,
                            energy_j=0.5 * i, finish_reason=finish_reason)


def test_scrape_over_http():
    metrics = ServingMetrics()
    n = 5
    for i in range(1, n + 1):
        observe(metrics, PLAN_A, i, finish_reason="length" if i == 5 else "stop")
    observe(metrics, PLAN_B, 1)
    metrics.set_running(PLAN_A, 3)
    metrics.set_waiting(PLAN_A, 7)
    metrics.set_kv_usage(PLAN_A, 0.25)
    metrics.set_power(PLAN_A, 42.5)
    _server, port = metrics.serve_http()
    try:
        assert port > 0
        s = scrape(port)
    finally:
        metrics.close()

    a = labels(PLAN_A)
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert value(s, f"planengine_{name}_count", **a) == n
        assert value(s, f"planengine_{name}_bucket", **a, le="+Inf") == n
        assert value(s, f"planengine_{name}_count", **labels(PLAN_B)) == 1
    assert value(s, "planengine_inter_token_latency_seconds_count", **a) == 3 * n
    assert value(s, "planengine_inter_token_latency_seconds_sum", **a) == pytest.approx(0.09 * n)
    assert value(s, "planengine_e2e_request_latency_seconds_sum", **a) == pytest.approx(sum(1.0 + i for i in range(1, 6)))
    # TTFT 0.1..0.5 s: two at or under vLLM's 0.25 s bucket
    assert value(s, "planengine_time_to_first_token_seconds_bucket", **a, le="0.25") == 2

    assert value(s, "planengine_prompt_tokens_total", **a) == sum(10 + i for i in range(1, 6))
    assert value(s, "planengine_generation_tokens_total", **a) == 4 * n
    assert value(s, "planengine_energy_joules_total", **a) == pytest.approx(0.5 * 15)
    assert value(s, "planengine_request_success_total", **a, finished_reason="stop") == 4
    assert value(s, "planengine_request_success_total", **a, finished_reason="length") == 1
    assert value(s, "planengine_generation_tokens_total", **labels(PLAN_B)) == 4

    assert value(s, "planengine_num_requests_running", **a) == 3
    assert value(s, "planengine_num_requests_waiting", **a) == 7
    assert value(s, "planengine_kv_cache_usage_perc", **a) == 0.25
    assert value(s, "planengine_power_watts", **a) == 42.5

    # closed: the port no longer answers
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_registries_are_separate():
    first, second = ServingMetrics(), ServingMetrics()
    observe(first, PLAN_A, 1)
    assert b"planengine_prompt_tokens_total" in first.prometheus_text()
    assert b'planengine_prompt_tokens_total{' not in second.prometheus_text()


def test_snapshot_percentiles_and_totals():
    now = [1000.0]
    metrics = ServingMetrics(clock=lambda: now[0], energy_source="estimated")
    empty = metrics.snapshot()
    assert empty["ttft"] is None and empty["requests_total"] == 0 and empty["generation_tokens_per_s"] == 0.0

    now[0] = 1100.0
    for i in range(1, 101):   # TTFT 0.01..1.00 s, e2e 1..100 s
        metrics.observe_request(PLAN_A, queue_s=0.0, ttft_s=i / 100, itl_s=[i / 1000], e2e_s=float(i),
                                prompt_tokens=1, generation_tokens=2, energy_j=1.0, finish_reason="stop")
    metrics.set_running(PLAN_A, 2)
    metrics.set_running(PLAN_B, 1)
    metrics.set_kv_usage(PLAN_A, 0.5)
    metrics.set_kv_usage(PLAN_B, 0.75)
    metrics.set_power(PLAN_B, 30.0)
    now[0] = 1100.5
    metrics.set_power(PLAN_A, 35.0)

    snap = metrics.snapshot()
    # numpy's linear interpolation on 1..100: p50 = 50.5, p95 = 95.05, p99 = 99.01
    assert snap["e2e"] == pytest.approx({"p50": 50.5, "p95": 95.05, "p99": 99.01})
    assert snap["ttft"] == pytest.approx({"p50": 0.505, "p95": 0.9505, "p99": 0.9901})
    assert snap["itl"] == pytest.approx({"p50": 0.0505, "p95": 0.09505, "p99": 0.09901})
    assert snap["running"] == 3
    assert snap["kv_cache_usage"] == 0.75
    assert snap["power_w"] == 35.0            # the most recently set
    assert snap["energy_j"] == pytest.approx(100.0)
    assert snap["energy_source"] == "estimated"
    assert snap["prompt_tokens_total"] == 100 and snap["generation_tokens_total"] == 200
    assert snap["requests_total"] == 100 and snap["requests_by_finish_reason"] == {"stop": 100}
    plan_b = metrics.snapshot(PLAN_B)
    assert plan_b["running"] == 1 and plan_b["requests_total"] == 0 and plan_b["e2e"] is None

    # observations age out of the percentile window (60 s)
    now[0] = 1200.0
    assert metrics.snapshot()["e2e"] is None
    assert metrics.snapshot()["requests_total"] == 100


def test_generation_rate_over_window():
    now = [0.0]
    metrics = ServingMetrics(clock=lambda: now[0], window_s=10.0)
    now[0] = 100.0
    # generated 40 tokens from t=92 (first token) to t=100, i.e. 5 tok/s
    metrics.observe_request(PLAN_A, queue_s=0.0, ttft_s=2.0, itl_s=[0.2] * 39, e2e_s=10.0,
                            prompt_tokens=5, generation_tokens=40, energy_j=0.0, finish_reason="stop")
    assert metrics.snapshot()["generation_tokens_per_s"] == pytest.approx(4.0)   # 40 tokens / 10 s
    now[0] = 104.0   # window 94..104 holds the last 6 s of it: 30 tokens
    assert metrics.snapshot()["generation_tokens_per_s"] == pytest.approx(3.0)
    now[0] = 111.0
    assert metrics.snapshot()["generation_tokens_per_s"] == 0.0


def test_bad_input_changes_nothing():
    metrics = ServingMetrics()
    with pytest.raises(InvalidArgument, match="finish_reason"):
        observe(metrics, PLAN_A, 1, finish_reason="exploded")
    with pytest.raises(InvalidArgument, match="e2e_s"):
        metrics.observe_request(PLAN_A, queue_s=0.0, ttft_s=0.1, itl_s=[], e2e_s=-1.0, prompt_tokens=1,
                                generation_tokens=1, energy_j=0.0, finish_reason="stop")
    with pytest.raises(InvalidArgument, match="itl_s"):
        metrics.observe_request(PLAN_A, queue_s=0.0, ttft_s=0.1, itl_s=[float("nan")], e2e_s=1.0,
                                prompt_tokens=1, generation_tokens=1, energy_j=0.0, finish_reason="stop")
    with pytest.raises(InvalidArgument):
        metrics.set_kv_usage(PLAN_A, 1.5)
    assert metrics.snapshot()["requests_total"] == 0
    assert b"planengine_request_success_total{" not in metrics.prometheus_text()


def test_cancelled_before_first_token_and_forget():
    metrics = ServingMetrics()
    metrics.observe_request(PLAN_A, queue_s=0.5, ttft_s=None, itl_s=[], e2e_s=0.5, prompt_tokens=0,
                            generation_tokens=0, energy_j=0.0, finish_reason="cancelled")
    metrics.set_running(PLAN_A, 1)
    text = metrics.prometheus_text().decode()
    assert 'finished_reason="cancelled"' in text
    assert "planengine_time_to_first_token_seconds_count{" not in text
    metrics.forget(PLAN_A)
    text = metrics.prometheus_text().decode()
    assert "planengine_num_requests_running{" not in text
    assert "planengine_e2e_request_latency_seconds_count{" in text  # history stays
