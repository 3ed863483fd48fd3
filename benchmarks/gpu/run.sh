#!/usr/bin/env bash
# GPU benchmark run for a CUDA machine with PyTorch (and optionally JAX)
# preinstalled, no network and no Keras.
#
# 1. installs the wheels carried in .whl/ (Keras and what it needs that the
#    machine lacks) into /tmp/site, if there are any;
# 2. prints what it found: GPU, CUDA, torch, JAX;
# 3. builds the CUDA adapter of the native kernels;
# 4. runs the native tests on KERAS_BACKEND=torch (not the slow ones);
# 5. benchmarks ResNet50 on torch in float32 and mixed_bfloat16, train and
#    inference, every row (python -m keras_residual bench);
# 6. times a plain-PyTorch peer: torchvision's ResNet50, channels_last,
#    float32 and autocast bfloat16, same batch;
# 7. benchmarks JAX (keras.applications, composite, limit) if JAX is there;
# 8. writes summary.md and results.json (every run's records) and packs the
#    per-run folders into runs.tar.gz.
#
# Output: $OUT if set, else ./gpu-results. Every stage has a timeout, and
# the stages share a deadline (TOTAL_SECONDS, default 470) so the whole run
# ends within 8 minutes; a stage that fails or times out is recorded and the
# run goes on.
#
# Usage: bash benchmarks/gpu/run.sh [--dry-run]
#   --dry-run (or CPU_SMOKE=1): tiny sizes, collection-only native tests and
#   no GPU needed, to check the script's logic on any machine.
# Environment: PYTHON (default python3), BATCH (default 128), IMAGE_SIZE
# (default 224), DATA_FORMAT (default channels_last), TOTAL_SECONDS.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT="$PWD"

DRY=0
if [[ "${1:-}" == "--dry-run" || "${CPU_SMOKE:-0}" == "1" ]]; then
  DRY=1
fi
PY="${PYTHON:-python3}"
DEST="${OUT:-$ROOT/gpu-results}"
mkdir -p "$DEST"
if [[ -n "${OUT:-}" ]]; then
  # Only a few files come back from $OUT: keep the per-run folders aside and
  # pack them at the end.
  RUNS="$(mktemp -d /tmp/keras-residual-gpu.XXXXXX)"
else
  RUNS="$DEST/runs"
  mkdir -p "$RUNS"
fi
LOG="$DEST/run.log"
: >"$LOG"
STATUS="$RUNS/status.txt"
: >"$STATUS"

if [[ $DRY -eq 1 ]]; then
  BATCH="${BATCH:-2}" IMAGE_SIZE="${IMAGE_SIZE:-32}" MODEL=resnet18
  BENCH_TIMING=(--repeats 1 --steps 1 --warmup 1)
  TOTAL_SECONDS="${TOTAL_SECONDS:-900}"
else
  BATCH="${BATCH:-128}" IMAGE_SIZE="${IMAGE_SIZE:-224}" MODEL=resnet50
  BENCH_TIMING=(--repeats 5 --steps 3 --warmup 2)
  TOTAL_SECONDS="${TOTAL_SECONDS:-470}"
fi
DATA_FORMAT="${DATA_FORMAT:-channels_last}"
DEADLINE=$((SECONDS + TOTAL_SECONDS))
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
# The GPU machine has no TensorFlow: Keras must not start on its default.
export KERAS_BACKEND="${KERAS_BACKEND:-torch}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and torch take turns on one GPU
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

say() { echo "== $*" | tee -a "$LOG"; }

# stage NAME MAX_SECONDS COMMAND...: runs COMMAND with the smaller of
# MAX_SECONDS and what is left before the deadline; logs to $RUNS/NAME.log.
stage() {
  local name="$1" limit="$2"
  shift 2
  local left=$((DEADLINE - SECONDS - 10))
  if ((left < 20)); then
    say "$name: skipped, out of time"
    echo "$name skipped (out of time)" >>"$STATUS"
    return 1
  fi
  ((limit > left)) && limit=$left
  say "$name (timeout ${limit}s): $*"
  local start=$SECONDS status=0
  timeout --kill-after=10 "$limit" "$@" >"$RUNS/$name.log" 2>&1 || status=$?
  tail -n 25 "$RUNS/$name.log" | tee -a "$LOG"
  local verdict="ok"
  ((status == 124 || status == 137)) && verdict="TIMED OUT"
  ((status != 0 && status != 124 && status != 137)) && verdict="FAILED ($status)"
  say "$name: $verdict in $((SECONDS - start))s"
  echo "$name $verdict $((SECONDS - start))s" >>"$STATUS"
  return "$status"
}

say "keras_residual GPU run: $(date -u +%FT%TZ), dry run: $DRY, output: $DEST"

# -- 1. wheels ----------------------------------------------------------------
shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]})); then
  say "installing ${#wheels[@]} carried wheels into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${wheels[@]}" \
    2>&1 | tail -n 5 | tee -a "$LOG"
  export PYTHONPATH="/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  say "no wheels in .whl/: using the Keras that $PY finds"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import keras" >>"$LOG" 2>&1; then
  say "Keras is not importable: carry its wheels in .whl/"
  exit 1
fi

# -- 2. what is here ----------------------------------------------------------
"$PY" - <<'PYEOF' 2>&1 | tee -a "$LOG" "$RUNS/environment.txt"
import importlib, platform, sys
print("python", sys.version.split()[0], platform.platform())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda,
          "cudnn", torch.backends.cudnn.version() if torch.cuda.is_available() else None)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("gpu", torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.0f} GiB",
              f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs")
    else:
        print("gpu: none visible to torch")
except ImportError as error:
    print("torch: not importable:", error)
try:
    import jax
    print("jax", jax.__version__, "devices", jax.devices())
except Exception as error:
    print("jax: not usable:", type(error).__name__, error)
for name in ("keras", "numpy", "torchvision", "matplotlib", "pytest_benchmark"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except ImportError as error:
        print(name, "missing:", error)
PYEOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
  --format=csv,noheader 2>&1 | tee -a "$LOG"
command -v nvcc >/dev/null && nvcc --version | grep release | tee -a "$LOG"

# -- 3. build the CUDA adapter ------------------------------------------------
stage build_torch_adapter 240 env KERAS_BACKEND=torch "$PY" -c \
  "from keras_residual.native import _torch; _torch.load(); print(_torch.status())"

# -- 4. native tests on torch -------------------------------------------------
if [[ $DRY -eq 1 ]]; then
  stage native_tests 120 env KERAS_BACKEND=torch "$PY" -m pytest tests/native -m "not slow" \
    -q -p no:cacheprovider --collect-only
else
  stage native_tests 120 env KERAS_BACKEND=torch "$PY" -m pytest tests/native -m "not slow" \
    -q -p no:cacheprovider -x
fi

# -- 5. the bench on torch ----------------------------------------------------
bench() {  # bench NAME BACKEND DTYPE IMPLEMENTATIONS MAX_SECONDS
  stage "$1" "$5" env KERAS_BACKEND="$2" "$PY" -m keras_residual bench --model "$MODEL" \
    --mode both --batch-size "$BATCH" --image-size "$IMAGE_SIZE" --dtype "$3" \
    --data-format "$DATA_FORMAT" --implementations "$4" "${BENCH_TIMING[@]}" --out "$RUNS/$1"
}
ALL=keras.applications,composite,native,folded,limit
bench torch_float32 torch float32 "$ALL" 130
bench torch_bfloat16 torch mixed_bfloat16 "$ALL" 130

# -- 6. plain PyTorch peer ------------------------------------------------------
if [[ $DRY -eq 1 ]]; then
  PEER_TIMING=(--repeats 1 --steps 1 --warmup 1)
else
  PEER_TIMING=(--repeats 5 --steps 5 --warmup 3)
fi
stage torch_peer 90 "$PY" benchmarks/gpu/torch_peer.py --out "$RUNS/torch_peer" \
  --batch-size "$BATCH" --image-size "$IMAGE_SIZE" "${PEER_TIMING[@]}"

# -- 7. JAX ---------------------------------------------------------------------
if "$PY" -c "import jax" >/dev/null 2>&1; then
  # XLA compiles each row's train and predict steps (most of this stage's
  # time), so JAX runs the three rows that matter there.
  bench jax_float32 jax float32 keras.applications,composite,limit 180
else
  say "jax: not importable, skipped"
  echo "jax_float32 skipped (jax not importable)" >>"$STATUS"
fi

# -- 8. summary -----------------------------------------------------------------
"$PY" - "$RUNS" "$DEST" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, os, shutil, sys
runs, dest = sys.argv[1], sys.argv[2]
combined, parts = {"runs": {}}, ["# keras_residual GPU benchmark", ""]
env = os.path.join(runs, "environment.txt")
if os.path.exists(env):
    parts += ["```", open(env).read().strip(), "```", ""]
status = os.path.join(runs, "status.txt")
parts += ["## Stages", "", "```", open(status).read().strip(), "```", ""]
for name in sorted(os.listdir(runs)):
    folder = os.path.join(runs, name)
    for file in ("results.json", "torch_peer.json"):
        path = os.path.join(folder, file)
        if os.path.isfile(path):
            combined["runs"][name] = json.load(open(path))
    markdown = os.path.join(folder, "results.md")
    if os.path.isfile(markdown):
        text = [("##" + line) if line.startswith("#") else line
                for line in open(markdown).read().splitlines()]
        parts += [f"## {name}", "", *text, ""]
    chart = os.path.join(folder, "results.png")
    if os.path.isfile(chart) and name.startswith("torch_"):
        shutil.copy(chart, os.path.join(dest, f"{name}.png"))
peer = combined["runs"].get("torch_peer")
if peer:
    parts += ["## torch_peer", "", peer.get("peer", ""), "",
              "| implementation | mode | images/s | min-max |", "|---|---|---:|---:|"]
    for r in peer.get("records", []):
        s = r["spread"]
        parts.append(f"| {r['implementation']} | {r['mode']} | {r['images_per_second']:.1f} "
                     f"| {s['min']:.1f}-{s['max']:.1f} |")
with open(os.path.join(dest, "summary.md"), "w") as handle:
    handle.write("\n".join(parts) + "\n")
with open(os.path.join(dest, "results.json"), "w") as handle:
    json.dump(combined, handle, indent=2, default=str)
print("runs:", ", ".join(combined["runs"]) or "none")
PYEOF
tar -czf "$DEST/runs.tar.gz" -C "$RUNS" . 2>>"$LOG"
say "done in ${SECONDS}s: $(ls "$DEST" | tr '\n' ' ')"
grep -q "FAILED\|TIMED OUT" "$STATUS" && exit 1
exit 0
