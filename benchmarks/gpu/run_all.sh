#!/usr/bin/env bash
# The whole GPU check in one call (issue 15), on a machine with an NVIDIA GPU and a CUDA build of
# torch 2.13.0, setuptools and ninja (else the build is serial) in $PYTHON's environment (default
# python3); needs no network:
#   1. build   softmoe with SOFTMOE_CUDA=1 for this GPU's architecture, into that environment
#              (editable, from this checkout)                                  -> OUT/build.log
#   2. tests   every CUDA test (pytest -m cuda tests)                         -> OUT/tests.log, tests.xml
#   3. bench   router, layer (with kernel launches per step) and HF benchmarks -> OUT/bench.log, bench_gpu.json
#   4. summary one page of all of it                                           -> OUT/summary.md
# Each step has its own time limit (build 150 s, tests 180 s, bench 120 s: 7.5 minutes at most, within 8 on one
# H100 / H200); a failed step is recorded (OUT/steps.tsv) and the next ones still run. Exits 1 when
# a step failed.
#
# --dry-run (no GPU, e.g. CI): the plumbing only. Checks that the tools and files are there,
# collects the CUDA tests without running them, runs the benchmark script's --dry-run, and writes
# the same files with every GPU step marked as skipped, and why.
#
#   benchmarks/gpu/run_all.sh OUTDIR
#   benchmarks/gpu/run_all.sh --dry-run OUTDIR
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -ne 1 ]; then echo "usage: $0 [--dry-run] OUTDIR" >&2; exit 2; fi
OUT=$1
mkdir -p "$OUT" || exit 2
STEPS="$OUT/steps.tsv"
printf 'step\tstatus\tseconds\tnote\n' > "$STEPS"
CUDA_TESTS=tests  # every test marked cuda, wherever it is
BENCH_PATH="$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"  # bench_gpu.py's hf section imports bench_hf
failed=0

# record NAME STATUS SECONDS NOTE
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STEPS"; }

# run_step NAME LIMIT_S LOG command...: runs the command under `timeout`, output to LOG
run_step() {
  local name=$1 limit=$2 log=$3; shift 3
  local start=$SECONDS
  echo "== $name (at most ${limit} s)"
  timeout "$limit" "$@" > "$log" 2>&1
  local rc=$?
  local took=$((SECONDS - start))
  if [ $rc -eq 0 ]; then record "$name" ok "$took" ""
  elif [ $rc -eq 124 ]; then record "$name" timeout "$took" "stopped after ${limit} s"; failed=1
  else record "$name" failed "$took" "exit status $rc"; failed=1; fi
  tail -n 3 "$log"
}

if [ $DRY -eq 1 ]; then
  note="dry run: no GPU work"
  for f in setup.py benchmarks/gpu/bench_gpu.py benchmarks/gpu/summary.py tests/test_cuda.py tests/test_cuda_experts.py; do
    [ -f "$f" ] || { record check failed 0 "missing $f"; failed=1; }
  done
  command -v timeout >/dev/null || { record check failed 0 "timeout (coreutils) not found"; failed=1; }
  record build skipped 0 "$note (would run: SOFTMOE_CUDA=1 pip install --no-build-isolation --no-deps -e .)"
  run_step tests-collect 150 "$OUT/tests.log" "$PYTHON" -m pytest -q --collect-only -m cuda -p no:cacheprovider $CUDA_TESTS
  record tests skipped 0 "$note (collected only)"
  run_step bench 150 "$OUT/bench.log" env PYTHONPATH="$BENCH_PATH" "$PYTHON" benchmarks/gpu/bench_gpu.py --out "$OUT" --dry-run
else
  arch=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || {
    echo "run_all.sh: no CUDA device visible to $PYTHON's torch (use --dry-run without a GPU)" >&2; exit 2; }
  run_step build 150 "$OUT/build.log" env SOFTMOE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" \
    "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
  run_step tests 180 "$OUT/tests.log" "$PYTHON" -m pytest -q -rs -m cuda -p no:cacheprovider \
    --junitxml="$OUT/tests.xml" $CUDA_TESTS
  run_step bench 120 "$OUT/bench.log" env PYTHONPATH="$BENCH_PATH" "$PYTHON" benchmarks/gpu/bench_gpu.py --out "$OUT"
fi
"$PYTHON" benchmarks/gpu/summary.py "$OUT" || failed=1
echo "== summary: $OUT/summary.md"
exit $failed
