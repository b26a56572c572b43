"""Every registered method runs two short tasks end to end on a tiny model."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lbcl_jax import adapters
from lbcl_jax import injection
from lbcl_jax import methods
from lbcl_jax import olora
from lbcl_jax import sensitivity

D, INNER, R, STEPS = 8, 6, 2, 4


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    q = nn.Dense(INNER, name="q")(x)
    v = nn.Dense(INNER, name="v")(x)
    return x + nn.Dense(D, name="o")(jnp.tanh(q) * v)


class Tiny(nn.Module):
  """Two blocks with attention-like q/v Dense layers and a scalar head."""

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = Block(name=f"block_{i}")(x)
    return nn.Dense(1, name="head")(x)[..., 0]


MODEL = Tiny()
CFG = adapters.AdapterConfig(targets=r".*/(q|v)", rank=R)


def _task_data(seed, n=16):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, D)).astype(np.float32)
  teacher = rng.normal(size=(D,)).astype(np.float32)
  return {"x": jnp.asarray(x), "y": jnp.asarray(np.tanh(x @ teacher))}


def _task_loss(params, adapter_tree, batch):
  with adapters.intercept(adapter_tree, CFG.scaling):
    pred = MODEL.apply({"params": params}, batch["x"])
  return jnp.mean((pred - batch["y"]) ** 2)


@functools.lru_cache(maxsize=None)
def _base_params():
  return jax.jit(MODEL.init)(jax.random.key(0), jnp.zeros((1, D)))["params"]


def _spec(method):
  """The method's training-relevant fields (so methods that train alike share compiles)."""
  return dataclasses.replace(method, name="", description="", inject=False, joint=False)


@functools.partial(jax.jit, static_argnames=("spec", "project_after_adam"))
def _train(spec, params, old, new, batch, project_after_adam=False):
  """STEPS of the method's optimizer on the full adapter state (base params for seqft)."""
  tx = methods.build_optimizer(spec, old, 1e-2, weight_decay=0.01,
                               project_after_adam=project_after_adam)

  def loss_fn(trainable):
    if spec.full_finetune:
      return _task_loss(trainable, {}, batch)
    loss = _task_loss(params, trainable, batch)
    if spec.olora:
      loss = loss + olora.olora_penalty(trainable, spec.olora_lambda1, spec.olora_lambda2)
    return loss

  def step(carry, _):
    trainable, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return (optax.apply_updates(trainable, updates), opt_state), loss

  trainable = params if spec.full_finetune else {"old": old, "new": new}
  # One scanned step keeps the compiled program small (compiles dominate on CPU).
  (trainable, _), losses = jax.lax.scan(step, (trainable, tx.init(trainable)), None,
                                        length=STEPS)
  return trainable, losses


@functools.lru_cache(maxsize=None)
def _run_method(name, project_after_adam=False):
  params = _base_params()
  method = methods.get_method(name)
  cfg = dataclasses.replace(CFG, init=method.init)
  tasks = [_task_data(1), _task_data(2)]
  if method.joint:
    tasks = [jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), *tasks)]
  state = adapters.empty_state()
  history = []
  for t, batch in enumerate(tasks):
    if method.full_finetune:
      params, losses = _train(_spec(method), params, {}, {}, batch)
      history.append({"losses": losses, "params": params})
      continue
    new = adapters.init_new(jax.random.key(10 + t), params, cfg)
    old = state["old"]
    if method.inject and adapters.num_tasks(old) > 0:
      seeds = jax.tree_util.tree_map(lambda a: a[:method.num_seed_samples], batch)

      def loss_of_stack(stack, sample):
        return _task_loss(params, stack, jax.tree_util.tree_map(lambda a: a[None], sample))

      scores = sensitivity.score_old_triplets(loss_of_stack, old, seeds,
                                              aggregation=method.score_aggregation)
      new = injection.inject(old, scores, with_sigma=method.inject_sigma,
                             layers=method.inject_layers, fresh=new)
    trained, losses = _train(_spec(method), params, old, new, batch,
                             project_after_adam=project_after_adam)
    history.append({"losses": losses, "old_before": old, "old_after": trained["old"],
                    "new_init": new, "new_final": trained["new"]})
    state = adapters.append_task(trained)
  return method, state, history


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_method_two_tasks(name):
  base_params = _base_params()
  method, state, history = _run_method(name)
  for h in history:
    losses = np.asarray(h["losses"])
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0], (name, losses)
  if method.full_finetune:
    assert state == adapters.empty_state()
    assert not np.array_equal(history[-1]["params"]["block_0"]["q"]["kernel"],
                              base_params["block_0"]["q"]["kernel"])
    return
  expected_k = 1 if method.joint else 2
  assert adapters.num_tasks(state["old"]) == expected_k
  # Old adapters are bit-identical after training a new task (weight decay is on).
  for h in history:
    for a, b in zip(jax.tree_util.tree_leaves(h["old_before"]),
                    jax.tree_util.tree_leaves(h["old_after"])):
      np.testing.assert_array_equal(a, b)
  last = adapters.flatten_layers(history[-1]["new_final"])
  if not method.train_sigma:  # LoRA-style: sigma frozen at 1
    for leaf in last.values():
      np.testing.assert_array_equal(leaf["sigma"], 1.0)
  if method.inject and not method.joint:
    # The second task starts from the alpha-weighted old triplets (K = 1: a copy).
    first = adapters.flatten_layers(history[0]["new_final"])
    init = adapters.flatten_layers(history[1]["new_init"])
    for path in first:
      np.testing.assert_allclose(init[path]["U"], first[path]["U"], rtol=1e-6)


def test_projection_after_adam_keeps_new_task_orthogonal():
  _, _, history = _run_method("lbcl", project_after_adam=True)
  _, _, default = _run_method("bcl")
  for hist in (history, default):
    old = adapters.flatten_layers(hist[1]["old_before"])
    init = adapters.flatten_layers(hist[1]["new_init"])
    final = adapters.flatten_layers(hist[1]["new_final"])
    for path in old:
      du = np.asarray(final[path]["U"] - init[path]["U"], np.float64)
      q, _ = np.linalg.qr(np.concatenate(list(np.asarray(old[path]["U"], np.float64)), axis=1))
      rel = np.linalg.norm(q.T @ du) / np.linalg.norm(du)
      if hist is history:
        assert rel <= 1e-5, (path, rel)  # exactly orthogonal (f32 round-off)
      else:
        assert rel < 1.0  # gradient projected; Adam's scaling leaves a small in-span part


def test_registry_and_labels():
  assert set(methods.METHODS) == {"seqft", "inclora", "olora", "lcl", "bcl", "nlnbcl", "lbcl",
                                  "mtl"}
  with pytest.raises(ValueError, match="valid methods: seqft"):
    methods.get_method("lora")
  lbcl = methods.get_method("lbcl")
  assert lbcl.inject and lbcl.project and lbcl.uses_adapters and lbcl.init == "adalora"
  assert methods.get_method("lbcl", inject_sigma=False).inject_sigma is False
  listed = methods.get_method("lcl", inject_layers=["a/q", "a/v"])
  assert listed.inject_layers == ("a/q", "a/v") and hash(listed)
  with pytest.raises(ValueError):
    methods.get_method("lcl", score_aggregation="max")
  tree = {"old": {"q": {"U": 0, "sigma": 0}}, "new": {"q": {"U": 0, "sigma": 0}}}
  labels = methods.param_labels(methods.get_method("inclora"), tree)
  assert labels == {"old": {"q": {"U": "frozen", "sigma": "frozen"}},
                    "new": {"q": {"U": "train", "sigma": "frozen"}}}
  labels = methods.param_labels(lbcl, tree["new"])
  assert labels == {"q": {"U": "train", "sigma": "train"}}
