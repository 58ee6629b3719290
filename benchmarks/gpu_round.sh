#!/usr/bin/env bash
# A round on a lent GPU machine in two calls of the device tool (10 minutes each at most):
#   OUT=$OUT FASTDIFF_GIT_COMMIT=<sha> bash benchmarks/gpu_round.sh test    # build, info, tests
#   OUT=$OUT FASTDIFF_GIT_COMMIT=<sha> bash benchmarks/gpu_round.sh bench   # the full benchmark
# Each stage first (re)builds the extension for sm_90 (incremental: ninja rebuilds what changed).
# Everything lands under $OUT (logs, results JSON/MD/PNG); a run cut short still leaves partial
# results. The device's copy of the tree has no .git: pass the commit, or the table says unknown.
set -o pipefail
: "${OUT:?set OUT to the folder that should receive logs and results}"
STAGE=${1:?usage: gpu_round.sh test|bench}
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export FASTDIFF_GIT_COMMIT=${FASTDIFF_GIT_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null)}
[ -n "$FASTDIFF_GIT_COMMIT" ] || echo "warning: no FASTDIFF_GIT_COMMIT and no .git: the table will say git unknown"
PY=${PY:-python3}  # on the lent machines bare `pip` belongs to another Python

$PY -m pip install --no-build-isolation -e . > "$OUT/install.log" 2>&1
echo "install rc=$? at ${SECONDS}s"; tail -4 "$OUT/install.log"
$PY -m fastdiff info 2>&1 | tee "$OUT/info.log"

case "$STAGE" in
test)
  TL=$(( 570 - SECONDS > 120 ? 570 - SECONDS : 120 ))
  t() {
    local name=$1; shift
    timeout "$TL" env OMP_NUM_THREADS=4 $PY -m pytest -q -x -rs -p no:cacheprovider "$@" \
      > "$OUT/tests_$name.log" 2>&1
    printf "\nrc=%s (124: cut by timeout)\n" $? >> "$OUT/tests_$name.log"
  }
  t attention_gpu tests/test_attention.py -m "gpu and not slow" &
  t attention tests/test_attention.py -m "not gpu and not slow" &
  t sampler_step tests/test_sampler_step.py &
  t multistep_step tests/test_multistep_step.py &
  t group_norm_silu tests/test_group_norm_silu.py &
  t optimize tests/test_optimize.py &
  t unet tests/test_unet.py &
  t rest tests --ignore=tests/test_attention.py --ignore=tests/test_sampler_step.py \
    --ignore=tests/test_multistep_step.py \
    --ignore=tests/test_group_norm_silu.py --ignore=tests/test_optimize.py \
    --ignore=tests/test_unet.py &
  wait
  echo "tests done at ${SECONDS}s"
  for f in "$OUT"/tests_*.log; do
    echo "== $f: $(grep -E ' (passed|failed|error|skipped)' "$f" | tail -1) $(tail -1 "$f")"
  done
  ;;
bench)
  # every registered suite, the unet one (U-Net forward vs diffusers eager/compile) and the
  # multistep one (one solver step vs diffusers' DPMSolver/UniPC step) included;
  # run.py's own budget (default 540 s from its start) keeps the call within 10 minutes
  $PY benchmarks/run.py --out "$OUT" --budget-s $(( 540 - SECONDS > 60 ? 540 - SECONDS : 60 )) \
    2>&1 | tee "$OUT/bench.log" | tail -80
  ;;
*) echo "unknown stage $STAGE (test or bench)"; exit 2 ;;
esac
