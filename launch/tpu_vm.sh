#!/usr/bin/env bash
# Creates a Cloud TPU VM (or pod slice), installs lbcl_jax on every worker, and runs the driver on
# all workers at once (multi-host JAX: main.py calls jax.distributed.initialize() on TPU pods).
#
#   TPU_NAME=lbcl ZONE=us-central2-b ACCELERATOR=v4-32 \
#   REPO=https://github.com/<you>/lbcl_jax.git \
#   CONFIG=configs/t5_large.py WORKDIR=gs://<bucket>/lbcl/t5_large_order1 \
#   EXTRA="--config.order=1 --config.data.data_dir=/data/CL_Benchmark" \
#   bash launch/tpu_vm.sh [create|install|run|delete|all]
#
# DRY_RUN=1 prints the gcloud commands instead of running them (tests/test_multiprocess.py
# checks them).
#
# WORKDIR may be a gs:// path (orbax and TensorBoard write there directly) so that a preempted
# slice resumes from the same place when the command is run again.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${REPO:?set REPO (git URL of lbcl_jax)}"
ACCELERATOR="${ACCELERATOR:-v4-8}"
VERSION="${VERSION:-tpu-ubuntu2204-base}"
CONFIG="${CONFIG:-configs/t5_large.py}"
WORKDIR="${WORKDIR:?set WORKDIR (a gs:// path is best)}"
EXTRA="${EXTRA:-}"
STEP="${1:-all}"

gcloud_() {
  if [ "${DRY_RUN:-0}" = "1" ]; then
    printf 'gcloud'; printf ' %q' "$@"; printf '\n'
  else
    gcloud "$@"
  fi
}

ssh_all() {
  gcloud_ compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"
}

create() {
  gcloud_ compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
      --accelerator-type "$ACCELERATOR" --version "$VERSION"
}

install() {
  ssh_all "set -e; python3 -m pip install -U pip; \
    [ -d lbcl_jax ] || git clone '$REPO' lbcl_jax; cd lbcl_jax && git pull --ff-only; \
    python3 -m pip install -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
}

run() {
  # Every worker runs the same command; JAX detects the pod slice (TPU_WORKER_HOSTNAMES) and
  # wires them into one program.
  ssh_all "cd lbcl_jax && python3 -m lbcl_jax.main --multihost --config='$CONFIG' --workdir='$WORKDIR' $EXTRA"
}

delete() {
  gcloud_ compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --quiet
}

case "$STEP" in
  create) create ;;
  install) install ;;
  run) run ;;
  delete) delete ;;
  all) create; install; run ;;
  *) echo "unknown step '$STEP': use create, install, run, delete or all" >&2; exit 2 ;;
esac
