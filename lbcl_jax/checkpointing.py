"""Resumable run state on orbax `CheckpointManager`, and the workdir's config guard.

A checkpoint holds the trainable state (adapters, or the base params for full fine-tuning), the
optimizer state and the RNG as arrays, and the run's progress (task index, step in the task, the
accuracy matrix so far, loss curves, sensitivity scores) as JSON. The frozen base model is never
written: it is reloaded from the model path (or re-initialised from the seed) on resume.
Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from lbcl_jax.errors import InputError
from lbcl_jax.files import atomic_write_text

CONFIG_FILE = "config.json"
# Run-control fields that may differ between a run and its resumption.
_RESUMABLE_DIFFERENCES = ("debug",)


def _comparable(config_dict: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in config_dict.items() if k not in _RESUMABLE_DIFFERENCES}


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  return x


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return _jsonable(config.to_dict())


def check_workdir_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
  """Records the config in a fresh workdir, or refuses one that holds a different run."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  mine = config_to_dict(config)
  if path.exists():
    try:
      theirs = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
      raise InputError(f"{path}: not valid JSON ({e}); delete the workdir to start afresh") from e
    a, b = _comparable(theirs), _comparable(mine)
    if a != b:
      diffs = _diff(a, b)
      raise InputError(
          f"workdir {workdir} holds a run of a different config ({'; '.join(diffs[:8])}). "
          "Use another --workdir, or delete this one to start afresh.")
    return
  if jax.process_index() == 0:
    atomic_write_text(path, json.dumps(mine, indent=2, sort_keys=True))


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}{k}.")
    return out
  return [] if a == b else [f"{prefix[:-1]}: {a!r} there, {b!r} now"]


class CheckpointRestoreError(InputError):
  """A run checkpoint that exists but cannot be read back."""


class RunCheckpointer:
  """Saves and restores named array trees plus a JSON progress record, keyed by global step.

  Each tree is its own orbax item, so a restore can read some of them (the old adapters first,
  to rebuild the optimizer whose state is read next).
  """

  ITEMS = ("old", "trainable", "opt_state", "rng")

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
    self._mngr = ocp.CheckpointManager(
        pathlib.Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            # Synchronous saves: a save has landed before training moves on, so a kill right
            # after it resumes from there.
            enable_async_checkpointing=False),
        item_names=self.ITEMS + ("progress",),
    )

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, trees: dict[str, Any], progress: dict[str, Any]) -> None:
    unknown = set(trees) - set(self.ITEMS)
    if unknown:
      raise ValueError(f"unknown checkpoint items {sorted(unknown)}; expected {self.ITEMS}")
    args = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
    self._mngr.save(step, args=ocp.args.Composite(progress=ocp.args.JsonSave(progress), **args),
                    force=True)
    self._mngr.wait_until_finished()

  def items(self, step: int) -> set[str]:
    """Names of the array trees saved at `step`."""
    directory = pathlib.Path(self._mngr.directory) / str(step)
    return {name for name in self.ITEMS if (directory / name).exists()}

  def restore_progress(self, step: int) -> dict[str, Any]:
    with self._naming_failures(step):
      out = self._mngr.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))
    return out.progress

  def restore(self, step: int, abstract: dict[str, Any]) -> dict[str, Any]:
    """Restores the named trees onto the shapes, dtypes and shardings of `abstract`."""
    with self._naming_failures(step):
      out = self._mngr.restore(step, args=ocp.args.Composite(
          **{name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}))
    return {name: out[name] for name in abstract}

  @contextlib.contextmanager
  def _naming_failures(self, step: int):
    """Turns a failed read of checkpoint `step` into one line naming its directory.

    Orbax and TensorStore report a damaged file in many ways (often a long dump); the last
    line of their message is the one that says what was wrong.
    """
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
      reason = lines[-1] if len(lines[-1]) <= 300 else lines[-1][:297] + "..."
      raise CheckpointRestoreError(
          f"checkpoint {pathlib.Path(self._mngr.directory) / str(step)} could not be restored "
          f"({type(e).__name__}: {reason}); delete that directory to resume from an earlier "
          "checkpoint, or the workdir to start afresh") from e

  def close(self) -> None:
    self._mngr.close()
