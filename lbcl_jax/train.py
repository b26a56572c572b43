"""The continual-learning driver: `train_and_evaluate(config, workdir)`.

For each task of the order:
  1. injection methods: pick seed samples, score every old triplet, inject the new adapter;
  2. build the optimizer (AdamW, plus the projection, the O-LoRA loss, as the method says);
  3. train;
  4. evaluate on every task seen so far, filling the accuracy matrix;
  5. checkpoint.
Everything a run needs to continue is checkpointed, and every random draw is a pure function of
(seed, task, step), so a resumed run ends with the same results as an uninterrupted one.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import pathlib
import signal
import time
from typing import Any, Callable

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
from lbcl_jax.errors import InputError
from lbcl_jax import injection
from lbcl_jax import methods as methods_lib
from lbcl_jax import metric_writer
from lbcl_jax import metrics as metrics_lib
from lbcl_jax import olora
from lbcl_jax import plots
from lbcl_jax import sensitivity
from lbcl_jax import sharding


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


class Run:
  """Everything fixed for the whole sequence: model, data, mesh, method."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               timings: Timings | None = None):
    timings = timings or Timings()
    self.config = config
    self.workdir = pathlib.Path(workdir)
    self.method = methods_lib.get_method(
        config.method,
        inject_sigma=config.injection.with_sigma,
        inject_layers=_injection_layers(config.injection.layers),
        num_seed_samples=config.injection.num_seed_samples,
        score_aggregation=config.injection.aggregation,
        olora_lambda1=config.olora.lambda1,
        olora_lambda2=config.olora.lambda2)
    self.mesh = sharding.make_mesh(config.mesh)
    dp = sharding.data_parallel_size(self.mesh)
    if config.optim.global_batch_size % dp:
      raise InputError(
          f"config.optim.global_batch_size={config.optim.global_batch_size} is not divisible by the "
          f"data-parallel size {dp} (mesh data x fsdp = {self.mesh.shape['data']} x {self.mesh.shape['fsdp']})")
    if config.optim.global_batch_size % (dp * config.optim.grad_accum_steps):
      raise InputError("config.optim.global_batch_size must be divisible by data-parallel size x "
                       f"grad_accum_steps ({dp} x {config.optim.grad_accum_steps})")
    if config.eval.batch_size % dp:
      raise InputError(f"config.eval.batch_size={config.eval.batch_size} is not divisible by the "
                       f"data-parallel size {dp}")
    self.tasks = backbones.resolve_tasks(config)
    with timings.phase("model_load"):
      self._load_model(config)
    with timings.phase("data"):
      self.data = backbones.load_task_data(config, self.tasks, self.backbone)

  def _load_model(self, config: ml_collections.ConfigDict) -> None:
    self.backbone = backbones.build(config)
    self.rules = tuple(config.mesh.logical_axis_rules)
    self.key = jax.random.key(config.seed)

    # The frozen base, created already sharded: random weights by a jit whose outputs are laid
    # out by the sharding rules, loaded weights placed shard by shard.
    bb = self.backbone
    init_key = jax.random.fold_in(self.key, 0x5EED)
    if bb.params is None:
      shapes = jax.eval_shape(bb.init_params, init_key)
    else:
      shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), bb.params)
    self.base_shardings = sharding.logical_to_sharding(bb.param_specs, shapes, self.mesh, self.rules)
    if bb.params is None:
      self.base = jax.jit(bb.init_params, out_shardings=self.base_shardings)(init_key)
    else:
      self.base = jax.device_put(bb.params, self.base_shardings)
      bb.params = None  # the host copy is no longer needed

    if self.method.uses_adapters:
      self.adapter_config = adapters_lib.AdapterConfig(
          targets=self.backbone.resolve_targets(config.adapters.targets),
          rank=config.adapters.rank,
          scaling=config.adapters.scaling,
          init=self.method.init,
          apply_mode=config.adapters.apply_mode or adapters_lib.AdapterConfig.apply_mode)
      # Raises naming the layer when the rank exceeds min(d_in, d_out).
      self.paths = adapters_lib.find_targets(self.base, self.adapter_config.targets)
      for path in self.paths:
        d_in, d_out = adapters_lib.get_kernel(self.base, path).shape
        if config.adapters.rank > min(d_in, d_out):
          raise InputError(f"config.adapters.rank={config.adapters.rank} exceeds min(d_in, d_out) = "
                           f"{min(d_in, d_out)} of layer {path} ({d_in} -> {d_out})")
      self.kernel_specs = self.backbone.kernel_specs(self.paths)
      self.apply_mode = self.adapter_config.apply_mode
    # Jitted functions kept across stages, so that a shape seen before is never compiled
    # again (a fresh `jax.jit` of a fresh closure compiles anew every time).
    self._kept: dict[str, tuple[Any, Any]] = {}

  def keep(self, name: str, make: Callable[[], Any], depends_on: Any = None) -> Any:
    """`make()`'s result, made again only when `depends_on` is not the object it was made for
    (one slot per name, so what a finished stage needed is not held)."""
    slot = self._kept.get(name)
    if slot is None or slot[0] is not depends_on:
      slot = self._kept[name] = (depends_on, make())
    return slot[1]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the task sequence of `config` in `workdir`; returns results.json's dict."""
  config_lib.validate(config)
  workdir = os.fspath(workdir)
  timings = Timings()
  # Building the run checks the model, data and mesh against the config, before the workdir
  # is touched.
  run = Run(config, workdir, timings)
  os.makedirs(workdir, exist_ok=True)
  checkpointing.check_workdir_config(workdir, config)
  writer = metric_writer.MetricWriter(workdir, just_logging=jax.process_index() > 0)
  writer.write_hparams(_flat_hparams(config))
  ckpt = checkpointing.RunCheckpointer(os.path.join(workdir, "checkpoints"), config.checkpoint.max_to_keep)

  # MTL trains one adapter on every task at once: a single stage holding all tasks.
  stages = [list(run.tasks)] if run.method.joint else [[t] for t in run.tasks]
  progress = {"stage": 0, "step": 0, "global_step": 0, "phase": "stage_start",
              "accuracy_matrix": [], "losses": {}, "sensitivity": {}, "train_seconds": 0.0,
              "stages": [", ".join(s) if len(s) > 1 else s[0] for s in stages]}
  old = None  # stacked frozen adapters of finished tasks (None before the first)
  base = run.base
  # The base with every old adapter merged in: what the next stage's forward pass starts from.
  # Evaluation computes it at the end of a stage; a resumed run computes it afresh.
  base_eff = None
  resume_step = ckpt.latest_step()
  if resume_step is not None:
    progress = ckpt.restore_progress(resume_step)
    logging.info("Resuming %s from checkpoint %d: stage %d, step %d, phase %s", workdir,
                 resume_step, progress["stage"], progress["step"], progress["phase"])

  with run.mesh:
    while progress["stage"] < len(stages):
      stage = progress["stage"]
      names = stages[stage]
      label = progress["stages"][stage]
      stage_key = jax.random.fold_in(run.key, stage)
      with timings.phase("stage_setup"):
        if resume_step is not None:
          old, base, trainable, optimizer, opt_state = _restore(
              run, ckpt, resume_step, progress, stage_key)
          resume_step = None
        else:
          trainable, optimizer, opt_state, scores = _begin_stage(run, old, base, stage_key, names)
          if scores is not None:
            progress["sensitivity"][label] = scores
          progress["phase"], progress["step"] = "train", 0
        if base_eff is None:
          base_eff = base if run.method.full_finetune else _merge(run, base, old)

      with timings.phase("train"):
        trainable, opt_state = _train_stage(run, ckpt, writer, progress, old, base, base_eff,
                                            trainable, optimizer, opt_state, stage_key, names,
                                            label, timings)
      del opt_state, base_eff

      # Evaluate every task seen so far with all adapters folded in (no task id).
      with timings.phase("eval"):
        if run.method.full_finetune:
          base = trainable
          eval_params = base
        else:
          old = adapters_lib.append_task({"old": old or {}, "new": trainable})["old"]
          eval_params = _merge(run, base, old)
        row = [None] * len(run.tasks)
        for s in stages[:stage + 1]:
          for name in s:
            row[run.tasks.index(name)] = float(backbones.evaluate(run, eval_params, name))
        base_eff = eval_params
        del eval_params
      progress["accuracy_matrix"].append(row)
      seen = {n: row[run.tasks.index(n)] for s in stages[:stage + 1] for n in s}
      logging.info("Accuracy after %s: %s", label, seen)
      writer.write_scalars(progress["global_step"], {f"accuracy/{n}": v for n, v in seen.items()})

      progress["stage"] += 1
      progress["step"] = 0
      progress["phase"] = "stage_start"
      with timings.phase("checkpoint"):
        _save(run, ckpt, progress, old, base, None, None)

  ckpt.close()
  with timings.phase("results"):
    results = _write_results(run, workdir, progress, timings)
    writer.flush()
    writer.close()
  return results


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  flat = flax.traverse_util.flatten_dict(checkpointing.config_to_dict(config), sep=".")
  return {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in flat.items()}


# ----------------------------------------------------------------------------------------------
# Stage set-up: fresh or injected adapter, optimizer.


def _merge(run: Run, base: Any, stack: Any) -> Any:
  """base + all adapters in `stack`, computed sharded like the base."""
  if not stack:
    return base
  fn = run.keep("merge", lambda: jax.jit(
      lambda b, s: adapters_lib.merge(b, s, run.adapter_config.scaling),
      out_shardings=run.base_shardings))
  return fn(base, stack)


def _trainable_shardings(run: Run, trainable: Any) -> Any:
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
  if run.method.full_finetune:
    return run.base_shardings
  specs = sharding.adapter_logical_specs(shapes, run.kernel_specs)
  return sharding.logical_to_sharding(specs, shapes, run.mesh, run.rules)


def _fresh_adapter(run: Run, stage_key: jax.Array) -> Any:
  def make():
    init = lambda k: adapters_lib.init_new(k, run.base, run.adapter_config, run.paths)
    shardings = _trainable_shardings(run, jax.eval_shape(init, stage_key))
    return jax.jit(init, out_shardings=shardings)
  return run.keep("fresh_adapter", make)(stage_key)


def _build_optimizer(run: Run, old: Any) -> optax.GradientTransformation:
  """The stage's optimizer. Only the projection depends on the old adapters; every other
  stage shares one optimizer object, and so one compiled train step per shape."""
  if run.method.project and old:
    return _new_optimizer(run, old)
  return run.keep("optimizer", lambda: _new_optimizer(run, None))


def _new_optimizer(run: Run, old: Any) -> optax.GradientTransformation:
  o = run.config.optim
  lr = o.learning_rate
  if o.warmup_steps:
    lr = optax.join_schedules(
        [optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps), optax.constant_schedule(o.learning_rate)],
        [o.warmup_steps])
  tx = methods_lib.build_optimizer(
      run.method, old or None, learning_rate=lr, weight_decay=o.weight_decay,
      max_grad_norm=o.grad_clip or None, projection_rtol=run.config.projection.rtol,
      project_after_adam=run.config.projection.after_adam)
  if o.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=o.grad_accum_steps)
  return tx


def _init_opt_state(run: Run, optimizer, trainable, old):
  """The optimizer state, sharded: moments follow their parameter (jit propagates the trainable
  leaves' shardings to what `init` derives from them); counts and projection bases, which
  derive from no parameter, are replicated over the mesh."""
  del old
  state = run.keep("opt_init", lambda: jax.jit(optimizer.init), depends_on=optimizer)(trainable)
  rep = sharding.replicated(run.mesh)

  def on_mesh(x):
    s = x.sharding
    if isinstance(s, jax.sharding.NamedSharding) and s.mesh == run.mesh:
      return s
    return rep
  # Pinning every leaf to a mesh sharding makes the first train step see the same input
  # shardings as every later one (it would otherwise compile twice).
  return jax.device_put(state, jax.tree.map(on_mesh, state))


def _begin_stage(run: Run, old: Any, base: Any, stage_key: jax.Array, names: list[str]):
  scores = None
  if run.method.full_finetune:
    trainable = base
  else:
    trainable = _fresh_adapter(run, stage_key)
    if run.method.inject and old:
      seeds = backbones.seed_batch(run, names[0], run.method.num_seed_samples,
                                   seed=int(jax.random.randint(jax.random.fold_in(stage_key, 1), (), 0, 2**31 - 1)))
      raw = _score_old(run, base, old, seeds)
      scores = {path: np.asarray(v).tolist() for path, v in raw.items()}
      trainable = jax.jit(
          lambda o, s, f: injection.inject(o, s, fresh=f, with_sigma=run.method.inject_sigma,
                                           layers=run.method.inject_layers),
          out_shardings=_trainable_shardings(run, trainable))(old, raw, trainable)
  optimizer = _build_optimizer(run, old)
  opt_state = _init_opt_state(run, optimizer, trainable, old)
  return trainable, optimizer, opt_state, scores


def _injection_layers(spec: str):
  spec = str(spec).strip()
  if spec == "all":
    return "all"
  if spec.isdigit():
    return int(spec)
  return [p.strip() for p in spec.split(",") if p.strip()]


def _score_old(run: Run, base: Any, old: Any, seeds: dict[str, jax.Array]) -> Any:
  """Triplet scores S[layer][k, i] of every old task's triplets on the new task's seeds."""
  cfg = run.config
  bb = run.backbone
  scaling = run.adapter_config.scaling

  def loss_of_stack(stack, sample):
    batch = jax.tree.map(lambda x: x[None], sample)
    with adapters_lib.intercept(stack, scaling):
      return bb.loss(base, batch, None)

  return sensitivity.score_old_triplets(
      loss_of_stack, old, seeds,
      aggregation=run.method.score_aggregation,
      layers=cfg.injection.sensitivity_layers or None,
      chunk_size=cfg.injection.chunk_size or None)


# ----------------------------------------------------------------------------------------------
# Training.


def _make_step(run: Run, optimizer: optax.GradientTransformation, trainable_shardings, opt_shardings):
  m = run.method
  bb = run.backbone

  def loss_fn(trainable, base_eff, old, batch, rng):
    if m.full_finetune:
      return bb.loss(trainable, batch, rng)
    stack = jax.tree.map(lambda x: x[None], trainable)
    if run.apply_mode == "merged":
      loss = bb.loss(adapters_lib.merge(base_eff, stack, run.adapter_config.scaling), batch, rng)
    else:
      with adapters_lib.intercept(stack, run.adapter_config.scaling):
        loss = bb.loss(base_eff, batch, rng)
    if m.olora and old:
      loss = loss + olora.olora_penalty({"old": old, "new": trainable}, m.olora_lambda1, m.olora_lambda2)
    return loss

  def step(trainable, opt_state, base_eff, old, batch, rng):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, base_eff, old, batch, rng)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return trainable, opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1),
                 out_shardings=(trainable_shardings, opt_shardings, sharding.replicated(run.mesh)))


def _train_stage(run, ckpt, writer, progress, old, base, base_eff, trainable, optimizer,
                 opt_state, stage_key, names, label, timings):
  """Trains the stage's trainable tree from `progress["step"]` on. `base_eff` is what the
  forward pass starts from: the base with every old adapter merged in (or the base itself)."""
  cfg = run.config
  stream = backbones.train_stream(run, names, seed=int(jax.random.randint(
      jax.random.fold_in(stage_key, 2), (), 0, 2**31 - 1)))
  num_steps = stream.num_steps_per_epoch * cfg.optim.num_epochs * cfg.optim.grad_accum_steps
  if cfg.optim.max_steps_per_task:
    num_steps = min(num_steps, cfg.optim.max_steps_per_task)
  tsh = jax.tree.map(lambda x: x.sharding, trainable)
  osh = jax.tree.map(lambda x: x.sharding, opt_state)
  step_fn = run.keep("step", lambda: _make_step(run, optimizer, tsh, osh), depends_on=optimizer)
  train_key = jax.random.fold_in(stage_key, 3)
  curve = progress["losses"].setdefault(label, [])
  start = progress["step"]
  bar = tqdm.tqdm(total=num_steps, initial=start, desc=f"train {label}", unit="step",
                  disable=jax.process_index() != 0, dynamic_ncols=True)
  t0, window_t, window_n = time.time(), time.time(), 0
  for step in range(start, num_steps):
    batch = sharding.global_batch(stream.batch(step), run.mesh)
    trainable, opt_state, loss = step_fn(trainable, opt_state, base_eff, old or {}, batch,
                                         jax.random.fold_in(train_key, step))
    progress["step"] = step + 1
    progress["global_step"] += 1
    window_n += 1
    bar.update(1)
    last = step + 1 == num_steps
    if progress["step"] % cfg.log_every_steps == 0 or last:
      loss_v = float(loss)
      rate = window_n / max(time.time() - window_t, 1e-9)
      window_t, window_n = time.time(), 0
      curve.append([progress["global_step"], loss_v])
      bar.set_postfix(loss=f"{loss_v:.4f}", steps_per_s=f"{rate:.2f}")
      writer.write_scalars(progress["global_step"], {f"train_loss/{label}": loss_v, "steps_per_second": rate})
    if cfg.checkpoint.every_steps and progress["step"] % cfg.checkpoint.every_steps == 0 and not last:
      progress["train_seconds"] += time.time() - t0
      with timings.phase("checkpoint"):
        _save(run, ckpt, progress, old, base, trainable, opt_state)
      t0 = time.time()
    if cfg.debug.kill_at_step >= 0 and progress["global_step"] == cfg.debug.kill_at_step:
      logging.warning("debug.kill_at_step=%d: killing this process with SIGKILL", cfg.debug.kill_at_step)
      os.kill(os.getpid(), signal.SIGKILL)
  bar.close()
  progress["train_seconds"] += time.time() - t0
  return trainable, opt_state


# ----------------------------------------------------------------------------------------------
# Checkpoints.


def _save(run, ckpt, progress, old, base, trainable, opt_state):
  """Checkpoints the run. Mid-stage: the trainable tree and optimizer state; at a stage
  boundary: what later stages need (the old adapters, or the fine-tuned base for SeqFT).
  The frozen pre-trained base is never written."""
  trees = {"rng": {"key": jax.random.key_data(run.key)}}
  if old:
    trees["old"] = old
  if trainable is not None:
    trees["trainable"] = trainable
    trees["opt_state"] = opt_state
  elif run.method.full_finetune:
    trees["trainable"] = base
  ckpt.save(progress["global_step"], trees, progress)


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def _abstract_adapter(run: Run, stage_key: jax.Array, num_tasks: int | None = None):
  """Shapes and shardings of one task's adapter, or of a stack of `num_tasks` of them."""
  one = jax.eval_shape(
      lambda k: adapters_lib.init_new(k, run.base, run.adapter_config, run.paths), stage_key)
  if num_tasks is not None:
    one = jax.tree.map(lambda x: jax.ShapeDtypeStruct((num_tasks,) + x.shape, x.dtype), one)
  specs = sharding.adapter_logical_specs(one, run.kernel_specs)
  return _with_shardings(one, sharding.logical_to_sharding(specs, one, run.mesh, run.rules))


def _restore(run, ckpt, step, progress, stage_key):
  """Restores the checkpointed state and returns (old, base, trainable, optimizer, opt_state)."""
  stage = progress["stage"]
  saved = ckpt.items(step)
  restored = ckpt.restore(step, {"rng": {"key": jax.eval_shape(lambda: jax.random.key_data(run.key))}})
  if not np.array_equal(np.asarray(restored["rng"]["key"]), np.asarray(jax.random.key_data(run.key))):
    raise InputError(f"checkpoint {step} was written with another seed")
  old = None
  if "old" in saved:
    old = ckpt.restore(step, {"old": _abstract_adapter(run, stage_key, num_tasks=stage)})["old"]
  base = run.base
  if progress["phase"] == "train":
    if run.method.full_finetune:
      trainable_abs = _abstract_with_shardings(run.base)
    else:
      trainable_abs = _abstract_adapter(run, stage_key)
    optimizer = _build_optimizer(run, old)
    # The optimizer state's shapes and shardings, as `_begin_stage` would create them.
    opt_abs = _abstract_with_shardings(_init_opt_state(run, optimizer, _zeros_like(trainable_abs), old))
    state = ckpt.restore(step, {"trainable": trainable_abs, "opt_state": opt_abs})
    return old, base, state["trainable"], optimizer, state["opt_state"]
  # A stage boundary: start the next stage as an uninterrupted run would.
  if run.method.full_finetune and "trainable" in saved:
    base = ckpt.restore(step, {"trainable": _abstract_with_shardings(run.base)})["trainable"]
  trainable, optimizer, opt_state, scores = _begin_stage(run, old, base, stage_key,
                                                         _stage_names(run, stage))
  if scores is not None:
    progress["sensitivity"][progress["stages"][stage]] = scores
  progress["phase"], progress["step"] = "train", 0
  return old, base, trainable, optimizer, opt_state


def _stage_names(run, stage):
  return list(run.tasks) if run.method.joint else [run.tasks[stage]]


def _abstract_with_shardings(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _zeros_like(abstract):
  return jax.tree.map(lambda a: jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding), abstract)


# ----------------------------------------------------------------------------------------------
# Results.


def _write_results(run: Run, workdir: str, progress: dict[str, Any],
                   timings: Timings) -> dict[str, Any]:
  matrix = progress["accuracy_matrix"]
  summary = metrics_lib.summarize(matrix, joint=run.method.joint)
  results = {
      "method": run.config.method,
      "tasks": list(run.tasks),
      "stages": progress["stages"],
      "accuracy_matrix": matrix,
      **summary,
      "global_steps": progress["global_step"],
      "train_seconds": progress["train_seconds"],
      "sensitivity": progress["sensitivity"],
      "losses": progress["losses"],
      "config": checkpointing.config_to_dict(run.config),
  }
  if jax.process_index() != 0:
    return dict(results, timings=timings.as_dict())
  wd = pathlib.Path(workdir)
  header = "after," + ",".join(run.tasks)
  lines = [header] + [
      f"{progress['stages'][i]}," + ",".join("" if v is None else f"{v:.6f}" for v in row)
      for i, row in enumerate(matrix)]
  metrics_lib.atomic_write_text(wd / "accuracy_matrix.csv", "\n".join(lines) + "\n")
  metrics_lib.atomic_write_text(wd / "report.md", _report_md(run, results))
  if run.config.plots:
    plots.accuracy_heatmap(matrix, run.tasks, progress["stages"], wd / "accuracy_matrix.png",
                           title=f"{run.config.method}: average accuracy {100 * results['average_accuracy']:.1f}")
    plots.sensitivity_plot(progress["sensitivity"], wd / "sensitivity.png")
    plots.loss_curves(progress["losses"], wd / "loss_curves.png")
  # Last, so that a results.json in a workdir means every other output is there too.
  # This invocation's wall seconds by phase (a resumed run counts only its own part).
  results["timings"] = timings.as_dict()
  metrics_lib.atomic_write_text(wd / "results.json", json.dumps(results, indent=2))
  return results


def _fmt(v):
  return "" if v is None else f"{100 * v:.1f}"


def _report_md(run: Run, results: dict[str, Any]) -> str:
  tasks = results["tasks"]
  out = [f"# {results['method']} on {', '.join(tasks)}", "",
         f"Model: `{run.config.model.path or run.config.model.family}`; method `{results['method']}`; "
         f"seed {run.config.seed}.", "",
         "Accuracy (%) on each task (columns) after each training stage (rows):", "",
         "| after | " + " | ".join(tasks) + " |",
         "|---|" + "---|" * len(tasks)]
  for stage, row in zip(results["stages"], results["accuracy_matrix"]):
    out.append(f"| {stage} | " + " | ".join(_fmt(v) for v in row) + " |")
  out += ["", "| metric | value |", "|---|---|"]
  for k in ("average_accuracy", "bwt", "fwt", "forgetting"):
    v = results.get(k)
    out.append(f"| {k} | {'n/a' if v is None else f'{100 * v:.2f}'} |")
  out.append("")
  return "\n".join(out)
