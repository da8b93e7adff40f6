"""`plan-engine bench --concurrency ... --grpc`: the same load through a real server and real channels.

Starts an in-process server on 127.0.0.1:0 with a plan sized for the highest level,
then for each level opens `n` client threads, each streaming one Generate. TTFT and
inter-token gaps are measured at the client, so they include serialization and the
network stack (loopback).
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from services.client import PlanEngineClient, plan_from_json
from services.server import ServerConfig, create_server


def bench_grpc(model: str, levels: list[int], prompt_len: int = 32, gen_len: int = 64,
               weights: str = "f32", batch_invariant: bool = False) -> list[dict[str, Any]]:
    import json
    top = max(levels)
    plan = plan_from_json(json.dumps({
        "id": "bench", "model": model, "weights": f"WEIGHT_FORMAT_{weights.upper()}",
        "scheduler_policy": "SCHEDULER_POLICY_THROUGHPUT",
        "batching": {"max_batch_size": top, "max_batched_tokens": max(512, top), "max_queue": top},
        "limits": {"max_tokens_per_request": gen_len}, "determinism": {"batch_invariant": batch_invariant}}))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server = create_server(ServerConfig(port=0, store_path=Path(tmp) / "plans.sqlite3", initial_plan=plan,
                                            max_workers=top + 8))
        try:
            vocab = server.control.runtime.model.config.vocab_size
            with PlanEngineClient(f"127.0.0.1:{server.port}") as client:  # warm-up: first-call costs off the table
                list(client.generate(ids=[1] * prompt_len, max_tokens=4, ignore_eos=True))
            for n in levels:
                rng = np.random.default_rng(n)
                prompts = [rng.integers(0, vocab, prompt_len).tolist() for _ in range(n)]
                ttft: list[float] = []
                itl: list[float] = []
                tokens = [0]
                lock = threading.Lock()

                def one(ids: list[int]) -> None:
                    with PlanEngineClient(f"127.0.0.1:{server.port}") as client:
                        t0 = time.perf_counter()
                        stamps = []
                        for r in client.generate(ids=ids, max_tokens=gen_len, ignore_eos=True):
                            if r.HasField("delta") and r.delta.token_ids:
                                stamps.append(time.perf_counter())
                        with lock:
                            if stamps:
                                ttft.append(stamps[0] - t0)
                                itl.extend(np.diff(stamps).tolist())
                            tokens[0] += len(stamps)

                threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
                start = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - start
                rows.append({"concurrency": n, "tokens": tokens[0], "aggregate_tok_s": round(tokens[0] / wall, 1),
                             "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3),
                             "ttft_p99_s": round(float(np.percentile(ttft, 99)), 3),
                             "itl_p50_s": round(float(np.percentile(itl, 50)), 4) if itl else 0.0,
                             "itl_p99_s": round(float(np.percentile(itl, 99)), 4) if itl else 0.0,
                             "wall_s": round(wall, 2)})
        finally:
            server.stop(1)
    base = rows[0]["aggregate_tok_s"] if rows else 1.0
    for r in rows:
        r["vs_first_level"] = round(r["aggregate_tok_s"] / base, 2)
    return rows
