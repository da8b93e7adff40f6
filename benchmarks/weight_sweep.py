"""Every weight matrix of a GGUF file through the int8 kernels at one batch size, as decode reads them.

A decode step streams each weight once from memory; this times exactly that, without the rest of
the model: all 2-D tensors of the file, repacked as `native` weights, each multiplied by a random
batch, in file order, repeated. It prints the milliseconds a sweep takes, the GB/s of weights that
is, and the tokens/s it bounds decode to. With --so, other builds of the extension (e.g. compiled
with -DPF_GROUPS=16) run the same sweep interleaved with the installed one, round by round, so a
kernel change is compared on one machine state (docs/02_performance.md used it for the L2
prefetch hint).

Usage: python benchmarks/weight_sweep.py MODEL [--threads 2] [--batch 1] [--rounds 12]
         [--so NAME=path/to/_ops_avx2.so ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gguf import GGMLQuantizationType, GGUFReader  # noqa: E402

from backends.cpu.quantized import BlockPart, QuantizedMatmul, as_blocks  # noqa: E402
from engine.execution import kernel_settings  # noqa: E402


def _extension(path: str):
    spec = importlib.util.spec_from_file_location("backends.cpu._ops_avx2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--so", action="append", default=[], metavar="NAME=PATH", help="another build to compare")
    args = ap.parse_args(argv)
    tensors = [(int(t.shape[1]), int(t.shape[0]), GGMLQuantizationType(t.tensor_type), np.array(t.data))
               for t in GGUFReader(args.model).tensors if len(t.shape) == 2]
    builds = {"installed": None} | dict(s.split("=", 1) for s in args.so)
    sweeps = {}
    rng = np.random.default_rng(0)
    for name, so in builds.items():
        qm = QuantizedMatmul("avx2", kernel_settings(threads=args.threads, prefetch_next_kib=0))
        if so is not None:
            qm.ops = _extension(so)
        sweeps[name] = (qm.ops, [(qm.handle([BlockPart(as_blocks(raw, rows), qtype, rows)], k),
                                  rng.standard_normal((args.batch, k), dtype=np.float32),
                                  np.empty((args.batch, rows), np.float32))
                                 for rows, k, qtype, raw in tensors])
    nbytes = sum(w.nbytes for w, _, _ in next(iter(sweeps.values()))[1])
    times: dict[str, list[float]] = {name: [] for name in builds}
    names = list(builds)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            ops, mats = sweeps[name]
            start = time.perf_counter()
            for w, x, out in mats:
                ops.matmul(x, w.matrix, out, args.threads)
            times[name].append(time.perf_counter() - start)
    print(f"{len(tensors)} matrices, {nbytes / 1e6:.0f} MB, batch {args.batch}, {args.threads} threads, "
          f"{args.rounds} rounds")
    for name in names:
        t = statistics.median(times[name])
        print(f"{name:12s} median {t * 1e3:6.1f} ms  {nbytes / t / 1e9:5.1f} GB/s  "
              f"{args.batch / t:6.1f} tok/s bound  (best {min(times[name]) * 1e3:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
