#!/usr/bin/env bash
# The GPU check of issue 21: benchmarks/bench_gpu.py under a timeout, results under $OUT.
#
#   bash scripts/gpu_check.sh --prepare   here, with network: download the wheel the device image
#                                         lacks (diffusers, for the samplers) into .whl/ (git-ignored
#                                         through .git/info/exclude)
#   bash scripts/gpu_check.sh [ARGS]      on the device machine: the quick benchmark (<= 3 min),
#                                         extra ARGS go to bench_gpu.py
#   FULL=1 bash scripts/gpu_check.sh      the full benchmark (<= 8 min)
#
# The device tool's calls (carry the wheels; $OUT comes back):
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=300)
#   run(command="FULL=1 bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Writes $OUT/bench_gpu.json (rewritten after every measurement, so a timeout still leaves
# results), $OUT/bench_gpu.log and $OUT/nvidia-smi.txt.
set -u
cd "$(dirname "$0")/.."

# The device image runs Python 3.12 and has no network: wheels travel from here.
DIFFUSERS="diffusers==0.42.1"

if [ "${1:-}" = "--prepare" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "$DIFFUSERS"
fi

OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY=python3
export PYTHONUNBUFFERED=1

# diffusers is pure Python; its other needs (huggingface_hub, regex, requests, Pillow, safetensors)
# are in the device image. Without it only the render and interactive sections fail.
if ! $PY -c "import diffusers" >/dev/null 2>&1; then
    if ls .whl/diffusers-*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu_check: diffusers is not importable and no .whl/ was carried (run --prepare here first);" \
             "the render and interactive sections will fail" >&2
    fi
fi
# The package is not installed there: import it from this checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "${FULL:-}" ]; then MODE=(); LIMIT=500; else MODE=(--quick); LIMIT=200; fi  # bench budgets 450 / 160 s + start-up

{ nvidia-smi; nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv; } \
    > "$OUT/nvidia-smi.txt" 2>&1 || true

# SIGTERM at the limit: bench_gpu marks the JSON "interrupted" and prints its table; KILL 15 s later.
timeout --signal=TERM --kill-after=15 "$LIMIT" \
    $PY benchmarks/bench_gpu.py ${MODE[@]+"${MODE[@]}"} --json "$OUT/bench_gpu.json" "$@" 2>&1 | tee "$OUT/bench_gpu.log"
rc=${PIPESTATUS[0]}
echo "gpu_check: bench_gpu.py exited $rc; results in $OUT"
ls -la "$OUT"
exit "$rc"
