"""Tests for lbcl_jax.injection against a plain NumPy implementation of the formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lbcl_jax import adapters
from lbcl_jax import injection
from lbcl_jax.errors import InputError
from lbcl_jax.models import bert as bert_lib
from lbcl_jax.models import llama as llama_lib
from lbcl_jax.models import t5 as t5_lib

K, R = 3, 4
SHAPES = {"dec/block_0/q": (6, 5), "dec/block_0/v": (6, 7), "dec/block_1/q": (6, 5)}


def _random(seed=0):
  rng = np.random.default_rng(seed)
  old, fresh, scores = {}, {}, {}
  for path, (d_in, d_out) in SHAPES.items():
    old[path] = {"U": rng.normal(size=(K, d_out, R)), "sigma": rng.uniform(size=(K, R)),
                 "V": rng.normal(size=(K, R, d_in))}
    fresh[path] = {"U": rng.normal(size=(d_out, R)), "sigma": rng.normal(size=(R,)),
                   "V": rng.normal(size=(R, d_in))}
    scores[path] = rng.uniform(size=(K, R))
  as_jax = lambda flat: adapters.unflatten_layers(
      {p: {n: jnp.asarray(a, jnp.float32) for n, a in l.items()} for p, l in flat.items()})
  return old, fresh, scores, as_jax(old), as_jax(fresh)


def _numpy_inject(old, fresh, scores, with_sigma, chosen):
  out = {}
  for path in SHAPES:
    if path not in chosen:
      out[path] = fresh[path]
      continue
    s = scores[path]
    alpha = s / s.sum(axis=0, keepdims=True)
    o = old[path]
    u = np.zeros_like(fresh[path]["U"])
    v = np.zeros_like(fresh[path]["V"])
    sig = np.zeros(R)
    for i in range(R):
      for k in range(K):
        u[:, i] += alpha[k, i] * o["U"][k][:, i]
        v[i, :] += alpha[k, i] * o["V"][k][i, :]
        sig[i] += alpha[k, i] * o["sigma"][k][i]
    out[path] = {"U": u, "sigma": sig if with_sigma else fresh[path]["sigma"], "V": v}
  return out


def _check(got, want):
  flat = adapters.flatten_layers(got)
  assert list(flat) == list(SHAPES)
  for path in SHAPES:
    for name in ("U", "sigma", "V"):
      np.testing.assert_allclose(flat[path][name], want[path][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_sigma", [True, False])
def test_inject_all_layers_matches_numpy(with_sigma):
  old, fresh, scores, old_j, fresh_j = _random()
  got = injection.inject(old_j, scores, with_sigma=with_sigma, fresh=fresh_j)
  _check(got, _numpy_inject(old, fresh, scores, with_sigma, set(SHAPES)))


def test_inject_top_n_and_explicit_layers():
  old, fresh, scores, old_j, fresh_j = _random(1)
  scores["dec/block_0/v"] = scores["dec/block_0/v"] * 10  # clearly the top layer
  scores["dec/block_0/q"] = scores["dec/block_0/q"] * 0.01  # clearly the bottom one
  got = injection.inject(old_j, scores, layers=1, fresh=fresh_j)
  _check(got, _numpy_inject(old, fresh, scores, True, {"dec/block_0/v"}))
  # Top-n depends on score values: it must also work with traced scores under jit.
  jitted = jax.jit(lambda o, s, f: injection.inject(o, s, layers=2, with_sigma=False, fresh=f))
  _check(jitted(old_j, scores, fresh_j),
         _numpy_inject(old, fresh, scores, False, {"dec/block_0/v", "dec/block_1/q"}))
  assert injection.select_injected_layers(scores, 2) == ["dec/block_0/v", "dec/block_1/q"]
  got = injection.inject(old_j, scores, layers=["dec/block_1/q"], with_sigma=False,
                         fresh=fresh_j)
  _check(got, _numpy_inject(old, fresh, scores, False, {"dec/block_1/q"}))
  got = injection.inject(old_j, scores, layers=r".*/q", fresh=fresh_j)
  _check(got, _numpy_inject(old, fresh, scores, True, {"dec/block_0/q", "dec/block_1/q"}))
  # Scores for a subset of layers: the others stay fresh.
  sub = {"dec/block_1/q": scores["dec/block_1/q"]}
  got = injection.inject(old_j, sub, fresh=fresh_j)
  _check(got, _numpy_inject(old, fresh, scores, True, {"dec/block_1/q"}))


def test_alpha_weights_normalise_and_zero_fallback():
  scores = {"a": np.array([[1.0, 0.0], [3.0, 0.0]]), "b": {"c": np.ones((2, 2))}}
  alpha = injection.alpha_weights(scores)
  np.testing.assert_allclose(alpha["a"], [[0.25, 0.5], [0.75, 0.5]])
  np.testing.assert_allclose(alpha["b/c"], 0.5)
  for a in alpha.values():
    np.testing.assert_allclose(np.sum(a, axis=0), 1.0, rtol=1e-6)


@pytest.mark.parametrize("layers", ["all", 2])
def test_padded_stack_with_task_mask_injects_as_the_unpadded_one(layers):
  """`adapters.pad_tasks` + `task_mask` (what LB-CL runs, so that one program serves every
  stage): the padding's zero triplets get no weight, also where a triplet's scores are all
  zero (the uniform fallback averages the real tasks only)."""
  old, fresh, scores, old_j, fresh_j = _random(2)
  scores["dec/block_1/q"][:, 0] = 0.0  # the fallback case
  want = injection.inject(old_j, scores, layers=layers, with_sigma=True, fresh=fresh_j)
  capacity = K + 2
  padded_scores = adapters.pad_tasks({p: jnp.asarray(v) for p, v in scores.items()}, capacity)
  padded = adapters.pad_tasks(old_j, capacity)
  assert adapters.num_tasks(padded) == capacity
  got = jax.jit(lambda o, s, f, m: injection.inject(o, s, layers=layers, fresh=f, task_mask=m))(
      padded, padded_scores, fresh_j, np.arange(capacity) < K)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  alpha = injection.alpha_weights(padded_scores, np.arange(capacity) < K)["dec/block_1/q"]
  np.testing.assert_allclose(alpha[:, 0], [1 / K] * K + [0.0] * 2, rtol=1e-6)
  # Without the mask the fallback would spread over the padding too.
  assert float(injection.alpha_weights(padded_scores)["dec/block_1/q"][0, 0]) == pytest.approx(
      1 / capacity)
  # A stack already that large is left as it is.
  assert adapters.pad_tasks(padded, K) is padded


def test_inject_dtype_and_errors():
  old, fresh, scores, old_j, fresh_j = _random(2)
  fresh16 = {"dec": {"block_0": {n: {k: v.astype(jnp.bfloat16) for k, v in l.items()}
                                 for n, l in fresh_j["dec"]["block_0"].items()},
                     "block_1": fresh_j["dec"]["block_1"]}}
  got = adapters.flatten_layers(injection.inject(old_j, scores, fresh=fresh16))
  assert got["dec/block_0/q"]["U"].dtype == jnp.bfloat16
  assert got["dec/block_1/q"]["U"].dtype == jnp.float32
  no_fresh = injection.inject(old_j, scores)  # every layer injected with sigma: fine
  assert list(adapters.flatten_layers(no_fresh)) == list(SHAPES)
  with pytest.raises(ValueError, match="fresh"):
    injection.inject(old_j, scores, with_sigma=False)
  with pytest.raises(ValueError, match="fresh"):
    injection.inject(old_j, scores, layers=1)
  with pytest.raises(ValueError, match="absent"):
    injection.inject(old_j, {**scores, "nope": scores["dec/block_1/q"]}, fresh=fresh_j)
  with pytest.raises(ValueError, match="shape"):
    injection.inject(old_j, {"dec/block_1/q": np.ones((K, R + 1))}, fresh=fresh_j)


def test_injection_with_sigma_adds_a_copy_of_the_old_update_without_sigma_adds_nothing():
  """What the new task starts from (the cause of the forgetting in BENCHMARKS.md).

  With one old task alpha = 1, so "with sigma" injects an exact copy of the old adapter: the
  layer starts the task at W0 + 2 dW_old. "Without sigma" keeps the fresh AdaLoRA sigma = 0,
  so the layer starts unchanged at W0 + dW_old, with U and V already spanning the old
  directions.
  """
  rng = np.random.default_rng(1)
  d_in, d_out, r = 5, 6, 3
  old = {"q": {"U": jnp.asarray(rng.normal(size=(1, d_out, r)), jnp.float32),
               "sigma": jnp.asarray(rng.uniform(0.5, 1.0, size=(1, r)), jnp.float32),
               "V": jnp.asarray(rng.normal(size=(1, r, d_in)), jnp.float32)}}
  fresh = adapters.unflatten_layers({"q": adapters.init_layer(
      jax.random.PRNGKey(0), d_in, d_out, adapters.AdapterConfig(rank=r))})
  scores = {"q": rng.uniform(0.1, 1.0, size=(1, r))}
  old_delta = adapters.delta(old["q"])
  layer = lambda t: adapters.flatten_layers(t)["q"]
  with_sigma = injection.inject(old, scores, with_sigma=True, fresh=fresh)
  np.testing.assert_allclose(adapters.delta(layer(with_sigma)), old_delta, rtol=1e-6)
  without = injection.inject(old, scores, with_sigma=False, fresh=fresh)
  np.testing.assert_array_equal(adapters.delta(layer(without)), 0.0)
  np.testing.assert_allclose(adapters.flatten_layers(without)["q"]["U"], old["q"]["U"][0])


@pytest.mark.parametrize("spec, parsed", [
    ("all", "all"), ("depth:4", injection.TopBlocks(4)), ("score:3", 3), ("2", 2),
    # One regex, commas and all (a comma-split list of regexes used to break these).
    ("encoder/layer_(4|5)/.*", "encoder/layer_(4|5)/.*"),
    ("decoder/block_[0-9]{1,2}/.*", "decoder/block_[0-9]{1,2}/.*"),
])
def test_parse_layers(spec, parsed):
  assert injection.parse_layers(spec) == parsed


@pytest.mark.parametrize("spec", ["depth:-1", "layer_(4"])
def test_parse_layers_bad_input_names_the_field(spec):
  with pytest.raises(InputError, match="config.injection.layers"):
    injection.parse_layers(spec)


def test_top_blocks_by_depth_decoder_first():
  t5 = [f"{side}/block_{i}/layer_{j}/{att}/{m}" for side in ("encoder", "decoder")
        for i in range(3) for j, att in ((0, "SelfAttention"), (1, "EncDecAttention"))
        if not (side == "encoder" and j == 1) for m in ("q", "v")]
  pattern = t5_lib.BLOCK_PATTERN
  top2 = injection.top_block_layers(t5, 2, pattern)
  assert top2 == tuple(p for p in t5 if p.startswith(("decoder/block_1/", "decoder/block_2/")))
  top4 = injection.top_block_layers(t5, 4, pattern)  # all 3 decoder blocks, then encoder's top
  assert {p.split("/layer_")[0] for p in top4} == {
      "decoder/block_0", "decoder/block_1", "decoder/block_2", "encoder/block_2"}
  assert injection.top_block_layers(t5, 99, pattern) == tuple(t5)
  assert injection.top_block_layers(t5, 0, pattern) == ()
  # Block 10 is above block 9 (numbers, not strings).
  bert = [f"encoder/layer_{i}/attention/self/{m}" for i in (9, 10, 2) for m in ("query", "value")]
  assert injection.top_block_layers(bert, 1, bert_lib.BLOCK_PATTERN) == tuple(bert[2:4])
  llama = [f"model/layers_{i}/self_attn/q_proj" for i in range(30)]
  assert injection.top_block_layers(llama, 3, llama_lib.BLOCK_PATTERN) == tuple(llama[27:])
