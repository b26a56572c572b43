"""The continual-learning driver: `train_and_evaluate(config, workdir)`.

The run config is turned once into typed pieces: a backbone (`lbcl_jax.backbones`), a method
(`lbcl_jax.methods`), the data (`lbcl_jax.data.task_data`) and the loop's settings
(`lbcl_jax.settings`). Then, for every stage the method asks for (one per task; one for all
tasks for MTL), over the loop's state (`loop_state.LoopState`, one value):
  1. the stage's trainable: a new adapter, fresh or as the method initialises it (LB-CL
     injects old triplets, scored on seed samples of the new task), or the base itself
     (SeqFT), with its optimizer: AdamW after the method's gradient transform (LB-CL's
     projection) (`stage.Stage.begin`);
  2. training with `make_train_step` (the backbone's loss, plus the method's regulariser)
     (`train_stage`);
  3. the trained tree folded in and the method's state updated (`stage.Stage.end`);
  4. evaluation of every task seen so far with all adapters merged (no task id), filling the
     accuracy matrix;
  5. a checkpoint.
Everything a run needs to continue is checkpointed, and every random draw is a pure function of
(seed, stage, step), so a resumed run ends with the same results as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from lbcl_jax import adapters as adapters_lib
from lbcl_jax import backbones
from lbcl_jax import checkpointing
from lbcl_jax import config_lib
from lbcl_jax import distributed
from lbcl_jax import evaluation
from lbcl_jax import methods as methods_lib
from lbcl_jax import metric_writer
from lbcl_jax import results as results_lib
from lbcl_jax import settings as settings_lib
from lbcl_jax import sharding
from lbcl_jax import stage as stage_lib
from lbcl_jax import tasks as tasks_lib
from lbcl_jax import timings as timings_lib
from lbcl_jax.data import task_data
from lbcl_jax.errors import Diverged, InputError, Preempted
from lbcl_jax.loop_state import LoopState, Progress
from lbcl_jax.timings import Timings


# ----------------------------------------------------------------------------------------------
# The train step: one, used by the driver, the tests and the benchmarks.


def make_train_step(backbone: Any, method: methods_lib.Method,
                    optimizer: optax.GradientTransformation, *, scaling: float = 1.0,
                    dropout: float = 0.0, apply_mode: str = "lowrank",
                    mesh: Optional[jax.sharding.Mesh] = None, trainable_shardings: Any = None,
                    opt_shardings: Any = None) -> Callable:
  """The jitted `step(trainable, opt_state, base_eff, old, batch, rng) -> (trainable,
  opt_state, loss)`.

  `trainable` is what the method's `trainable` says trains (the new adapter, or the base
  params for a method that trains the base); `base_eff` the base with every old adapter merged
  in; `old` the stacked old adapters ({} before the first), which only the method's regulariser
  reads. An adapter joins the model as low-rank products through `nn.intercept_methods`
  ("lowrank") or materialised kernels ("merged"). The step takes a seventh argument,
  `method_state` (the method's `end_stage` state, None by default), which the regulariser
  reads. `trainable` and `opt_state` are donated.

  Args:
    backbone: anything with `loss(params, batch, rng) -> scalar` (a `Backbone`).
    method: the method (its `trainable` and `regularizer`).
    optimizer: the stage's optimizer (`methods.build_optimizer`).
    scaling: the adapters' output multiplier.
    dropout: dropout on the new adapter's input ("lowrank" only), drawn from the step's rng.
    apply_mode: "lowrank" or "merged".
    mesh: with the shardings, pins the outputs' layout (the loss is replicated).
    trainable_shardings, opt_shardings: the outputs' shardings (None: jit's choice).
  """

  def loss_fn(trainable, base_eff, old, batch, rng, method_state):
    params, stack = method.trainable.model(trainable, base_eff)
    if stack is None:
      loss = backbone.loss(params, batch, rng)
    elif apply_mode == "merged":
      loss = backbone.loss(adapters_lib.merge(params, stack, scaling), batch, rng)
    else:
      drop_rng = jax.random.fold_in(rng, 0xAD) if dropout else None
      with adapters_lib.intercept(stack, scaling, dropout=dropout, rng=drop_rng):
        loss = backbone.loss(params, batch, rng)
    penalty = method.regularizer(trainable, old or None, method_state)
    return loss if penalty is None else loss + penalty

  def step(trainable, opt_state, base_eff, old, batch, rng, method_state=None):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, base_eff, old, batch, rng,
                                              method_state)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return trainable, opt_state, loss

  out_shardings = None
  if dropout and apply_mode == "merged":
    raise ValueError("adapter dropout needs apply_mode='lowrank'")
  if trainable_shardings is not None:
    out_shardings = (trainable_shardings, opt_shardings, sharding.replicated(mesh))
  return jax.jit(step, donate_argnums=(0, 1), out_shardings=out_shardings)


def apply_train_step(step_fn: Callable, state: LoopState, batch: Any, rng: jax.Array,
                     old: Any = None) -> tuple[LoopState, jax.Array]:
  """One step of `make_train_step`'s `step_fn` on the loop's state: (the state after it, the
  step's loss). `old`: the old stack as the step sees it (default `state.old`; the driver's is
  padded to the run's capacity, `Stage.padded`)."""
  old = state.old if old is None else old
  trainable, opt_state, loss = step_fn(state.trainable, state.opt_state, state.base_eff,
                                       old or {}, batch, rng, state.method_state)
  return state.replace(trainable=trainable, opt_state=opt_state), loss


# ----------------------------------------------------------------------------------------------
# The run.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the task sequence of `config` in `workdir`; returns results.json's dict."""
  config_lib.validate(config)
  distributed.check_same_everywhere(
      json.dumps(checkpointing.config_to_dict(config), sort_keys=True), "the run config")
  workdir = os.fspath(workdir)
  # Before the model loads, so that its buffers, too, are served under the policy.
  malloc = timings_lib.set_malloc_policy(config.process.malloc,
                                         config.process.mmap_threshold_bytes)
  timings = Timings()
  config, stage, tasks, key = build_stage(config, timings)

  os.makedirs(workdir, exist_ok=True)
  lock = checkpointing.WorkdirLock(workdir).acquire() if jax.process_index() == 0 else None
  try:
    with _StopOnSigterm() as stop:
      return _run(config, workdir, stage, tasks, key, timings, stop, malloc)
  finally:
    if lock is not None:
      lock.release()


def build_stage(config: ml_collections.ConfigDict, timings: Optional[Timings] = None
                ) -> tuple[ml_collections.ConfigDict, stage_lib.Stage, list[str], jax.Array]:
  """Everything a run's stages use, built (and so checked against the config) before any
  work: (the config, with the family a decoder checkpoint runs as; the `Stage`; the run's
  tasks; the run's key)."""
  timings = timings or Timings()
  # Everything is built, and so checked against the config, before the workdir is touched.
  method = methods_lib.get_method(config.method, settings_lib.method_settings(config))
  loop = settings_lib.LoopConfig.from_config(config, method)
  mesh = sharding.make_mesh(config.mesh)
  settings_lib.check_batch_sizes(loop, mesh)
  tasks = tasks_lib.run_tasks(config.order, config.num_tasks)
  key = jax.random.key(config.seed)
  with timings.phase("model_load"):
    backbone = backbones.build(backbones.BackboneConfig.from_config(config))
    if backbone.model_type != config.model.family:
      # The checkpoint's own family runs (`backbones.build`: same interface); the run's
      # records, and an export or resume of it, name that family.
      config = config.copy_and_resolve_references()
      config.model.family = backbone.model_type
    rules = tuple(config.mesh.logical_axis_rules)
    with sharding.on_mesh(mesh, rules):
      base = stage_lib.place_base(backbone, method, loop, key, mesh, rules)
    method = method.resolve(backbone, base.paths)
  with timings.phase("data"):
    data = task_data.load_task_data(task_data.DataConfig.from_config(config), tasks,
                                    backbone.encode)
  stage = stage_lib.Stage(backbone=backbone, method=method, base=base, data=data, loop=loop,
                          optimizer_settings=settings_lib.optimizer_settings(config),
                          kept=stage_lib.Kept())
  return config, stage, tasks, key


@dataclasses.dataclass
class Outputs:
  """Where a run writes while it trains: checkpoints, metrics, timings; and its stop flag."""

  ckpt: checkpointing.RunCheckpointer
  writer: metric_writer.MetricWriter
  timings: Timings
  stop: Any = None  # asks for a checkpoint and an exit at the next step (`_StopOnSigterm`)

  def close(self) -> None:
    """Before a run stops early (diverged, preempted)."""
    self.ckpt.close()
    self.writer.flush()
    self.writer.close()


def _run(config: ml_collections.ConfigDict, workdir: str, stage: stage_lib.Stage, tasks: list,
         key: jax.Array, timings: Timings, stop: "_StopOnSigterm", malloc: str = "glibc"
         ) -> dict[str, Any]:
  """The stage loop of `train_and_evaluate`, in a locked workdir (`malloc`: the C heap's
  policy in force in this process, `timings.set_malloc_policy`'s answer)."""
  checkpointing.check_workdir_config(workdir, config)
  writer = metric_writer.MetricWriter(workdir, just_logging=jax.process_index() > 0)
  writer.write_hparams(_flat_hparams(config))
  loop, base, backbone = stage.loop, stage.base, stage.backbone
  out = Outputs(ckpt=checkpointing.RunCheckpointer(os.path.join(workdir, "checkpoints"),
                                                   loop.checkpoint_max_to_keep),
                writer=writer, timings=timings, stop=stop)

  stages = stage.method.stages(tasks)
  joint = any(len(s) > 1 for s in stages)
  # The stack after the last stage is the largest: programs over the old stack (sensitivity
  # pass, injection, merge) compile once, for it (`Stage.padded`).
  stage.old_capacity = stage.method.trainable.num_old(len(stages))
  state = LoopState(progress=Progress(stages=[", ".join(s) for s in stages]), key=key,
                    params=base.params)

  predict = stage.kept.get("predict", lambda: jax.jit(backbone.predict))
  # On the mesh with the logical axis rules: the models' activation constraints take effect
  # in every program traced below (train step, sensitivity pass, merge, evaluation).
  with sharding.on_mesh(base.mesh, base.rules):
    with timings.phase("stage_setup"):
      resumed = _resume(out.ckpt, stage, stages, key, workdir)
    if resumed is not None:
      state = resumed
    while state.progress.stage < len(stages):
      progress = state.progress
      names = stages[progress.stage]
      label = progress.stages[progress.stage]
      # The stage's peak RSS (a resumed stage's: from where this invocation picked it up).
      timings_lib.reset_peak_rss()
      with timings.phase("stage_setup"):
        if state.trainable is None:  # not resumed mid-stage
          t0, c0 = time.time(), timings_lib.compile_seconds()
          state = stage.begin(state, names)
          progress.stage_costs[label] = {
              "old_tasks": sum(len(s) for s in stages[:progress.stage]),
              "begin_seconds": round(time.time() - t0, 3),
              # The part of them JAX spent compiling (programs whose shapes changed).
              "begin_compile_seconds": round(timings_lib.compile_seconds() - c0, 3),
              "trainable_bytes": _nbytes(state.trainable),
              "train_seconds": -progress.train_seconds}
        if state.base_eff is None:
          # The base with every old adapter merged in (or the base alone, for a trainable that
          # carries the old adapter on): what the stage's forward pass starts from. Evaluation
          # computes the former at the end of a stage; a resumed run afresh.
          under = state.old if stage.method.trainable.merges_old else None
          state = state.replace(base_eff=stage.merge(state.params, under))

      with timings.phase("train"):
        c0 = timings_lib.compile_seconds()
        try:
          state = train_stage(stage, state, names, label, out)
          _check_collapse(config, backbone, progress, names, label)
        except (Diverged, Preempted):
          out.close()
          raise
      _add_seconds(progress.stage_costs.setdefault(label, {}), "train_compile_seconds",
                   timings_lib.compile_seconds() - c0)
      # Freed before the merge below.
      state = state.replace(opt_state=None, base_eff=None)

      # Evaluate every task seen so far with all adapters folded in (no task id).
      with timings.phase("eval"):
        t0, c0 = time.time(), timings_lib.compile_seconds()
        state = stage.end(state, names)
        jax.block_until_ready(state.method_state)
        costs = progress.stage_costs.setdefault(label, {})
        costs.update(end_seconds=round(time.time() - t0, 3),
                     method_state_bytes=_nbytes(state.method_state),
                     # (set to minus the total when the stage began)
                     train_seconds=round(costs.get("train_seconds", 0.0)
                                         + progress.train_seconds, 3))
        t0 = time.time()
        eval_params = stage.merge(state.params, state.old)
        trained = [n for s in stages[:progress.stage + 1] for n in s]
        evaluated = evaluated_tasks(loop.eval_matrix, stages, progress.stage)
        rows = {}
        for space in (loop.label_space, *loop.extra_label_spaces):
          # "seen": every label of the tasks trained so far; no task identity reaches the model.
          labels = evaluation.label_space(space, trained)
          rows[space] = row = [None] * len(tasks)
          for name in evaluated:
            row[tasks.index(name)] = float(evaluation.evaluate(
                backbone, predict, eval_params, stage.data[name].split(loop.eval_split), name,
                batch_size=loop.eval_batch_size, mesh=base.mesh, labels=labels))
        row = rows[loop.label_space]
        if stage.method.trainable.merges_old:  # the next stage trains on it
          state = state.replace(base_eff=eval_params)
        del eval_params
        costs.update(eval_seconds=round(time.time() - t0, 3), evaluated_tasks=len(evaluated),
                     # The stage's end and evaluation: what JAX spent compiling in them.
                     end_eval_compile_seconds=round(timings_lib.compile_seconds() - c0, 3))
      progress.accuracy_matrix.append(row)
      for space in loop.extra_label_spaces:
        progress.label_space_matrices.setdefault(space, []).append(rows[space])
      seen = {n: row[tasks.index(n)] for n in trained if row[tasks.index(n)] is not None}
      logging.info("Accuracy after %s: %s", label, seen)
      writer.write_scalars(progress.global_step, {f"accuracy/{n}": v for n, v in seen.items()})

      progress.stage += 1
      progress.step = 0
      progress.phase = "stage_start"
      with timings.phase("checkpoint"):
        t0 = time.time()
        stage.save(out.ckpt, state)
        # Measured after the save, so the stage's checkpoint holds its mid-stage saves' time
        # and peak RSS so far; the next stage's checkpoint (and results.json) the whole.
        _add_seconds(costs, "checkpoint_seconds", time.time() - t0)
        costs["peak_rss_bytes"] = max(costs.get("peak_rss_bytes", 0),
                                      timings_lib.peak_rss_bytes())
      if progress.stage < len(stages) and stop.requested(progress.global_step):
        out.close()
        raise Preempted(f"stopped on SIGTERM at the end of stage {label} (global step "
                        f"{progress.global_step}), checkpointed in {workdir}; run the same "
                        "command again to resume")

  out.ckpt.close()
  progress = state.progress
  with timings.phase("results"):
    doc = results_lib.results_document(
        method=config.method, tasks=tasks, stages=progress.stages,
        matrix=progress.accuracy_matrix, joint=joint,
        global_steps=progress.global_step, train_seconds=progress.train_seconds,
        sensitivity=progress.sensitivity, losses=progress.losses, warnings=progress.warnings,
        stage_costs=progress.stage_costs, eval_matrix=loop.eval_matrix,
        skipped_rows=skipped_rows(stage.data),
        eval_split=loop.eval_split, label_space=loop.label_space,
        label_spaces=results_lib.label_space_summaries(
            progress.label_space_matrices, joint=joint),
        config=checkpointing.config_to_dict(config))
    # This invocation's wall seconds by phase (a resumed run counts only its own part).
    # And the C heap's policy its process ran with ("glibc" where none could be set).
    # And the accelerator it ran on, which a benchmark record names beside the host's CPU.
    late = lambda: {"timings": timings.as_dict(), "malloc_policy": malloc,
                    "huge_pages": timings_lib.huge_pages_in_force(),
                    "devices": {"platform": jax.default_backend(),
                                "kind": jax.devices()[0].device_kind,
                                "count": jax.device_count()}}
    if jax.process_index() == 0:
      if config.export.final:
        # The merged model of the last stage as a Hugging Face checkpoint directory.
        from lbcl_jax import export  # pylint: disable=g-import-not-at-top
        export.export_run(workdir, os.path.join(workdir, "export"), overwrite=True)
      doc = results_lib.write_results(workdir, doc, plots=loop.plots, late_fields=late)
    writer.flush()
    writer.close()
  return {**doc, **late()}


# ----------------------------------------------------------------------------------------------
# One stage's training.


def train_stage(stage: stage_lib.Stage, state: LoopState, names: list[str], label: str,
                out: Outputs) -> LoopState:
  """Trains the stage's trainable tree from `state.progress.step` on; returns the state after
  the stage's last step. `state.base_eff` is what the forward pass starts from: the base with
  every old adapter merged in (or the base)."""
  loop, mesh, progress, stage_key = stage.loop, stage.base.mesh, state.progress, state.stage_key
  stream = stage.method.batches(
      stage.data, names, loop.micro_batch_size,
      int(jax.random.randint(jax.random.fold_in(stage_key, 2), (), 0, 2**31 - 1)),
      loop.train_padding, state.method_state)
  num_steps = stream.num_steps_per_epoch * loop.num_epochs * loop.grad_accum_steps
  if loop.max_steps_per_task:
    # Per task: a joint stage (MTL) of n tasks gets the budget of n sequential stages.
    num_steps = min(num_steps, loop.max_steps_per_task * len(names))
  tsh = jax.tree.map(lambda x: x.sharding, state.trainable)
  osh = jax.tree.map(lambda x: x.sharding, state.opt_state)
  adapter = stage.base.adapter_config  # the scaling, dropout and apply mode of the adapters
  # Kept for the optimizer's `update`, the one thing of it the step calls: stages that share it
  # (`Stage.optimizer`) share the compiled step.
  step_fn = stage.kept.get("step", lambda: make_train_step(
      stage.backbone, stage.method, state.optimizer,
      scaling=adapter.scaling if adapter else 1.0, dropout=adapter.dropout if adapter else 0.0,
      apply_mode=adapter.apply_mode if adapter else "lowrank", mesh=mesh,
      trainable_shardings=tsh, opt_shardings=osh), depends_on=state.optimizer.update)
  # The regulariser sees the old stack padded to the run's capacity: one shape a run.
  old = stage.padded(state.old)
  train_key = jax.random.fold_in(stage_key, 3)
  curve = progress.losses.setdefault(label, [])
  start = progress.step
  bar = tqdm.tqdm(total=num_steps, initial=start, desc=f"train {label}", unit="step",
                  disable=jax.process_index() != 0, dynamic_ncols=True)
  replicated = stage.backbone.replicated_keys
  # The first non-finite loss of the stage and its step, tracked on device (no host sync
  # per step) and read whenever the host looks anyway: at logging and before a checkpoint.
  watch = stage.kept.get("watch", lambda: jax.jit(_watch_loss))
  first_bad = (jnp.int32(-1), jnp.float32(0.0))

  def check_finite():
    bad_step = int(first_bad[0])
    if bad_step >= 0:
      bar.close()
      raise Diverged(f"the training loss of task {label} became {float(first_bad[1])} at "
                     f"step {bad_step} of the stage; the run stopped without results (the "
                     "checkpoints written before are kept). Lower "
                     "--config.optim.learning_rate or clip gradients "
                     "(--config.optim.grad_clip=1.0)")

  costs = progress.stage_costs.setdefault(label, {})
  t0, window_t, window_n = time.time(), time.time(), 0
  # The steady-state step time: from the end of this invocation's first step (which compiles)
  # to the end of its last, less the checkpoints in between.
  steady_t0, saving, faults0 = None, 0.0, 0
  for step in range(start, num_steps):
    host_batch = stream.batch(step)
    if step == start:
      # The padded shape its steps run at: a stage's step time depends on it, not only on K.
      costs["batch_shape"] = [int(d) for d in np.shape(host_batch["input_ids"])]
    batch = sharding.global_batch(host_batch, mesh, replicated_keys=replicated)
    state, loss = apply_train_step(step_fn, state, batch, jax.random.fold_in(train_key, step),
                                   old=old)
    first_bad = watch(first_bad, loss, step + 1)
    if steady_t0 is None:
      jax.block_until_ready(loss)
      # What compiling the step freed goes back; the steps after it reuse their own pages.
      timings_lib.release_free_heap()
      steady_t0, faults0 = time.time(), timings_lib.minor_faults()
    progress.step = step + 1
    progress.global_step += 1
    window_n += 1
    bar.update(1)
    last = step + 1 == num_steps
    if progress.step % loop.log_every_steps == 0 or last:
      check_finite()
      loss_v = float(loss)
      rate = window_n / max(time.time() - window_t, 1e-9)
      window_t, window_n = time.time(), 0
      curve.append([progress.global_step, loss_v])
      bar.set_postfix(loss=f"{loss_v:.4f}", steps_per_s=f"{rate:.2f}")
      out.writer.write_scalars(progress.global_step,
                               {f"train_loss/{label}": loss_v, "steps_per_second": rate})
    stopping = out.stop is not None and not last and out.stop.requested(progress.global_step)
    if (loop.checkpoint_every_steps and progress.step % loop.checkpoint_every_steps == 0
        and not last) or stopping:
      check_finite()  # never checkpoint a diverged state
      progress.train_seconds += time.time() - t0
      t0 = time.time()
      with out.timings.phase("checkpoint"):
        stage.save(out.ckpt, state)
      saved = time.time() - t0
      saving += saved
      _add_seconds(costs, "checkpoint_seconds", saved)
      t0 = time.time()
    if stopping:
      bar.close()
      raise Preempted(f"stopped on SIGTERM at global step {progress.global_step} (task "
                      f"{label}), checkpointed; run the same command again to resume")
    if loop.kill_at_step >= 0 and progress.global_step == loop.kill_at_step:
      logging.warning("debug.kill_at_step=%d: killing this process with SIGKILL",
                      loop.kill_at_step)
      os.kill(os.getpid(), signal.SIGKILL)
  bar.close()
  check_finite()
  progress.train_seconds += time.time() - t0
  if steady_t0 is not None and num_steps - start > 1:
    jax.block_until_ready(state.trainable)
    costs["step_seconds"] = round((time.time() - steady_t0 - saving)
                                  / (num_steps - start - 1), 4)
    # Pages first touched a steady step: near 0 when its buffers are the last step's.
    costs["step_minor_faults"] = round((timings_lib.minor_faults() - faults0)
                                       / (num_steps - start - 1))
  return state


def evaluated_tasks(matrix: str, stages: Sequence[Sequence[str]], index: int) -> list[str]:
  """The tasks evaluated after stage `index`: every task trained so far ("full"), or, with
  "diagonal_final", the stage's own tasks and, after the last stage, every task."""
  trained = [n for s in stages[:index + 1] for n in s]
  if matrix == "full" or index == len(stages) - 1:
    return trained
  return list(stages[index])


def skipped_rows(data: Mapping[str, task_data.TaskData]) -> dict[str, dict[str, int]]:
  """{task: {split: rows}} of the rows the data loader skipped (`data.invalid_rows="skip"`)."""
  out = {}
  for name, task in data.items():
    counts = {k: int(v) for k, v in task.skipped_rows.items() if v}
    if counts:
      out[name] = counts
  return out


def _add_seconds(costs: dict, key: str, seconds: float) -> None:
  """Adds `seconds` to a stage's cost `key` (a stage may save several checkpoints)."""
  costs[key] = round(costs.get(key, 0.0) + seconds, 3)


def _nbytes(tree: Any) -> int:
  """Bytes of a pytree's arrays (0 for None)."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _watch_loss(first_bad, loss, step):
  """(step, loss) of the first non-finite loss so far ((-1, 0) while there is none)."""
  bad_step, bad_value = first_bad
  hit = (bad_step < 0) & ~jnp.isfinite(loss)
  return (jnp.where(hit, jnp.int32(step), bad_step),
          jnp.where(hit, loss.astype(jnp.float32), bad_value))


# ----------------------------------------------------------------------------------------------
# Preemption and resumption.


class _StopOnSigterm:
  """SIGTERM (a preemptible VM or spot GPU about to be taken) asks the run to stop at the
  next step boundary, after a checkpoint. On several hosts every process must stop at the same
  step: JAX's preemption sync point (`jax.distributed` registers its own SIGTERM notifier)
  decides; on one, the handler's flag does."""

  def __init__(self):
    self._flag = False
    self._previous = None

  def __enter__(self) -> "_StopOnSigterm":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    logging.warning("SIGTERM: stopping at the next step boundary, after a checkpoint")
    self._flag = True

  def requested(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # no preemption service (distributed runtime without it)
        return self._flag
    return self._flag


def _resume(ckpt: checkpointing.RunCheckpointer, stage: stage_lib.Stage, stages: list,
            key: jax.Array, workdir: str) -> Optional[LoopState]:
  """The loop's state from the newest intact checkpoint, or None for a fresh run.

  A checkpoint that fails to restore is named in one line and moved aside, and the next older
  one is tried (the run keeps the newest stage boundary besides the newest checkpoints)."""
  steps = ckpt.all_steps()
  for step in reversed(steps):
    try:
      progress = Progress.from_json(ckpt.restore_progress(step))
      logging.info("Resuming %s from checkpoint %d: stage %d, step %d, phase %s", workdir,
                   step, progress.stage, progress.step, progress.phase)
      if progress.stage >= len(stages):
        return LoopState(progress=progress, key=key, params=stage.base.params)
      return stage.restore(ckpt, step, progress, key, stages)
    except checkpointing.CheckpointRestoreError as e:
      moved = ckpt.quarantine(step)
      print(f"warning: checkpoint {e.directory} could not be restored ({e.reason}); moved it "
            f"to {moved}, trying an older checkpoint",
            file=sys.stderr, flush=True)
  if steps:
    raise InputError(f"no checkpoint in {workdir}/checkpoints could be restored (tried "
                     f"{', '.join(map(str, reversed(steps)))}); delete the workdir to start "
                     "afresh")
  return None


# The collapse check (`loss_collapse`): a logged loss this close to ln n (relative) is a
# uniform guess (a collapsed model's is exact to ~1e-6; healthy ones stayed >= 2e-3 away), and
# a rise this many times over the first logged loss or the uniform guess is a divergence.
COLLAPSE_UNIFORM_RTOL = 1e-4
COLLAPSE_RISE = 100.0


def loss_collapse(curve: list, guesses: list, stage_offset: int = 0) -> Optional[str]:
  """What a stage's logged training losses say went wrong, or None for a healthy curve.

  A collapse is either
    * the second half of the logged losses all at a uniform guess, ln n (within
      `COLLAPSE_UNIFORM_RTOL`): the model's output no longer depends on its input (it stayed
      there from the start, or fell to it); or
    * their median over `COLLAPSE_RISE` times the smaller of the first logged loss and ln n,
      and above ln n: the loss rose by orders of magnitude without becoming NaN.
  The check reads only the losses the loop logged anyway (no device sync).

  Args:
    curve: [[global step, loss], ...] as logged in the stage.
    guesses: the (n, what n counts) of each of the stage's tasks (`Backbone.uniform_guess`).
    stage_offset: the global step before the stage's first step (to name steps of the stage).

  Returns:
    A clause to follow "its loss" (the task's training loss), or None.
  """
  points = [(int(s) - stage_offset, float(l)) for s, l in curve
            if l is not None and np.isfinite(l)]
  if not points:
    return None
  losses = [l for _, l in points]
  tail = losses[len(losses) // 2:]
  uniform = {float(np.log(n)): (n, what) for n, what in guesses if n > 1}

  def at_uniform(loss):
    return next((u for u in uniform
                 if abs(loss - u) <= COLLAPSE_UNIFORM_RTOL * max(1.0, u)), None)

  if uniform and all(at_uniform(l) is not None for l in tail):
    first = len(losses)
    while first and at_uniform(losses[first - 1]) is not None:
      first -= 1
    n, what = uniform[at_uniform(losses[-1])]
    return (f"stayed at {losses[-1]:.4f} = ln {n}, a uniform guess over {n} {what}, from step "
            f"{points[first][0]} of the stage on")
  references = [x for x in (losses[0], *uniform) if x > 0]
  median = float(np.median(tail))
  if references and median > COLLAPSE_RISE * min(references) and median > max(uniform,
                                                                             default=0.0):
    if min(references) == losses[0]:
      than = f"its first logged value, {losses[0]:.4g} at step {points[0][0]}"
    else:
      n, what = uniform[min(references)]
      than = f"ln {n} = {np.log(n):.4f}, a uniform guess over {n} {what}"
    return (f"rose to {median:.4g} (the median of its last {len(tail)} logged values), over "
            f"{COLLAPSE_RISE:g} times {than}")
  return None


def _check_collapse(config: ml_collections.ConfigDict, backbone: backbones.Backbone,
                    progress: Progress, names: list, label: str) -> None:
  """After a stage's training: a collapsed loss (`loss_collapse`) is a `warning:` line and an
  entry of `progress.warnings`, or, with config.optim.stop_on_collapse, `Diverged`."""
  guesses = [backbone.uniform_guess(tasks_lib.get_task(n)) for n in names]
  reason = loss_collapse(progress.losses.get(label, []), [g for g in guesses if g],
                         progress.global_step - progress.step)
  if reason is None:
    return
  what = (f"training of task {label} collapsed: its loss {reason}, so the accuracies after it "
          "are chance-level")
  remedy = (f"the learning rate ({config.optim.learning_rate:g}) is likely too high: lower "
            "--config.optim.learning_rate or clip gradients (--config.optim.grad_clip=1.0)")
  if config.optim.stop_on_collapse:
    raise Diverged(f"{what}; the run stopped without results (config.optim.stop_on_collapse; "
                   f"the checkpoints written before are kept); {remedy}")
  message = f"{what}; {remedy}; --config.optim.stop_on_collapse=True stops such a run (exit 3)"
  if message not in progress.warnings:
    progress.warnings.append(message)
  if jax.process_index() == 0:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  flat = flax.traverse_util.flatten_dict(checkpointing.config_to_dict(config), sep=".")
  return {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in flat.items()}
