"""Starting a multi-process (multi-host) run: who the coordinator is, how many processes, which
one this is.

JAX reads only the coordinator's address from the environment (`JAX_COORDINATOR_ADDRESS`);
the number of processes and this process's id it takes from its arguments or from a cluster it
recognises (TPU VMs, SLURM, Open MPI). So the project reads all three itself, from flags or from
the variables the launchers set, and passes them explicitly:

| flag | environment | what |
| --- | --- | --- |
| `--coordinator_address` | `JAX_COORDINATOR_ADDRESS` | `host:port` of process 0's coordinator service |
| `--num_processes` | `JAX_NUM_PROCESSES` | how many processes the run has |
| `--process_id` | `JAX_PROCESS_ID` | this process, 0 ... n - 1 |

A flag wins over its variable. With none of them set, a TPU VM, SLURM or MPI job keeps JAX's
own detection (`--multihost`, or detected from the environment), as MaxText and t5x users
expect. CPU processes talk through gloo collectives (the CPU backend has no others), so several
processes on one machine run the same program as several hosts would.

Bad input answers within a bounded time with one line (`InputError`): a missing or malformed
value, a process id out of range, or a coordinator that does not answer within `timeout_s`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import threading
from typing import Mapping, Optional

from lbcl_jax import errors
from lbcl_jax.errors import InputError

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
# Variables that mean "this is one process of a cluster JAX detects by itself".
AUTO_DETECTED = ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


@dataclasses.dataclass(frozen=True)
class Cluster:
  """How this process joins the run.

  Attributes:
    coordinator: `host:port` of the coordinator, or None (auto-detection, or one process).
    num_processes: the run's process count, None with auto-detection.
    process_id: this process's index, None with auto-detection.
    auto: let JAX detect the cluster (TPU VM, SLURM, MPI).
  """

  coordinator: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  auto: bool = False

  @property
  def distributed(self) -> bool:
    return self.auto or self.coordinator is not None


def _int(value: str, name: str) -> int:
  try:
    return int(str(value).strip())
  except ValueError:
    raise InputError(f"{name}={value!r}: expected an integer") from None


def resolve(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
            process_id: Optional[int] = None, *, multihost: Optional[bool] = None,
            env: Optional[Mapping[str, str]] = None) -> Cluster:
  """The run's cluster from flags (`None`: not given) and the environment.

  Raises:
    InputError: naming the flag or variable, for a partial or inconsistent set.
  """
  env = os.environ if env is None else env
  names = {}  # value -> where it came from, for messages

  def pick(flag_value, flag, var, parse):
    if flag_value is not None:
      names[flag] = f"--{flag}"
      return flag_value
    if env.get(var, "").strip():
      names[flag] = var
      return parse(env[var], var)
    return None

  coordinator = pick(coordinator, "coordinator_address", ENV_COORDINATOR, lambda v, _: v.strip())
  num_processes = pick(num_processes, "num_processes", ENV_NUM_PROCESSES, _int)
  process_id = pick(process_id, "process_id", ENV_PROCESS_ID, _int)
  explicit = [v is not None for v in (coordinator, num_processes, process_id)]
  if any(explicit) and not all(explicit):
    missing = [f"--{f} (or {v})" for f, v, given in
               (("coordinator_address", ENV_COORDINATOR, explicit[0]),
                ("num_processes", ENV_NUM_PROCESSES, explicit[1]),
                ("process_id", ENV_PROCESS_ID, explicit[2])) if not given]
    raise InputError(f"a multi-process run needs the coordinator, the number of processes and "
                     f"this process's id; missing {', '.join(missing)}")
  if all(explicit):
    if multihost is False:
      raise InputError("--nomultihost contradicts the coordinator / process settings given")
    if not re.fullmatch(r"\[?[\w.:-]+\]?:\d{1,5}", coordinator):
      raise InputError(f"{names['coordinator_address']}={coordinator!r}: expected host:port")
    if num_processes < 1:
      raise InputError(f"{names['num_processes']}={num_processes}: must be >= 1")
    if not 0 <= process_id < num_processes:
      raise InputError(f"{names['process_id']}={process_id}: must be in [0, {num_processes}) "
                       f"({names['num_processes']}={num_processes})")
    return Cluster(coordinator, num_processes, process_id)
  auto = multihost if multihost is not None else any(v in env for v in AUTO_DETECTED)
  return Cluster(auto=bool(auto))


def initialize(cluster: Cluster, *, timeout_s: int = 300) -> None:
  """Joins the run described by `cluster` (nothing to do for a single process).

  Raises:
    InputError: when the coordinator does not answer within `timeout_s` seconds, or JAX
      refuses the settings.
  """
  if not cluster.distributed:
    return
  import jax  # pylint: disable=g-import-not-at-top
  # The CPU backend's only cross-process collectives; the GPU and TPU backends ignore this.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  where = (f"coordinator {cluster.coordinator} (process {cluster.process_id} of "
           f"{cluster.num_processes})" if cluster.coordinator else "the detected cluster")
  # JAX aborts the process (a C++ fatal error and a stack dump) when the deadline passes; a
  # watchdog says what happened in one line and exits first.
  joined = threading.Event()
  hint = ("coordinator did not answer" if cluster.process_id else
          "not every process joined")

  def watchdog():
    if not joined.wait(timeout_s):
      errors.exit_with(f"could not join {where} within {timeout_s} s ({hint}; check that every "
                       "process was started with the same --coordinator_address and "
                       "--num_processes, and that the address is reachable)", from_thread=True)

  threading.Thread(target=watchdog, name="distributed-watchdog", daemon=True).start()
  try:
    if cluster.coordinator:
      jax.distributed.initialize(cluster.coordinator, cluster.num_processes, cluster.process_id,
                                 initialization_timeout=int(timeout_s) + 60)
    else:
      jax.distributed.initialize(initialization_timeout=int(timeout_s) + 60)
  except (RuntimeError, ValueError) as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
    raise InputError(f"could not join {where}: {lines[0][:300]}") from e
  finally:
    joined.set()


def check_same_everywhere(value: str, what: str) -> None:
  """Raises `InputError` on every process when `value` (e.g. the run config as JSON) is not
  the same on all of them (processes started with different settings would otherwise train
  different models in lockstep, or hang at a collective)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  digest = np.frombuffer(hashlib.sha256(value.encode("utf-8")).digest()[:8], np.int32)
  every = np.asarray(multihost_utils.process_allgather(digest)).reshape(jax.process_count(), -1)
  differ = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
  if differ:
    raise InputError(f"{what} of process(es) {differ} differs from process 0's: start every "
                     "process with the same --config and overrides")
