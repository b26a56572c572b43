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
import shutil
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from lbcl_jax.errors import InputError
from lbcl_jax.files import atomic_write_text

CONFIG_FILE = "config.json"
# Run-control fields that may differ between a run and its resumption.
_RESUMABLE_DIFFERENCES = ("debug", "process")


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


def with_new_defaults(theirs: Any, mine: Any, defaults: Any) -> Any:
  """`theirs` (a recorded config) with every field it lacks and `mine` has at the field's
  default (`defaults`) taken from `mine`: a field added to the config since the run began, left
  at its default, does not make the run another one."""
  if not (isinstance(theirs, dict) and isinstance(mine, dict)):
    return theirs
  out = dict(theirs)
  defaults = defaults if isinstance(defaults, dict) else {}
  for k, v in mine.items():
    if k not in theirs:
      if k in defaults and defaults[k] == v:
        out[k] = v
    else:
      out[k] = with_new_defaults(theirs[k], v, defaults.get(k))
  return out


def check_workdir_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
  """Records the config in a fresh workdir, or refuses one that holds a different run. A field
  the recorded config lacks (added to the code since) counts as the same when this run leaves
  it at its default."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  mine = config_to_dict(config)
  if path.exists():
    try:
      theirs = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
      raise InputError(f"{path}: not valid JSON ({e}); delete the workdir to start afresh") from e
    from lbcl_jax import config_lib  # pylint: disable=g-import-not-at-top
    theirs = with_new_defaults(theirs, mine, config_to_dict(config_lib.base_config()))
    a, b = _comparable(theirs), _comparable(mine)
    if a != b:
      diffs = _diff(a, b)
      raise InputError(
          f"workdir {workdir} holds a run of a different config ({'; '.join(diffs[:8])}). "
          "Use another --workdir, or delete this one to start afresh.")
    return
  if jax.process_index() == 0:
    atomic_write_text(path, json.dumps(mine, indent=2, sort_keys=True))


class WorkdirLock:
  """One run per workdir: an exclusive `flock` on `<workdir>/.lock`, held for the process's
  life. The kernel drops it when the process dies, however it dies, so a killed run never
  leaves it stuck."""

  def __init__(self, workdir: str | os.PathLike):
    self.path = pathlib.Path(workdir) / ".lock"
    self._file = None

  def acquire(self) -> "WorkdirLock":
    import fcntl  # pylint: disable=g-import-not-at-top
    f = open(self.path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      holder = f.read().strip() or "unknown"
      f.close()
      raise InputError(f"workdir {self.path.parent} is in use by another run (pid {holder}); "
                       "wait for it to finish or use another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    self._file = f
    return self

  def release(self) -> None:
    if self._file is not None:
      self._file.close()  # closing the file drops the lock
      self._file = None


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}{k}.")
    return out
  return [] if a == b else [f"{prefix[:-1]}: {a!r} there, {b!r} now"]


class CheckpointRestoreError(InputError):
  """A run checkpoint that exists but cannot be read back: `directory` is the checkpoint,
  `reason` one clause naming the damaged file and what is wrong with it."""

  def __init__(self, message: str, directory: pathlib.Path | None = None, reason: str = ""):
    super().__init__(message)
    self.directory = directory
    self.reason = reason or message


class RunCheckpointer:
  """Saves and restores named array trees plus a JSON progress record, keyed by global step.

  Each tree is its own orbax item, so a restore can read some of them (the old adapters first,
  to rebuild the optimizer whose state is read next).
  """

  # What `stage.Stage.save` writes: the old adapters, the stage's trainable tree and optimizer
  # state, the base a method trained ("params", at stage boundaries), the method's state. "rng"
  # is read by nothing: checkpoints before the key moved into the progress record had it.
  ITEMS = ("old", "trainable", "opt_state", "params", "method_state", "rng")

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
    self._directory = pathlib.Path(directory).absolute()
    self._max_to_keep = max(1, int(max_to_keep))
    self._mngr = self._manager()

  def _manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self._directory,
        options=ocp.CheckpointManagerOptions(
            # Retention is ours (`_prune`): the newest `max_to_keep`, plus the newest stage
            # boundary, so a damaged newest checkpoint always has an intact one behind it.
            max_to_keep=None, create=True,
            # Synchronous saves: a save has landed before training moves on, so a kill right
            # after it resumes from there.
            enable_async_checkpointing=False),
        item_names=self.ITEMS + ("progress",),
    )

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    """Every checkpointed step, oldest first."""
    return sorted(self._mngr.all_steps())

  def save(self, step: int, trees: dict[str, Any], progress: dict[str, Any]) -> None:
    unknown = set(trees) - set(self.ITEMS)
    if unknown:
      raise ValueError(f"unknown checkpoint items {sorted(unknown)}; expected {self.ITEMS}")
    args = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
    self._mngr.save(step, args=ocp.args.Composite(progress=ocp.args.JsonSave(progress), **args),
                    force=True)
    self._mngr.wait_until_finished()
    self._prune()

  def _is_boundary(self, step: int) -> bool:
    path = self._directory / str(step) / "progress" / "metadata"
    try:
      return json.loads(path.read_text(encoding="utf-8")).get("phase") == "stage_start"
    except (OSError, ValueError):
      return False

  def _prune(self) -> None:
    """Keeps the newest `max_to_keep` checkpoints and the newest stage boundary."""
    steps = self.all_steps()
    keep = set(steps[-self._max_to_keep:])
    boundaries = [s for s in steps if self._is_boundary(s)]
    if boundaries:
      keep.add(boundaries[-1])
    # Every process calls delete: orbax removes the files on the primary one and then waits
    # for all of them at a barrier (a delete on process 0 alone would hang the run).
    for s in steps:
      if s not in keep:
        self._mngr.delete(s)

  def quarantine(self, step: int) -> pathlib.Path:
    """Moves a damaged checkpoint out of the way (beside the checkpoints, not deleted, so it
    can be inspected), so the run can go on from an older one and save that step again."""
    target = self._directory.parent / "damaged_checkpoints" / str(step)
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      if target.exists():
        shutil.rmtree(target)
      os.replace(self._directory / str(step), target)
    if jax.process_count() > 1:  # nobody looks at the checkpoints before it has moved
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"lbcl_jax quarantine {step}")
    # The manager caches the steps it has seen: start a fresh one.
    self._mngr.close()
    self._mngr = self._manager()
    return target

  def items(self, step: int) -> set[str]:
    """Names of the array trees saved at `step`."""
    directory = pathlib.Path(self._mngr.directory) / str(step)
    return {name for name in self.ITEMS if (directory / name).exists()}

  def restore_progress(self, step: int) -> dict[str, Any]:
    with self._naming_failures(step):
      out = self._mngr.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))
    return out.progress

  def restore(self, step: int, abstract: dict[str, Any]) -> dict[str, Any]:
    """Restores the named trees onto the shapes, dtypes and shardings of `abstract`; a `None`
    tree restores as saved (a reader of a finished run, which has no model to take shapes
    from)."""
    with self._naming_failures(step):
      out = self._mngr.restore(step, args=ocp.args.Composite(
          **{name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}))
    return {name: out[name] for name in abstract}

  @contextlib.contextmanager
  def _naming_failures(self, step: int):
    """Turns a failed read of checkpoint `step` into one line naming the damaged file.

    Orbax and TensorStore report a damaged file in many ways, mostly without its name (a
    truncated array file: "Exception: ... See full TensorStore details: <spec dump>"), so the
    checkpoint's files are checked (`damaged_files`) and the first damaged one is named; when
    none is found, the innermost error's first line stands in.
    """
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      directory = pathlib.Path(self._mngr.directory) / str(step)
      try:
        damaged = damaged_files(directory)
      except Exception:  # pylint: disable=broad-except  # the diagnosis must not hide `e`
        damaged = []
      if damaged:
        reason = damaged[0] + (f", and {len(damaged) - 1} more damaged file"
                               f"{'s' if len(damaged) > 2 else ''}" if len(damaged) > 1 else "")
      else:
        reason = _innermost_reason(e)
      raise CheckpointRestoreError(
          f"checkpoint {directory} could not be restored ({reason}); delete that directory to "
          "resume from an earlier checkpoint, or the workdir to start afresh",
          directory=directory, reason=reason) from e

  def close(self) -> None:
    self._mngr.close()


# ---------------------------------------------------------------------------------------------
# What is wrong with a checkpoint that does not restore.

# Orbax's JSON files in a step directory: the step's and each item's metadata, the arrays'
# shardings and per-process array metadata, and the progress record (a JSON item).
_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata")
_OCDBT_MANIFEST = "manifest.ocdbt"


def damaged_files(step_dir: str | os.PathLike) -> list[str]:
  """One clause per damaged file of the checkpoint directory `step_dir`, paths relative to it:
  "<file>: missing", "<file>: truncated (N of M bytes)" or "<file>: bad metadata (...)".

  Checks orbax's JSON metadata files (they must parse) and every array database (TensorStore
  OCDBT, one per item: the manifests, then every B-tree node and value they reference, which
  must exist and hold the byte ranges referenced; M is the end of the last range referenced
  in the file). Empty when nothing is found damaged.
  """
  root = pathlib.Path(step_dir)
  out = []
  for path in sorted(root.rglob("*")):
    if path.is_file() and (path.name in _JSON_FILES or path.parent.name == "array_metadatas"):
      try:
        json.loads(path.read_bytes().decode("utf-8"))
      except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        detail = f"{e.msg} (byte {e.pos})" if isinstance(e, json.JSONDecodeError) else str(e)
        out.append(f"{path.relative_to(root)}: bad metadata (not valid JSON: {detail}; "
                   f"{path.stat().st_size} bytes)")
  databases = {p.parent for p in root.rglob(_OCDBT_MANIFEST)}
  # An item whose per-process databases are there but whose merged manifest is not.
  for item in {p.parent for p in root.glob("*/ocdbt.process_*")} - databases:
    out.append(f"{(item / _OCDBT_MANIFEST).relative_to(root)}: missing")
  needed: dict[pathlib.Path, int] = {}  # file -> end of the last byte range referenced in it
  unreadable: dict[pathlib.Path, str] = {}  # file -> why a node in it did not decode
  for db in sorted(databases):
    bad_manifest = _read_ocdbt(db, needed, unreadable)
    if bad_manifest:
      out.append(f"{(db / _OCDBT_MANIFEST).relative_to(root)}: bad metadata ({bad_manifest}; "
                 f"{(db / _OCDBT_MANIFEST).stat().st_size} bytes)")
  for path, end in sorted(needed.items()):
    rel = path.relative_to(root)
    if not path.is_file():
      out.append(f"{rel}: missing")
    elif path.stat().st_size < end:
      out.append(f"{rel}: truncated ({path.stat().st_size} of {end} bytes)")
    elif path in unreadable:
      out.append(f"{rel}: unreadable ({unreadable[path]})")
  return out


def _read_ocdbt(db: pathlib.Path, needed: dict, unreadable: dict) -> str:
  """Walks the OCDBT database in directory `db` (its manifest, then every node it references)
  and records in `needed` the bytes referenced in each file, in `unreadable` the files whose
  nodes do not decode. Returns why the manifest does not read ("" when it does)."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  try:
    base = ts.KvStore.open({"driver": "file", "path": str(db) + "/"}).result()
    pending = _locations(ts.ocdbt.dump(base).result())
  except Exception as e:  # pylint: disable=broad-except
    return _first_line(e)
  seen = set()
  while pending:
    location = pending.pop()
    if location in seen:
      continue
    seen.add(location)
    kind, rest = location.split(":", 1)
    name, offset, length = rest.rsplit(":", 2)
    path = db / name.replace(":", "", 1)  # "<prefix>:<path>", the prefix relative to `db`
    end = int(offset) + int(length)
    needed[path] = max(needed.get(path, 0), end)
    if kind == "value" or not path.is_file() or path.stat().st_size < end:
      continue
    try:  # a B-tree or version-tree node: read it, and what it references
      pending += _locations(ts.ocdbt.dump(base, location).result())
    except Exception as e:  # pylint: disable=broad-except
      unreadable.setdefault(path, _first_line(e))
  return ""


_LOCATION_KINDS = ("value:", "btreenode:", "versionnode:")


def _locations(dumped: Any) -> list[str]:
  """Every node or value location string ("<kind>:<prefix>:<path>:<offset>:<length>") in an
  `ocdbt.dump` result."""
  if isinstance(dumped, dict):
    return [l for v in dumped.values() for l in _locations(v)]
  if isinstance(dumped, list):
    return [l for v in dumped for l in _locations(v)]
  if isinstance(dumped, str) and dumped.startswith(_LOCATION_KINDS) and dumped.count(":") >= 4:
    return [dumped]
  return []


def _first_line(e: BaseException, limit: int = 300) -> str:
  line = next((l.strip() for l in str(e).splitlines() if l.strip()), type(e).__name__)
  return line if len(line) <= limit else line[:limit - 3] + "..."


def _innermost_reason(e: BaseException) -> str:
  """"Type: first line" of the innermost error `e` was raised from (the one that says what
  went wrong; the outer ones wrap it, often with a long dump)."""
  seen = set()
  while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return f"{type(e).__name__}: {_first_line(e)}"
