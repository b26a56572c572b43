"""Tests for lbcl_jax.adapters: targets, init, stacking, delta, merge and intercept."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lbcl_jax import adapters

D = 8  # d_model of the tiny T5-like model
INNER = 6  # attention inner dim (q/k/v out)


class Attention(nn.Module):
  dtype: object = None

  @nn.compact
  def __call__(self, x):
    dense = lambda f, n: nn.Dense(f, use_bias=False, dtype=self.dtype, name=n)
    q, k, v = dense(INNER, "q")(x), dense(INNER, "k")(x), dense(INNER, "v")(x)
    return dense(D, "o")(jnp.tanh(q) * k + v)


class FF(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(D, name="wo")(nn.relu(nn.Dense(12, name="wi")(x)))


class Block(nn.Module):
  dtype: object = None

  @nn.compact
  def __call__(self, x):
    x = x + Attention(self.dtype, name="SelfAttention")(x)
    return x + FF(name="DenseReluDense")(x)


class TinyT5(nn.Module):
  """Nested modules with T5 parameter paths: encoder/block_i/SelfAttention/q ..."""

  dtype: object = None

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = Block(self.dtype, name=f"block_{i}")(x)
    return nn.Dense(3, name="head")(x)


class Wrapper(nn.Module):
  @nn.compact
  def __call__(self, x):
    return TinyT5(name="encoder")(x)


@pytest.fixture(scope="module")
def setup():
  model = Wrapper()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, D)), jnp.float32)
  params = jax.jit(model.init)(jax.random.key(1), x)["params"]
  return model, params, x


QV = [f"encoder/block_{i}/SelfAttention/{n}" for i in range(2) for n in "qv"]


def _random_stack(seed, params, paths, k, r, scale=0.3):
  """A K-task stack tree with random (non-zero) factors (NumPy: no per-op compiles)."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path in paths:
    d_in, d_out = adapters.get_kernel(params, path).shape
    flat[path] = {
        "U": jnp.asarray(scale * rng.normal(size=(k, d_out, r)), jnp.float32),
        "sigma": jnp.asarray(rng.uniform(0.5, 1.5, size=(k, r)), jnp.float32),
        "V": jnp.asarray(scale * rng.normal(size=(k, r, d_in)), jnp.float32),
    }
  return adapters.unflatten_layers(flat)


def test_find_targets_presets_and_regex(setup):
  _, params, _ = setup
  assert adapters.find_targets(params, "qv") == QV
  all_lin = adapters.find_targets(params, "all_linear")
  assert len(all_lin) == 2 * 6 and "encoder/head" not in all_lin
  assert adapters.find_targets(params, r".*/head") == ["encoder/head"]

  class Family:
    ADAPTER_TARGETS = r".*/SelfAttention/k"
    ALL_LINEAR_TARGETS = r".*"

  assert adapters.find_targets(params, "qv", family=Family) == [
      "encoder/block_0/SelfAttention/k", "encoder/block_1/SelfAttention/k"]
  with pytest.raises(ValueError, match="match no Dense"):
    adapters.find_targets(params, r".*/nothing")
  with pytest.raises(ValueError, match="top-level 'params'"):
    adapters.find_targets({"params": params}, r"block_0/SelfAttention/q")


def test_init_new_shapes_and_schemes(setup):
  _, params, _ = setup
  cfg = adapters.AdapterConfig(rank=4)
  new = adapters.init_new(jax.random.key(0), params, cfg)
  flat = adapters.flatten_layers(new)
  assert list(flat) == QV
  leaf = flat[QV[0]]
  assert leaf["U"].shape == (INNER, 4) and leaf["V"].shape == (4, D)
  assert leaf["sigma"].shape == (4,) and not np.any(leaf["sigma"])
  assert 0.005 < float(jnp.std(leaf["V"])) < 0.05
  # Per-layer keys come from the path: a subset of layers gets the same init.
  sub = adapters.init_new(jax.random.key(0), params, cfg, paths=[QV[2]])
  np.testing.assert_array_equal(adapters.flatten_layers(sub)[QV[2]]["U"], flat[QV[2]]["U"])
  assert not np.array_equal(flat[QV[0]]["U"], flat[QV[1]]["U"])
  # Drawn group by group (one vmapped init per kernel shape), each layer is still exactly
  # `init_layer` under its own path's key.
  for path, leaf in flat.items():
    d_in, d_out = adapters.get_kernel(params, path).shape
    alone = adapters.init_layer(jax.random.fold_in(jax.random.key(0), adapters._path_seed(path)),
                                d_in, d_out, cfg)
    for name in ("U", "sigma", "V"):
      np.testing.assert_array_equal(leaf[name], alone[name])

  lora = adapters.init_new(jax.random.key(0), params,
                           adapters.AdapterConfig(rank=4, init="lora", dtype=jnp.bfloat16))
  leaf = adapters.flatten_layers(lora)[QV[0]]
  assert leaf["U"].dtype == jnp.bfloat16 and not np.any(np.asarray(leaf["U"], np.float32))
  np.testing.assert_array_equal(np.asarray(leaf["sigma"], np.float32), 1.0)
  assert float(jnp.max(jnp.abs(leaf["V"].astype(jnp.float32)))) <= 1 / np.sqrt(D)


def test_rank_too_large_names_layer(setup):
  _, params, _ = setup
  with pytest.raises(ValueError, match="encoder/block_0/SelfAttention/q"):
    adapters.init_new(jax.random.key(0), params, adapters.AdapterConfig(rank=INNER + 1))
  with pytest.raises(ValueError):
    adapters.AdapterConfig(init="bogus")


def test_append_and_stacked(setup):
  _, params, _ = setup
  cfg = adapters.AdapterConfig(rank=2)
  state = adapters.empty_state()
  with pytest.raises(ValueError, match="empty"):
    adapters.append_task(state)
  news = []
  for t in range(3):
    state["new"] = adapters.init_new(jax.random.key(t), params, cfg)
    news.append(state["new"])
    both = adapters.stacked(state)
    assert adapters.num_tasks(both) == t + 1
    state = adapters.append_task(state)
    assert state["new"] == {} and adapters.num_tasks(state["old"]) == t + 1
  old = adapters.flatten_layers(state["old"])[QV[1]]
  assert old["U"].shape == (3, INNER, 2)
  for t in range(3):
    np.testing.assert_array_equal(old["V"][t], adapters.flatten_layers(news[t])[QV[1]]["V"])
  assert adapters.adapter_param_count(state) == 3 * 4 * (INNER * 2 + 2 + 2 * D)


def test_stack_programs_are_not_kept_for_each_stack_size(setup):
  """The old stack grows a task a stage. Appending to it, padding it to a run's capacity and
  cutting padded scores back compile for each of its sizes; eagerly, JAX kept each of those
  programs for the process's life (on a 14-task SmolLM2 run, about 15 MB of RSS a stage).
  Over growing stacks no program stays alive, and the results are the eager ones."""
  import gc  # pylint: disable=g-import-not-at-top
  _, params, _ = setup
  cfg = adapters.AdapterConfig(rank=2)
  client = jax.devices()[0].client
  state = adapters.empty_state()
  live = []
  for t in range(5):
    state["new"] = adapters.init_new(jax.random.key(t), params, cfg)
    new = adapters.flatten_layers(state["new"])
    state = adapters.append_task(state)
    padded = adapters.pad_tasks(state["old"], 6)
    scores = {p: leaf["sigma"] for p, leaf in adapters.flatten_layers(padded).items()}
    cut = adapters.first_tasks(scores, t + 1)
    gc.collect()
    live.append(len(client.live_executables()))
    # Checked on the host: an eager slice here would itself keep a program for each t.
    flat = jax.tree.map(np.asarray, adapters.flatten_layers(padded))
    for path, leaf in flat.items():
      assert leaf["U"].shape[0] == 6
      np.testing.assert_array_equal(leaf["V"][t], np.asarray(new[path]["V"]))
      assert not np.any(leaf["U"][t + 1:])
      np.testing.assert_array_equal(np.asarray(cut[path]), leaf["sigma"][:t + 1])
  # The first rounds may compile what init_new and the checks need, once; then nothing grows.
  assert live[2:] == [live[2]] * 3, live


def test_delta_and_lora_factors_match_numpy(setup):
  _, params, _ = setup
  stack = adapters.flatten_layers(_random_stack(3, params, QV, 3, 2))
  leaf = stack[QV[0]]
  u, s, v = (np.asarray(leaf[n], np.float64) for n in ("U", "sigma", "V"))
  want = 0.5 * sum((u[k] * s[k]) @ v[k] for k in range(3)).T
  np.testing.assert_allclose(adapters.delta(leaf, 0.5), want, rtol=1e-5, atol=1e-6)
  a, b = adapters.to_lora_factors(leaf, 0.5)
  np.testing.assert_allclose((b @ a).T, want, rtol=1e-5, atol=1e-6)


def test_merge_equals_intercept_nested_model(setup):
  model, params, x = setup
  k, r, scaling = 3, 2, 0.7
  paths = adapters.find_targets(params, "all_linear")
  stack = _random_stack(4, params, paths, k, r)
  apply = jax.jit(model.apply)
  merged = apply({"params": adapters.merge(params, stack, scaling)}, x)

  @jax.jit
  def lowrank(stack):
    with adapters.intercept(stack, scaling):
      return model.apply({"params": params}, x)

  low = lowrank(stack)
  base = apply({"params": params}, x)
  assert float(jnp.max(jnp.abs(merged - base))) > 1e-2  # the adapters do something
  np.testing.assert_allclose(low, merged, rtol=1e-5, atol=1e-5)

  # A full state (old stack + new) gives the same as its stacked form, jitted and vmapped.
  flat = adapters.flatten_layers(stack)
  state = {
      "old": adapters.unflatten_layers({p: {n: a[:2] for n, a in l.items()}
                                        for p, l in flat.items()}),
      "new": adapters.unflatten_layers({p: {n: a[2] for n, a in l.items()}
                                        for p, l in flat.items()}),
  }
  fwd = adapters.apply(model.apply, state, scaling)
  np.testing.assert_allclose(jax.jit(fwd)({"params": params}, x), merged, rtol=1e-5, atol=1e-5)
  per_ex = jax.jit(jax.vmap(lambda xi: fwd({"params": params}, xi[None])[0]))(x)
  np.testing.assert_allclose(per_ex, merged, rtol=1e-5, atol=1e-5)
  fwd_m = adapters.apply(model.apply, state, scaling, mode="merged")
  np.testing.assert_allclose(jax.jit(fwd_m)({"params": params}, x), merged, rtol=1e-5,
                             atol=1e-5)


def test_intercept_gradients_match_merged(setup):
  model, params, x = setup
  stack = _random_stack(5, params, QV, 2, 2)

  def loss_low(st):
    with adapters.intercept(st, 1.3):
      return jnp.sum(model.apply({"params": params}, x) ** 2)

  def loss_merged(st):
    return jnp.sum(model.apply({"params": adapters.merge(params, st, 1.3)}, x) ** 2)

  g_low = jax.jit(jax.grad(loss_low))(stack)
  g_mer = jax.jit(jax.grad(loss_merged))(stack)
  for a, b in zip(jax.tree_util.tree_leaves(g_low), jax.tree_util.tree_leaves(g_mer)):
    assert float(jnp.max(jnp.abs(b))) > 0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_merge_preserves_dtype_and_boxes():
  class Boxed(nn.Module):
    @nn.compact
    def __call__(self, x):
      init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
      return nn.Dense(4, kernel_init=init, param_dtype=jnp.bfloat16, name="q")(x)

  variables = Boxed().init(jax.random.key(0), jnp.ones((1, 4)))
  params = variables["params"]
  assert isinstance(params["q"]["kernel"], nn.Partitioned)
  stack = {"q": {"U": jnp.ones((1, 4, 1)), "sigma": jnp.ones((1, 1)),
                 "V": jnp.full((1, 1, 4), 0.5)}}
  merged = adapters.merge(params, stack)
  kernel = merged["q"]["kernel"]
  assert isinstance(kernel, nn.Partitioned) and kernel.names == ("embed", "mlp")
  assert kernel.value.dtype == jnp.bfloat16
  want = params["q"]["kernel"].value.astype(jnp.float32) + 0.5
  np.testing.assert_allclose(kernel.value.astype(jnp.float32), want, rtol=1e-2)
  assert merged["q"]["bias"] is params["q"]["bias"]


def test_intercept_keeps_dense_dtype():
  dense = nn.Dense(4, dtype=jnp.bfloat16, name="q")
  x = jnp.ones((3, 5))
  params = dense.init(jax.random.key(0), x)["params"]
  new = {"q": {"U": jnp.ones((4, 2)), "sigma": jnp.ones((2,)), "V": jnp.ones((2, 5))}}
  with adapters.intercept(new):
    y = dense.apply({"params": params}, x)
  # A top-level module has an empty path; the adapter then keys on ''... so wrap instead.
  assert y.dtype == jnp.bfloat16

  class Outer(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4, dtype=jnp.bfloat16, name="q")(x)

  params = Outer().init(jax.random.key(0), x)["params"]
  base = Outer().apply({"params": params}, x)
  with adapters.intercept(new, 0.5):
    y = Outer().apply({"params": params}, x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32) - np.asarray(base, np.float32),
                             0.5 * 2 * 5, rtol=1e-2)


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5])
def test_dropout_keep_mask_keeps_one_minus_rate(rate):
  shape = (7, 129, 33)  # an odd number of entries: the last word is half used
  keep, keep_prob = adapters.dropout_keep_mask(jax.random.key(3), shape, rate)
  assert keep.shape == shape and keep.dtype == jnp.bool_
  assert keep_prob == 1.0 - round(rate * 65536) / 65536 and abs(keep_prob - (1 - rate)) < 1e-5
  n = keep.size
  # Within 4 binomial standard errors of the keep probability.
  assert abs(float(keep.mean()) - keep_prob) < 4 * math.sqrt(keep_prob * (1 - keep_prob) / n)
  # The two 16-bit halves of a word are not the same draw.
  flat = np.asarray(keep).reshape(-1)
  assert not np.array_equal(flat[: n // 2], flat[(n + 1) // 2:(n + 1) // 2 + n // 2])
  again, _ = adapters.dropout_keep_mask(jax.random.key(3), shape, rate)
  other, _ = adapters.dropout_keep_mask(jax.random.key(4), shape, rate)
  np.testing.assert_array_equal(keep, again)
  assert not np.array_equal(keep, other)


def test_intercept_dropout_acts_on_the_adapter_input_only():
  """With U = V = I and sigma = 1 the adapter term is exactly dropout(x): every entry is 0 or
  x / (1 - p), about p of them 0; the base path sees x; the same key draws the same mask."""
  d, p = 64, 0.25
  dense = nn.Dense(d, use_bias=False)
  params = {"params": {"kernel": jnp.zeros((d, d))}}  # base output 0: y is the adapter term
  eye = jnp.eye(d)
  new = {"U": eye, "sigma": jnp.ones((d,)), "V": eye}
  x = jax.random.normal(jax.random.key(0), (32, d)) + 3.0  # no exact zeros

  def run(rng, dropout):
    # A top-level Dense has the empty path: its adapter lives under the key "".
    with adapters.intercept({"": jax.tree.map(lambda a: a[None], new)}, 1.0, dropout=dropout,
                            rng=rng):
      return dense.apply(params, x)

  plain = run(None, p)  # no key: no dropout
  np.testing.assert_allclose(plain, x, rtol=1e-6)
  y = np.asarray(run(jax.random.key(1), p))
  kept = y != 0
  np.testing.assert_allclose(y[kept], np.asarray(x / (1 - p))[kept], rtol=1e-5)
  assert abs((~kept).mean() - p) < 0.03
  np.testing.assert_array_equal(y, run(jax.random.key(1), p))
  assert not np.array_equal(y, run(jax.random.key(2), p))
