"""The continual-learning driver: `train_and_evaluate(config, workdir)`.

The run config is turned once into typed pieces: a backbone (`lbcl_jax.backbones`), a method
(`lbcl_jax.methods`), the data (`lbcl_jax.data.task_data`) and the loop's settings. Then, for
every stage the method asks for (one per task; one for all tasks for MTL):
  1. the new adapter: fresh, or as the method initialises it (LB-CL injects old triplets,
     scored on seed samples of the new task);
  2. the optimizer: AdamW after the method's gradient transform (LB-CL's projection);
  3. training with `make_train_step` (the backbone's loss, plus the method's regulariser);
  4. evaluation of every task seen so far with all adapters merged (no task id), filling the
     accuracy matrix;
  5. a checkpoint.
Everything a run needs to continue is checkpointed, and every random draw is a pure function of
(seed, stage, step), so a resumed run ends with the same results as an uninterrupted one.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional

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
from lbcl_jax import injection
from lbcl_jax import methods as methods_lib
from lbcl_jax import metric_writer
from lbcl_jax import results as results_lib
from lbcl_jax import sensitivity
from lbcl_jax import sharding
from lbcl_jax import tasks as tasks_lib
from lbcl_jax.data import pipeline
from lbcl_jax.data import task_data
from lbcl_jax.errors import Diverged, InputError, Preempted


class Timings:
  """Wall seconds of this invocation per phase, and how much of them JAX spent compiling.

  A phase entered inside another pauses the outer one, so the phases add up to the time spent
  inside them. `compile` (tracing, lowering and XLA compilation, from JAX's own monitoring
  events) overlaps the phases it happened in.
  """

  _compile_seconds = 0.0
  _listening = False

  def __init__(self):
    self.seconds: dict[str, float] = collections.defaultdict(float)
    if not Timings._listening:
      # One process-wide listener (JAX cannot scope one to a run); runs read deltas of it.
      jax.monitoring.register_event_duration_secs_listener(Timings._on_event)
      Timings._listening = True
    self._compile_start = Timings._compile_seconds
    self._stack: list[list] = []  # [name, start] of the open phases, innermost last

  @staticmethod
  def _on_event(name: str, seconds: float, **_) -> None:
    if name.startswith("/jax/core/compile/"):
      Timings._compile_seconds += seconds

  @contextlib.contextmanager
  def phase(self, name: str):
    now = time.perf_counter()
    if self._stack:
      outer = self._stack[-1]
      self.seconds[outer[0]] += now - outer[1]
    self._stack.append([name, now])
    try:
      yield
    finally:
      now = time.perf_counter()
      self.seconds[name] += now - self._stack.pop()[1]
      if self._stack:
        self._stack[-1][1] = now

  def as_dict(self) -> dict[str, float]:
    """Seconds per phase so far, the open phases up to now included."""
    seconds = dict(self.seconds)
    now = time.perf_counter()
    for name, start in self._stack:
      seconds[name] = seconds.get(name, 0.0) + now - start
    out = {k: round(v, 3) for k, v in seconds.items()}
    out["compile"] = round(Timings._compile_seconds - self._compile_start, 3)
    return out




@dataclasses.dataclass
class Progress:
  """Where a run is: checkpointed as JSON with the arrays, so a resumed run carries on.

  Attributes:
    stage: the stage being trained (or about to start).
    step: the step within the stage.
    global_step: steps over the whole run.
    phase: "stage_start" (the stage's adapter and optimizer are still to be made) or "train".
    accuracy_matrix: one row per finished stage, in the run's label space.
    label_space_matrices: the same in each further label space measured (`eval.extra_label_spaces`).
    losses: stage name -> [[global step, loss], ...] at the logging interval.
    sensitivity: stage name -> {layer: [K][r] scores of the old triplets}, for methods that
      score them.
    train_seconds: seconds spent in training steps, over every invocation.
    warnings: what the run found wrong but did not stop for (a collapsed task's loss), as
      printed in its `warning:` lines.
    stages: the stage names.
    rng_key: the run's PRNG key data (checked on resume).
  """

  stage: int = 0
  step: int = 0
  global_step: int = 0
  phase: str = "stage_start"
  accuracy_matrix: list = dataclasses.field(default_factory=list)
  label_space_matrices: dict = dataclasses.field(default_factory=dict)
  losses: dict = dataclasses.field(default_factory=dict)
  sensitivity: dict = dataclasses.field(default_factory=dict)
  warnings: list = dataclasses.field(default_factory=list)
  train_seconds: float = 0.0
  stages: list = dataclasses.field(default_factory=list)
  rng_key: list = dataclasses.field(default_factory=list)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "Progress":
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """The driver's own fields of the run config, typed once."""

  seed: int
  global_batch_size: int
  grad_accum_steps: int
  num_epochs: int
  max_steps_per_task: int
  eval_batch_size: int
  train_padding: str
  log_every_steps: int
  checkpoint_every_steps: int
  checkpoint_max_to_keep: int
  kill_at_step: int
  plots: bool
  sensitivity_layers: Optional[str]
  # Per-sample gradients this many at a time in the sensitivity pass; 0 = a micro-batch.
  injection_chunk_size: int
  adapter_targets: str
  adapter_rank: int
  adapter_scaling: float
  adapter_dropout: float
  apply_mode: str
  eval_split: str
  label_space: str
  extra_label_spaces: tuple

  @property
  def micro_batch_size(self) -> int:
    """Examples per forward/backward pass: the global batch over the accumulation steps."""
    return max(1, self.global_batch_size // self.grad_accum_steps)

  @property
  def sensitivity_chunk_size(self) -> int:
    """Seed samples per vmapped gradient call: by default a micro-batch, so that scoring never
    needs more activation memory than a train step."""
    return self.injection_chunk_size or self.micro_batch_size

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  method: methods_lib.Method) -> "LoopConfig":
    """The loop's fields; the adapters' scaling and dropout default to `method`'s."""
    a = config.adapters
    scaling = method.scaling(a.rank) if a.scaling is None else float(a.scaling)
    dropout = method.adapter_dropout if a.dropout is None else float(a.dropout)
    apply_mode = a.apply_mode or adapters_lib.AdapterConfig.apply_mode
    if dropout and apply_mode == "merged" and not method.trains_base:
      raise InputError(f"config.adapters.dropout={dropout} needs apply_mode 'lowrank' (dropout "
                       "acts on the adapter's input, which merged kernels do not have); set "
                       "--config.adapters.apply_mode=lowrank or --config.adapters.dropout=0")
    return cls(
        seed=config.seed, global_batch_size=config.optim.global_batch_size,
        grad_accum_steps=config.optim.grad_accum_steps, num_epochs=config.optim.num_epochs,
        max_steps_per_task=config.optim.max_steps_per_task,
        eval_batch_size=config.eval.batch_size, train_padding=config.data.train_padding,
        log_every_steps=config.log_every_steps,
        checkpoint_every_steps=config.checkpoint.every_steps,
        checkpoint_max_to_keep=config.checkpoint.max_to_keep,
        kill_at_step=config.debug.kill_at_step, plots=config.plots,
        sensitivity_layers=config.injection.sensitivity_layers or None,
        injection_chunk_size=config.injection.chunk_size,
        adapter_targets=config.adapters.targets, adapter_rank=config.adapters.rank,
        adapter_scaling=scaling, adapter_dropout=dropout, apply_mode=apply_mode,
        eval_split=config.eval.split, label_space=config.eval.label_space,
        extra_label_spaces=config_lib.extra_label_spaces(config))


def method_settings(config: ml_collections.ConfigDict) -> methods_lib.MethodSettings:
  """The method-related fields of a run config."""
  return methods_lib.MethodSettings(
      inject_sigma=config.injection.with_sigma,
      inject_layers=injection.parse_layers(config.injection.layers),
      num_seed_samples=config.injection.num_seed_samples,
      score_aggregation=config.injection.aggregation,
      olora_lambda1=config.olora.lambda1, olora_lambda2=config.olora.lambda2,
      projection_rtol=config.projection.rtol, orth_reg_weight=config.adapters.orth_reg_weight)


def optimizer_settings(config: ml_collections.ConfigDict) -> methods_lib.OptimizerSettings:
  """AdamW's fields of a run config (a linear warm-up to the constant rate, when asked)."""
  o = config.optim
  lr = o.learning_rate
  if o.warmup_steps:
    lr = optax.join_schedules(
        [optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps),
         optax.constant_schedule(o.learning_rate)], [o.warmup_steps])
  return methods_lib.OptimizerSettings(
      learning_rate=lr, weight_decay=o.weight_decay, max_grad_norm=o.grad_clip or None,
      transform_after_adam=config.projection.after_adam)


def resolve_injection_layers(method: methods_lib.Method, backbone: backbones.Backbone,
                             paths: list) -> methods_lib.Method:
  """`method` with a depth choice (`injection.TopBlocks`) turned into the layer paths it
  names, by the backbone's block pattern (the method never sees the model)."""
  layers = getattr(method, "inject_layers", None)
  if not isinstance(layers, injection.TopBlocks):
    return method
  chosen = injection.top_block_layers(paths, layers.n, backbone.model_module.BLOCK_PATTERN)
  logging.info("Injection into the top %d blocks: %d layers (%s ...)", layers.n, len(chosen),
               ", ".join(chosen[:4]))
  return dataclasses.replace(method, inject_layers=chosen)


class Kept:
  """Jitted functions kept across stages, so that a shape seen before is never compiled again
  (a fresh `jax.jit` of a fresh closure compiles anew every time)."""

  def __init__(self):
    self._slots: dict[str, tuple[Any, Any]] = {}

  def get(self, name: str, make: Callable[[], Any], depends_on: Any = None) -> Any:
    """`make()`'s result, made again only when `depends_on` is not the object it was made for
    (one slot per name, so what a finished stage needed is not held)."""
    slot = self._slots.get(name)
    if slot is None or slot[0] is not depends_on:
      slot = self._slots[name] = (depends_on, make())
    return slot[1]


@dataclasses.dataclass
class Base:
  """The frozen pre-trained model on the mesh, and the layers adapters attach to.

  Attributes:
    params: the weights, sharded by the logical axis rules.
    shardings: their shardings.
    mesh, rules: the device mesh and the logical axis rules.
    adapter_config: the adapters' targets, rank, scaling, init (None when the base trains).
    paths: the adapted layers' module paths.
    kernel_specs: each adapted layer's kernel's logical spec.
  """

  params: Any
  shardings: Any
  mesh: jax.sharding.Mesh
  rules: tuple
  adapter_config: Optional[adapters_lib.AdapterConfig]
  paths: list
  kernel_specs: dict


def place_base(backbone: backbones.Backbone, method: methods_lib.Method, loop: LoopConfig,
               key: jax.Array, mesh: jax.sharding.Mesh, rules: tuple,
               abstract: bool = False) -> Base:
  """The frozen base, created already sharded: random weights by a jit whose outputs are laid
  out by the sharding rules, loaded weights placed shard by shard. With `abstract`, nothing is
  created: the params are `jax.ShapeDtypeStruct`s with their shardings (for compiling the
  driver's programs ahead of time, benchmarks/scale_plan.py)."""
  init_key = jax.random.fold_in(key, 0x5EED)
  if backbone.params is None:
    shapes = jax.eval_shape(backbone.init_params, init_key)
  else:
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), backbone.params)
  shardings = sharding.logical_to_sharding(backbone.param_specs, shapes, mesh, rules)
  if abstract:
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          shapes, shardings)
  elif backbone.params is None:
    params = jax.jit(backbone.init_params, out_shardings=shardings)(init_key)
  else:
    params = jax.device_put(backbone.params, shardings)
    backbone.params = None  # the host copy is no longer needed
  base = Base(params=params, shardings=shardings, mesh=mesh, rules=rules, adapter_config=None,
              paths=[], kernel_specs={})
  if method.trains_base:
    return base
  base.adapter_config = adapters_lib.AdapterConfig(
      targets=backbone.adapter_targets(loop.adapter_targets), rank=loop.adapter_rank,
      scaling=loop.adapter_scaling, init=method.adapter_init, apply_mode=loop.apply_mode)
  base.paths = adapters_lib.find_targets(params, base.adapter_config.targets)
  # Before any work: the rank must fit every adapted layer.
  adapters_lib.check_rank(params, base.paths, loop.adapter_rank)
  base.kernel_specs = backbone.kernel_specs(base.paths)
  return base


def _check_batch_sizes(loop: LoopConfig, mesh: jax.sharding.Mesh) -> None:
  dp = sharding.data_parallel_size(mesh)
  if loop.global_batch_size % dp:
    raise InputError(
        f"config.optim.global_batch_size={loop.global_batch_size} is not divisible by the "
        f"data-parallel size {dp} (mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']})")
  if loop.global_batch_size % (dp * loop.grad_accum_steps):
    raise InputError("config.optim.global_batch_size must be divisible by data-parallel size x "
                     f"grad_accum_steps ({dp} x {loop.grad_accum_steps})")
  if loop.eval_batch_size % dp:
    raise InputError(f"config.eval.batch_size={loop.eval_batch_size} is not divisible by the "
                     f"data-parallel size {dp}")


# ----------------------------------------------------------------------------------------------
# The train step: one, used by the driver, the tests and the benchmarks.


def make_train_step(backbone: Any, method: methods_lib.Method,
                    optimizer: optax.GradientTransformation, *, scaling: float = 1.0,
                    dropout: float = 0.0, apply_mode: str = "lowrank", mesh: Optional[jax.sharding.Mesh] = None,
                    trainable_shardings: Any = None, opt_shardings: Any = None) -> Callable:
  """The jitted `step(trainable, opt_state, base_eff, old, batch, rng) -> (trainable,
  opt_state, loss)`.

  `trainable` is the new adapter (or the base params, for a method that trains the base);
  `base_eff` the base with every old adapter merged in; `old` the stacked old adapters ({}
  before the first), which only the method's regulariser reads. The adapter joins the model
  as low-rank products through `nn.intercept_methods` ("lowrank") or materialised kernels
  ("merged"). `trainable` and `opt_state` are donated.

  Args:
    backbone: anything with `loss(params, batch, rng) -> scalar` (a `Backbone`).
    method: the method (its `trains_base` and `regularizer`).
    optimizer: the stage's optimizer (`methods.build_optimizer`).
    scaling: the adapters' output multiplier.
    dropout: dropout on the new adapter's input ("lowrank" only), drawn from the step's rng.
    apply_mode: "lowrank" or "merged".
    mesh: with the shardings, pins the outputs' layout (the loss is replicated).
    trainable_shardings, opt_shardings: the outputs' shardings (None: jit's choice).
  """

  def loss_fn(trainable, base_eff, old, batch, rng):
    if method.trains_base:
      loss = backbone.loss(trainable, batch, rng)
    else:
      stack = jax.tree.map(lambda x: x[None], trainable)
      if apply_mode == "merged":
        loss = backbone.loss(adapters_lib.merge(base_eff, stack, scaling), batch, rng)
      else:
        drop_rng = jax.random.fold_in(rng, 0xAD) if dropout else None
        with adapters_lib.intercept(stack, scaling, dropout=dropout, rng=drop_rng):
          loss = backbone.loss(base_eff, batch, rng)
    penalty = method.regularizer(trainable, old or None)
    return loss if penalty is None else loss + penalty

  def step(trainable, opt_state, base_eff, old, batch, rng):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, base_eff, old, batch, rng)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return trainable, opt_state, loss

  out_shardings = None
  if dropout and apply_mode == "merged":
    raise ValueError("adapter dropout needs apply_mode='lowrank'")
  if trainable_shardings is not None:
    out_shardings = (trainable_shardings, opt_shardings, sharding.replicated(mesh))
  return jax.jit(step, donate_argnums=(0, 1), out_shardings=out_shardings)


# ----------------------------------------------------------------------------------------------
# The run.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the task sequence of `config` in `workdir`; returns results.json's dict."""
  config_lib.validate(config)
  distributed.check_same_everywhere(
      json.dumps(checkpointing.config_to_dict(config), sort_keys=True), "the run config")
  workdir = os.fspath(workdir)
  timings = Timings()
  # Everything is built, and so checked against the config, before the workdir is touched.
  method = methods_lib.get_method(config.method, method_settings(config))
  loop = LoopConfig.from_config(config, method)
  mesh = sharding.make_mesh(config.mesh)
  _check_batch_sizes(loop, mesh)
  tasks = tasks_lib.run_tasks(config.order, config.num_tasks)
  key = jax.random.key(config.seed)
  with timings.phase("model_load"):
    backbone = backbones.build(backbones.BackboneConfig.from_config(config))
    rules = tuple(config.mesh.logical_axis_rules)
    with sharding.on_mesh(mesh, rules):
      base = place_base(backbone, method, loop, key, mesh, rules)
    method = resolve_injection_layers(method, backbone, base.paths)
  with timings.phase("data"):
    data = task_data.load_task_data(task_data.DataConfig.from_config(config), tasks,
                                    backbone.encode)
  opt_settings = optimizer_settings(config)

  os.makedirs(workdir, exist_ok=True)
  lock = checkpointing.WorkdirLock(workdir).acquire() if jax.process_index() == 0 else None
  try:
    with _StopOnSigterm() as stop:
      return _run(config, workdir, timings, method, loop, mesh, tasks, key, backbone, base,
                  data, opt_settings, stop)
  finally:
    if lock is not None:
      lock.release()


def _run(config, workdir, timings, method, loop, mesh, tasks, key, backbone, base, data,
         opt_settings, stop) -> dict[str, Any]:
  """The stage loop of `train_and_evaluate`, in a locked workdir."""
  checkpointing.check_workdir_config(workdir, config)
  writer = metric_writer.MetricWriter(workdir, just_logging=jax.process_index() > 0)
  writer.write_hparams(_flat_hparams(config))
  ckpt = checkpointing.RunCheckpointer(os.path.join(workdir, "checkpoints"),
                                       loop.checkpoint_max_to_keep)
  kept = Kept()
  stage = Stage(backbone=backbone, method=method, base=base, data=data, loop=loop,
                optimizer_settings=opt_settings, key=key, kept=kept, stop=stop)

  stages = method.stages(tasks)
  joint = any(len(s) > 1 for s in stages)
  progress = Progress(stages=[", ".join(s) for s in stages])

  def close_outputs():  # before a run stops early (diverged, preempted)
    ckpt.close()
    writer.flush()
    writer.close()

  old = None  # stacked frozen adapters of finished tasks (None before the first)
  params = base.params  # the base model's weights: the pre-trained ones, or SeqFT's latest
  # The base with every old adapter merged in: what the next stage's forward pass starts from.
  # Evaluation computes it at the end of a stage; a resumed run computes it afresh.
  base_eff = None
  resumed = None

  predict = kept.get("predict", lambda: jax.jit(backbone.predict))
  # On the mesh with the logical axis rules: the models' activation constraints take effect
  # in every program traced below (train step, sensitivity pass, merge, evaluation).
  with sharding.on_mesh(mesh, base.rules):
    with timings.phase("stage_setup"):
      resumed = _resume(ckpt, stage, stages, key, workdir)
    if resumed is not None:
      progress, resumed = resumed
    while progress.stage < len(stages):
      names = stages[progress.stage]
      label = progress.stages[progress.stage]
      stage_key = jax.random.fold_in(key, progress.stage)
      with timings.phase("stage_setup"):
        if resumed is not None:
          old, params, trainable, optimizer, opt_state = resumed
          resumed = None
        else:
          trainable, optimizer, opt_state = stage.begin(old, params, stage_key, names, progress)
        if base_eff is None:
          base_eff = stage.merge(params, old)

      with timings.phase("train"):
        try:
          trainable, opt_state = stage.train(ckpt, writer, progress, old, params, base_eff,
                                             trainable, optimizer, opt_state, stage_key, names,
                                             label, timings)
          _check_collapse(config, backbone, progress, names, label)
        except (Diverged, Preempted):
          close_outputs()
          raise
      del opt_state, base_eff

      # Evaluate every task seen so far with all adapters folded in (no task id).
      with timings.phase("eval"):
        if method.trains_base:
          params = trainable
        else:
          old = adapters_lib.append_task({"old": old or {}, "new": trainable})["old"]
          # Laid out as a restored stack is (`abstract_adapter`), whatever the stacking chose.
          old = jax.device_put(old, jax.tree.map(lambda a: a.sharding, abstract_adapter(
              base, stage_key, num_tasks=adapters_lib.num_tasks(old))))
        eval_params = stage.merge(params, old)
        trained = [n for s in stages[:progress.stage + 1] for n in s]
        rows = {}
        for space in (loop.label_space, *loop.extra_label_spaces):
          # "seen": every label of the tasks trained so far; no task identity reaches the model.
          labels = tasks_lib.label_union(trained) if space == "seen" else None
          rows[space] = row = [None] * len(tasks)
          for name in trained:
            row[tasks.index(name)] = float(evaluation.evaluate(
                backbone, predict, eval_params, data[name].split(loop.eval_split), name,
                batch_size=loop.eval_batch_size, mesh=mesh, labels=labels))
        row = rows[loop.label_space]
        base_eff = eval_params
        del eval_params
      progress.accuracy_matrix.append(row)
      for space in loop.extra_label_spaces:
        progress.label_space_matrices.setdefault(space, []).append(rows[space])
      seen = {n: row[tasks.index(n)] for n in trained}
      logging.info("Accuracy after %s: %s", label, seen)
      writer.write_scalars(progress.global_step, {f"accuracy/{n}": v for n, v in seen.items()})

      progress.stage += 1
      progress.step = 0
      progress.phase = "stage_start"
      with timings.phase("checkpoint"):
        stage.save(ckpt, progress, old, params, None, None)
      if progress.stage < len(stages) and stop.requested(progress.global_step):
        close_outputs()
        raise Preempted(f"stopped on SIGTERM at the end of stage {label} (global step "
                        f"{progress.global_step}), checkpointed in {workdir}; run the same "
                        "command again to resume")

  ckpt.close()
  with timings.phase("results"):
    doc = results_lib.results_document(
        method=config.method, tasks=tasks, stages=progress.stages,
        matrix=progress.accuracy_matrix, joint=joint,
        global_steps=progress.global_step, train_seconds=progress.train_seconds,
        sensitivity=progress.sensitivity, losses=progress.losses, warnings=progress.warnings,
        eval_split=loop.eval_split, label_space=loop.label_space,
        label_spaces=results_lib.label_space_summaries(
            progress.label_space_matrices, joint=joint),
        config=checkpointing.config_to_dict(config))
    # This invocation's wall seconds by phase (a resumed run counts only its own part).
    late = lambda: {"timings": timings.as_dict()}
    if jax.process_index() == 0:
      if config.export.final:
        # The merged model of the last stage as a Hugging Face checkpoint directory.
        from lbcl_jax import export  # pylint: disable=g-import-not-at-top
        export.export_run(workdir, os.path.join(workdir, "export"), overwrite=True)
      doc = results_lib.write_results(workdir, doc, plots=loop.plots, late_fields=late)
    writer.flush()
    writer.close()
  return {**doc, **late()}


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


def _resume(ckpt, stage: "Stage", stages: list, key: jax.Array, workdir: str):
  """(progress, restored state) from the newest intact checkpoint, or None for a fresh run.

  A checkpoint that fails to restore is named in one line and moved aside, and the next older
  one is tried (the run keeps the newest stage boundary besides the newest checkpoints)."""
  steps = ckpt.all_steps()
  for step in reversed(steps):
    try:
      progress = Progress.from_json(ckpt.restore_progress(step))
      logging.info("Resuming %s from checkpoint %d: stage %d, step %d, phase %s", workdir,
                   step, progress.stage, progress.step, progress.phase)
      if progress.stage >= len(stages):
        return progress, None
      stage_key = jax.random.fold_in(key, progress.stage)
      state = stage.restore(ckpt, step, progress, stage_key, stages[progress.stage])
      return progress, state
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


# ----------------------------------------------------------------------------------------------
# One stage: its adapter and optimizer, training, checkpoints.


@dataclasses.dataclass
class Stage:
  """What every stage uses, fixed for the run: the stage functions read it explicitly."""

  backbone: backbones.Backbone
  method: methods_lib.Method
  base: Base
  data: dict
  loop: LoopConfig
  optimizer_settings: methods_lib.OptimizerSettings
  key: jax.Array
  kept: Kept
  stop: Any = None  # asks for a checkpoint and an exit at the next step (`_StopOnSigterm`)

  # -- adapters ---------------------------------------------------------------------------------

  def merge(self, params: Any, stack: Any) -> Any:
    """`params` + every adapter in `stack`, computed sharded like the base."""
    if not stack:
      return params
    scaling = self.base.adapter_config.scaling
    fn = self.kept.get("merge", lambda: jax.jit(
        lambda b, s: adapters_lib.merge(b, s, scaling), out_shardings=self.base.shardings))
    return fn(params, stack)

  def trainable_shardings(self, trainable: Any) -> Any:
    if self.method.trains_base:
      return self.base.shardings
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
    return sharding.adapter_shardings(shapes, self.base.kernel_specs, self.base.mesh,
                                      self.base.rules)

  def _init_new(self, key: jax.Array) -> Any:
    return adapters_lib.init_new(key, self.base.params, self.base.adapter_config, self.base.paths)

  def fresh_adapter(self, stage_key: jax.Array) -> Any:
    def make():
      shardings = self.trainable_shardings(jax.eval_shape(self._init_new, stage_key))
      return jax.jit(self._init_new, out_shardings=shardings)
    return self.kept.get("fresh_adapter", make)(stage_key)

  def score_old(self, params: Any, old: Any, names: list[str], stage_key: jax.Array):
    """The method's `score_old`: old triplets' scores on seed samples of the stage's task."""

    def score(num_seed_samples: int):
      seed = int(jax.random.randint(jax.random.fold_in(stage_key, 1), (), 0, 2**31 - 1))
      samples = pipeline.seed_samples(self.data[names[0]].train_examples, num_seed_samples, seed)
      seeds = self.backbone.seed_batch(samples, tasks_lib.get_task(names[0]))
      return self.scorer()(params, old, seeds)

    return score

  def scorer(self) -> Callable:
    """The sensitivity pass, jitted once for the run: `(params, old, seeds) -> {layer: [K, r]
    scores}`. The base params are an argument, not a captured constant, so the same program
    also compiles on abstract arrays (benchmarks/scale_plan.py)."""
    backbone, scaling = self.backbone, self.base.adapter_config.scaling
    method, loop, rules = self.method, self.loop, self.base.rules

    def run(params, old, seeds):
      def loss_of_stack(stack, sample):
        batch = jax.tree.map(lambda x: x[None], sample)
        # The seed samples are split over the batch axes (spmd_axis_name below), each
        # sample's batch of one is not: every device scores its own samples.
        with sharding.per_sample_rules(rules), adapters_lib.intercept(stack, scaling):
          return backbone.loss(params, batch, None)

      return sensitivity.score_old_triplets(
          loss_of_stack, old, seeds, aggregation=method.score_aggregation,
          layers=loop.sensitivity_layers, chunk_size=loop.sensitivity_chunk_size, jit=False,
          spmd_axis_name=sharding.BATCH_AXES)

    return self.kept.get("score", lambda: jax.jit(run))

  # -- optimizer --------------------------------------------------------------------------------

  def optimizer(self, old: Any) -> optax.GradientTransformation:
    """The stage's optimizer. Stages whose method transforms nothing share one optimizer
    object, and so one compiled train step per shape."""
    if self.method.gradient_transform(old or None) is None:
      return self.kept.get("optimizer", lambda: self._new_optimizer(None))
    return self._new_optimizer(old)

  def _new_optimizer(self, old: Any) -> optax.GradientTransformation:
    tx = methods_lib.build_optimizer(self.method, old or None, self.optimizer_settings)
    if self.loop.grad_accum_steps > 1:
      tx = optax.MultiSteps(tx, every_k_schedule=self.loop.grad_accum_steps)
    return tx

  def init_opt_state(self, optimizer, trainable):
    """The optimizer state, sharded (`sharding.optimizer_state_shardings`): moments follow
    their parameter, projection bases their factor's vectors, counts are replicated."""
    init = self.kept.get("opt_init", lambda: jax.jit(optimizer.init), depends_on=optimizer)
    state = init(trainable)
    shardings = sharding.optimizer_state_shardings(
        state, jax.tree.map(lambda x: x.sharding, trainable), self.base.mesh)
    # Pinning every leaf to a mesh sharding makes the first train step see the same input
    # shardings as every later one (it would otherwise compile twice).
    return jax.device_put(state, shardings)

  def begin(self, old: Any, params: Any, stage_key: jax.Array, names: list[str],
            progress: Progress):
    """The stage's trainable tree, optimizer and optimizer state, as the method starts it."""
    if self.method.trains_base:
      trainable = params
    else:
      fresh = self.fresh_adapter(stage_key)
      trainable, scores = self.method.init_adapter(
          fresh, old or None, self.score_old(params, old, names, stage_key))
      if scores is not None:
        progress.sensitivity[progress.stages[progress.stage]] = {
            path: np.asarray(v).tolist() for path, v in scores.items()}
        trainable = jax.device_put(trainable, self.trainable_shardings(trainable))
    optimizer = self.optimizer(old)
    opt_state = self.init_opt_state(optimizer, trainable)
    progress.phase, progress.step = "train", 0
    return trainable, optimizer, opt_state

  # -- training ---------------------------------------------------------------------------------

  def train(self, ckpt, writer, progress: Progress, old, params, base_eff, trainable, optimizer,
            opt_state, stage_key, names, label, timings: Timings):
    """Trains the stage's trainable tree from `progress.step` on. `base_eff` is what the
    forward pass starts from: the base with every old adapter merged in (or the base)."""
    loop, mesh = self.loop, self.base.mesh
    stream = task_data.train_stream(
        self.data, names, loop.micro_batch_size,
        seed=int(jax.random.randint(jax.random.fold_in(stage_key, 2), (), 0, 2**31 - 1)),
        train_padding=loop.train_padding)
    num_steps = stream.num_steps_per_epoch * loop.num_epochs * loop.grad_accum_steps
    if loop.max_steps_per_task:
      # Per task: a joint stage (MTL) of n tasks gets the budget of n sequential stages.
      num_steps = min(num_steps, loop.max_steps_per_task * len(names))
    tsh = jax.tree.map(lambda x: x.sharding, trainable)
    osh = jax.tree.map(lambda x: x.sharding, opt_state)
    adapter = self.base.adapter_config
    step_fn = self.kept.get("step", lambda: make_train_step(
        self.backbone, self.method, optimizer,
        scaling=adapter.scaling if adapter else 1.0,
        dropout=loop.adapter_dropout if adapter else 0.0,
        apply_mode=adapter.apply_mode if adapter else "lowrank", mesh=mesh,
        trainable_shardings=tsh, opt_shardings=osh), depends_on=optimizer)
    train_key = jax.random.fold_in(stage_key, 3)
    curve = progress.losses.setdefault(label, [])
    start = progress.step
    bar = tqdm.tqdm(total=num_steps, initial=start, desc=f"train {label}", unit="step",
                    disable=jax.process_index() != 0, dynamic_ncols=True)
    replicated = self.backbone.replicated_keys
    # The first non-finite loss of the stage and its step, tracked on device (no host sync
    # per step) and read whenever the host looks anyway: at logging and before a checkpoint.
    watch = self.kept.get("watch", lambda: jax.jit(_watch_loss))
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

    t0, window_t, window_n = time.time(), time.time(), 0
    for step in range(start, num_steps):
      batch = sharding.global_batch(stream.batch(step), mesh, replicated_keys=replicated)
      trainable, opt_state, loss = step_fn(trainable, opt_state, base_eff, old or {}, batch,
                                           jax.random.fold_in(train_key, step))
      first_bad = watch(first_bad, loss, step + 1)
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
        writer.write_scalars(progress.global_step,
                             {f"train_loss/{label}": loss_v, "steps_per_second": rate})
      stopping = self.stop is not None and not last and self.stop.requested(progress.global_step)
      if (loop.checkpoint_every_steps and progress.step % loop.checkpoint_every_steps == 0
          and not last) or stopping:
        check_finite()  # never checkpoint a diverged state
        progress.train_seconds += time.time() - t0
        with timings.phase("checkpoint"):
          self.save(ckpt, progress, old, params, trainable, opt_state)
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
    return trainable, opt_state

  # -- checkpoints ------------------------------------------------------------------------------

  def save(self, ckpt, progress: Progress, old, params, trainable, opt_state) -> None:
    """Checkpoints the run. Mid-stage: the trainable tree and optimizer state; at a stage
    boundary: what later stages need (the old adapters, or the trained base). The frozen
    pre-trained base is never written."""
    # The run's key goes into the progress record as plain integers: every array a checkpoint
    # holds is a global jax.Array, which any number of processes can write and read back.
    progress.rng_key = _key_ints(self.key)
    trees = {}
    if old:
      trees["old"] = old
    if trainable is not None:
      trees["trainable"] = trainable
      trees["opt_state"] = opt_state
    elif self.method.trains_base:
      trees["trainable"] = params
    ckpt.save(progress.global_step, trees, progress.to_json())

  def _abstract_adapter(self, stage_key: jax.Array, num_tasks: int | None = None):
    return abstract_adapter(self.base, stage_key, num_tasks)

  def restore(self, ckpt, step: int, progress: Progress, stage_key: jax.Array, names):
    """Restores the checkpointed state: (old, params, trainable, optimizer, opt_state)."""
    saved = ckpt.items(step)
    if progress.rng_key and progress.rng_key != _key_ints(self.key):
      raise InputError(f"checkpoint {step} was written with another seed")
    old = None
    if "old" in saved:
      old = ckpt.restore(step, {"old": self._abstract_adapter(
          stage_key, num_tasks=progress.stage)})["old"]
    params = self.base.params
    if progress.phase == "train":
      if self.method.trains_base:
        trainable_abs = _abstract_with_shardings(self.base.params)
      else:
        trainable_abs = self._abstract_adapter(stage_key)
      optimizer = self.optimizer(old)
      # The optimizer state's shapes and shardings, as `begin` would create them.
      opt_abs = _abstract_with_shardings(
          self.init_opt_state(optimizer, _zeros_like(trainable_abs)))
      state = ckpt.restore(step, {"trainable": trainable_abs, "opt_state": opt_abs})
      return old, params, state["trainable"], optimizer, state["opt_state"]
    # A stage boundary: start the next stage as an uninterrupted run would.
    if self.method.trains_base and "trainable" in saved:
      params = ckpt.restore(
          step, {"trainable": _abstract_with_shardings(self.base.params)})["trainable"]
    trainable, optimizer, opt_state = self.begin(old, params, stage_key, names, progress)
    return old, params, trainable, optimizer, opt_state


def _key_ints(key: jax.Array) -> list[int]:
  """A PRNG key as plain integers (host values, the same on every process)."""
  return [int(v) for v in np.asarray(jax.random.key_data(key)).reshape(-1)]


def _watch_loss(first_bad, loss, step):
  """(step, loss) of the first non-finite loss so far ((-1, 0) while there is none)."""
  bad_step, bad_value = first_bad
  hit = (bad_step < 0) & ~jnp.isfinite(loss)
  return (jnp.where(hit, jnp.int32(step), bad_step),
          jnp.where(hit, loss.astype(jnp.float32), bad_value))


def abstract_adapter(base: Base, key: jax.Array, num_tasks: int | None = None):
  """Shapes and shardings of one task's adapter on `base`, or of a stack of `num_tasks` of
  them (what checkpoints hold): the targets to restore them onto."""
  one = jax.eval_shape(
      lambda k: adapters_lib.init_new(k, base.params, base.adapter_config, base.paths), key)
  if num_tasks is not None:
    one = jax.tree.map(lambda x: jax.ShapeDtypeStruct((num_tasks,) + x.shape, x.dtype), one)
  shardings = sharding.adapter_shardings(one, base.kernel_specs, base.mesh, base.rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      one, shardings)


def _abstract_with_shardings(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _zeros_like(abstract):
  return jax.tree.map(lambda a: jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding), abstract)
