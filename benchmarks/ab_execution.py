"""Two or more values of one `execution` setting, side by side on decode (tg) in one process.

A shared machine drifts by tens of percent within minutes, so separate runs cannot resolve a
few-percent effect. This loads the model once and alternates the values (`Backend.configure`,
as a live plan change does), round by round, reversing the order every other round; it prints
each value's tokens/s per round and the median of the per-round ratios to the first value,
which drift cancels out of.

Usage: python benchmarks/ab_execution.py MODEL SETTING V1,V2[,...] [--tokens 32] [--rounds 12]
         [--weights native]
e.g.   python benchmarks/ab_execution.py ~/.cache/plan-engine/bench-1b/llama-1b-shape-Q4_K_M.gguf \\
         prefetch_next_kib 0,8192
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.execution import FIELDS, kernel_settings  # noqa: E402
from engine.runtime.bench import run_tg  # noqa: E402
from engine.runtime.generate import LoadedModel  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("setting", choices=[f for f in FIELDS if not f.startswith("energy_")])
    ap.add_argument("values", help="comma-separated whole numbers")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--weights", default="native")
    args = ap.parse_args(argv)
    values = [int(v) for v in args.values.split(",")]
    model = LoadedModel(args.model, weights=args.weights)
    try:
        run_tg(model, 8)  # warm-up: page in the weights
        speeds: dict[int, list[float]] = {v: [] for v in values}
        for r in range(args.rounds):
            for v in values if r % 2 == 0 else values[::-1]:
                model.backend.configure(kernel_settings(**{args.setting: v}))
                speeds[v].append(args.tokens / run_tg(model, args.tokens))
    finally:
        model.close()
    for v in values:
        print(f"{args.setting}={v}: median {statistics.median(speeds[v]):.1f} tok/s, "
              f"rounds {[round(s, 1) for s in speeds[v]]}")
    for v in values[1:]:
        ratios = [b / a for a, b in zip(speeds[values[0]], speeds[v])]
        faster = sum(r > 1 for r in ratios)
        print(f"{args.setting}={v} / {values[0]}: median ratio {statistics.median(ratios):.3f}, "
              f"faster in {faster} of {len(ratios)} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
