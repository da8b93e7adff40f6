"""Serving metrics: Prometheus exposition named after vLLM's, plus an in-process snapshot.

Names follow vLLM v1 (`vllm/v1/metrics/loggers.py`) with the `planengine_` prefix, so a
vLLM dashboard carries over by replacing the prefix. Buckets are vLLM's. Unlike vLLM's, the
names have no colon: colons are reserved for recording rules, and an OpenMetrics scrape
rewrites them, so the stored series would not have the documented names.

| planengine                                   | vLLM                                     | type      |
|----------------------------------------------|------------------------------------------|-----------|
| planengine_time_to_first_token_seconds       | vllm:time_to_first_token_seconds         | histogram |
| planengine_inter_token_latency_seconds       | vllm:inter_token_latency_seconds         | histogram |
| planengine_e2e_request_latency_seconds       | vllm:e2e_request_latency_seconds         | histogram |
| planengine_request_queue_time_seconds        | vllm:request_queue_time_seconds          | histogram |
| planengine_num_requests_running              | vllm:num_requests_running                | gauge     |
| planengine_num_requests_waiting              | vllm:num_requests_waiting                | gauge     |
| planengine_kv_cache_usage_perc (0..1)        | vllm:kv_cache_usage_perc (0..1)          | gauge     |
| planengine_prompt_tokens_total               | vllm:prompt_tokens_total                 | counter   |
| planengine_generation_tokens_total           | vllm:generation_tokens_total             | counter   |
| planengine_request_success_total{finished_reason} | vllm:request_success_total{finished_reason} | counter |
| planengine_prefix_cache_queries_total        | vllm:prefix_cache_queries_total (tokens) | counter   |
| planengine_prefix_cache_hits_total           | vllm:prefix_cache_hits_total (tokens)    | counter   |
| planengine_prefix_cache_evictions_total      | — (ours: KV blocks evicted)              | counter   |
| planengine_power_watts                       | — (ours)                                 | gauge     |
| planengine_energy_joules_total               | — (ours)                                 | counter   |

Labels: vLLM labels with `model_name` (and `engine`); we label with `model_name`,
`plan_id` and `plan_version`, so every series says which plan produced it.
`finished_reason` takes this engine's values: "stop", "length", "cancelled" (vLLM says
"abort" for the last), and "error".

Differences worth knowing:
- vLLM increments the token counters every engine step; here they move when a request
  finishes (`observe_request`), so a scrape lags a long request by its duration.
- `energy_joules_total` is the sum of the energy attributed to finished requests (see
  `engine.telemetry.energy.EnergyAccount`); idle energy is in no request's share.
- Histograms give bucketed quantiles only; `snapshot()` keeps bounded deques of recent
  observations for exact p50/p95/p99 over a recent window.
- `prometheus_client` adds `_created` series for counters and histograms; harmless.

Each `ServingMetrics` owns its `CollectorRegistry` (not the process-global one), so several
engines, or tests, can live in one process.
"""

from __future__ import annotations

import math
import numbers
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Self

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from engine.errors import InvalidArgument

PREFIX = "planengine_"
LABELS = ("model_name", "plan_id", "plan_version")
FINISH_REASONS = frozenset({"stop", "length", "cancelled", "error"})

# vLLM's buckets, seconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                           40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

QUANTILES = (50, 95, 99)


@dataclass(frozen=True)
class PlanLabels:
    """The plan a metric series belongs to."""

    plan_id: str
    plan_version: int | str
    model: str

    def values(self) -> tuple[str, str, str]:
        return (self.model, self.plan_id, str(self.plan_version))


@dataclass
class _Gauges:
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    power_w: float = 0.0
    power_at: float = -math.inf


@dataclass
class _Finished:
    """One finished request, kept for the recent-window percentiles and token rate."""

    plan: PlanLabels
    end: float            # clock time it finished
    first_token: float    # clock time of its first token (= end when it produced none)
    generation_tokens: int


class ServingMetrics:
    """The serving metrics of one engine: Prometheus series plus a recent-window snapshot.

    Thread-safe: requests finish on engine threads while servicers read snapshots.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, energy_source: str = "",
                 recent: int = 4096, window_s: float = 10.0, percentile_window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        if recent < 1 or not window_s > 0 or not percentile_window_s > 0:
            raise InvalidArgument(
                f"recent={recent}, window_s={window_s}, percentile_window_s={percentile_window_s}: all must be positive")
        self.registry = registry if registry is not None else CollectorRegistry()
        self.energy_source = energy_source
        self.window_s = float(window_s)
        self.percentile_window_s = float(percentile_window_s)
        self._clock = clock
        self._created = clock()
        self._lock = threading.Lock()
        self._servers: list[tuple[object, threading.Thread]] = []

        def histogram(name, doc, buckets):
            return Histogram(PREFIX + name, doc, LABELS, registry=self.registry, buckets=buckets)

        def gauge(name, doc):
            return Gauge(PREFIX + name, doc, LABELS, registry=self.registry)

        def counter(name, doc, extra=()):
            return Counter(PREFIX + name, doc, LABELS + extra, registry=self.registry)

        self._ttft = histogram("time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self._itl = histogram("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS)
        self._e2e = histogram("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                              REQUEST_LATENCY_BUCKETS)
        self._queue = histogram("request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
                                REQUEST_LATENCY_BUCKETS)
        self._running = gauge("num_requests_running", "Number of requests in model execution batches.")
        self._waiting = gauge("num_requests_waiting", "Number of requests waiting to be processed.")
        self._kv_usage = gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self._power = gauge("power_watts", "Rolling-average power in watts (source: see energy_source).")
        # prometheus_client appends `_total` to counter names on exposition.
        self._prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self._generation_tokens = counter("generation_tokens", "Number of generation tokens processed.")
        self._energy = counter("energy_joules", "Energy attributed to finished requests, in joules.")
        self._success = counter("request_success", "Count of finished requests.", ("finished_reason",))
        self._prefix_queries = counter("prefix_cache_queries",
                                       "Prefix cache queries, in terms of number of queried tokens.")
        self._prefix_hits = counter("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.")
        self._prefix_evictions = counter("prefix_cache_evictions", "Cached KV blocks evicted to make room.")

        # Recent observations: (clock time, plan, value), bounded.
        self._recent_ttft: deque[tuple[float, PlanLabels, float]] = deque(maxlen=recent)
        self._recent_itl: deque[tuple[float, PlanLabels, float]] = deque(maxlen=recent)
        self._recent_e2e: deque[tuple[float, PlanLabels, float]] = deque(maxlen=recent)
        self._recent_queue: deque[tuple[float, PlanLabels, float]] = deque(maxlen=recent)
        self._finished: deque[_Finished] = deque(maxlen=recent)
        self._gauges: dict[PlanLabels, _Gauges] = {}
        self._totals: dict[PlanLabels, dict[str, float]] = {}

    # -- recording -------------------------------------------------------------------------

    def observe_request(self, plan: PlanLabels, *, queue_s: float, ttft_s: float | None,
                        itl_s: Sequence[float], e2e_s: float, prompt_tokens: int,
                        generation_tokens: int, energy_j: float, finish_reason: str) -> None:
        """Record one finished request. `ttft_s` is None for a request that produced no token.

        TTFT and e2e count from arrival, so they include the queue time (as in vLLM).
        A bad value raises InvalidArgument and records nothing.
        """
        _check_finite_nonneg(queue_s=queue_s, e2e_s=e2e_s, energy_j=energy_j,
                             prompt_tokens=prompt_tokens, generation_tokens=generation_tokens)
        if ttft_s is not None:
            _check_finite_nonneg(ttft_s=ttft_s)
        itl = [float(x) for x in itl_s]
        if not all(math.isfinite(x) and x >= 0 for x in itl):
            raise InvalidArgument("itl_s must be finite and non-negative", field="itl_s")
        if finish_reason not in FINISH_REASONS:
            raise InvalidArgument(
                f"finish_reason {finish_reason!r} is not one of {sorted(FINISH_REASONS)}", field="finish_reason")

        labels = plan.values()
        if ttft_s is not None:
            self._ttft.labels(*labels).observe(ttft_s)
        itl_hist = self._itl.labels(*labels)
        for x in itl:
            itl_hist.observe(x)
        self._e2e.labels(*labels).observe(e2e_s)
        self._queue.labels(*labels).observe(queue_s)
        self._prompt_tokens.labels(*labels).inc(prompt_tokens)
        self._generation_tokens.labels(*labels).inc(generation_tokens)
        self._energy.labels(*labels).inc(energy_j)
        self._success.labels(*labels, finish_reason).inc()

        now = self._clock()
        start = now - e2e_s
        with self._lock:
            if ttft_s is not None:
                self._recent_ttft.append((now, plan, float(ttft_s)))
            self._recent_itl.extend((now, plan, x) for x in itl)
            self._recent_e2e.append((now, plan, float(e2e_s)))
            self._recent_queue.append((now, plan, float(queue_s)))
            first = min(now, start + ttft_s) if ttft_s is not None else now
            self._finished.append(_Finished(plan, now, first, int(generation_tokens)))
            t = self._totals.setdefault(plan, {"prompt_tokens": 0, "generation_tokens": 0, "energy_j": 0.0,
                                               "requests": 0})
            t["prompt_tokens"] += int(prompt_tokens)
            t["generation_tokens"] += int(generation_tokens)
            t["energy_j"] += float(energy_j)
            t["requests"] += 1

    def set_running(self, plan: PlanLabels, n: int) -> None:
        _check_finite_nonneg(running=n)
        self._running.labels(*plan.values()).set(n)
        with self._lock:
            self._gauges.setdefault(plan, _Gauges()).running = int(n)

    def set_waiting(self, plan: PlanLabels, n: int) -> None:
        _check_finite_nonneg(waiting=n)
        self._waiting.labels(*plan.values()).set(n)
        with self._lock:
            self._gauges.setdefault(plan, _Gauges()).waiting = int(n)

    def set_kv_usage(self, plan: PlanLabels, frac: float) -> None:
        if not (math.isfinite(frac) and 0.0 <= frac <= 1.0):
            raise InvalidArgument(f"kv cache usage must be a fraction in [0, 1], got {frac}", field="frac")
        self._kv_usage.labels(*plan.values()).set(frac)
        with self._lock:
            self._gauges.setdefault(plan, _Gauges()).kv_usage = float(frac)

    def set_power(self, plan: PlanLabels, watts: float) -> None:
        _check_finite_nonneg(watts=watts)
        self._power.labels(*plan.values()).set(watts)
        with self._lock:
            g = self._gauges.setdefault(plan, _Gauges())
            g.power_w, g.power_at = float(watts), self._clock()

    def add_prefix_cache(self, plan: PlanLabels, queries: int, hits: int, evictions: int) -> None:
        """Count prefix-cache lookups since the last call: tokens queried, tokens found, blocks evicted."""
        _check_finite_nonneg(queries=queries, hits=hits, evictions=evictions)
        labels = plan.values()
        self._prefix_queries.labels(*labels).inc(queries)
        self._prefix_hits.labels(*labels).inc(hits)
        self._prefix_evictions.labels(*labels).inc(evictions)

    def forget(self, plan: PlanLabels) -> None:
        """Drop a retired plan's gauge series (its counters and histograms stay: they are history)."""
        labels = plan.values()
        for g in (self._running, self._waiting, self._kv_usage, self._power):
            try:
                g.remove(*labels)
            except KeyError:
                pass
        with self._lock:
            self._gauges.pop(plan, None)

    # -- reading ---------------------------------------------------------------------------

    def snapshot(self, plan: PlanLabels | None = None) -> dict:
        """Current state, for one plan or (None) all of them.

        Keys follow the MetricsSnapshot message: running, waiting, generation_tokens_per_s
        (over the last `window_s`), ttft / itl / e2e / queue ({"p50", "p95", "p99"} seconds over
        the last `percentile_window_s`, None without data), kv_cache_usage, power_w,
        energy_j, energy_source, prompt_tokens_total, generation_tokens_total,
        requests_total, requests_by_finish_reason (from the counters).
        Across plans, running and waiting add up, kv usage is the largest and power the
        most recently set (it is one machine's power, reported under each plan's labels).
        """
        now = self._clock()
        keep = (lambda p: True) if plan is None else (lambda p: p == plan)
        with self._lock:
            gauges = [g for p, g in self._gauges.items() if keep(p)]
            totals = [t for p, t in self._totals.items() if keep(p)]
            horizon = now - self.percentile_window_s
            recent = {name: [v for (t, p, v) in d if t >= horizon and keep(p)]
                      for name, d in (("ttft", self._recent_ttft), ("itl", self._recent_itl),
                                      ("e2e", self._recent_e2e), ("queue", self._recent_queue))}
            finished = [f for f in self._finished if keep(f.plan)]

        power = max(gauges, key=lambda g: g.power_at).power_w if gauges else 0.0
        return {
            "running": sum(g.running for g in gauges),
            "waiting": sum(g.waiting for g in gauges),
            "generation_tokens_per_s": self._token_rate(finished, now),
            **{name: _percentiles(values) for name, values in recent.items()},
            "kv_cache_usage": max((g.kv_usage for g in gauges), default=0.0),
            "power_w": power,
            "energy_j": sum(t["energy_j"] for t in totals),
            "energy_source": self.energy_source,
            "prompt_tokens_total": sum(t["prompt_tokens"] for t in totals),
            "generation_tokens_total": sum(t["generation_tokens"] for t in totals),
            "requests_total": sum(t["requests"] for t in totals),
            "requests_by_finish_reason": self._finish_counts(plan),
        }

    def _token_rate(self, finished: list[_Finished], now: float) -> float:
        # Each finished request's tokens are spread evenly from its first token to its end;
        # the rate is the tokens that fall inside the window over the window's length.
        span = min(self.window_s, now - self._created)
        if span <= 0:
            return 0.0
        lo = now - span
        tokens = 0.0
        for f in finished:
            if f.end < lo:
                continue
            duration = f.end - f.first_token
            if duration <= 0:
                tokens += f.generation_tokens
            else:
                overlap = f.end - max(lo, f.first_token)
                tokens += f.generation_tokens * overlap / duration
        return tokens / span

    def _finish_counts(self, plan: PlanLabels | None) -> dict[str, int]:
        counts: dict[str, int] = {}
        want = plan.values() if plan is not None else None
        for metric in self._success.collect():
            for s in metric.samples:
                if not s.name.endswith("_total"):
                    continue
                if want is not None and tuple(s.labels[k] for k in LABELS) != want:
                    continue
                reason = s.labels["finished_reason"]
                counts[reason] = counts.get(reason, 0) + int(s.value)
        return counts

    def prometheus_text(self) -> bytes:
        """The registry in Prometheus text exposition format."""
        return generate_latest(self.registry)

    def serve_http(self, host: str = "127.0.0.1", port: int = 0) -> tuple[object, int]:
        """Serve `/metrics` (any path, in fact) over HTTP on a daemon thread; returns (server, port).

        Stopped by `close()`.
        """
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        with self._lock:
            self._servers.append((server, thread))
        return server, server.server_port

    def close(self) -> None:
        """Stop the HTTP servers started by `serve_http` and wait for their threads."""
        with self._lock:
            servers, self._servers = self._servers, []
        for server, thread in servers:
            server.shutdown()      # stops serve_forever; in-flight scrapes finish first
            server.server_close()
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _percentiles(values: list[float]) -> dict[str, float] | None:
    # Linear interpolation between closest ranks (numpy's default).
    if not values:
        return None
    qs = np.percentile(np.asarray(values, dtype=np.float64), QUANTILES)
    return {f"p{q}": float(v) for q, v in zip(QUANTILES, qs)}


def _check_finite_nonneg(**values: float) -> None:
    for name, v in values.items():
        if not (isinstance(v, numbers.Real) and math.isfinite(v) and v >= 0):
            raise InvalidArgument(f"{name} must be a finite non-negative number, got {v!r}", field=name)
