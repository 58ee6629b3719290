#!/usr/bin/env bash
# One full round on a lent GPU machine, sized for one 10-minute call of the device tool:
# build (sm_90 only), info, the test suite in 5 parallel processes, then the benchmark with the
# time that is left. Everything lands under $OUT (logs, results JSON/MD/PNG); a run cut short
# still leaves partial results. Usage: OUT=/some/dir bash benchmarks/gpu_round.sh
set -o pipefail
: "${OUT:?set OUT to the folder that should receive logs and results}"
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export FASTDIFF_GIT_COMMIT=${FASTDIFF_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
PY=${PY:-python3}  # on the lent machines bare `pip` belongs to another Python

$PY -m pip install --no-build-isolation -e . > "$OUT/install.log" 2>&1
echo "install rc=$? at ${SECONDS}s"; tail -4 "$OUT/install.log"
$PY -m fastdiff info 2>&1 | tee "$OUT/info.log"

TL=$(( 360 - SECONDS > 90 ? 360 - SECONDS : 90 ))
t() {
  local name=$1; shift
  timeout "$TL" env OMP_NUM_THREADS=4 $PY -m pytest -q -x -rs -p no:cacheprovider "$@" \
    > "$OUT/tests_$name.log" 2>&1
  printf "\nrc=%s (124: cut by timeout)\n" $? >> "$OUT/tests_$name.log"
}
t attention_gpu tests/test_attention.py -m "gpu and not slow" &
t attention tests/test_attention.py -m "not gpu and not slow" &
t sampler_step tests/test_sampler_step.py &
t group_norm_silu tests/test_group_norm_silu.py &
t rest tests --ignore=tests/test_attention.py --ignore=tests/test_sampler_step.py \
  --ignore=tests/test_group_norm_silu.py &
wait
echo "tests done at ${SECONDS}s"
for f in "$OUT"/tests_*.log; do
  echo "== $f: $(grep -E ' (passed|failed|error|skipped)' "$f" | tail -1) $(tail -1 "$f")"
done

$PY benchmarks/run.py --out "$OUT" --budget-s $(( 550 - SECONDS > 60 ? 550 - SECONDS : 60 )) \
  2>&1 | tee "$OUT/bench.log" | tail -70
