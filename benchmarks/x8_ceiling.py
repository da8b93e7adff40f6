"""The int8 multiply pipe's ceiling on this CPU, for our kernels' instruction streams, and what it allows a model.

Builds benchmarks/x8_ceiling.c (gcc or $CC, the kernels' -O3) and runs it on 1 and --threads
threads: the multiply-adds a second of `vpmaddubsw` alone and of the Q4_K, Q4_0 and Q6_K kernels'
instruction streams with every operand in L1 (x8_ceiling.c says what each loop is). No real kernel
can pass these: they leave out the unpacking, the memory and every other op.

With --model, it also reads the file's 2-D weights (a decode step multiplies each once per row) and
prints the ceiling for that file's mix of types: the time one token's matrices take at each type's
ceiling, summed. Types without a loop of their own here are listed and left out.

Usage: python benchmarks/x8_ceiling.py [--threads 2] [--rounds 5] [--model FILE.gguf ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOOP_OF_TYPE = {"Q4_K": "q4k", "Q4_0": "q40", "Q6_K": "q6k"}  # each type's loop in x8_ceiling.c


def build(out_dir: Path) -> Path:
    exe = out_dir / "x8_ceiling"
    cc = os.environ.get("CC", "gcc")
    subprocess.run([cc, "-O3", "-mavx2", "-mfma", "-pthread", str(HERE / "x8_ceiling.c"), "-o", str(exe)], check=True)
    return exe


def measure(exe: Path, threads: int, rounds: int) -> dict[str, float]:
    """GMAC/s of each loop, the best of `rounds`"""
    out = subprocess.run([str(exe), str(threads), str(rounds)], check=True, capture_output=True, text=True).stdout
    got = {}
    for line in out.splitlines():  # "q4k threads=2 gmac_s=57.7 (best of 5; sink 0)"
        fields = dict(f.split("=", 1) for f in line.split()[1:3])
        got[line.split()[0]] = float(fields["gmac_s"])
    return got


def model_mix(path: Path) -> dict[str, int]:
    """multiply-adds a token by weight type: every 2-D tensor once (a tied embedding is the head)"""
    from gguf import GGMLQuantizationType, GGUFReader

    mix: dict[str, int] = {}
    for t in GGUFReader(path).tensors:
        if len(t.shape) == 2:
            name = GGMLQuantizationType(t.tensor_type).name
            mix[name] = mix.get(name, 0) + int(t.shape[0]) * int(t.shape[1])
    return mix


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--model", type=Path, action="append", default=[])
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        one, many = measure(exe, 1, args.rounds), measure(exe, args.threads, args.rounds)
    print(f"{'loop':8} {'1 thread':>10} {f'{args.threads} threads':>11} {'of maddubs':>11}  (GMAC/s, best of {args.rounds})")
    for loop in one:
        print(f"{loop:8} {one[loop]:10.1f} {many[loop]:11.1f} {many[loop] / many['maddubs']:10.0%}")
    for path in args.model:
        mix = model_mix(path)
        total = sum(mix.values())
        covered = {t: n for t, n in mix.items() if t in LOOP_OF_TYPE}
        seconds = sum(n / (many[LOOP_OF_TYPE[t]] * 1e9) for t, n in covered.items())
        rate = sum(covered.values()) / seconds  # multiply-adds a second over the types measured
        shares = ", ".join(f"{t} {n / total:.1%}" for t, n in sorted(mix.items(), key=lambda kv: -kv[1]))
        left = sorted(set(mix) - set(covered))
        print(f"\n{path.name}: {total / 1e9:.3f} G multiply-adds a token ({shares})")
        print(f"  ceiling on {args.threads} threads: {rate / 1e9:.1f} GMAC/s, {rate / total:.1f} tokens/s of matrices"
              + (f" (left out: {', '.join(left)})" if left else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
