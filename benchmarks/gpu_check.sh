#!/usr/bin/env bash
# The GPU acceptance run (issue 15): on a machine with one NVIDIA GPU (H100 or H200) whose python3 already holds
# PyTorch with CUDA and Triton, build gpt2fast in place (nvcc builds gpt2fast._C), run every `gpu`-marked test,
# then `gpt2fast bench` for the triton and cuda backends, fp16 weights and int8 (W8A16, issue 17: half the bytes),
# batch 1 / 8 / 64, beside hf and hf-static (bf16 is in the gpu-marked tests); everything lands in one folder:
#   env.txt        the GPU, driver, nvcc and package versions
#   gpu-tests.log  pytest's output for the gpu-marked tests (and gpu-tests.xml, its JUnit report)
#   bench/         bench.json, bench.md and the plots
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (default: benchmarks/results/gpu-check)
# It installs nothing from the network: the build uses the machine's setuptools and pybind11 and no other
# dependency is fetched (--no-deps); a package the machine lacks can come as wheels in GPT2FAST_WHEELS=DIR.
# Budget: about 10 minutes (the build 2, the tests 3, bench 4; each is cut off at its share and says so), inside
# the device tool's 600 s per command when run as `bash benchmarks/gpu_check.sh "$OUT/gpu-check"` there.
# Not yet run on a GPU: no machine was lent when it was written (2026-12-06). The first run is the check.
set -uo pipefail
out=$(realpath -m "${1:-$(dirname "$0")/results/gpu-check}")  # before the cd: relative to the caller
cd "$(dirname "$0")/.."
mkdir -p "$out"
py=${PYTHON:-python3}

if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: $py's torch sees no CUDA GPU; run this on a GPU machine" >&2
    exit 2
fi

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    nvcc --version | tail -n 2 || true
    "$py" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
    git log --oneline -1 || true
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

if [ -n "${GPT2FAST_WHEELS:-}" ]; then
    shopt -s nullglob
    wheels=("$GPT2FAST_WHEELS"/*.whl)
    [ ${#wheels[@]} -gt 0 ] || { echo "gpu_check.sh: no wheels in $GPT2FAST_WHEELS" >&2; exit 3; }
    "$py" -m pip install -q --no-index --find-links "$GPT2FAST_WHEELS" "${wheels[@]}" || exit 3
fi
GPT2FAST_BUILD_CUDA=1 timeout -k 10 120 "$py" -m pip install -q --no-build-isolation --no-deps -e . || {
    echo "gpu_check.sh: the build failed or ran past 120 s (nvcc, or pybind11 / setuptools missing from $py)" >&2
    exit 3
}

status=0
mapfile -t files < <(grep -l "pytest.mark.gpu" tests/*.py)
[ ${#files[@]} -gt 0 ] || { echo "gpu_check.sh: no test file has gpu-marked tests" >&2; exit 4; }
# -m gpu after the config's -m 'not gpu': the last one wins
timeout -k 10 180 "$py" -m pytest -m gpu -q -p no:cacheprovider --junitxml "$out/gpu-tests.xml" "${files[@]}" \
    > "$out/gpu-tests.log" 2>&1 || status=$?
tail -n 5 "$out/gpu-tests.log"
if [ "$status" -eq 124 ]; then
    echo "gpu_check.sh: the gpu tests ran past 180 s and were cut off" | tee -a "$out/gpu-tests.log"
fi

bench_status=0
timeout -k 10 240 "$py" -m gpt2fast bench --model random:gpt2 --backends triton cuda --dtypes float16 \
    --quantization none int8 --batch-sizes 1 8 64 --baselines hf hf-static --out "$out/bench" || bench_status=$?
if [ "$bench_status" -eq 124 ]; then
    echo "gpu_check.sh: bench ran past 240 s and was cut off (its results are written at the end: none)" >&2
fi

echo "gpu_check.sh: tests exit $status, bench exit $bench_status; results in $out"
[ "$status" -eq 0 ] && [ "$bench_status" -eq 0 ]
