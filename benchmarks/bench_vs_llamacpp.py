"""plan-engine against llama.cpp on a 1B model of Llama-3.2-1B's shape, side by side (`make bench-vs-llamacpp`).

What it does, each step skipped when its output is already there:

1. llama.cpp's tools (llama-bench, llama-batched-bench, llama-quantize) from the sources vendored
   in llama-cpp-python==0.3.36, built once with cmake under ~/.cache/plan-engine/llama.cpp.
2. The model: Llama-3.2-1B's shape (dim 2048, 16 layers, 32/8 heads, ffn 8192, tied embedding)
   with random weights -- speed does not depend on the values -- and SmolLM2's tokenizer (a
   49,152-token vocabulary instead of 128,256), written as F16 with gguf-py, then quantized with
   llama-quantize to each type asked for (default Q4_K_M, Q4_0, Q8_0, Q6_K).
3. The table: pp512 and tg128 (llama-bench -p 512 -n 128; ours `plan-engine bench --pp 512 --tg
   128`), and 16 and 32 streams of 32-token prompts and 64 generated tokens (llama-batched-bench
   -npp 32 -ntg 64; ours `plan-engine bench --concurrency`), counted as generated tokens over the
   whole time, prefill included. Every run uses 2 threads (--threads) and the file's own blocks
   (`--weights native`). Rounds are interleaved (each round runs every type, llama.cpp and ours
   alternating who goes first) and the table shows each figure's median over the rounds, so
   drift in a shared machine's speed hits both sides alike.

4. With --model FILE (any number), those GGUF files run the same columns beside the 1B models, in
   the same interleaved rounds: `--model ~/.cache/plan-engine/models/SmolLM2-135M-Instruct.Q4_1.gguf`
   is the embedded default's row (`make setup` pulls it). `--types ""` runs only these.

Usage: python benchmarks/bench_vs_llamacpp.py [--types Q4_K_M,Q4_0] [--model FILE ...] [--rounds 2]
       [--threads 2] [--workdir DIR] [--llama-dir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("PLAN_ENGINE_CACHE", Path.home() / ".cache" / "plan-engine"))
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
TOOLS = ("llama-bench", "llama-batched-bench", "llama-quantize")
TYPES = ("Q4_K_M", "Q4_0", "Q8_0", "Q6_K")
SMOLLM2 = CACHE / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"  # `make setup` pulls it; its tokenizer is reused

# Llama-3.2-1B (config.json of meta-llama/Llama-3.2-1B)
SHAPE = dict(dim=2048, layers=16, heads=32, kv_heads=8, ffn=8192, rope_base=500000.0, eps=1e-5, context=4096)
PP, TG, STREAMS, PROMPT, GEN = 512, 128, (16, 32), 32, 64


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- 1. llama.cpp's tools ----------------------------------------------------------------

def llama_source(root: Path) -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist, downloaded and unpacked once."""
    src = root / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").exists():
        return src
    root.mkdir(parents=True, exist_ok=True)
    tarballs = list(root.glob("llama_cpp_python-0.3.36.tar.gz"))
    if not tarballs:
        log(f"downloading the {LLAMA_CPP_PYTHON} sdist")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        LLAMA_CPP_PYTHON, "-d", str(root)], check=True)
        tarballs = list(root.glob("llama_cpp_python-0.3.36.tar.gz"))
    with tarfile.open(tarballs[0]) as tar:
        tar.extractall(root, filter="data")
    return src


def llama_tools(root: Path) -> Path:
    """The bin/ directory holding TOOLS, built with cmake if any is missing."""
    src = llama_source(root)
    bin_dir = src / "build" / "bin"
    with open(root / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second run waits for the first one's build, then reuses it
        if all((bin_dir / t).exists() for t in TOOLS):
            return bin_dir
        log(f"building {', '.join(TOOLS)} in {src / 'build'} (~10 min on 2 cores)")
        subprocess.run(["cmake", "-S", str(src), "-B", str(src / "build"), "-DCMAKE_BUILD_TYPE=Release",
                        "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF"], check=True)
        subprocess.run(["cmake", "--build", str(src / "build"), "--config", "Release", "-j", str(os.cpu_count() or 2),
                        "--target", *TOOLS], check=True)
    return bin_dir


# --- 2. the 1B model ---------------------------------------------------------------------

def write_f16_model(path: Path, seed: int = 0) -> None:
    """Llama-3.2-1B's shape, random F16 weights (N(0, 0.02); norms 1), SmolLM2's tokenizer."""
    from gguf import GGUFReader, GGUFWriter
    if not SMOLLM2.exists():
        raise SystemExit(f"{SMOLLM2} is missing: `make setup` (plan-engine models pull) downloads it")
    tok = GGUFReader(str(SMOLLM2))

    def field(name: str):
        return tok.fields[name]

    def strings(name: str) -> list[str]:
        return [bytes(field(name).parts[i]).decode("utf-8") for i in field(name).data]

    tokens, merges = strings("tokenizer.ggml.tokens"), strings("tokenizer.ggml.merges")
    types = [int(field("tokenizer.ggml.token_type").parts[i][0]) for i in field("tokenizer.ggml.token_type").data]
    scalar = lambda name: int(field(name).parts[field(name).data[0]][0])  # noqa: E731
    s = SHAPE
    head_dim = s["dim"] // s["heads"]
    tmp = path.with_suffix(".tmp")
    w = GGUFWriter(str(tmp), "llama")
    w.add_name("llama-3.2-1b-shape-random")
    w.add_block_count(s["layers"])
    w.add_context_length(s["context"])
    w.add_embedding_length(s["dim"])
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(s["rope_base"])
    w.add_layer_norm_rms_eps(s["eps"])
    w.add_file_type(1)  # MOSTLY_F16
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(bytes(field("tokenizer.ggml.pre").parts[field("tokenizer.ggml.pre").data[0]]).decode())
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(scalar("tokenizer.ggml.bos_token_id"))
    w.add_eos_token_id(scalar("tokenizer.ggml.eos_token_id"))
    rng = np.random.default_rng(seed)

    def weight(name: str, rows: int, cols: int) -> None:
        w.add_tensor(name, (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16))

    weight("token_embd.weight", len(tokens), s["dim"])  # tied: no output.weight, as Llama-3.2-1B
    w.add_tensor("output_norm.weight", np.ones(s["dim"], np.float32))
    kv = s["kv_heads"] * head_dim
    for i in range(s["layers"]):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", np.ones(s["dim"], np.float32))
        w.add_tensor(b + "ffn_norm.weight", np.ones(s["dim"], np.float32))
        weight(b + "attn_q.weight", s["dim"], s["dim"])
        weight(b + "attn_k.weight", kv, s["dim"])
        weight(b + "attn_v.weight", kv, s["dim"])
        weight(b + "attn_output.weight", s["dim"], s["dim"])
        weight(b + "ffn_gate.weight", s["ffn"], s["dim"])
        weight(b + "ffn_up.weight", s["ffn"], s["dim"])
        weight(b + "ffn_down.weight", s["dim"], s["ffn"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(path)


def models(workdir: Path, bin_dir: Path, types: list[str]) -> dict[str, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    f16 = workdir / "llama-1b-shape-F16.gguf"
    out = {t: workdir / f"llama-1b-shape-{t}.gguf" for t in types}
    if not all(p.exists() for p in out.values()) and not f16.exists():
        log(f"writing {f16}")
        write_f16_model(f16)
    for t, p in out.items():
        if not p.exists():
            log(f"llama-quantize {t}")
            tmp = p.with_suffix(".tmp")
            subprocess.run([str(bin_dir / "llama-quantize"), str(f16), str(tmp), t, "2"], check=True,
                           stdout=subprocess.DEVNULL)
            tmp.rename(p)
    return out


# --- 3. the runs -------------------------------------------------------------------------

def _run(cmd: list[str], env: dict | None = None) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout


def llama_pp_tg(bin_dir: Path, model: Path, threads: int) -> dict[str, float]:
    rows = json.loads(_run([str(bin_dir / "llama-bench"), "-m", str(model), "-p", str(PP), "-n", str(TG),
                            "-t", str(threads), "-r", "1", "-o", "json"]))
    got = {}
    for r in rows:
        key = "pp" if r["n_prompt"] and not r["n_gen"] else "tg"
        got[key] = float(r["avg_ts"])
    return got


def llama_streams(bin_dir: Path, model: Path, threads: int) -> dict[str, float]:
    out = _run([str(bin_dir / "llama-batched-bench"), "-m", str(model), "-c", str(max(STREAMS) * (PROMPT + GEN) + 64),
                "-b", "2048", "-ub", "512", "-npp", str(PROMPT), "-ntg", str(GEN),
                "-npl", ",".join(map(str, STREAMS)), "-t", str(threads), "--output-format", "jsonl"])
    got = {}
    for line in out.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            got[f"s{r['pl']}"] = r["pl"] * r["tg"] / r["t"]  # generated tokens over the whole time, as ours
    return got


def _plan_engine() -> list[str]:
    exe = Path(sys.executable).with_name("plan-engine")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "services.cli"]


def ours_pp_tg(model: Path, threads: int) -> dict[str, float]:
    out = _run(_plan_engine() + ["bench", "--model", str(model), "--weights", "native", "--pp", str(PP),
                                 "--tg", str(TG), "--repeats", "1"], env=_env(threads))
    got = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        if key == f"pp{PP}_tok_s":
            got["pp"] = float(value)
        elif key == f"tg{TG}_tok_s":
            got["tg"] = float(value)
        elif key == "weights_report":
            got["weights_report"] = value.strip()
    return got


def ours_streams(model: Path, threads: int) -> dict[str, float]:
    out = _run(_plan_engine() + ["bench", "--model", str(model), "--weights", "native", "--concurrency",
                                 ",".join(map(str, STREAMS)), "--prompt-len", str(PROMPT), "--gen-len", str(GEN),
                                 "--json"], env=_env(threads))
    return {f"s{r['concurrency']}": float(r["aggregate_tok_s"]) for r in json.loads(out)["levels"]}


def _env(threads: int) -> dict:
    """Ours on `threads` cores, as llama.cpp's -t: the kernels' pool is sized by the affinity mask
    (_pinned), OpenBLAS by its variable."""
    return dict(os.environ, OPENBLAS_NUM_THREADS=str(threads))


def _pinned(threads: int) -> None:
    """Restrict this process (and the runs it starts) to `threads` CPUs when the machine has more."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > threads:
        os.sched_setaffinity(0, cpus[:threads])


COLUMNS = (("pp", f"pp{PP}"), ("tg", f"tg{TG}"), ("s16", "16 streams"), ("s32", "32 streams"))


def table(results: dict[str, dict[str, dict[str, list[float]]]]) -> str:
    """one row per model: a 1B type's name, or a --model file's"""
    lines = ["| model | " + " | ".join(f"{title} ours/llama.cpp" for _, title in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for name, sides in results.items():
        cells = []
        for key, _ in COLUMNS:
            ours, theirs = sides["ours"].get(key, []), sides["llama.cpp"].get(key, [])
            if ours and theirs:
                a, b = statistics.median(ours), statistics.median(theirs)
                cells.append(f"{a:.1f}/{b:.1f} = {a / b:.2f}x")
            else:
                cells.append("-")
        label = name if name.endswith(".gguf") else f"1B llama shape, {name}"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", default=",".join(TYPES), help=f"llama-quantize types (default {','.join(TYPES)})")
    p.add_argument("--model", type=Path, action="append", default=[],
                   help="another GGUF file to run beside the 1B models (e.g. SmolLM2's)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=CACHE / "bench-1b", help="where the models are written")
    p.add_argument("--llama-dir", type=Path, default=CACHE / "llama.cpp", help="llama.cpp sources and build")
    p.add_argument("--only", choices=("ours", "llama.cpp"), default=None, help="run one side only")
    p.add_argument("--json", type=Path, default=None, help="also write every measurement here")
    args = p.parse_args(argv)
    types = [t for t in args.types.split(",") if t]
    for extra in args.model:
        if not extra.is_file():
            p.error(f"--model {extra}: no such file")
    _pinned(args.threads)
    bin_dir = llama_tools(args.llama_dir)
    files = models(args.workdir, bin_dir, types) if types else {}
    files.update({m.name: m for m in args.model})
    types = list(files)
    sides = {"llama.cpp": lambda m: {**llama_pp_tg(bin_dir, m, args.threads),
                                     **llama_streams(bin_dir, m, args.threads)},
             "ours": lambda m: {**ours_pp_tg(m, args.threads), **ours_streams(m, args.threads)}}
    if args.only:
        sides = {args.only: sides[args.only]}
    results = {t: {"ours": {}, "llama.cpp": {}} for t in types}
    notes: dict[str, str] = {}
    for rnd in range(args.rounds):
        for i, t in enumerate(types):
            order = list(sides) if (rnd + i) % 2 == 0 else list(sides)[::-1]  # alternate who goes first
            for side in order:
                log(f"round {rnd + 1}/{args.rounds} {t} {side}")
                got = sides[side](files[t])
                if "weights_report" in got:
                    notes[t] = got.pop("weights_report")
                for key, value in got.items():
                    results[t][side].setdefault(key, []).append(value)
                log(f"  {side} {t}: " + ", ".join(f"{k}={v:.1f}" for k, v in got.items()))
    print(f"\n{args.rounds} interleaved rounds, medians, {args.threads} threads, "
          f"{time.strftime('%Y-%m-%d %H:%M')}; ours = plan-engine bench --weights native")
    print(table(results))
    for t, note in notes.items():
        print(f"{t}: {note}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "weights": notes}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
