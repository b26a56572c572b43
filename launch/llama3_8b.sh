#!/usr/bin/env bash
# Llama-3-8B with LB-CL (configs/llama3_8b.py) on the meshes benchmarks/scale_plan.py chose
# (BENCHMARKS.md, "Pod scale on paper"): the base, the adapters and the optimizer state split
# over an fsdp axis of every chip (data 1, fsdp all, tensor 1), global batch 64 x 512 tokens.
#
# A TPU slice: the plan's smallest for v5e (16 GiB a chip) is 8 chips, fsdp 8, each block
# recomputed in the backward pass (remat "full": 12.6 GiB a chip, 8 rows each); on 64 chips
# (ACCELERATOR=v5litepod-64, one row a chip) REMAT=weights is enough (5.9 GiB). Runs
# launch/tpu_vm.sh (create, install, run on every worker):
#   TARGET=tpu TPU_NAME=lbcl-8b ZONE=us-west4-a REPO=https://github.com/<you>/lbcl_jax.git \
#   WORKDIR=gs://<bucket>/llama3_8b DATA_DIR=/data/CL_Benchmark bash launch/llama3_8b.sh all
#
# A GPU cluster: H100s (80 GiB), one process a node driving its 8 GPUs (launch/gpu.sh), the fsdp
# axis over every GPU of every node. The plan: one node (fsdp 8) needs no recomputation (remat
# "weights", 33 GiB a GPU); 8 nodes (fsdp 64) hold 6 GiB a GPU. Run on every node with its own
# PROCESS_ID:
#   TARGET=gpu COORDINATOR=10.0.0.1:1234 NUM_PROCESSES=2 PROCESS_ID=0 \
#   WORKDIR=/shared/llama3_8b DATA_DIR=/data/CL_Benchmark bash launch/llama3_8b.sh
#
# Further driver flags go after the script's arguments (gpu) or in EXTRA (tpu). DRY_RUN=1
# prints the TPU's gcloud commands instead of running them (tests/test_scale_plan.py checks
# them).
set -euo pipefail
TARGET="${TARGET:?set TARGET to tpu or gpu}"
DATA_DIR="${DATA_DIR:?set DATA_DIR (the CL_Benchmark directory on every worker)}"
HERE="$(cd "$(dirname "$0")" && pwd)"
MESH="--config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1"
case "$TARGET" in
  tpu)
    export ACCELERATOR="${ACCELERATOR:-v5litepod-8}"
    export VERSION="${VERSION:-v2-alpha-tpuv5-lite}"
    export CONFIG=configs/llama3_8b.py
    export EXTRA="$MESH --config.model.remat=${REMAT:-full} --config.data.data_dir=$DATA_DIR ${EXTRA:-}"
    exec bash "$HERE/tpu_vm.sh" "${1:-all}"
    ;;
  gpu)
    export CONFIG=configs/llama3_8b.py
    # shellcheck disable=SC2086
    exec bash "$HERE/gpu.sh" $MESH "--config.model.remat=${REMAT:-weights}" \
        "--config.data.data_dir=$DATA_DIR" "$@"
    ;;
  *)
    echo "unknown TARGET '$TARGET': use tpu or gpu" >&2
    exit 2
    ;;
esac
