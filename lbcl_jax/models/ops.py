"""Activations, softmax and norms whose backward pass keeps one activation-sized residual.

Reverse-mode autodiff of the textbook formulas saves every intermediate the derivative
touches: `jax.nn.gelu(approximate=False)` keeps three `[..., d_ff]` tensors (the product, erfc
and exp), `jax.nn.softmax` (without the `jax_softmax_custom_jvp` flag) keeps exp and the output,
a mask applied with `jnp.where` keeps its broadcast, and a LayerNorm keeps four. Adapter
training freezes the weights, so these residuals, not the matmuls' inputs, are most of a step's
memory. On all-MiniLM-L6-v2's adapter step (8 x 128 tokens, `benchmarks/peer_step.py`) the
saved tensors fell from 360 to 167 MB with this module (39 MB of both are the frozen weights
themselves) and XLA's peak temporary memory from 322 to 157 MB.

Each function computes the textbook form's forward values and a custom VJP from one saved
tensor, as torch's kernels do: an activation saves its input, softmax its output, a norm its
input and one or two numbers per row, a GLU product its two inputs. Where the backward pass
recomputes from a saved input, an optimization barrier stops XLA from merging (CSE) the
recomputation with the forward pass's, which would keep the forward's intermediates alive
instead. Forward-mode differentiation (`jax.jvp`) is not defined for them; nothing here uses
it. `dense_dot_general` is the Dense layers' matmul with bf16 operands and f32 accumulation
(`config.model.dot_dtype`), its three products kept in the form CPUs with AMX run fast.
Pure functions over arrays (no flax): a model family calls them. `tests/test_ops.py` checks
values and gradients against the `jax.nn` forms and counts the residuals.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import math

import jax
from jax import lax
import jax.numpy as jnp

Array = jax.Array


# ----------------------------------------------------------------------------- activations


def _gelu_exact_and_grad(x: Array) -> tuple[Array, Array]:
  # Phi(x) = (1 + erf(x / sqrt 2)) / 2, torch's formula; d/dx x Phi(x) = Phi + x phi. jax.nn.gelu
  # writes Phi with erfc, which XLA:CPU evaluates 2.4x slower in f32 (two branches and an exp;
  # erf is one rational polynomial) for the same values to 1e-6.
  cdf = 0.5 * (1.0 + lax.erf(x * (1.0 / math.sqrt(2.0))))
  pdf = jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
  return x * cdf, cdf + x * pdf


def _gelu_tanh_and_grad(x: Array) -> tuple[Array, Array]:
  # 0.5 x (1 + tanh(c (x + 0.044715 x^3))), c = sqrt(2 / pi), as jax.nn.gelu(approximate=True).
  c = math.sqrt(2.0 / math.pi)
  t = jnp.tanh(c * (x + 0.044715 * x * x * x))
  grad = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)
  return 0.5 * x * (1.0 + t), grad


def _silu_and_grad(x: Array) -> tuple[Array, Array]:
  s = jax.nn.sigmoid(x)
  return x * s, s * (1.0 + x * (1.0 - s))


def _quick_gelu_and_grad(x: Array) -> tuple[Array, Array]:
  s = jax.nn.sigmoid(1.702 * x)
  return x * s, s * (1.0 + 1.702 * x * (1.0 - s))


def _relu_and_grad(x: Array) -> tuple[Array, Array]:
  return jnp.maximum(x, 0), (x > 0).astype(x.dtype)


def _tanh_and_grad(x: Array) -> tuple[Array, Array]:
  t = jnp.tanh(x)
  return t, 1.0 - t * t


# HF `ACT2FN` names -> x -> (f(x), f'(x)). HF's "gelu" is the exact erf form (flax's is tanh).
_FORMS = {
    "gelu": _gelu_exact_and_grad,
    "gelu_new": _gelu_tanh_and_grad,
    "gelu_pytorch_tanh": _gelu_tanh_and_grad,
    "gelu_fast": _gelu_tanh_and_grad,
    "quick_gelu": _quick_gelu_and_grad,
    "relu": _relu_and_grad,
    "silu": _silu_and_grad,
    "swish": _silu_and_grad,
    "tanh": _tanh_and_grad,
}


def _pointwise(value_and_grad):
  """A custom-VJP elementwise function that saves its input and recomputes f'(x) backward.

  Saving f'(x) instead (a custom JVP) is no better: XLA fuses the last elementwise ops of
  f'(x) into the backward pass and keeps the two or three tensors they read alive, where the
  input, a matmul's output, stays one buffer (torch's GELU saves its input too).
  """

  @jax.custom_vjp
  def f(x):
    return value_and_grad(x)[0]

  def f_fwd(x):
    return value_and_grad(x)[0], x

  def f_bwd(x, g):
    # The barrier stops XLA from merging this recomputation with the forward pass's (CSE),
    # which would keep the forward's intermediates alive until here.
    x = lax.optimization_barrier(x)
    return ((g * value_and_grad(x)[1]).astype(x.dtype),)

  f.defvjp(f_fwd, f_bwd)
  return f


# The activations by HF name.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    name: _pointwise(form) for name, form in _FORMS.items()}


def activation(name: str) -> Callable[[Array], Array]:
  """The activation HF calls `name` (a key of `ACTIVATIONS`); its gradient saves only f'(x).

  >>> import jax.numpy as jnp
  >>> round(float(activation("gelu")(jnp.float32(1.0))), 4)  # 1 * Phi(1), the erf form
  0.8413
  """
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"activation {name!r} is not supported; use one of "
                     f"{sorted(ACTIVATIONS)}") from None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gated(name: str, gate: Array, up: Array) -> Array:
  """`act(gate) * up` for the activation HF calls `name`: a GLU feed-forward's product (SwiGLU,
  T5 v1.1's gated GELU).

  The backward pass saves `gate` and `up` (the projections' outputs) and recomputes the
  activation, instead of also keeping act(gate) and f'(gate).

  >>> import jax.numpy as jnp
  >>> float(gated("relu", jnp.float32(2.0), jnp.float32(3.0)))
  6.0
  """
  return _FORMS[name](gate)[0] * up


def _gated_fwd(name, gate, up):
  return _FORMS[name](gate)[0] * up, (gate, up)


def _gated_bwd(name, res, g):
  gate, up = lax.optimization_barrier(res)  # recompute, not CSE with the forward (_pointwise)
  act, grad = _FORMS[name](gate)
  return (g * up * grad).astype(gate.dtype), (g * act).astype(up.dtype)


gated.defvjp(_gated_fwd, _gated_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softcap(x: Array, cap: float) -> Array:
  """`tanh(x / cap) * cap` (Gemma 2's soft-capping of attention scores and logits), in HF's
  order; the backward pass saves x and recomputes the tanh.

  >>> import jax.numpy as jnp
  >>> [round(float(v), 3) for v in softcap(jnp.array([0.5, 100.0]), 2.0)]
  [0.49, 2.0]
  """
  return _softcap_fwd(x, cap)[0]


def _softcap_fwd(x, cap):
  return jnp.tanh(x / cap) * cap, x


def _softcap_bwd(cap, x, g):
  x = lax.optimization_barrier(x)  # recompute, not CSE with the forward (_pointwise)
  t = jnp.tanh(x / cap)
  return ((g * (1.0 - t * t)).astype(x.dtype),)


softcap.defvjp(_softcap_fwd, _softcap_bwd)


# ----------------------------------------------------------------------------- softmax


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _masked_softmax(x: Array, mask: Array, axis: int) -> Array:
  return _masked_softmax_fwd(x, mask, axis)[0]


def _masked_softmax_fwd(x, mask, axis):
  # Masked entries get the lowest finite score (as HF adds finfo.min): a row with no valid
  # entry then comes out uniform instead of NaN.
  x = jnp.where(mask, x, jnp.finfo(x.dtype).min)
  e = jnp.exp(x - jnp.max(x, axis=axis, keepdims=True))
  y = e / jnp.sum(e, axis=axis, keepdims=True)
  # A custom VJP rather than a JVP: the rows with a valid entry are saved un-broadcast (a JVP
  # would save the mask broadcast to x's shape as a second residual).
  return y, (y, jnp.any(mask, axis=axis, keepdims=True))


def _masked_softmax_bwd(axis, res, g):
  y, valid_row = res
  # d softmax = y * (g - <y, g>); masked entries of a valid row have y = 0, and a row with no
  # valid entry is a constant (its scores were all replaced).
  gx = y * (g - jnp.sum(y * g, axis=axis, keepdims=True))
  return jnp.where(valid_row, gx, jnp.zeros((), gx.dtype)), None


_masked_softmax.defvjp(_masked_softmax_fwd, _masked_softmax_bwd)


def softmax(x: Array, mask: Array | None = None, axis: int = -1) -> Array:
  """Softmax over `axis` of `x` where `mask` (broadcastable to `x`) is set, saving only its output.

  Entries where `mask` is False get `finfo.min` before the softmax, so they get probability 0
  unless their whole row is masked (then the row is uniform, as in HF's models).

  >>> import jax.numpy as jnp
  >>> y = softmax(jnp.array([[0.0, 0.0, 5.0]]), jnp.array([[True, True, False]]))
  >>> [round(float(v), 3) for v in y[0]]
  [0.5, 0.5, 0.0]
  """
  mask = jnp.ones((), bool) if mask is None else jnp.asarray(mask, bool)
  mask = mask.reshape((1,) * (x.ndim - mask.ndim) + mask.shape)
  return _masked_softmax(x, mask, axis)


# ----------------------------------------------------------------------------- norms


def _as_row(v: Array, x: Array) -> Array:
  return v.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: Array, scale: Array, bias: Array, epsilon: float, dtype=None) -> Array:
  """`(x - mean) / sqrt(var + eps) * scale + bias` over the last axis.

  Statistics in f32 with the two-pass variance (as torch, and `nn.LayerNorm(use_fast_variance=
  False)` do) from x as given; the result has `dtype` (None: x's). The backward pass saves x
  and two f32 numbers per row
  (as torch's kernel does) and recomputes the normalised input from them.

  >>> import jax.numpy as jnp
  >>> y = layer_norm(jnp.array([[1.0, 3.0]]), jnp.ones(2), jnp.zeros(2), 0.0)
  >>> [round(float(v), 3) for v in y[0]]
  [-1.0, 1.0]
  """
  return _layer_norm_fwd(x, scale, bias, epsilon, dtype)[0]


def _layer_norm_stats(x32: Array, epsilon: float) -> tuple[Array, Array]:
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  centred = x32 - mean
  return mean, lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + epsilon)


def _layer_norm_fwd(x, scale, bias, epsilon, dtype):
  x32 = x.astype(jnp.float32)
  mean, rstd = _layer_norm_stats(x32, epsilon)
  y = ((x32 - mean) * rstd * _as_row(scale, x) + _as_row(bias, x)).astype(dtype or x.dtype)
  return y, (x, mean, rstd, scale, bias)


def _layer_norm_bwd(epsilon, dtype, res, g):
  del epsilon, dtype
  x, mean, rstd, scale, bias = res
  x_hat = (x.astype(jnp.float32) - mean) * rstd
  g32 = g.astype(jnp.float32)
  batch_axes = tuple(range(g.ndim - 1))
  d_scale = jnp.sum(g32 * x_hat, axis=batch_axes).astype(scale.dtype)
  d_bias = jnp.sum(g32, axis=batch_axes).astype(bias.dtype)
  gx = g32 * _as_row(scale, g)
  dx = rstd * (gx - jnp.mean(gx, axis=-1, keepdims=True)
               - x_hat * jnp.mean(gx * x_hat, axis=-1, keepdims=True))
  return dx.astype(x.dtype), d_scale, d_bias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def rms_norm(x: Array, scale: Array, epsilon: float, scale_in_f32: bool = True,
             dtype=None) -> Array:
  """`scale * x / sqrt(mean(x^2) + eps)` over the last axis, statistics in f32 from x as given;
  the result has `dtype` (None: x's).

  `scale_in_f32`: multiply by `scale` in f32 and then cast (HF's T5), or cast the normalised
  input to `dtype` first (HF's Llama); the two agree in f32. The backward pass saves x and
  one f32 number per row.

  >>> import jax.numpy as jnp
  >>> y = rms_norm(jnp.array([[3.0, 4.0]]), jnp.ones(2), 0.0)  # rms = sqrt(12.5)
  >>> [round(float(v), 3) for v in y[0]]
  [0.849, 1.131]
  """
  return _rms_norm_fwd(x, scale, epsilon, scale_in_f32, dtype)[0]


def _rms_norm_fwd(x, scale, epsilon, scale_in_f32, dtype):
  x32, dtype = x.astype(jnp.float32), dtype or x.dtype
  rstd = lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + epsilon)
  if scale_in_f32:
    y = (_as_row(scale, x) * (x32 * rstd)).astype(dtype)
  else:
    y = scale.astype(dtype) * (x32 * rstd).astype(dtype)
  return y, (x, rstd, scale)


def _rms_norm_bwd(epsilon, scale_in_f32, dtype, res, g):
  del epsilon, scale_in_f32, dtype
  x, rstd, scale = res
  x_hat = x.astype(jnp.float32) * rstd
  g32 = g.astype(jnp.float32)
  d_scale = jnp.sum(g32 * x_hat, axis=tuple(range(g.ndim - 1))).astype(scale.dtype)
  gx = g32 * _as_row(scale, g)
  dx = rstd * (gx - x_hat * jnp.mean(gx * x_hat, axis=-1, keepdims=True))
  return dx.astype(x.dtype), d_scale


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


# ----------------------------------------------------------------------------- dot operands

# `config.model.dot_dtype`: "" leaves every Dense's matmul to XLA in the compute dtype;
# "bfloat16" rounds the operands of the Dense layers' matmuls to bf16 and accumulates in f32
# (`dense_dot_general`), everything else staying in the compute dtype.
DOT_DTYPES = ("", "bfloat16")


@functools.lru_cache(maxsize=None)
def dense_dot_general(dot_dtype: str) -> Callable | None:
  """`nn.Dense`'s `dot_general` for `config.model.dot_dtype`; None (XLA's own) for "".

  Why: on CPUs with AMX, XLA:CPU in jaxlib 0.10 runs a bf16 x bf16 matmul *with an f32
  result* on the AMX tiles (a 2048^3 matmul at ~1.8 TFLOP/s on an idle 2-core Xeon, against
  ~0.3 in f32 and ~0.2 for bf16 x bf16 -> bf16), but JAX's transpose rule gives the backward matmuls
  the operand dtype as result type, which falls back to the slow paths. So the product here is
  a custom VJP whose three matmuls (forward, input and weight cotangents) all take narrow
  operands and an f32 result, as `torch.autocast` does; the residuals are the narrow operands.
  The result is cast back to the compute dtype (f32 models stay f32 between layers).

  Only Dense's contraction exists here: the last axis of `x` with a 2-D kernel's first.
  """
  if dot_dtype not in DOT_DTYPES:
    raise ValueError(f"dot_dtype {dot_dtype!r} is not one of {DOT_DTYPES}")
  if not dot_dtype:
    return None
  narrow = jnp.dtype(dot_dtype)

  def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                  **unused):
    del precision, unused  # The operands' dtype is the precision asked for.
    (contract_l, contract_r), (batch_l, batch_r) = dimension_numbers
    if (rhs.ndim != 2 or tuple(contract_l) != (lhs.ndim - 1,) or tuple(contract_r) != (0,)
        or batch_l or batch_r):
      raise ValueError(f"dense_dot_general({dot_dtype!r}) takes nn.Dense's contraction (x's "
                       f"last axis with a 2-D kernel's first), not {dimension_numbers}")
    out = jnp.dtype(preferred_element_type or jnp.result_type(lhs, rhs))
    return _narrow_dense(lhs, rhs, narrow, out, (jnp.dtype(lhs.dtype), jnp.dtype(rhs.dtype)))

  return dot_general


def _wide_dot(a: Array, b: Array, contract_a, contract_b) -> Array:
  return lax.dot_general(a, b, ((contract_a, contract_b), ((), ())),
                         preferred_element_type=jnp.float32)


def _narrow_product(x: Array, w: Array, narrow, out) -> tuple[Array, Array, Array]:
  """(x @ w in `out`, x and w rounded to `narrow`): the forward pass of both rules below."""
  xn, wn = x.astype(narrow), w.astype(narrow)
  return _wide_dot(xn, wn, (x.ndim - 1,), (0,)).astype(out), xn, wn


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _narrow_dense(x: Array, w: Array, narrow, out, cotangent_dtypes) -> Array:
  """x @ w from `narrow` operands, accumulated in f32, in `out`; cotangents in
  `cotangent_dtypes` (x's and w's own)."""
  del cotangent_dtypes
  return _narrow_product(x, w, narrow, out)[0]


def _narrow_dense_fwd(x, w, narrow, out, cotangent_dtypes):
  # symbolic_zeros: x and w come as CustomVJPPrimal, saying whether each is differentiated.
  # Each cotangent is computed only if asked for (a frozen kernel gets none), and only the
  # operand it needs is kept: the kernel for x's, the input for w's.
  del cotangent_dtypes
  y, xn, wn = _narrow_product(x.value, w.value, narrow, out)
  return y, (xn if w.perturbed else None, wn if x.perturbed else None)


def _narrow_dense_bwd(narrow, out, cotangent_dtypes, res, g):
  del out
  xn, wn = res
  dx = dw = None
  # symbolic_zeros' contract: an output cotangent that is zero may come as a SymbolicZero.
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    return dx, dw
  gn = g.astype(narrow)
  if wn is not None:
    dx = _wide_dot(gn, wn, (g.ndim - 1,), (1,)).astype(cotangent_dtypes[0])
  if xn is not None:
    lead = tuple(range(g.ndim - 1))
    dw = _wide_dot(xn, gn, lead, lead).astype(cotangent_dtypes[1])
  return dx, dw


_narrow_dense.defvjp(_narrow_dense_fwd, _narrow_dense_bwd, symbolic_zeros=True)


# ----------------------------------------------------------------------------- block remat

# What a transformer block keeps for its backward pass (`config.model.remat`); a model family
# wraps its block in `flax.linen.remat(policy=...)` unless "none". The values are the same
# either way (nothing random is redrawn: dropout's keys are the block's own).
REMAT_POLICIES: dict[str, Callable | None] = {
    # Plain autodiff: XLA may keep whatever the forward pass made, the base's weights that
    # fsdp gathered included, until the backward pass uses them again.
    "none": None,
    # Every residual saved, nothing recomputed; the block's inputs pass an optimization
    # barrier, so the weights fsdp gathers are gathered again in the backward pass instead of
    # held from the forward pass: the step holds one block's gathered weights, not the
    # model's, at the cost of a second all-gather per block.
    "weights": jax.checkpoint_policies.everything_saveable,
    # Only the block's inputs saved: the block is recomputed in the backward pass (a third
    # more FLOPs), for per-device batches whose activations do not fit.
    "full": jax.checkpoint_policies.nothing_saveable,
}
