#!/usr/bin/env bash
# GPU check and benchmark run for a CUDA machine with PyTorch, nvcc and
# compute-sanitizer preinstalled, no network and (maybe) no Keras.
#
# Steps, in order, under one deadline (TOTAL_SECONDS, default 450, so that
# the run with its wheel install ends within 8 minutes), each with its own
# timeout:
#  1. wheels: installs .whl/*.whl into /tmp/site unless Keras imports already;
#  2. environment: GPU, CUDA, torch, nvcc, compute-sanitizer (no CUDA device
#     visible to torch: exit 1);
#  3. build: the torch adapter with its CUDA kernels (gpu_common.py); when
#     cuda_compiled is false it prints cuda_reason and the run exits 1;
#  4. cuda_tests: the CUDA tests of tests/native/test_torch_op.py on their own
#     (-k "cuda and not refused_without_cuda_torch"); fails unless some pass,
#     none fails and none is skipped;
#  5. checks, in parallel: sanitize_ops.py under compute-sanitizer memcheck,
#     racecheck, synccheck and initcheck (an error fails), sanitize_ops.py
#     plainly with the stream and torch.compile smoke checks, and
#     large_tensor.py (bfloat16 tensors of more than 2**31 elements);
#  6. kernel_bandwidth: GB/s per kernel against a device copy;
#  7. bench, if time remains: python -m keras_residual bench (ResNet50, batch
#     128, every row) in mixed_bfloat16, the torchvision peer
#     (torch_peer.py), float32, and JAX where it imports.
#
# Steps 2-6 are required: one that fails, times out or cannot run makes the
# exit status 1. The bench steps are optional: run when at least their
# minimum time is left; only an error in them (not a timeout) fails the run.
#
# Output ($OUT if set, else ./gpu-results), ten files at most: run.log,
# build.log, cuda_tests.log, sanitize.log, large_tensor.log,
# kernel_bandwidth.log, kernel_bandwidth.json, bench.log, summary.json and
# summary.md.
#
# Usage: bash benchmarks/gpu/run.sh [--dry-run]
#   --dry-run (or DRY_RUN=1, or CPU_SMOKE=1): every step on the CPU with tiny
#   sizes; the steps that need a GPU are skipped with the reason, and missing
#   CUDA is reported, not fatal. Checks the script on any machine.
# Environment: PYTHON (default python3), TOTAL_SECONDS, BATCH (default 128),
# IMAGE_SIZE (default 224), DATA_FORMAT (default channels_last),
# SANITIZE_PARALLEL (default 1: the four tools at once; 0: one after another).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT="$PWD"
GPU="benchmarks/gpu"

DRY=0
if [[ "${1:-}" == "--dry-run" || "${DRY_RUN:-0}" == "1" || "${CPU_SMOKE:-0}" == "1" ]]; then
  DRY=1
fi
PY="${PYTHON:-python3}"
DEST="${OUT:-$ROOT/gpu-results}"
mkdir -p "$DEST"
RUNS="$(mktemp -d /tmp/keras-residual-gpu.XXXXXX)"  # scratch: JSON pieces, bench folders
LOG="$DEST/run.log"
STEPS="$RUNS/steps.tsv"
: >"$LOG"
: >"$STEPS"
for file in build cuda_tests sanitize large_tensor kernel_bandwidth bench; do
  : >"$DEST/$file.log"
done

if [[ $DRY -eq 1 ]]; then
  BATCH="${BATCH:-2}" IMAGE_SIZE="${IMAGE_SIZE:-32}" MODEL=resnet18
  BENCH_TIMING=(--repeats 1 --steps 1 --warmup 1)
  PEER_TIMING=(--repeats 1 --steps 1 --warmup 1)
  TOTAL_SECONDS="${TOTAL_SECONDS:-1800}"
  # Two rows are enough to check the steps (the CPU is slow at the others).
  ROWS=composite,native
  JAX_ROWS=composite
  BENCH_LIMIT=300 PEER_LIMIT=150  # a small shared CPU is slow
else
  BATCH="${BATCH:-128}" IMAGE_SIZE="${IMAGE_SIZE:-224}" MODEL=resnet50
  BENCH_TIMING=(--repeats 5 --steps 3 --warmup 2)
  PEER_TIMING=(--repeats 5 --steps 5 --warmup 3)
  TOTAL_SECONDS="${TOTAL_SECONDS:-450}"
  ROWS=keras.applications,composite,native,folded,limit
  # XLA compiles each row's train and predict steps (most of that step's time).
  JAX_ROWS=keras.applications,composite,limit
  BENCH_LIMIT=150 PEER_LIMIT=90
fi
DATA_FORMAT="${DATA_FORMAT:-channels_last}"
DEADLINE=$((SECONDS + TOTAL_SECONDS))
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
# The GPU machine has no TensorFlow: Keras must not start on its default.
export KERAS_BACKEND="${KERAS_BACKEND:-torch}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and torch take turns on one GPU
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

say() { echo "== $*" | tee -a "$LOG"; }
now() { date +%s; }
left() { echo $((DEADLINE - SECONDS - 10)); }

# record NAME VERDICT RC SECONDS REQUIRED NOTE: one line of steps.tsv.
record() {
  local note="${6//$'\t'/ }"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${note//$'\n'/ }" >>"$STEPS"
  say "$1: $2 (rc $3, $4s)${6:+: $6}"
}

verdict_of() {  # verdict_of RC
  case "$1" in
    0) echo ok ;;
    124 | 137) echo "TIMED OUT" ;;
    *) echo "FAILED" ;;
  esac
}

# step NAME LIMIT REQUIRED LOGFILE COMMAND...: runs COMMAND with the smaller
# of LIMIT and the time left, appending its output to LOGFILE; returns its
# status (125 when there was no time to start it).
step() {
  local name="$1" limit="$2" required="$3" logfile="$4"
  shift 4
  local remaining
  remaining=$(left)
  if ((remaining < 20)); then
    record "$name" "SKIPPED (out of time)" 125 0 "$required" ""
    return 125
  fi
  ((limit > remaining)) && limit=$remaining
  say "$name (timeout ${limit}s): $*"
  local start status=0 out="$RUNS/$name.out"
  start=$(now)
  timeout --kill-after=10 "$limit" "$@" >"$out" 2>&1 || status=$?
  {
    echo "== $name (timeout ${limit}s, exit status $status, $(($(now) - start))s): $*"
    cat "$out"
    echo
  } >>"$logfile"
  tail -n 15 "$out" | sed 's/^/   | /' | tee -a "$LOG"
  record "$name" "$(verdict_of $status)" "$status" $(($(now) - start)) "$required" ""
  return "$status"
}

# finish: writes summary.json and summary.md, exits 1 when a required step
# is not ok or an optional one failed (dry run: GPU-only skips are fine).
finish() {
  "$PY" "$GPU/summarize.py" "$RUNS" "$DEST" "$DRY" 2>&1 | tee -a "$LOG"
  local status=${PIPESTATUS[0]}
  say "done in ${SECONDS}s (status $status): $(ls "$DEST" | tr '\n' ' ')"
  exit "$status"
}

say "keras_residual GPU run: $(date -u +%FT%TZ), dry run: $DRY, output: $DEST, deadline ${TOTAL_SECONDS}s"

# -- 1. wheels ----------------------------------------------------------------------
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
shopt -s nullglob
wheels=(.whl/*.whl)
if "$PY" -c "import keras" >/dev/null 2>&1; then
  say "Keras imports already ($("$PY" -c 'import keras; print(keras.__version__)' 2>/dev/null))"
elif ((${#wheels[@]})); then
  say "installing ${#wheels[@]} carried wheels into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${wheels[@]}" \
    2>&1 | tail -n 5 | tee -a "$LOG"
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
KERAS=1
if ! "$PY" -c "import keras" >>"$LOG" 2>&1; then
  KERAS=0
  say "Keras is not importable (carry its wheels in .whl/): the CUDA tests and the bench fail"
fi

# -- 2. environment -------------------------------------------------------------------
SANITIZER=""
for candidate in "$(command -v compute-sanitizer 2>/dev/null)" \
  "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer; do
  if [[ -n "$candidate" && -x "$candidate" ]]; then
    SANITIZER="$candidate"
    break
  fi
done
timeout 60 "$PY" - "$RUNS/environment.json" <<'PYEOF' 2>&1 | tee -a "$LOG"
import importlib, json, platform, sys
env = {"python": sys.version.split()[0], "platform": platform.platform()}
try:
    import torch
    env.update(torch=torch.__version__, cuda=torch.version.cuda,
               cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(p.total_memory / 2**30),
                   sm=f"{p.major}{p.minor}", sms=p.multi_processor_count,
                   cudnn=torch.backends.cudnn.version())
except ImportError as error:
    env["torch"] = f"not importable: {error}"
for name in ("keras", "numpy", "torchvision", "jax", "triton"):
    try:
        env[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as error:
        env[name] = f"missing ({type(error).__name__})"
print("\n".join(f"   {k}: {v}" for k, v in env.items()))
json.dump(env, open(sys.argv[1], "w"), indent=2)
PYEOF
{
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
    --format=csv,noheader
  command -v nvcc >/dev/null && nvcc --version | grep release
  [[ -n "$SANITIZER" ]] && echo "compute-sanitizer: $SANITIZER ($("$SANITIZER" --version | grep -i version | tail -n 1))"
} 2>&1 | sed 's/^/   /' | tee -a "$LOG" "$RUNS/tools.txt"
CUDA_OK=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [[ "$CUDA_OK" != "1" ]]; then
  if [[ $DRY -eq 1 ]]; then
    record environment "ok" 0 0 required "dry run: no CUDA device visible to torch (a real run stops here)"
  else
    record environment "FAILED" 1 0 required "no CUDA device visible to torch"
    finish
  fi
else
  record environment ok 0 0 required "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
fi

# -- 3. build the torch adapter with its CUDA kernels ------------------------------------
REQUIRE_CUDA=(--require-cuda)
[[ $DRY -eq 1 ]] && REQUIRE_CUDA=()  # a dry run reports a CPU-only build, and goes on
step build 300 required "$DEST/build.log" \
  "$PY" "$GPU/gpu_common.py" --json "$RUNS/build.json" "${REQUIRE_CUDA[@]}"
build_status=$?
CUDA_COMPILED=$("$PY" -c "import json,sys; print(int(bool(json.load(open(sys.argv[1]))['cuda_compiled'])))" \
  "$RUNS/build.json" 2>/dev/null || echo 0)
if [[ "$CUDA_COMPILED" != "1" ]]; then
  reason=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['cuda_reason'])" \
    "$RUNS/build.json" 2>/dev/null || echo "the build failed: see build.log")
  if [[ $DRY -eq 1 && $build_status -eq 0 ]]; then
    say "dry run: cuda_compiled is false ($reason): a real run exits 1 here"
  else
    say "cuda_compiled is false: $reason"
    grep -v '^ *"' "$DEST/build.log" | tail -n 30 | sed 's/^/   | /' | tee -a "$LOG"
    finish
  fi
fi

# -- 4. the CUDA tests, on their own --------------------------------------------------------
if [[ $KERAS -eq 1 ]]; then
  step cuda_tests 150 required "$DEST/cuda_tests.log" env KERAS_BACKEND=torch \
    "$PY" -m pytest tests/native/test_torch_op.py -k "cuda and not refused_without_cuda_torch" \
    -rs -q -p no:cacheprovider --junitxml="$RUNS/cuda_tests.xml"
  # Counted from the JUnit XML: some must pass, none fail, none be skipped.
  counts=$("$PY" - "$RUNS/cuda_tests.xml" <<'PYEOF' 2>&1
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception as error:
    print(f"0 0 0 no JUnit XML ({type(error).__name__})")
    raise SystemExit
suites = [root] if root.tag == "testsuite" else list(root)
get = lambda key: sum(int(s.get(key, 0)) for s in suites)
tests, skipped = get("tests"), get("skipped")
failed = get("failures") + get("errors")
print(tests - skipped - failed, failed, skipped, "")
PYEOF
  )
  read -r passed failed skipped _ <<<"$counts"
  note="$passed passed, $failed failed, $skipped skipped"
  if [[ "${passed:-0}" -gt 0 && "${failed:-1}" -eq 0 && "${skipped:-1}" -eq 0 ]]; then
    record cuda_tests_count ok 0 0 required "$note"
  elif [[ $DRY -eq 1 ]]; then
    record cuda_tests_count "ok" 0 0 required "dry run: $note (a real run fails unless 0 skipped, 0 failed)"
  else
    record cuda_tests_count FAILED 1 0 required "$note: CUDA tests must pass, none skipped"
  fi
else
  record cuda_tests FAILED 1 0 required "Keras is not importable (tests/conftest.py imports it)"
fi

# -- 5. checks in parallel: sanitizers, smoke, large tensor -----------------------------------
# bg NAME LIMIT LOGFILE COMMAND...: starts COMMAND in the background with its timeout.
bg_pids=()
bg_names=()
bg() {
  local name="$1" limit="$2" logfile="$3"
  shift 3
  local remaining
  remaining=$(left)
  ((limit > remaining)) && limit=$remaining
  if ((limit < 20)); then
    record "$name" "SKIPPED (out of time)" 125 0 required ""
    return
  fi
  say "$name (timeout ${limit}s, in the background): $*"
  (
    start=$(now)
    status=0
    timeout --kill-after=10 "$limit" "$@" >"$logfile" 2>&1 || status=$?
    echo "$status $(($(now) - start))" >"$RUNS/$name.rc"
  ) &
  bg_pids+=($!)
  bg_names+=("$name")
}

if [[ $DRY -eq 1 ]]; then
  SMOKE=(--device cpu --extra stream,compile --compile-backend aot_eager)
  LARGE=(--device cpu --nhwc-shape 2,3,40,24 --nchw-shape 2,24,3,41 --boundary 3000
    --window 256 --chunk-rows 100)
  BANDWIDTH=(--device cpu --cases nhwc:2x8x8x64,nhwc:2x3x3x128,nchw:2x64x6x6 --reps 3)
else
  SMOKE=(--device cuda --extra stream,compile)
  LARGE=(--device cuda)
  BANDWIDTH=(--device cuda)
fi
TOOLS=(memcheck racecheck synccheck initcheck)
bg smoke 240 "$RUNS/smoke.log" "$PY" "$GPU/sanitize_ops.py" "${SMOKE[@]}" --json "$RUNS/smoke.json"
bg large_tensor 180 "$DEST/large_tensor.log" "$PY" "$GPU/large_tensor.py" "${LARGE[@]}" \
  --json "$RUNS/large_tensor.json"
if [[ $DRY -eq 1 ]]; then
  for tool in "${TOOLS[@]}"; do
    record "sanitize_$tool" "SKIPPED (no GPU)" 0 0 required \
      "dry run: compute-sanitizer needs a GPU (${SANITIZER:-compute-sanitizer not found})"
  done
  TOOLS=()
elif [[ -z "$SANITIZER" ]]; then
  for tool in "${TOOLS[@]}"; do
    record "sanitize_$tool" FAILED 1 0 required "compute-sanitizer not found (PATH, CUDA_HOME)"
  done
  TOOLS=()
fi
for tool in "${TOOLS[@]}"; do
  # No caching allocator: each tensor is its own allocation, so that memcheck
  # sees an access past a tensor's end.
  bg "sanitize_$tool" 240 "$RUNS/sanitize_$tool.log" \
    env -u PYTORCH_CUDA_ALLOC_CONF PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool "$tool" --error-exitcode 86 --print-limit 30 \
    "$PY" "$GPU/sanitize_ops.py" --device cuda --json "$RUNS/sanitize_$tool.json"
  [[ "${SANITIZE_PARALLEL:-1}" == "0" ]] && wait "${bg_pids[-1]}"
done
wait "${bg_pids[@]}" 2>/dev/null
for name in "${bg_names[@]}"; do
  read -r status secs <"$RUNS/$name.rc" 2>/dev/null || { status=1; secs=0; }
  verdict=$(verdict_of "$status")
  note=""
  log="$RUNS/$name.log"
  [[ $name == large_tensor ]] && log="$DEST/large_tensor.log"
  case "$name" in
    sanitize_*)
      summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -n 2 | tr -s ' =' ' ')
      checks=$(grep -E "^sanitize_ops:" "$log" | tail -n 1)
      note="${summary:-no summary line}; ${checks:-sanitize_ops did not finish}"
      if [[ $status -eq 0 ]] && ! grep -q "ERROR SUMMARY: 0 errors" "$log"; then
        verdict="FAILED"
        status=1
      fi
      ;;
    smoke) note=$(grep -E "^sanitize_ops:" "$log" | tail -n 1) ;;
    large_tensor) note=$(grep -E "^large_tensor:" "$log" | tail -n 1) ;;
  esac
  if [[ $name != large_tensor ]]; then
    {
      echo "== $name: $verdict (exit status $status, ${secs}s)${note:+: $note}"
      cat "$log"
      echo
    } >>"$DEST/sanitize.log"
  fi
  tail -n 8 "$log" | sed "s/^/   | /" | tee -a "$LOG"
  record "$name" "$verdict" "$status" "$secs" required "$note"
done

# -- 6. kernel bandwidth ---------------------------------------------------------------------
step kernel_bandwidth 120 required "$DEST/kernel_bandwidth.log" \
  "$PY" "$GPU/kernel_bandwidth.py" "${BANDWIDTH[@]}" --json "$DEST/kernel_bandwidth.json"

# -- 7. the model bench, if time remains -------------------------------------------------------
# optional NAME LIMIT MIN COMMAND...: step if at least MIN seconds are left.
optional() {
  local name="$1" limit="$2" min="$3"
  shift 3
  if [[ $KERAS -eq 0 && $name != torch_peer ]]; then
    record "$name" "SKIPPED (no Keras)" 0 0 optional ""
    return
  fi
  if (($(left) < min)); then
    record "$name" "SKIPPED (out of time)" 0 0 optional "$(left)s left, needs ${min}s"
    return
  fi
  step "$name" "$limit" optional "$DEST/bench.log" "$@"
}
bench() {  # bench NAME BACKEND DTYPE IMPLEMENTATIONS MAX_SECONDS MIN_SECONDS
  optional "$1" "$5" "$6" env KERAS_BACKEND="$2" "$PY" -m keras_residual bench --model "$MODEL" \
    --mode both --batch-size "$BATCH" --image-size "$IMAGE_SIZE" --dtype "$3" \
    --data-format "$DATA_FORMAT" --implementations "$4" "${BENCH_TIMING[@]}" --out "$RUNS/$1"
}
bench torch_bfloat16 torch mixed_bfloat16 "$ROWS" "$BENCH_LIMIT" 90
optional torch_peer "$PEER_LIMIT" 45 "$PY" "$GPU/torch_peer.py" --out "$RUNS/torch_peer" \
  --batch-size "$BATCH" --image-size "$IMAGE_SIZE" "${PEER_TIMING[@]}"
bench torch_float32 torch float32 "$ROWS" "$BENCH_LIMIT" 90
if "$PY" -c "import jax" >/dev/null 2>&1; then
  bench jax_float32 jax float32 "$JAX_ROWS" 180 120
else
  record jax_float32 "SKIPPED (jax not importable)" 0 0 optional ""
fi

finish
