"""Every registered method through the driver's own train step, and through the driver.

Like optax's `_common_test.py` runs every optimizer, this battery runs every method of
`lbcl_jax.methods.METHODS` (a) for two short tasks through `train.make_train_step` on a tiny
model, checking what the method promises, and (b) through `train.train_and_evaluate` on a
tiny random BERT. Adding a method means adding its row to `BATTERY`; a method without one
fails `test_every_method_has_a_battery_row`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lbcl_jax import adapters
from lbcl_jax import methods
from lbcl_jax import sensitivity
from lbcl_jax import settings
from lbcl_jax import train
from lbcl_jax.data import pipeline as methods_lib_pipeline

import driver_utils as du


@dataclasses.dataclass(frozen=True)
class Row:
  """What a method promises, checked by the battery."""

  trains_base: bool = False
  frozen_sigma: bool = False   # sigma stays at its initial value
  frozen_v: bool = False       # V stays as the method set it before training (InfLoRA)
  injects: bool = False        # the second task starts from the old triplets
  continues: bool = False      # the second task starts from the first's trained adapter
  projects: bool = False       # the new U/V updates avoid the old subspaces
  regularized: bool = False    # a loss term once old adapters (or a method state) exist
  joint: bool = False          # one stage for all tasks
  generative: bool = False     # runs only on a generative backbone (the driver row: tiny Llama)
  settings: tuple = ()         # (MethodSettings field, value) pairs for the toy


BATTERY = {
    "seqft": Row(trains_base=True),
    "inclora": Row(frozen_sigma=True),
    "olora": Row(frozen_sigma=True, regularized=True),
    "nlnbcl": Row(),
    "lcl": Row(injects=True),
    "bcl": Row(projects=True),
    "lbcl": Row(injects=True, projects=True),
    "mtl": Row(frozen_sigma=True, joint=True),
    "seqlora": Row(frozen_sigma=True, continues=True),
    "inflora": Row(frozen_sigma=True, frozen_v=True),
    "replay": Row(trains_base=True, generative=True),
    # lambda 1 for the toy (the default, 1e3, is for real models' small Fisher entries).
    "ewc": Row(trains_base=True, regularized=True, settings=(("ewc_weight", 1.0),)),
}

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


class TinyBackbone:
  """The one thing `make_train_step` asks of a backbone: a loss."""

  replicated_keys = ()

  def loss(self, params, batch, rng):
    del rng
    pred = MODEL.apply({"params": params}, batch["x"])
    return jnp.mean((pred - batch["y"]) ** 2)


def _task_data(seed, n=16):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, D)).astype(np.float32)
  teacher = rng.normal(size=(D,)).astype(np.float32)
  return {"x": jnp.asarray(x), "y": jnp.asarray(np.tanh(x @ teacher))}


@functools.lru_cache(maxsize=None)
def _base_params():
  return jax.jit(MODEL.init)(jax.random.key(0), jnp.zeros((1, D)))["params"]


def test_every_method_has_a_battery_row():
  assert set(BATTERY) == set(methods.METHODS)


class ToyProbe:
  """`methods.Probe` on the tiny model: the stage's task's rows are its samples."""

  def __init__(self, names, params, old, data, method, scaling):
    self.tasks, self.run_tasks = list(names), list(data)
    self._params, self._old, self._data = params, old, data
    self._method, self._scaling = method, scaling

  def _rows(self, n):
    return jax.tree.map(lambda a: a[:n], self._data[self.tasks[0]])

  def sample(self, n, salt):
    labels = np.zeros(len(self._data[self.tasks[0]]["x"]), np.int64)
    return methods_lib_pipeline.seed_sample_indices(labels, n, salt)

  def score_old(self, n, aggregation="mean"):
    backbone, params = TinyBackbone(), self._params

    def loss_of_stack(stack, sample):
      with adapters.intercept(stack, self._scaling):
        return backbone.loss(params, jax.tree.map(lambda a: a[None], sample), None)

    return sensitivity.score_old_triplets(loss_of_stack, self._old, self._rows(n),
                                          aggregation=aggregation)

  def squared_grads(self, trained, n, salt=0):
    kind = self._method.trainable
    base = (adapters.merge(self._params, self._old, self._scaling)
            if kind.merges_old and self._old else self._params)

    def loss(t, sample):
      params, stack = kind.model(t, base)
      batch = jax.tree.map(lambda a: a[None], sample)
      if stack is None:
        return TinyBackbone().loss(params, batch, None)
      with adapters.intercept(stack, self._scaling):
        return TinyBackbone().loss(params, batch, None)

    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(trained, self._rows(n))
    return jax.tree.map(lambda g: jnp.mean(jnp.square(g), axis=0), grads)

  def input_grams(self, stack, n, salt=0):
    params = adapters.merge(self._params, stack, self._scaling) if stack else self._params
    x = self._rows(n)["x"]
    return adapters.input_grams(lambda: MODEL.apply({"params": params}, x),
                                ["block_0/q", "block_0/v", "block_1/q", "block_1/v"])


@functools.lru_cache(maxsize=None)
def _run_method(name, transform_after_adam=False):
  """Two tasks (one joint stage for MTL) through the driver's train step, with the stage
  functions the driver calls (the trainable's start and finish, the method's end of stage)."""
  row = BATTERY[name]
  backbone = TinyBackbone()
  method = methods.get_method(
      name, methods.MethodSettings(**dict(row.settings)) if row.settings else None)
  kind = method.trainable
  params = _base_params()
  cfg = adapters.AdapterConfig(targets=r".*/(q|v)", rank=R, init=method.adapter_init)
  data = {"a": _task_data(1), "b": _task_data(2)}
  settings = methods.OptimizerSettings(learning_rate=1e-2, weight_decay=0.01,
                                       transform_after_adam=transform_after_adam)
  old, state, history = None, None, []
  for t, names in enumerate(method.stages(["a", "b"])):
    batch = jax.tree.map(lambda *a: jnp.concatenate(a), *[data[n] for n in names])
    probe = ToyProbe(names, params, old, data, method, cfg.scaling)
    fresh = lambda t=t: adapters.init_new(jax.random.key(10 + t), params, cfg)
    trainable, _ = kind.start(method, params, fresh, old, probe, state)
    # The step donates the trainable; `params` is cached and old adapters are kept.
    trainable = jax.tree.map(jnp.copy, trainable)
    record = {"regularizer": method.regularizer(trainable, old, state)}
    tx = methods.build_optimizer(method, old, settings, state)
    step = train.make_train_step(backbone, method, tx, scaling=cfg.scaling)
    base_eff = adapters.merge(params, old, cfg.scaling) if old and kind.merges_old else params
    record["init"] = jax.tree.map(jnp.copy, trainable)
    opt_state, losses = tx.init(trainable), []
    for i in range(STEPS):
      trainable, opt_state, loss = step(trainable, opt_state, base_eff, old or {}, batch,
                                        jax.random.key(i), state)
      losses.append(float(loss))
    record.update(losses=losses, final=trainable, old_before=old, state_before=state)
    history.append(record)
    end_probe = ToyProbe(names, params, old, data, method, cfg.scaling)
    params, old = kind.finish(trainable, params, old)
    state = method.end_stage(state, trainable, old, end_probe)
  return method, params, old, history


def _in_span_fraction(record):
  """|projection of the U update onto the old tasks' U columns| / |U update|, worst layer."""
  old = adapters.flatten_layers(record["old_before"])
  init = adapters.flatten_layers(record["init"])
  final = adapters.flatten_layers(record["final"])
  worst = 0.0
  for path in old:
    du_ = np.asarray(final[path]["U"] - init[path]["U"], np.float64)
    q, _ = np.linalg.qr(np.concatenate(list(np.asarray(old[path]["U"], np.float64)), axis=1))
    worst = max(worst, np.linalg.norm(q.T @ du_) / np.linalg.norm(du_))
  return worst


@pytest.mark.parametrize("name", sorted(BATTERY))
def test_method_through_the_train_step(name):
  row = BATTERY[name]
  method, params, old, history = _run_method(name)
  assert method.trains_base == row.trains_base
  assert len(history) == (1 if row.joint else 2)
  for h in history:
    assert all(math.isfinite(v) for v in h["losses"])
    assert h["losses"][-1] < h["losses"][0], (name, h["losses"])
  if not row.joint:
    # The regulariser exists exactly when the method has one and old adapters (or its state)
    # exist (or, for AdaLoRA's orthogonality term of the SVD family, whenever it is set).
    orth = getattr(method, "orth_reg_weight", 0.0) > 0
    assert (history[0]["regularizer"] is not None) == orth
    assert (history[1]["regularizer"] is not None) == (row.regularized or orth)
    if row.regularized:  # (EWC's is 0 where the stage starts, at its anchor)
      h = history[1]
      assert float(method.regularizer(h["final"], h["old_before"], h["state_before"])) > 0
    h = history[1]
    if h["old_before"] is not None:
      # The driver hands both the old stack padded with zero adapters to the run's most old
      # tasks (one shape a run, one compiled step): a zero adapter changes neither.
      padded = adapters.pad_tasks(h["old_before"], 3)
      assert adapters.num_tasks(padded) == 3
      reg = method.regularizer(h["final"], h["old_before"], h["state_before"])
      reg_padded = method.regularizer(h["final"], padded, h["state_before"])
      assert (reg is None) == (reg_padded is None)
      if reg is not None:
        np.testing.assert_allclose(float(reg_padded), float(reg), rtol=1e-6)
      transform = method.gradient_transform(h["old_before"], h["state_before"])
      if transform is not None:
        grads = jax.tree.map(lambda x: jnp.asarray(
            np.random.default_rng(1).normal(size=x.shape), x.dtype), h["init"])
        on_padded = method.gradient_transform(padded, h["state_before"])
        for a, b in zip(jax.tree.leaves(transform.update(grads, transform.init(grads))[0]),
                        jax.tree.leaves(on_padded.update(grads, on_padded.init(grads))[0])):
          np.testing.assert_allclose(a, b, atol=1e-5)
  if row.trains_base:
    assert old is None
    assert not np.array_equal(params["block_0"]["q"]["kernel"],
                              _base_params()["block_0"]["q"]["kernel"])
    return
  assert adapters.num_tasks(old) == method.trainable.num_old(len(history))
  last = adapters.flatten_layers(history[-1]["final"])
  first_init = adapters.flatten_layers(history[-1]["init"])
  for path, leaf in last.items():
    sigma_moved = not np.array_equal(leaf["sigma"], first_init[path]["sigma"])
    assert sigma_moved != row.frozen_sigma, path
    v_moved = not np.array_equal(leaf["V"], first_init[path]["V"])
    assert v_moved != row.frozen_v, path
  if not row.joint:
    # Injection: with one old task alpha = 1, so the second task starts from a copy of the
    # first task's trained U (and V); so does a continued adapter; a fresh adapter otherwise.
    first = adapters.flatten_layers(history[0]["final"])
    init = adapters.flatten_layers(history[1]["init"])
    for path in first:
      copied = np.allclose(init[path]["U"], first[path]["U"], rtol=1e-6)
      assert copied == (row.injects or row.continues), path
    if row.projects:
      # The method's gradient transform leaves no gradient in the old span ...
      old = history[1]["old_before"]
      grads = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(0).normal(size=x.shape),
                                                 x.dtype), history[1]["init"])
      transform = method.gradient_transform(old)
      projected, _ = transform.update(grads, transform.init(grads))
      assert _in_span_fraction({"old_before": old, "init": jax.tree.map(jnp.zeros_like, grads),
                                "final": projected}) <= 1e-5
      # ... and Adam's per-coordinate scaling after it puts back only part of what the same
      # method without projection puts in the old span (in this tiny toy about half).
      unprojected = "lcl" if row.injects else "nlnbcl"
      assert _in_span_fraction(history[1]) < 0.75 * _in_span_fraction(
          _run_method(unprojected)[3][1])


def test_projection_after_adam_keeps_new_task_exactly_orthogonal():
  for name in ("bcl", "lbcl"):
    _, _, _, history = _run_method(name, transform_after_adam=True)
    assert _in_span_fraction(history[1]) <= 1e-5  # f32 round-off


def _peft_orth_reg(layers) -> float:
  """PEFT's `AdaLoraModel.forward` term, line for line in torch: over every `lora_A` ([r, in],
  our V) and `lora_B` ([out, r], our U), `||A A^T - I||_F` / `||B^T B - I||_F`, summed and
  divided by the number of matrices."""
  torch = pytest.importorskip("torch")
  regu_loss, num_param = 0.0, 0
  for layer in layers:
    for n, p in (("lora_A", torch.tensor(layer["V"])), ("lora_B", torch.tensor(layer["U"]))):
      para_cov = p @ p.T if "lora_A" in n else p.T @ p
      eye = torch.eye(*para_cov.size(), out=torch.empty_like(para_cov))
      num_param += 1
      regu_loss += torch.norm(para_cov - eye, p="fro")
  return float(regu_loss / num_param)


def test_orthogonality_regularizer_matches_peft():
  """PEFT's AdaLoRA term (unsquared Frobenius norms, mean over matrices), so that a weight means
  what PEFT's orth_reg_weight means; zero exactly, with a finite gradient, for orthonormal
  factors; the SVD family adds weight * R to the loss from the first task."""
  rng = np.random.default_rng(0)
  new = {"a": {"q": {"U": rng.normal(size=(7, 3)), "sigma": rng.normal(size=3),
                     "V": rng.normal(size=(3, 5))}},
         "b": {"U": rng.normal(size=(4, 3)), "sigma": rng.normal(size=3),
               "V": rng.normal(size=(3, 6))}}
  ref = _peft_orth_reg([new["a"]["q"], new["b"]])
  # Not the squared form (the AdaLoRA paper's), nor a mean over layers: 2 matrices a layer.
  squared = np.mean([np.sum((l["U"].T @ l["U"] - np.eye(3)) ** 2) +
                     np.sum((l["V"] @ l["V"].T - np.eye(3)) ** 2)
                     for l in (new["a"]["q"], new["b"])])
  assert abs(squared - ref) > 1.0
  got = methods.svd.orthogonality_regularizer(jax.tree.map(jnp.asarray, new))
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  q, _ = np.linalg.qr(rng.normal(size=(7, 3)))
  p, _ = np.linalg.qr(rng.normal(size=(5, 3)))
  ortho = {"q": {"U": jnp.asarray(q, jnp.float32), "sigma": jnp.ones(3),
                 "V": jnp.asarray(p.T, jnp.float32)}}
  assert float(methods.svd.orthogonality_regularizer(ortho)) < 1e-5
  eye = {"q": {"U": jnp.eye(4, 3), "sigma": jnp.ones(3), "V": jnp.eye(3, 5)}}
  grads = jax.grad(methods.svd.orthogonality_regularizer)(eye)
  assert float(methods.svd.orthogonality_regularizer(eye)) == 0.0
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  lbcl = methods.get_method("lbcl", methods.MethodSettings(orth_reg_weight=0.5))
  np.testing.assert_allclose(lbcl.regularizer(jax.tree.map(jnp.asarray, new), None), 0.5 * ref,
                             rtol=1e-5)
  assert methods.get_method("lbcl", orth_reg_weight=0.0).regularizer(new, None) is None


@pytest.mark.parametrize("name, scaling, dropout", [
    ("inclora", 4.0, 0.1), ("olora", 4.0, 0.1), ("mtl", 4.0, 0.1), ("lbcl", 1.0, 0.0),
    ("seqft", 1.0, 0.0)])
def test_adapter_scaling_and_dropout_defaults(name, scaling, dropout):
  """O-LoRA's LoRA settings (alpha 32, so 4 at r = 8; dropout 0.1) for the LoRA family and
  MTL, AdaLoRA's scaling 1 for the SVD family; the run config overrides either."""
  config = du.make_config(f"--config.method={name}")
  method = methods.get_method(name, settings.method_settings(config))
  loop = settings.LoopConfig.from_config(config, method)
  assert (loop.adapter.scaling, loop.adapter.dropout) == (scaling, dropout)
  config = du.make_config(f"--config.method={name}", "--config.adapters.rank=4")
  assert settings.LoopConfig.from_config(config, method).adapter.scaling == (
      1.0 if scaling == 1.0 else 32 / 4)
  config = du.make_config(f"--config.method={name}", "--config.adapters.scaling=2",
                          "--config.adapters.dropout=0")
  loop = settings.LoopConfig.from_config(config, method)
  assert (loop.adapter.scaling, loop.adapter.dropout) == (2.0, 0.0)


def test_sensitivity_chunk_defaults_to_the_training_micro_batch():
  """Scoring 64 seed samples in one vmap ran SmolLM2 out of memory; by default the per-sample
  gradients go a training micro-batch at a time, and an explicit chunk size wins."""
  method = methods.get_method("lbcl")
  config = du.make_config("--config.optim.global_batch_size=8",
                          "--config.optim.grad_accum_steps=2")
  assert settings.LoopConfig.from_config(config, method).sensitivity_chunk_size == 4
  config = du.make_config("--config.injection.chunk_size=3")
  assert settings.LoopConfig.from_config(config, method).sensitivity_chunk_size == 3


def test_registry_and_labels():
  with pytest.raises(ValueError, match="valid methods: seqft"):
    methods.get_method("lora")
  lbcl = methods.get_method("lbcl")
  assert lbcl.inject and lbcl.project and lbcl.adapter_init == "adalora"
  assert methods.get_method("lbcl", inject_sigma=True).inject_sigma is True
  configured = methods.get_method("lbcl", methods.MethodSettings(num_seed_samples=3))
  assert configured.num_seed_samples == 3
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


@pytest.mark.parametrize("name", sorted(BATTERY))
def test_method_through_the_driver(tmp_path, name):
  """The whole driver on a tiny random BERT (a tiny Llama for a method that needs a generative
  backbone): two tasks, a few steps each."""
  row = BATTERY[name]
  model = du.tiny_llama(tmp_path) if row.generative else du.tiny_bert(tmp_path)
  r = train.train_and_evaluate(
      du.make_config(*du.FAST, *model, f"--config.method={name}",
                     "--config.optim.max_steps_per_task=3", "--config.plots=False"),
      str(tmp_path / "wd"))
  m = r["accuracy_matrix"]
  assert len(m) == (1 if row.joint else 2) and len(m[-1]) == 2
  assert all(0.0 <= v <= 1.0 for v in m[-1])
  assert all(math.isfinite(v) for curve in r["losses"].values() for _, v in curve)
  assert bool(r["sensitivity"]) == row.injects
  assert (r["bwt"] is None) == row.joint
  # The step cap is per task: a joint stage of both tasks trains as many steps as two stages.
  assert sum(len(curve) for curve in r["losses"].values()) == 2 * 3


# ---------------------------------------------------------------------------------------------
# A method with state (`Method.end_stage`): tests/stateful_method.py's `Anchored`, the running
# mean of the finished tasks' adapters, which its regulariser pulls the new adapter toward.


def _stateful_args(tmp, *more):
  return [*du.FAST, *du.tiny_bert(tmp), "--config.optim.max_steps_per_task=4",
          "--config.checkpoint.every_steps=2", "--config.plots=False", *more]


@pytest.fixture(scope="module")
def stateful_straight(tmp_path_factory):
  """(args, results.json, workdir) of an uninterrupted run of `anchored`."""
  tmp = tmp_path_factory.mktemp("stateful")
  args = _stateful_args(tmp, "--config.method=anchored")
  du.run_main(tmp / "wd", *args, module="stateful_method")
  return args, json.loads((tmp / "wd" / "results.json").read_text()), tmp / "wd"


def test_method_state_reaches_the_regularizer_and_the_checkpoint(tmp_path, stateful_straight):
  """The state of the first task changes how the second trains (and nothing before it), and
  every checkpoint after the first task holds it."""
  _, straight, wd = stateful_straight
  du.run_main(tmp_path / "free", *_stateful_args(tmp_path, "--config.method=anchored_free"),
              module="stateful_method")
  free = json.loads((tmp_path / "free" / "results.json").read_text())
  first, second = straight["stages"]
  assert straight["losses"][first] == free["losses"][first]
  assert straight["losses"][second] != free["losses"][second]
  # The pull adds a positive term to the second task's loss from its first step.
  assert straight["losses"][second][0][1] > free["losses"][second][0][1]
  kept = [p for p in (wd / "checkpoints").iterdir() if p.name.isdigit()]
  after_first = [p for p in kept
                 if json.loads((p / "progress" / "metadata").read_text())["stage"] >= 1]
  assert after_first and all((p / "method_state").is_dir() for p in after_first)
  assert not any((p / "method_state").exists() for p in kept if p not in after_first)


@pytest.mark.parametrize("kill_at_step", [5, 7])
def test_method_state_survives_kill_and_resume(tmp_path, stateful_straight, kill_at_step):
  """Killed with SIGKILL right after the first step of the second task (resumed from the
  stage boundary) or mid-way through it (from a mid-stage checkpoint), then resumed: the same
  results, bit for bit, as the uninterrupted run."""
  args, straight, _ = stateful_straight
  resumed = du.killed_then_resumed(tmp_path / "wd", args, kill_at_step,
                                   module="stateful_method")
  du.assert_same_run(straight, resumed)
