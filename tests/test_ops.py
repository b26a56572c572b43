"""`lbcl_jax.models.ops`: the same values and gradients as the textbook forms, fewer residuals.

The residuals of a VJP are the leaves of the closure `jax.vjp` returns: the tests count those of
the input's size, which is what a step keeps per layer.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lbcl_jax.models import ops

SHAPE = (3, 5, 16)
# ops' exact GELU is torch's erf form, jax's the erfc form: they differ by ~1e-6 absolute where
# 1 + erf cancels (x << 0).
ATOL = 3e-6

# The textbook forms HF's ACT2FN names stand for (as jax writes them).
REFERENCE = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def _x(seed=0, shape=SHAPE, scale=3.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _full_residuals(f, *args):
  """How many of f's VJP residuals have the first argument's shape (bool ones count too)."""
  _, vjp = jax.vjp(f, *args)
  return sum(leaf.shape == args[0].shape for leaf in jax.tree_util.tree_leaves(vjp))


def _grads(f, args, cot):
  return jax.vjp(f, *args)[1](cot)


def test_every_name_has_a_reference():
  assert set(REFERENCE) == set(ops.ACTIVATIONS)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_activation_matches_reference_and_saves_one_tensor(name):
  x, cot = _x(), _x(1, scale=1.0)
  f, ref = ops.activation(name), REFERENCE[name]
  np.testing.assert_allclose(f(x), ref(x), rtol=1e-6, atol=ATOL)
  np.testing.assert_allclose(_grads(f, (x,), cot)[0], _grads(ref, (x,), cot)[0],
                             rtol=2e-5, atol=ATOL)
  assert _full_residuals(f, x) == 1


def test_textbook_gelu_keeps_more_than_one_tensor():
  # Why ops exists: if jax's GELU stopped saving three tensors this module could go.
  assert _full_residuals(REFERENCE["gelu"], _x()) > 1


def test_unknown_activation_names_the_choices():
  with pytest.raises(ValueError, match="'mish' is not supported.*silu"):
    ops.activation("mish")


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_new", "relu"])
def test_gated_matches_reference_and_saves_its_inputs(name):
  gate, up, cot = _x(), _x(2), _x(3, scale=1.0)
  ref = lambda g, u: REFERENCE[name](g) * u
  f = functools.partial(ops.gated, name)
  np.testing.assert_allclose(f(gate, up), ref(gate, up), rtol=1e-6, atol=ATOL)
  for got, want in zip(_grads(f, (gate, up), cot), _grads(ref, (gate, up), cot)):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  assert _full_residuals(f, gate, up) == 2
  assert _full_residuals(ref, gate, up) >= 3


def _reference_softmax(x, mask):
  return jax.nn.softmax(jnp.where(mask, x, jnp.finfo(x.dtype).min), axis=-1)


def test_masked_softmax_matches_reference():
  x, cot = _x(), _x(1, scale=1.0)
  mask = np.random.default_rng(4).random(SHAPE) > 0.3
  mask[0, 0] = False  # a row with no valid entry: uniform, and no gradient to its scores
  mask = jnp.asarray(mask)
  y = ops.softmax(x, mask)
  np.testing.assert_allclose(y, _reference_softmax(x, mask), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(y[0, 0], np.full(SHAPE[-1], 1 / SHAPE[-1]), rtol=1e-6)
  assert float(jnp.max(jnp.where(mask, 0.0, y)[1:])) == 0.0
  got = _grads(lambda x: ops.softmax(x, mask), (x,), cot)[0]
  want = _grads(lambda x: _reference_softmax(x, mask), (x,), cot)[0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(got[0, 0]))) == 0.0


def test_softmax_broadcasts_its_mask_and_saves_only_its_output():
  x = _x()
  key_mask = jnp.arange(SHAPE[-1]) < 11  # one mask for every row, as attention's key mask
  np.testing.assert_allclose(ops.softmax(x, key_mask), _reference_softmax(x, key_mask),
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(ops.softmax(x), jax.nn.softmax(x), rtol=1e-6, atol=1e-7)
  assert _full_residuals(lambda x: ops.softmax(x, key_mask), x) == 1
  assert _full_residuals(lambda x: _reference_softmax(x, key_mask), x) > 1


def test_layer_norm_matches_flax_two_pass():
  x = _x() + 5.0  # an offset, where the one-pass variance would lose digits
  cot = _x(1, scale=1.0)
  scale, bias = _x(5, (SHAPE[-1],), 1.0), _x(6, (SHAPE[-1],), 1.0)
  ln = nn.LayerNorm(epsilon=1e-12, use_fast_variance=False)
  ref = lambda x, s, b: ln.apply({"params": {"scale": s, "bias": b}}, x)
  f = lambda x, s, b: ops.layer_norm(x, s, b, 1e-12)
  np.testing.assert_allclose(f(x, scale, bias), ref(x, scale, bias), rtol=1e-5, atol=1e-5)
  for got, want in zip(_grads(f, (x, scale, bias), cot), _grads(ref, (x, scale, bias), cot)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert _full_residuals(f, x, scale, bias) == 1
  assert _full_residuals(ref, x, scale, bias) > 1


@pytest.mark.parametrize("scale_in_f32", [True, False])
def test_rms_norm_matches_reference(scale_in_f32):
  x, cot, scale = _x(), _x(1, scale=1.0), _x(5, (SHAPE[-1],), 1.0)

  def ref(x, s):
    return s * x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)

  f = lambda x, s: ops.rms_norm(x, s, 1e-6, scale_in_f32)
  np.testing.assert_allclose(f(x, scale), ref(x, scale), rtol=1e-5, atol=1e-6)
  for got, want in zip(_grads(f, (x, scale), cot), _grads(ref, (x, scale), cot)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert _full_residuals(f, x, scale) == 1


def test_rms_norm_bf16_follows_each_models_cast():
  x = _x().astype(jnp.bfloat16)
  scale = _x(5, (SHAPE[-1],), 1.0).astype(jnp.bfloat16)
  norm = x.astype(jnp.float32) * jax.lax.rsqrt(
      jnp.mean(jnp.square(x.astype(jnp.float32)), -1, keepdims=True) + 1e-6)
  t5_like = ops.rms_norm(x, scale, 1e-6, True)
  llama_like = ops.rms_norm(x, scale, 1e-6, False)
  assert t5_like.dtype == llama_like.dtype == jnp.bfloat16
  np.testing.assert_array_equal(t5_like, (scale.astype(jnp.float32) * norm).astype(jnp.bfloat16))
  np.testing.assert_array_equal(llama_like, scale * norm.astype(jnp.bfloat16))


def test_norms_take_statistics_from_x_as_given_and_cast_to_dtype():
  # A model whose compute dtype is bf16 may be handed an f32 stream: the statistics come from
  # the f32 values (as the models' norms computed them), only the result is bf16.
  x = _x() + 5.0
  scale, bias = _x(5, (SHAPE[-1],), 1.0), _x(6, (SHAPE[-1],), 1.0)
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + 1e-6)
  for scale_in_f32 in (True, False):
    y = ops.rms_norm(x, scale, 1e-6, scale_in_f32, jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    want = (scale * (x * rstd)).astype(jnp.bfloat16) if scale_in_f32 else (
        scale.astype(jnp.bfloat16) * (x * rstd).astype(jnp.bfloat16))
    np.testing.assert_array_equal(y, want)
  y = ops.layer_norm(x, scale, bias, 1e-12, jnp.bfloat16)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(y, ops.layer_norm(x, scale, bias, 1e-12).astype(jnp.bfloat16))
