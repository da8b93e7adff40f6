"""`plan-engine bench --trace FILE`: replay a load trace (services/load_trace.py) against a server.

Each request is sent at its `at` (divided by `speed`) on its own thread and streamed to the end;
it generates exactly its `max_tokens` (`ignore_eos`). Times are taken at the client, so they include
the channel: TTFT is send to first token, ITL the gaps between token messages. The summary uses the
control plane's own arithmetic (engine/control/objectives.py: tokens per busy second, joules per
token from each result's attributed energy, p99 TTFT and ITL), so a replay's figures and a trial's
are the same kind of number. A request that fails (an RPC error, finish reason "error") is counted,
never retried.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from engine.control.objectives import Measurement, RequestSample, measure
from services.client import PlanEngineClient
from services.load_trace import Trace, prompt_ids


@dataclass
class ReplayResult:
    trace: str
    samples: list[RequestSample]
    plans: dict[str, int]  # "id@version" -> requests it served
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def measurement(self) -> Measurement:
        return measure(self.samples)

    def summary(self) -> dict:
        m = self.measurement
        ttft = [s.ttft_s for s in self.samples if s.ttft_s is not None]
        return {"trace": self.trace, **m.as_dict(), "ttft_p50_s": round(float(np.median(ttft)), 4) if ttft else 0.0,
                "wall_s": round(self.wall_s, 2), "plans": self.plans, "errors": self.errors[:5]}


def model_vocab(client: PlanEngineClient) -> int:
    """The active model's vocabulary size (from InspectModel)."""
    from protos.planengine.v1 import control_plane_pb2 as pb
    details = json.loads(client._call("InspectModel", pb.InspectModelRequest()).details_json)
    return int(details["config"]["vocab_size"])


def replay(connect: Callable[[], PlanEngineClient], trace: Trace, *, speed: float = 1.0, vocab: int | None = None,
           stop: threading.Event | None = None) -> ReplayResult:
    """Send every request of `trace` at its time through clients made by `connect()`; wait for all."""
    if not speed > 0:
        raise ValueError(f"speed {speed} must be positive")
    stop = stop or threading.Event()
    with connect() as client:
        vocab = vocab or model_vocab(client)
    samples: list[RequestSample] = []
    plans: dict[str, int] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        r = trace.requests[index]
        ids = prompt_ids(trace.seed, index, r.prompt_tokens, vocab)
        stamps: list[float] = []
        energy, failed, plan = 0.0, False, ""
        start = time.perf_counter()
        try:
            with connect() as client:
                for msg in client.generate(ids=ids, max_tokens=r.max_tokens, ignore_eos=True, priority=r.priority):
                    if msg.HasField("delta") and msg.delta.token_ids:
                        stamps.extend([time.perf_counter()] * len(msg.delta.token_ids))
                    elif msg.HasField("final"):
                        energy = msg.final.energy_j
                        failed = msg.final.finish_reason == "error"
                        plan = f"{msg.final.plan.id}@{msg.final.plan.version}"
        except grpc.RpcError as exc:
            failed = True
            with lock:
                errors.append(f"request {index}: {exc.code().name}: {exc.details()}")
        end = time.perf_counter()
        sample = RequestSample(start, end, stamps[0] - start if stamps else None,
                               tuple(np.diff(stamps).tolist()) if len(stamps) > 1 else (), len(stamps), energy, failed)
        with lock:
            samples.append(sample)
            if plan:
                plans[plan] = plans.get(plan, 0) + 1

    threads = []
    t0 = time.perf_counter()
    for i, r in enumerate(trace.requests):
        delay = t0 + r.at / speed - time.perf_counter()
        if delay > 0 and stop.wait(delay):
            break
        t = threading.Thread(target=one, args=(i,), name=f"replay-{i}", daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return ReplayResult(trace.name, samples, plans, errors, time.perf_counter() - t0)
