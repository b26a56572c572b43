r"""Runs a whole continual-learning task sequence.

  python -m lbcl_jax.main                                      # the embedded default, offline
  python -m lbcl_jax.main --config=configs/t5_large.py --workdir=/tmp/run \
      --config.method=olora --config.order=4

Writes the accuracy matrix, metrics, plots and checkpoints into --workdir; running the same
command again resumes from the last checkpoint there.

With `--config.process.huge_pages=True`, where the kernel gives transparent huge pages only on
request (most Linux distributions), the command starts itself again, before JAX loads, with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1, so that XLA's per-step working memory is faulted in 2
MiB pages.

Bad input (a config file, an override, a value, data, a model, a workdir in use or a run
checkpoint) ends the run with one `error: ...` line on stderr and exit status 2, before
anything is written. A diverged loss (NaN or inf, or a collapse with optim.stop_on_collapse)
ends it with exit status 3 and no results; SIGTERM with a checkpoint and exit status 75 (run
the same command again to resume). A collapse without that flag, a training loss stuck at a
uniform guess or risen by orders of magnitude, is one `warning:` line per task and a
`warnings` entry in results.json and report.md. Anything else that goes wrong is a bug and
shows its traceback.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from lbcl_jax import config_lib
from lbcl_jax import errors
from lbcl_jax.errors import Diverged, InputError, Preempted

FLAGS = flags.FLAGS
EXIT_BAD_INPUT = errors.EXIT_BAD_INPUT
# The training loss became NaN or infinite (or collapsed, with optim.stop_on_collapse): no
# results were written, the last good checkpoint is kept.
EXIT_DIVERGED = 3
# Stopped on SIGTERM after a checkpoint (a preempted VM): run the same command again to resume
# (EX_TEMPFAIL, "try again later", so a scheduler can requeue on it).
EXIT_PREEMPTED = 75

_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Directory for checkpoints, logs and results.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", None,
    "Join a multi-process run before anything else (TPU pods, multi-node GPU). Default: when "
    "a coordinator is given, or the environment is a TPU VM, SLURM or MPI job.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0's coordinator (default: $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in the run (default: $JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process, 0 ... num_processes - 1 (default: $JAX_PROCESS_ID).")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 300,
    "Seconds to wait for every process to join before giving up with an error.")


fail = errors.exit_with


# ---------------------------------------------------------------------------------------------
# Checking `--config` and its overrides before absl parses them: ml_collections reports an
# unknown key as a bare `AttributeError: "'lr'"` traceback.


def _config_argument(argv: Sequence[str]) -> str | None:
  """The value of `--config` in `argv` (`--config=x` or `--config x`), or None."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load_config(spec: str | None) -> ml_collections.ConfigDict:
  """The config `--config` names (`path.py` or `path.py:argument`), as config_flags loads it."""
  if spec is None:
    return config_lib.get_config()
  path, _, argument = spec.partition(":")
  if not os.path.isfile(path):
    fail(f"--config={spec}: no such config file {path!r}")
  module_spec = importlib.util.spec_from_file_location("_lbcl_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)  # a bug in the file shows its own traceback
  if not hasattr(module, "get_config"):
    fail(f"--config={spec}: {path} defines no get_config()")
  return module.get_config(argument) if argument else module.get_config()


def _config_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      out += _config_paths(value, prefix + key + ".")
  return out


def _initials(name: str) -> str:
  return "".join(w[0] for w in name.split("_") if w)


def closest_keys(config: ml_collections.ConfigDict, path: str, n: int = 3) -> list[str]:
  """The valid config keys most like `path`: abbreviations (`lr` for `learning_rate`) first,
  then by spelling, among the keys under the deepest parent that exists."""
  *parents, leaf = path.split(".")
  node, prefix = config, ""
  for p in parents:
    if isinstance(node, ml_collections.ConfigDict) and p in node:
      node, prefix = node[p], prefix + p + "."
    else:
      break
  if not isinstance(node, ml_collections.ConfigDict):
    return []
  siblings = list(node.keys())
  wanted = path[len(prefix):].split(".")[0]
  abbreviated = [prefix + k for k in siblings if _initials(k) == wanted]
  # A close spelling of the field's name anywhere (e.g. a field under another parent).
  by_leaf = {p.rsplit(".", 1)[-1]: p for p in _config_paths(config)}
  misspelt = [by_leaf[k] for k in difflib.get_close_matches(leaf, list(by_leaf), n=n, cutoff=0.8)]
  nearby = [prefix + k for k in difflib.get_close_matches(wanted, siblings, n=n, cutoff=0.0)]
  return list(dict.fromkeys(abbreviated + misspelt + nearby))[:n]


def check_overrides(argv: Sequence[str]) -> None:
  """Fails with the closest valid keys when an override names no field of the config."""
  config = _load_config(_config_argument(argv))
  for arg in argv:
    match = re.match(r"^--?(?:no)?config\.([^=\s]+)", arg)
    if not match:
      continue
    path = match.group(1)
    node = config
    for part in path.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        suggestions = closest_keys(config, path)
        hint = f"; closest valid keys: {', '.join(suggestions)}" if suggestions else ""
        fail(f"--config.{path}: the config has no field {path!r}{hint} "
             "(every field is documented in lbcl_jax/config_lib.py)")
      node = node[part]


def _parse_flags(argv: list[str]) -> list[str]:
  check_overrides(argv[1:])
  config_flags.DEFINE_config_file(
      "config", config_lib.__file__,
      "Config file (configs/*.py); the embedded default (lbcl_jax/config_lib.py) when omitted.",
      lock_config=True)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    fail(str(e))


# ---------------------------------------------------------------------------------------------


class _QuietLibraries(logging.logging.Filter):
  """Drops orbax's per-save INFO chatter; its warnings and errors still show."""

  def filter(self, record):
    return record.levelno >= logging.logging.WARNING or "/orbax/" not in record.pathname


def _restart_with_huge_pages() -> None:
  """Starts this same command again with glibc's huge-page tunable set, where it is missing and
  would help (`timings.huge_pages_environ`): glibc reads it only when a process starts. Only a
  process started as `python -m lbcl_jax.main` restarts itself (not a program that calls
  `run()`), before JAX is loaded; the process id, its files and its signals stay."""
  from lbcl_jax import timings  # pylint: disable=g-import-not-at-top
  main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if main_spec is None or main_spec.name != "lbcl_jax.main":
    return
  environ = timings.huge_pages_environ()
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}: settings go in --config.<field>=<value>")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Imported here so that flag errors answer without loading JAX.
  from lbcl_jax import distributed  # pylint: disable=g-import-not-at-top
  from lbcl_jax import timings  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  if config.process.huge_pages:
    _restart_with_huge_pages()
  # The C heap's policy before JAX allocates anything (train_and_evaluate sets it again for
  # callers that import it; a value it does not know is refused there, with the others).
  if config.process.malloc in timings.MALLOC_POLICIES:
    timings.set_malloc_policy(config.process.malloc, config.process.mmap_threshold_bytes)
  try:
    cluster = distributed.resolve(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  multihost=_MULTIHOST.value)
    distributed.initialize(cluster, timeout_s=_DISTRIBUTED_TIMEOUT.value)
  except InputError as e:
    fail(str(e))
  import jax  # pylint: disable=g-import-not-at-top
  from lbcl_jax import train  # pylint: disable=g-import-not-at-top
  logging.info("JAX process %d / %d, local devices: %s",
               jax.process_index(), jax.process_count(), jax.local_devices())
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except InputError as e:
    fail(str(e))
  except Diverged as e:
    fail(f"training diverged: {e}", EXIT_DIVERGED)
  except Preempted as e:
    fail(str(e), EXIT_PREEMPTED, prefix="preempted")


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
