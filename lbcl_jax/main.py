r"""Runs a whole continual-learning task sequence.

  python -m lbcl_jax.main                                      # the embedded default, offline
  python -m lbcl_jax.main --config=configs/t5_large.py --workdir=/tmp/run \
      --config.method=olora --config.order=4

Writes the accuracy matrix, metrics, plots and checkpoints into --workdir; running the same
command again resumes from the last checkpoint there.
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from lbcl_jax import config_lib

FLAGS = flags.FLAGS

_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Directory for checkpoints, logs and results.")
config_flags.DEFINE_config_file(
    "config", config_lib.__file__,
    "Config file (configs/*.py); the embedded default (lbcl_jax/config_lib.py) when omitted.",
    lock_config=True)
_MULTIHOST = flags.DEFINE_bool(
    "multihost", None,
    "Call jax.distributed.initialize() before anything else (TPU pods, multi-node GPU). "
    "Default: when the environment names a coordinator or a TPU worker list.")


def _wants_distributed() -> bool:
  if _MULTIHOST.value is not None:
    return _MULTIHOST.value
  return any(k in os.environ for k in (
      "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


class _QuietLibraries(logging.logging.Filter):
  """Drops orbax's per-save INFO chatter; its warnings and errors still show."""

  def filter(self, record):
    return record.levelno >= logging.logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if _wants_distributed():
    jax.distributed.initialize()
  config = FLAGS.config
  logging.info("JAX process %d / %d, local devices: %s",
               jax.process_index(), jax.process_count(), jax.local_devices())
  # Imported here so that `--help` and flag errors answer without loading JAX models.
  from lbcl_jax import train  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(config, _WORKDIR.value)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
