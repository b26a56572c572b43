"""Replay, EWC and InfLoRA: each one's promise on a toy, and kill -9 + resume through the driver.

The battery (tests/test_method_battery.py) runs them with every other method; here each is
held to what it claims:
  * replay: every batch holds round(share x B) memory rows, the rest the new task's, each new
    example once an epoch, and `batch(step)` is a pure function of the step;
  * EWC: the penalty's gradient is `lambda * F * (theta - theta*)`, and the Fisher (the
    driver's `Probe.squared_grads`) is the mean per-sample squared gradient;
  * InfLoRA: training the new task's U leaves the old task's outputs unchanged (to 1e-5) on
    its recorded inputs, while the new task's loss falls;
and a run of each killed with SIGKILL mid-way through its second task and resumed ends, bit for
bit, as an uninterrupted one.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lbcl_jax import adapters
from lbcl_jax import backbones
from lbcl_jax import methods
from lbcl_jax import tasks as tasks_lib
from lbcl_jax import train
from lbcl_jax.data import pipeline
from lbcl_jax.data import task_data
from lbcl_jax.errors import InputError
from lbcl_jax.methods import inflora as inflora_lib
from lbcl_jax.methods import replay as replay_lib

import driver_utils as du


# ---------------------------------------------------------------------------------------------
# Replay.


class MemoryProbe:
  """The two things `Replay.end_stage` asks of a probe."""

  def __init__(self, task, run_tasks, size):
    self.tasks, self.run_tasks, self._size = [task], list(run_tasks), size

  def sample(self, n, salt):
    return pipeline.seed_sample_indices(np.zeros(self._size, np.int64), n, salt)


@pytest.fixture(scope="module")
def llama_data(tmp_path_factory):
  """Two synthetic tasks tokenised for a tiny Llama, as the driver loads them."""
  tmp = tmp_path_factory.mktemp("replay")
  config = du.make_config(*du.FAST, *du.tiny_llama(tmp))
  backbone = backbones.build(backbones.BackboneConfig.from_config(config))
  names = tasks_lib.run_tasks(config.order, config.num_tasks)
  return task_data.load_task_data(task_data.DataConfig.from_config(config), names,
                                  backbone.encode)


def _rows(batch):
  return [tuple(r) for r in np.asarray(batch["input_ids"])]


def test_replay_batches_hold_the_share_of_memory_rows(llama_data):
  first, second = list(llama_data)
  method = methods.get_method("replay", methods.MethodSettings(replay_per_task=4,
                                                               replay_share=0.25))
  state = method.end_stage(None, None, None,
                           MemoryProbe(first, llama_data, len(llama_data[first].train)))
  memory = replay_lib.memory_examples(state, llama_data)
  assert len(memory) == 4 and {t for t, _ in memory} == {first}
  stream = method.batches(llama_data, [second], 8, seed=3, state=state)
  new_data, old_data = llama_data[second].train, llama_data[first].train
  # Every example of either task as the stream collates it (one shape for the stage); the
  # synthetic tasks repeat some sentences, so a row stands for the set of its examples.
  old_all = _rows(old_data.collate(np.arange(len(old_data)), len(old_data), stream.lengths))
  new_all = _rows(new_data.collate(np.arange(len(new_data)), len(new_data), stream.lengths))
  old_rows: dict = {}
  for i, r in enumerate(old_all):
    old_rows.setdefault(r, set()).add(i)
  assert not set(old_all) & set(new_all)
  in_memory = {i for _, i in memory}
  k = 2  # round(0.25 * 8)
  assert stream.num_steps_per_epoch == -(-len(new_data) // (8 - k))
  seen_new = []
  for step in range(stream.num_steps_per_epoch):
    batch = stream.batch(step)
    assert batch["input_ids"].shape[0] == 8
    real = [r for r, w in zip(_rows(batch), batch["weight"]) if w > 0]
    from_memory = [r for r in real if r in old_rows]
    assert len(from_memory) == k
    assert all(old_rows[r] & in_memory for r in from_memory)
    seen_new += [r for r in real if r not in old_rows]
    again = stream.batch(step)
    assert all(np.array_equal(batch[key], again[key]) for key in batch)
  assert sorted(seen_new) == sorted(new_all)  # each new example once an epoch
  # A second finished task extends the memory; a share leaving no new row is refused.
  state = method.end_stage(state, None, None,
                           MemoryProbe(second, llama_data, len(new_data)))
  assert {t for t, _ in replay_lib.memory_examples(state, llama_data)} == {first, second}
  with pytest.raises(InputError, match="config.replay.share"):
    methods.get_method("replay", methods.MethodSettings(replay_share=0.95)).batches(
        llama_data, [second], 4, seed=0, state=state)


# ---------------------------------------------------------------------------------------------
# EWC.


def test_ewc_penalty_gradient_is_lambda_f_times_the_distance():
  rng = np.random.default_rng(0)
  shapes = {"a": {"kernel": (3, 4)}, "b": {"scale": (5,)}}
  tree = lambda: jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                              is_leaf=lambda x: isinstance(x, tuple))
  theta, anchor = tree(), tree()
  fisher = jax.tree.map(jnp.abs, tree())
  method = methods.get_method("ewc", methods.MethodSettings(ewc_weight=7.0))
  state = {"own": {"fisher": fisher, "anchor": anchor}}
  grads = jax.grad(lambda t: method.regularizer(t, None, state))(theta)
  want = jax.tree.map(lambda f, t, a: 7.0 * f * (t - a), fisher, theta, anchor)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  penalty = float(method.regularizer(theta, None, state))
  np.testing.assert_allclose(penalty, 3.5 * sum(
      float(jnp.sum(f * (t - a) ** 2)) for f, t, a in zip(
          jax.tree.leaves(fisher), jax.tree.leaves(theta), jax.tree.leaves(anchor))), rtol=1e-5)
  assert method.regularizer(theta, None, None) is None  # nothing before a task has finished


def test_ewc_refuses_a_method_whose_adapter_does_not_carry_on():
  with pytest.raises(InputError, match="config.ewc.over='lbcl'"):
    methods.get_method("ewc", methods.MethodSettings(ewc_over="lbcl"))
  over = methods.get_method("ewc", methods.MethodSettings(ewc_over="seqlora"))
  assert over.inner.name == "seqlora" and over.frozen_factors == ("sigma",)


def test_driver_fisher_is_the_mean_squared_per_sample_gradient(tmp_path):
  """`StageProbe.squared_grads` (a scan over samples) against `vmap` of per-sample gradients,
  on the tiny Llama's base as SeqFT trains it."""
  config = du.make_config(*du.FAST, *du.tiny_llama(tmp_path), "--config.method=ewc")
  _, stage, names, _ = train.build_stage(config)
  params = stage.base.params
  probe = stage.probe(names[:1], params, None, jax.random.key(3))
  got = probe.squared_grads(params, 5, salt=1)
  seeds = probe._seed_batch(5, 1)  # pylint: disable=protected-access

  def loss(p, sample):
    return stage.backbone.loss(p, jax.tree.map(lambda x: x[None], sample), None)

  grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, seeds)
  want = jax.tree.map(lambda g: jnp.mean(jnp.square(g), axis=0), grads)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-10)
  assert sum(float(jnp.sum(g)) for g in jax.tree.leaves(got)) > 0


# ---------------------------------------------------------------------------------------------
# InfLoRA.

D, H = 8, 6


class OneLayer(nn.Module):
  """q and v of one input, a head: the adapted layers see the data itself."""

  @nn.compact
  def __call__(self, x):
    q = nn.Dense(H, name="q")(x)
    v = nn.Dense(H, name="v")(x)
    return nn.Dense(1, name="head")(jnp.tanh(q) * v)[..., 0]


MODEL = OneLayer()
PATHS = ["q", "v"]


class LayerProbe:
  """`input_grams` on the toy: the stage's task's inputs."""

  def __init__(self, params, x, scaling):
    self._params, self._x, self._scaling = params, x, scaling

  def input_grams(self, stack, n, salt=0):
    params = adapters.merge(self._params, stack, self._scaling) if stack else self._params
    return adapters.input_grams(lambda: MODEL.apply({"params": params}, self._x[:n]), PATHS)


class ToyLoss:
  replicated_keys = ()

  def loss(self, params, batch, rng):
    del rng
    return jnp.mean((MODEL.apply({"params": params}, batch["x"]) - batch["y"]) ** 2)


def _inflora_two_tasks(protect: bool):
  """Task a (inputs in a 3-dimensional subspace), then task b (anywhere), through InfLoRA's
  hooks and the driver's train step; `protect=False` designs b's V without a's subspace.
  Returns the model's outputs on a's inputs after each task, and the method's state."""
  rng = np.random.default_rng(0)
  basis = np.linalg.qr(rng.normal(size=(D, 3)))[0]
  xa = (rng.normal(size=(32, 3)) @ basis.T).astype(np.float32)
  xb = rng.normal(size=(32, D)).astype(np.float32)
  ya, yb = np.tanh(xa.sum(-1)).astype(np.float32), np.tanh(xb[:, 0]).astype(np.float32)
  params = MODEL.init(jax.random.key(0), jnp.zeros((1, D)))["params"]
  method = methods.get_method("inflora", methods.MethodSettings(inflora_threshold=1.0,
                                                                inflora_samples=32))
  cfg = adapters.AdapterConfig(targets="^(q|v)$", rank=2, init=method.adapter_init)
  settings = methods.OptimizerSettings(learning_rate=3e-2)
  old, state, outputs_a = None, None, []
  for t, (x, y) in enumerate(((xa, ya), (xb, yb))):
    probe = LayerProbe(params, jnp.asarray(x), cfg.scaling)
    fresh = adapters.init_new(jax.random.key(t), params, cfg, PATHS)
    new, _ = method.init_adapter(fresh, old, probe, state if protect else None)
    if t == 1 and protect:
      for path in PATHS:  # V's rows: orthonormal, orthogonal to task a's inputs
        v = np.asarray(adapters.flatten_layers(new)[path]["V"])
        assert np.abs(v @ basis).max() < 1e-5
        np.testing.assert_allclose(v @ v.T, np.eye(2), atol=1e-5)
    tx = methods.build_optimizer(method, old, settings, state)
    step = train.make_train_step(ToyLoss(), method, tx, scaling=cfg.scaling)
    base_eff = adapters.merge(params, old, cfg.scaling) if old else params
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    opt_state, losses = tx.init(new), []
    before = adapters.flatten_layers(jax.tree.map(jnp.copy, new))
    for i in range(30):
      new, opt_state, loss = step(new, opt_state, base_eff, old or {}, batch, jax.random.key(i),
                                  state)
      losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0]
    moved = adapters.flatten_layers(new)
    for path in PATHS:  # only U trains
      assert not np.allclose(moved[path]["U"], 0.0)
      np.testing.assert_array_equal(moved[path]["V"], before[path]["V"])
    old = adapters.append_task({"old": old or {}, "new": new})["old"]
    state = method.end_stage(state, new, old, LayerProbe(params, jnp.asarray(x), cfg.scaling))
    model = adapters.merge(params, old, cfg.scaling)
    outputs_a.append(np.asarray(MODEL.apply({"params": model}, jnp.asarray(xa))))
  return outputs_a, state


def test_inflora_leaves_the_old_tasks_outputs_unchanged():
  outputs_a, state = _inflora_two_tasks(protect=True)
  np.testing.assert_allclose(outputs_a[1], outputs_a[0], atol=1e-5)
  projector = adapters.flatten_arrays(state)["q"]
  np.testing.assert_allclose(projector @ projector, projector, atol=1e-5)
  assert round(float(jnp.trace(projector))) >= 3
  # Without the old subspace the same training moves task a's outputs.
  unprotected, _ = _inflora_two_tasks(protect=False)
  assert np.abs(unprotected[1] - unprotected[0]).max() > 1e-3


def test_gpm_extension_keeps_the_threshold_of_the_energy():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(200, 6)) * np.array([5.0, 3.0, 1.0, 0.5, 0.1, 0.01])
  gram = jnp.asarray(x.T @ x, jnp.float32)
  energy = np.trace(np.asarray(gram))
  for threshold, want_rank in ((0.5, 1), (0.9, 2), (0.99, 3), (1.0, 6)):
    p = np.asarray(inflora_lib.extend_projector(gram, None, threshold))
    np.testing.assert_allclose(p @ p, p, atol=1e-4)
    rank = int(round(np.trace(p)))
    assert rank == want_rank, (threshold, rank)
    assert np.trace(p @ np.asarray(gram)) / energy >= min(threshold, 1 - 1e-6) - 1e-6
  # Extending keeps what is there and adds only directions outside it.
  p1 = inflora_lib.extend_projector(gram, None, 0.5)
  p2 = np.asarray(inflora_lib.extend_projector(gram, p1, 0.9))
  np.testing.assert_allclose(p2 @ np.asarray(p1), np.asarray(p1), atol=1e-4)
  assert round(np.trace(p2)) == 2


# ---------------------------------------------------------------------------------------------
# Through the driver: killed with SIGKILL mid-way through the second task, resumed.


def _args(tmp, name, *more):
  return [*du.FAST, *du.tiny_llama(tmp), f"--config.method={name}",
          "--config.optim.max_steps_per_task=4", "--config.checkpoint.every_steps=2",
          "--config.plots=False", "--config.replay.per_task=4", "--config.ewc.samples=4",
          "--config.inflora.samples=4", *more]


@pytest.mark.parametrize("name", ["replay", "ewc", "inflora"])
def test_killed_and_resumed_as_uninterrupted(tmp_path, name):
  args = _args(tmp_path, name)
  du.run_main(tmp_path / "straight", *args)
  straight = json.loads((tmp_path / "straight" / "results.json").read_text())
  # Step 7: the second task's third step, after its mid-stage checkpoint at step 6, so the
  # resumed run restores the method's state (traced through end_stage with each stage's probe).
  resumed = du.killed_then_resumed(tmp_path / "wd", args, 7)
  du.assert_same_run(straight, resumed)
  assert len(straight["accuracy_matrix"]) == 2
  # What each stage cost, and what the method keeps: replay two int32 task ids and 2 x 4
  # example indices; EWC a Fisher and an anchor as large as the base it trains.
  first, second = (straight["stage_costs"][s] for s in straight["stages"])
  assert all(c["train_seconds"] > 0 and c["end_seconds"] >= 0 for c in (first, second))
  kept = {"replay": (2 + 2 * 4) * 4, "ewc": 2 * first["trainable_bytes"]}
  if name in kept:
    assert second["method_state_bytes"] == kept[name]
  assert second["method_state_bytes"] >= first["method_state_bytes"] > 0


def test_input_grams_sum_the_unmasked_rows_of_each_layer():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 5, D)), jnp.float32)
  mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], jnp.int32)
  params = MODEL.init(jax.random.key(0), jnp.zeros((1, D)))["params"]
  grams = adapters.input_grams(lambda: MODEL.apply({"params": params}, x), ["q", "head"],
                               [jnp.ones((7,)), mask])
  rows = np.asarray(x).reshape(-1, D)[np.asarray(mask).reshape(-1) > 0]
  np.testing.assert_allclose(grams["q"], rows.T @ rows, rtol=1e-5)
  assert set(grams) == {"q", "head"} and grams["head"].shape == (H, H)


def test_ewc_penalty_benchmark_reads_the_last_task_from_the_last_two_checkpoints(tmp_path):
  """`benchmarks/ewc_penalty.py` pairs the state after the second-to-last task (Fisher and
  anchor) with the weights after the last, and reports the penalty and its gradient's norm."""
  import ewc_penalty  # pylint: disable=g-import-not-at-top
  from lbcl_jax import checkpointing  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  tree = lambda: {"model": {"a": rng.normal(size=(3, 4)).astype(np.float32),
                            "b": rng.normal(size=(5,)).astype(np.float32)}}
  ckpt = checkpointing.RunCheckpointer(tmp_path / "checkpoints", max_to_keep=3)
  fisher = jax.tree.map(np.abs, tree())
  anchor, theta = tree(), tree()
  for stage, step, state, params in (
      (1, 2, {"own": {"fisher": tree(), "anchor": tree()}}, tree()),  # older
      (2, 4, {"own": {"fisher": fisher, "anchor": anchor}}, tree()),
      (3, 6, {"own": {"fisher": tree(), "anchor": tree()}}, theta)):
    ckpt.save(step, {"method_state": state, "params": params},
              {"phase": "stage_start", "stage": stage})
  ckpt.close()
  (tmp_path / "config.json").write_text(json.dumps(
      {"method": "ewc", "ewc": {"over": "seqft", "weight": 30.0}, "optim": {"grad_clip": 1.0}}))
  got = ewc_penalty.measure(tmp_path)
  f, a, t = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(z)]).astype(np.float64)
             for z in (fisher, anchor, theta))
  assert got["checkpoints"] == [4, 6]
  np.testing.assert_allclose(got["penalty"], 15.0 * np.sum(f * (t - a) ** 2), rtol=1e-5)
  np.testing.assert_allclose(got["penalty_grad_norm"], np.linalg.norm(30.0 * f * (t - a)),
                             rtol=1e-5)
  np.testing.assert_allclose(got["distance"], np.linalg.norm(t - a), rtol=1e-6)
  assert got["fisher"]["max"] == pytest.approx(float(f.max()))


def test_ewc_penalty_benchmark_refuses_a_run_whose_newest_checkpoint_is_mid_task(tmp_path):
  """A run stopped inside a task has a newer checkpoint than its last task end: pairing it
  with the checkpoint before would measure a task that never finished."""
  import ewc_penalty  # pylint: disable=g-import-not-at-top
  from lbcl_jax import checkpointing  # pylint: disable=g-import-not-at-top
  tree = {"model": {"a": np.ones((2, 2), np.float32)}}
  ckpt = checkpointing.RunCheckpointer(tmp_path / "checkpoints", max_to_keep=3)
  ckpt.save(4, {"method_state": {"own": {"fisher": tree, "anchor": tree}}, "params": tree},
            {"phase": "stage_start", "stage": 2})
  ckpt.save(5, {"params": tree}, {"phase": "train", "stage": 2})
  ckpt.close()
  (tmp_path / "config.json").write_text(json.dumps(
      {"method": "ewc", "ewc": {"over": "seqft", "weight": 1.0}, "optim": {"grad_clip": 1.0}}))
  with pytest.raises(InputError, match="not two consecutive task ends .*step 5: train of stage 2"):
    ewc_penalty.measure(tmp_path)
