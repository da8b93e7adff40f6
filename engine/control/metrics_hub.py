"""Where engine, backend and system metrics converge: one hub per server.

The worker reports each finished request (`on_finish`); a ticker samples the
running worker's gauges (requests, KV blocks, power) once a second. GetMetrics,
WatchMetrics, the Prometheus endpoint and the agents all read the same hub.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from engine.runtime.worker import Final
from engine.telemetry.energy import PowerMeter
from engine.telemetry.metrics import PlanLabels, ServingMetrics


class MetricsHub:
    def __init__(self, meter: PowerMeter, runtime: Callable[[], Any], tick_s: float = 1.0):
        """`runtime()` returns the control plane's active Runtime (or None while loading)."""
        self.meter = meter
        self.metrics = ServingMetrics(energy_source=meter.source)
        self._runtime = runtime
        self._start_j = meter.energy_j()
        self._labels: PlanLabels | None = None  # the plan the gauges were last set under
        self._prefix_seen: tuple[Any, tuple[int, int, int]] = (None, (0, 0, 0))  # worker, its counts last tick
        self._prefix_lock = threading.Lock()  # tick runs on the ticker and in snapshot()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_loop, args=(tick_s,), name="metrics-tick", daemon=True)
        self._ticker.start()
        self._http = None
        self._listeners: list[Callable[[Final], None]] = []

    def add_listener(self, listener: Callable[[Final], None]) -> None:
        """Also call `listener(final)` for every finished request (on the engine thread: keep it short)."""
        self._listeners.append(listener)

    @staticmethod
    def labels(plan) -> PlanLabels:
        return PlanLabels(plan.id, str(plan.version), plan.model)

    def on_finish(self, final: Final) -> None:
        stamp = final.tag
        t = final.timings
        self.metrics.observe_request(
            PlanLabels(stamp.id, str(stamp.version), stamp.model), queue_s=t["queue_s"],
            ttft_s=t["ttft_s"] if final.completion_tokens else None, itl_s=final.itl_s, e2e_s=t["total_s"],
            prompt_tokens=final.prompt_tokens, generation_tokens=final.completion_tokens, energy_j=final.energy_j,
            finish_reason=final.finish_reason)
        for listener in self._listeners:
            listener(final)

    def tick(self) -> None:
        runtime = self._runtime()
        if runtime is None:
            return
        stats = runtime.worker.stats()
        labels = self.labels(runtime.plan)
        if labels != self._labels:  # a plan switch: the old version's gauges no longer describe anything
            if self._labels is not None:
                self.metrics.forget(self._labels)
            self._labels = labels
        self.metrics.set_running(labels, stats["running"])
        self.metrics.set_waiting(labels, stats["waiting"])
        self.metrics.set_kv_usage(labels, stats["kv_usage"])
        self.metrics.set_power(labels, stats["power_w"])
        worker = runtime.worker
        totals = (stats["prefix_cache_queries"], stats["prefix_cache_hits"], stats["prefix_cache_evictions"])
        with self._prefix_lock:
            seen_worker, seen = self._prefix_seen
            if seen_worker is not worker:  # a new runtime's worker counts from zero
                seen = (0, 0, 0)
            self.metrics.add_prefix_cache(labels, *(max(0, now - before) for now, before in zip(totals, seen)))
            self._prefix_seen = (worker, totals)

    def _tick_loop(self, tick_s: float) -> None:
        while not self._stop.wait(tick_s):
            self.tick()

    def snapshot(self) -> dict[str, Any]:
        """The MetricsSnapshot fields, plus the active plan, the op profile and the KV blocks."""
        self.tick()
        snap = self.metrics.snapshot()
        snap["energy_j"] = self.meter.energy_j() - self._start_j  # since start, not only attributed
        snap["at"] = time.time()
        runtime = self._runtime()
        if runtime is not None:
            snap["plan"] = runtime.plan
            stats = runtime.worker.stats()
            snap["kv_blocks_used"], snap["kv_blocks_total"] = stats["kv_blocks_used"], stats["kv_blocks_total"]
            snap["preemptions"] = stats["preemptions"]
            snap["profile"] = runtime.profile.rows() if runtime.profile is not None else []
        return snap

    def serve_http(self, host: str, port: int) -> int:
        """Serve /metrics (Prometheus text format); returns the bound port."""
        self._http, bound = self.metrics.serve_http(host, port)
        return bound

    def close(self) -> None:
        self._stop.set()
        self._ticker.join()
        self.metrics.close()
