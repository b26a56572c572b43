#!/usr/bin/env bash
# Runs the driver on one machine with one or several NVIDIA GPUs (one process drives them all),
# or on several machines (one process each; set NUM_PROCESSES, PROCESS_ID, COORDINATOR).
#
#   CONFIG=configs/t5_large.py WORKDIR=/scratch/lbcl/run1 bash launch/gpu.sh --config.order=2
#   # several machines:
#   COORDINATOR=10.0.0.1:1234 NUM_PROCESSES=2 PROCESS_ID=0 ... bash launch/gpu.sh
set -euo pipefail
CONFIG="${CONFIG:-configs/t5_large.py}"
WORKDIR="${WORKDIR:?set WORKDIR}"
if [ "${INSTALL:-0}" = "1" ]; then
  python3 -m pip install -e . "jax[cuda12]"
fi
# Let XLA take GPU memory as it needs it rather than 75% up front, and keep cuBLAS deterministic
# enough that a resumed run matches an uninterrupted one.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true"
MULTI=()
if [ -n "${COORDINATOR:-}" ]; then
  export JAX_COORDINATOR_ADDRESS="$COORDINATOR"
  export JAX_NUM_PROCESSES="${NUM_PROCESSES:?set NUM_PROCESSES}"
  export JAX_PROCESS_ID="${PROCESS_ID:?set PROCESS_ID}"
  MULTI=(--multihost)
fi
exec python3 -m lbcl_jax.main "${MULTI[@]}" --config="$CONFIG" --workdir="$WORKDIR" "$@"
