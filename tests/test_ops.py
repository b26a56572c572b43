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


# ----------------------------------------------------------------------------- dot operands

DENSE_DIMS = (((2,), (0,)), ((), ()))


def _bf16_rounded(a):
  return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


def test_dense_dot_general_of_the_compute_dtype_is_xlas_own():
  assert ops.dense_dot_general("") is None
  with pytest.raises(ValueError, match="'float8'"):
    ops.dense_dot_general("float8")


def test_bf16_dot_rounds_the_operands_and_accumulates_in_f32():
  x, w = _x(1), _x(2, shape=(16, 7), scale=1.0)
  y = ops.dense_dot_general("bfloat16")(x, w, DENSE_DIMS)
  assert y.dtype == jnp.float32
  exact_of_rounded = _bf16_rounded(x) @ _bf16_rounded(w)
  np.testing.assert_allclose(y, exact_of_rounded, rtol=1e-5, atol=1e-5)
  # ... and the rounding happened: the unrounded product is visibly elsewhere.
  assert np.abs(np.asarray(x, np.float64) @ np.asarray(w, np.float64) - exact_of_rounded).max() > 1e-3
  # A bf16 model keeps bf16 activations; only the accumulation is wide.
  assert ops.dense_dot_general("bfloat16")(x.astype(jnp.bfloat16), w, DENSE_DIMS).dtype == (
      jnp.float32)  # result_type(bf16, f32)
  both = ops.dense_dot_general("bfloat16")(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                                           DENSE_DIMS)
  assert both.dtype == jnp.bfloat16


def test_bf16_dot_cotangents_are_bf16_products_accumulated_in_f32():
  x, w, g = _x(1), _x(2, shape=(16, 7), scale=1.0), _x(3, shape=(3, 5, 7), scale=1.0)
  dot = functools.partial(ops.dense_dot_general("bfloat16"), dimension_numbers=DENSE_DIMS)
  _, pullback = jax.vjp(dot, x, w)
  dx, dw = pullback(g)
  assert dx.dtype == dw.dtype == jnp.float32
  gr = _bf16_rounded(g)
  np.testing.assert_allclose(dx, gr @ _bf16_rounded(w).T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      dw, _bf16_rounded(x).reshape(-1, 16).T @ gr.reshape(-1, 7), rtol=1e-5, atol=1e-5)


def _dot_generals(jaxpr):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for value in eqn.params.values():
      for inner in (value if isinstance(value, (tuple, list)) else (value,)):
        inner = getattr(inner, "jaxpr", inner)
        if hasattr(inner, "eqns"):
          yield from _dot_generals(inner)


def test_every_matmul_of_a_bf16_dot_step_takes_bf16_and_gives_f32():
  """The forward product and both cotangent products: XLA:CPU's fast AMX path is bf16 x bf16
  with an f32 result, and JAX's own transpose rule would hand the backward an f32 cotangent
  (an f32 matmul) -- the reason this is a custom VJP."""
  x, w = _x(1), _x(2, shape=(16, 7), scale=1.0)
  dot = functools.partial(ops.dense_dot_general("bfloat16"), dimension_numbers=DENSE_DIMS)
  loss = lambda x, w: jnp.sum(jnp.tanh(dot(x, w)))
  # A frozen kernel (an adapter's base layer) gets no cotangent product at all.
  for argnums, products in (((0, 1), 3), (0, 2)):
    dots = list(_dot_generals(jax.make_jaxpr(jax.grad(loss, argnums))(x, w).jaxpr))
    assert len(dots) == products, (argnums, dots)
    for eqn in dots:
      assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2, eqn
      assert eqn.outvars[0].aval.dtype == jnp.float32, eqn


def test_bf16_dot_takes_only_denses_contraction():
  with pytest.raises(ValueError, match="nn.Dense's contraction"):
    ops.dense_dot_general("bfloat16")(_x(1), _x(2, shape=(3, 16)), (((2,), (1,)), ((), ())))


def test_a_dense_with_the_bf16_dot_has_the_same_params_and_near_outputs():
  x = _x(1)
  plain = nn.Dense(7)
  params = plain.init(jax.random.key(0), x)
  narrow = nn.Dense(7, dot_general=ops.dense_dot_general("bfloat16"))
  assert jax.tree.structure(narrow.init(jax.random.key(0), x)) == jax.tree.structure(params)
  a, b = plain.apply(params, x), narrow.apply(params, x)
  np.testing.assert_allclose(b, a, rtol=3e-2, atol=3e-2)
  assert not np.array_equal(a, b)

