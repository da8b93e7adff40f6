#!/usr/bin/env bash
# The GPU checks in one run, for a machine with an NVIDIA GPU and CuPy (docs/04_cuda_backend.md):
# what the machine is, the CUDA tests (every test under tests/backends/cuda, the gpu-marked ones
# run where cuda_available() is true), then `plan-engine bench` on the CUDA backend.
#   usage: benchmarks/gpu_check.sh [MODEL]   (default: the embedded SmolLM2, from the model cache)
# Logs go to $OUT (else /tmp/gpu-check). Nothing here asserts a speed; the bench prints it.
set -u
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
py=${PYTHON:-python3}
model=${1:-smollm2-135m-instruct-q4_1}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
$py -c "import sys, numpy, cupy; print('python', sys.version.split()[0], 'numpy', numpy.__version__,
'cupy', cupy.__version__, 'cuda runtime', cupy.cuda.runtime.runtimeGetVersion())"
if $py setup.py build_ext --inplace >"$out/build_ext.log" 2>&1; then echo "C extension built"
else echo "C extension not built (the cpu backend runs numpy alone): tail of build_ext.log:"; tail -5 "$out/build_ext.log"; fi
$py -c "from backends.cuda import cuda_available; print('cuda_available:', cuda_available())"
$py -m pytest -p no:cacheprovider -q -s -rA -m "not container" --timeout 600 tests/backends/cuda 2>&1 \
    | tee "$out/pytest_cuda.log" | grep -v "^PASSED\|^SKIPPED"
for args in "--pp 512 --tg 128 --repeats 3 --profile" "--concurrency 1,16,32 --prompt-len 32 --gen-len 64"; do
    echo "== plan-engine bench --model $model --backend cuda --weights native $args"
    # shellcheck disable=SC2086
    $py -m services.cli bench --model "$model" --backend cuda --weights native $args 2>&1 | tee -a "$out/bench_cuda.log"
done
