"""One stage of a run: its set-up and its end, around the training loop of `lbcl_jax.train`.

* `place_base`: the frozen base on the mesh (`Base`), with the layers adapters attach to.
* `Stage`: what every stage uses, fixed for the run (backbone, method, base, data, settings,
  the jitted functions kept across stages), and the stage functions over the loop's state
  (`loop_state.LoopState`): `begin` (the trainable, as the method starts it, its optimizer and
  state), `end` (the trained tree folded in, the method's state), `save` and `restore`.
* `StageProbe`: what a method may ask of a stage's data and model (`methods.Probe`).
* `abstract_adapter`: one adapter's (or a stack's) shapes and shardings, what checkpoints are
  restored onto.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lbcl_jax import adapters as adapters_lib
from lbcl_jax import backbones
from lbcl_jax import methods as methods_lib
from lbcl_jax import sensitivity
from lbcl_jax import settings as settings_lib
from lbcl_jax import sharding
from lbcl_jax import tasks as tasks_lib
from lbcl_jax.data import pipeline
from lbcl_jax.errors import InputError
from lbcl_jax.loop_state import LoopState, Progress


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

  def drop_programs(self, prefixes: tuple[str, ...]) -> None:
    """Frees the compiled programs of the kept functions named with one of `prefixes` (the
    functions stay, and compile again for the next shape they meet)."""
    for name, (_, fn) in self._slots.items():
      if name.startswith(prefixes) and hasattr(fn, "clear_cache"):
        fn.clear_cache()


@dataclasses.dataclass
class Base:
  """The frozen pre-trained model on the mesh, and the layers adapters attach to.

  Attributes:
    params: the weights, sharded by the logical axis rules.
    shardings: their shardings.
    mesh, rules: the device mesh and the logical axis rules.
    adapter_config: the adapters' targets (as a regex), rank, scaling, dropout, init, apply
      mode (None when the method's trainable carries no adapters).
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



def place_base(backbone: backbones.Backbone, method: methods_lib.Method,
               loop: settings_lib.LoopConfig, key: jax.Array, mesh: jax.sharding.Mesh,
               rules: tuple, abstract: bool = False) -> Base:
  """The frozen base, created already sharded: random weights by a jit whose outputs are laid
  out by the sharding rules, loaded weights placed shard by shard. With `abstract`, nothing is
  created: the params are `jax.ShapeDtypeStruct`s with their shardings (for compiling the
  driver's programs ahead of time, benchmarks/scale_plan.py). The adapters are those the
  method's trainable carries (`loop.adapter`, their preset targets turned into the model's
  regex), their rank checked against every adapted layer before any work."""
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
  adapter = method.trainable.adapter(loop.adapter)
  if adapter is None:
    return base
  base.adapter_config = dataclasses.replace(
      adapter, targets=backbone.adapter_targets(adapter.targets))
  base.paths = adapters_lib.find_targets(params, base.adapter_config.targets)
  adapters_lib.check_rank(params, base.paths, adapter.rank)
  base.kernel_specs = backbone.kernel_specs(base.paths)
  return base


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


@dataclasses.dataclass
class Stage:
  """What every stage uses, fixed for the run: the stage functions read it explicitly and
  take and return the loop's state (`LoopState`)."""

  backbone: backbones.Backbone
  method: methods_lib.Method
  base: Base
  data: dict
  loop: settings_lib.LoopConfig
  optimizer_settings: methods_lib.OptimizerSettings
  kept: Kept
  # The most adapters the frozen stack holds in the run, after its last stage (the driver sets
  # it from the run's stages; 0: not known). Programs over the old stack see it padded to this
  # many tasks (`padded`), so they compile once a run, not once a stage.
  old_capacity: int = 0

  # -- adapters ---------------------------------------------------------------------------------

  def padded(self, stack: Any) -> Any:
    """`stack` (an old stack: leaves `[K, ...]`) padded with zero adapters to `old_capacity`
    tasks (`adapters.pad_tasks`); any other adapter tree (one task's, a full state) as it is."""
    flat = adapters_lib.flatten_layers(stack) if stack else {}
    if not flat or adapters_lib.is_full_state(stack) or next(iter(flat.values()))["U"].ndim != 3:
      return stack
    # Its programs are kept while the stack has this size (dropped when it grows, `end`).
    pad = self.kept.get("stack/pad", lambda: jax.jit(adapters_lib.pad_leaf, static_argnums=1))
    return adapters_lib.pad_tasks(stack, self.old_capacity, pad=pad)

  def merge(self, params: Any, stack: Any) -> Any:
    """`params` + every adapter in `stack`, computed sharded like the base."""
    if not stack:
      return params
    stack = self.padded(stack)  # zero adapters add nothing
    scaling = self.base.adapter_config.scaling
    fn = self.kept.get("merge", lambda: jax.jit(
        lambda b, s: adapters_lib.merge(b, s, scaling), out_shardings=self.base.shardings))
    return fn(params, stack)

  def trainable_shardings(self, adapter: Any) -> Any:
    """The shardings of an adapter tree (one task's, or a stack's) on the base."""
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), adapter)
    return sharding.adapter_shardings(shapes, self.base.kernel_specs, self.base.mesh,
                                      self.base.rules)

  def _init_new(self, key: jax.Array) -> Any:
    return adapters_lib.init_new(key, self.base.params, self.base.adapter_config, self.base.paths)

  def fresh_adapter(self, stage_key: jax.Array) -> Any:
    def make():
      shardings = self.trainable_shardings(jax.eval_shape(self._init_new, stage_key))
      return jax.jit(self._init_new, out_shardings=shardings)
    return self.kept.get("fresh_adapter", make)(stage_key)

  def probe(self, names: Sequence[str], params: Any, old: Any,
            stage_key: jax.Array) -> "StageProbe":
    """The method's `Probe` of a stage: its tasks' data, the model as `params` and `old` (the
    base and the frozen stack the stage trains on) make it."""
    return StageProbe(self, list(names), params, old, stage_key)

  def scorer(self, aggregation: str = "mean") -> Callable:
    """The sensitivity pass with the method's `aggregation` over the seed samples, jitted once
    for the run: `(params, old, seeds) -> {layer: [K, r] scores}`. The base params are an
    argument, not a captured constant, so the same program also compiles on abstract arrays
    (benchmarks/scale_plan.py)."""
    backbone, scaling = self.backbone, self.base.adapter_config.scaling
    loop, rules = self.loop, self.base.rules

    def run(params, old, seeds):
      def loss_of_stack(stack, sample):
        batch = jax.tree.map(lambda x: x[None], sample)
        # The seed samples are split over the batch axes (spmd_axis_name below), each
        # sample's batch of one is not: every device scores its own samples.
        with sharding.per_sample_rules(rules), adapters_lib.intercept(stack, scaling):
          return backbone.loss(params, batch, None)

      return sensitivity.score_old_triplets(
          loss_of_stack, old, seeds, aggregation=aggregation,
          layers=loop.sensitivity_layers, chunk_size=loop.sensitivity_chunk_size, jit=False,
          spmd_axis_name=sharding.BATCH_AXES)

    return self.kept.get(f"score/{aggregation}", lambda: jax.jit(run))

  def _per_sample_loss(self, params: Any, stack: Any, sample: Any) -> jax.Array:
    """The backbone's loss of one sample (a row of a `seed_batch`), with `stack` applied."""
    batch = jax.tree.map(lambda x: x[None], sample)
    scaling = self.base.adapter_config.scaling if self.base.adapter_config else 1.0
    applied = (contextlib.nullcontext() if stack is None
               else adapters_lib.intercept(stack, scaling))
    with sharding.per_sample_rules(self.base.rules), applied:
      return self.backbone.loss(params, batch, None)

  def squared_grads_fn(self) -> Callable:
    """`(trained, base_eff, seeds) -> tree like trained`: the mean over the seed samples of
    each one's squared gradient of the loss with respect to the stage's trainable tree, one
    sample at a time (a scan: never more than one gradient held)."""
    kind = self.method.trainable

    def run(trained, base_eff, seeds):
      def loss(t, sample):
        params, stack = kind.model(t, base_eff)
        return self._per_sample_loss(params, stack, sample)

      def body(acc, sample):
        g = jax.grad(loss)(trained, sample)
        return jax.tree.map(lambda a, x: a + jnp.square(x.astype(jnp.float32)), acc, g), None

      acc = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trained)
      acc, _ = jax.lax.scan(body, acc, seeds)
      n = jax.tree.leaves(seeds)[0].shape[0]
      return jax.tree.map(lambda a: a / n, acc)

    return jax.jit(run)

  def input_grams_fn(self) -> Callable:
    """`(params, seeds) -> {layer: [d_in, d_in]}`: `adapters.input_grams` of every adapted
    layer summed over the seed samples, one sample at a time (its padding masked out)."""
    paths = list(self.base.paths)

    def run(params, seeds):
      def body(acc, sample):
        batch = jax.tree.map(lambda x: x[None], sample)
        masks = [batch[k] for k in ("attention_mask", "label_mask", "option_mask") if k in batch]
        with sharding.per_sample_rules(self.base.rules):
          grams = adapters_lib.input_grams(
              lambda: self.backbone.loss(params, batch, None), paths, masks)
        return {p: acc[p] + grams[p] for p in acc}, None

      acc = {p: jnp.zeros((d,) * 2, jnp.float32)
             for p, d in ((p, adapters_lib.get_kernel(params, p).shape[0]) for p in paths)}
      acc, _ = jax.lax.scan(body, acc, seeds)
      return acc

    return jax.jit(run)

  # -- optimizer --------------------------------------------------------------------------------

  def optimizer(self, old: Any, method_state: Any = None) -> optax.GradientTransformation:
    """The stage's optimizer. Stages whose method transforms nothing share one optimizer; stages
    whose transform carries what differs between them in its state
    (`Method.transform_in_state`, LB-CL's projection bases) share its `update`. The train step
    is kept for an `update` (`train_stage`), so either way one compiles per batch shape."""
    # Built once: LB-CL's transform computes every layer's projection bases (an SVD each),
    # over the stack padded to the run's capacity, so that they have one shape a run.
    transform = self.method.gradient_transform(self.padded(old) or None, method_state)
    if transform is None:
      return self.kept.get("optimizer", lambda: self._new_optimizer(None))
    tx = self._new_optimizer(transform)
    if self.method.transform_in_state:
      # This stage's state (`init`), the first such stage's `update`.
      first = self.kept.get("optimizer/transform_in_state", lambda: tx)
      tx = optax.GradientTransformation(tx.init, first.update)
    return tx

  def _new_optimizer(self, transform: Optional[optax.GradientTransformation]
                     ) -> optax.GradientTransformation:
    tx = methods_lib.build_optimizer(self.method, settings=self.optimizer_settings,
                                     transform=transform)
    if self.loop.grad_accum_steps > 1:
      # As a plain GradientTransformation: its `update` one object, which the step is kept for.
      tx = optax.MultiSteps(tx, every_k_schedule=self.loop.grad_accum_steps
                            ).gradient_transformation()
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

  # -- the stage's start and end ----------------------------------------------------------------

  def begin(self, state: LoopState, names: list[str]) -> LoopState:
    """The stage's trainable tree (as the method's trainable starts it), optimizer and
    optimizer state."""
    progress, stage_key = state.progress, state.stage_key
    if not self.old_capacity:
      # Unpadded, the old stack grows by one task a stage, so the sensitivity pass's and the
      # merge's programs for its earlier sizes never run again; kept, each stage's held about
      # 100 MB on SmolLM2 (a run's RSS grew 120 MB a stage over 8 stages; 20 MB dropped).
      self.kept.drop_programs(("score/", "merge"))
    kind = self.method.trainable
    trainable, scores = kind.start(
        self.method, state.params, lambda: self.fresh_adapter(stage_key), state.old or None,
        self.probe(names, state.params, state.old, stage_key), state.method_state)
    if scores is not None:
      progress.sensitivity[progress.stages[progress.stage]] = {
          path: np.asarray(v).tolist() for path, v in scores.items()}
    if kind.masks_frozen:  # an adapter, as the method made it: laid out as a fresh one
      trainable = jax.device_put(trainable, self.trainable_shardings(trainable))
    optimizer = self.optimizer(state.old, state.method_state)
    opt_state = self.init_opt_state(optimizer, trainable)
    progress.phase, progress.step = "train", 0
    return state.replace(trainable=trainable, optimizer=optimizer, opt_state=opt_state)

  def end(self, state: LoopState, names: Sequence[str]) -> LoopState:
    """The trained tree folded in (the new adapter joins the frozen stack, or the trained base
    replaces the base) and the method's state updated; the stage's trainable, optimizer and
    effective base dropped."""
    # The stack grows by this stage's adapter: the padding's program for its size so far is not
    # needed again (the one for the new size, compiled next, serves evaluation and the next
    # stage), and the stage's sizes never come back.
    self.kept.drop_programs(("stack/",))
    probe = self.probe(names, state.params, state.old, state.stage_key)
    params, old = self.method.trainable.finish(state.trainable, state.params, state.old)
    if old is not None:
      # Laid out as a restored stack is (`abstract_adapter`), whatever the stacking chose.
      old = jax.device_put(old, jax.tree.map(lambda a: a.sharding, abstract_adapter(
          self.base, state.stage_key, num_tasks=adapters_lib.num_tasks(old))))
    method_state = self.method.end_stage(state.method_state, state.trainable, old, probe)
    if method_state is not None:
      method_state = jax.device_put(method_state, sharding.replicated(self.base.mesh))
    return state.replace(params=params, old=old, base_eff=None, trainable=None,
                         optimizer=None, opt_state=None, method_state=method_state)

  # -- checkpoints ------------------------------------------------------------------------------

  def save(self, ckpt, state: LoopState) -> None:
    """Checkpoints the run. Mid-stage: the trainable tree and optimizer state; at a stage
    boundary: the base if the method trained it. Always: the old adapters and the method's
    state. The frozen pre-trained base is never written."""
    # The run's key goes into the progress record as plain integers: every array a checkpoint
    # holds is a global jax.Array, which any number of processes can write and read back.
    progress = state.progress
    progress.rng_key = _key_ints(state.key)
    trees = {}
    if state.old:
      trees["old"] = state.old
    if state.trainable is not None:
      trees["trainable"] = state.trainable
      trees["opt_state"] = state.opt_state
    elif state.params is not self.base.params:
      trees["params"] = state.params
    if state.method_state is not None:
      trees["method_state"] = state.method_state
    ckpt.save(progress.global_step, trees, progress.to_json())

  def restore(self, ckpt, step: int, progress: Progress, key: jax.Array,
              stages: Sequence[Sequence[str]]) -> LoopState:
    """The loop's state as checkpoint `step` holds it (`stages`: the run's stages' tasks). At a
    stage boundary the stage is still to begin (`begin`), as in an uninterrupted run."""
    saved = ckpt.items(step)
    if progress.rng_key and progress.rng_key != _key_ints(key):
      raise InputError(f"checkpoint {step} was written with another seed")
    state = LoopState(progress=progress, key=key, params=self.base.params)
    stage_key = state.stage_key
    base_abs = _abstract_with_shardings(self.base.params)
    abstract = {}
    if "old" in saved:
      abstract["old"] = abstract_adapter(
          self.base, stage_key, num_tasks=self.method.trainable.num_old(progress.stage))
    if "params" in saved:
      abstract["params"] = base_abs
    if "method_state" in saved:
      abstract["method_state"] = self.abstract_method_state(stages[:progress.stage], key)
    if abstract:
      restored = ckpt.restore(step, abstract)
      state = state.replace(old=restored.get("old"), params=restored.get("params", state.params),
                            method_state=restored.get("method_state"))
    if progress.phase == "train":
      trainable_abs = self.method.trainable.like(
          base_abs, lambda: abstract_adapter(self.base, stage_key))
      optimizer = self.optimizer(state.old, state.method_state)
      # The optimizer state's shapes and shardings, as `begin` would create them.
      opt_abs = _abstract_with_shardings(
          self.init_opt_state(optimizer, _zeros_like(trainable_abs)))
      restored = ckpt.restore(step, {"trainable": trainable_abs, "opt_state": opt_abs})
      state = state.replace(trainable=restored["trainable"], optimizer=optimizer,
                            opt_state=restored["opt_state"])
    return state

  def abstract_method_state(self, stages: Sequence[Sequence[str]], key: jax.Array) -> Any:
    """Shapes and shardings (replicated) of the method's state after the finished `stages`
    (their tasks; `key` the run's), by tracing `Method.end_stage` over them, each with its
    stage's probe: what a checkpointed state is restored onto."""
    trainable = self.method.trainable
    params = _abstract_with_shardings(self.base.params)
    trained = trainable.like(params, lambda: abstract_adapter(self.base, key))
    old, state = None, None

    def end(state, trained, params, old, names, stage_key):
      probe = self.probe(names, params, old, stage_key)
      params, old = trainable.finish(trained, params, old)
      return self.method.end_stage(state, trained, old, probe), params, old

    for i, names in enumerate(stages):
      stage_key = jax.random.fold_in(key, i)
      state, params, old = jax.eval_shape(
          functools.partial(end, names=names, stage_key=stage_key), state, trained, params, old)
    replicated = sharding.replicated(self.base.mesh)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                        state)


class StageProbe:
  """The driver's `methods.Probe` for one stage: draws from the stage's task's training
  examples, and the model as the stage trains it (`params`, the base; `old`, the frozen stack
  merged into it when the method's trainable trains on top of the old adapters)."""

  # Each kind of draw folds its own constant into the stage key, then the caller's salt.
  SCORE_SALT, DRAW_SALT = 1, 4

  def __init__(self, stage: Stage, tasks: list[str], params: Any, old: Any,
               stage_key: jax.Array):
    self._stage, self.tasks, self.run_tasks = stage, tasks, list(stage.data)
    self.old_capacity = stage.old_capacity
    self._params, self._old, self._key = params, old, stage_key

  def _seed(self, *salts: int) -> int:
    # Eager even while `end_stage` is traced (`abstract_method_state`): the draws are host
    # values, the same in both.
    with jax.ensure_compile_time_eval():
      key = self._key
      for s in salts:
        key = jax.random.fold_in(key, s)
      return int(jax.random.randint(key, (), 0, 2**31 - 1))

  def _examples(self):
    return self._stage.data[self.tasks[0]].train_examples

  def sample(self, n: int, salt: int) -> np.ndarray:
    examples = self._examples()  # a task smaller than n gives all it has
    return pipeline.seed_sample_indices([e.label_index for e in examples],
                                        min(n, len(examples)), self._seed(self.DRAW_SALT, salt))

  def _seed_batch(self, n: int, salt: int):
    examples = self._examples()
    picked = [examples[i] for i in self.sample(n, salt)]
    return self._stage.backbone.seed_batch(picked, tasks_lib.get_task(self.tasks[0]))

  def score_old(self, num_seed_samples: int, aggregation: str = "mean"):
    seed = self._seed(self.SCORE_SALT)
    samples = pipeline.seed_samples(self._examples(), num_seed_samples, seed)
    seeds = self._stage.backbone.seed_batch(samples, tasks_lib.get_task(self.tasks[0]))
    scores = self._stage.scorer(aggregation)(self._params, self._stage.padded(self._old), seeds)
    # The zero adapters of the padding score zero; they are cut off again.
    return adapters_lib.first_tasks(scores, adapters_lib.num_tasks(self._old))

  def _trained_on(self) -> Any:
    """The base the stage's trainable trained on (`NewAdapter.model`'s `base_eff`)."""
    if self._stage.method.trainable.merges_old and self._old:
      return self._stage.merge(self._params, self._old)
    return self._params

  def squared_grads(self, trained: Any, n: int, salt: int = 0) -> Any:
    fn = self._stage.kept.get("squared_grads", self._stage.squared_grads_fn)
    return fn(trained, self._trained_on(), self._seed_batch(n, salt))

  def input_grams(self, stack: Any, n: int, salt: int = 0) -> dict:
    fn = self._stage.kept.get("input_grams", self._stage.input_grams_fn)
    return fn(self._stage.merge(self._params, stack), self._seed_batch(n, salt))


def _key_ints(key: jax.Array) -> list[int]:
  """A PRNG key as plain integers (host values, the same on every process)."""
  return [int(v) for v in np.asarray(jax.random.key_data(key)).reshape(-1)]


def _abstract_with_shardings(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _zeros_like(abstract):
  return jax.tree.map(lambda a: jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding), abstract)
