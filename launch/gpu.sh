#!/usr/bin/env bash
# Runs the driver on one machine with one or several NVIDIA GPUs (one process drives them all),
# or on several machines (one process each; set NUM_PROCESSES, PROCESS_ID, COORDINATOR).
#
#   CONFIG=configs/t5_large.py WORKDIR=/scratch/lbcl/run1 bash launch/gpu.sh --config.order=2
#   # several machines (one process each; run on every machine with its own PROCESS_ID):
#   COORDINATOR=10.0.0.1:1234 NUM_PROCESSES=2 PROCESS_ID=0 CONFIG=... WORKDIR=... bash launch/gpu.sh
#
# WORKDIR must be one directory every process sees (a shared file system or a gs:// path).
# PYTHON picks the interpreter (default python3). tests/test_multiprocess.py runs the
# several-machines form on one machine, two CPU processes on localhost.
set -euo pipefail
PYTHON="${PYTHON:-python3}"
CONFIG="${CONFIG:-configs/t5_large.py}"
WORKDIR="${WORKDIR:?set WORKDIR}"
if [ "${INSTALL:-0}" = "1" ]; then
  "$PYTHON" -m pip install -e . "jax[cuda12]"
fi
# Let XLA take GPU memory as it needs it rather than 75% up front, and keep cuBLAS deterministic
# enough that a resumed run matches an uninterrupted one.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true"
if [ -n "${COORDINATOR:-}" ]; then
  # lbcl_jax.distributed reads the three and passes them to jax.distributed.initialize.
  export JAX_COORDINATOR_ADDRESS="$COORDINATOR"
  export JAX_NUM_PROCESSES="${NUM_PROCESSES:?set NUM_PROCESSES}"
  export JAX_PROCESS_ID="${PROCESS_ID:?set PROCESS_ID}"
fi
exec "$PYTHON" -m lbcl_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
