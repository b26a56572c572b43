"""Tests for lbcl_jax.olora: O-LoRA's orthogonality and L2 loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lbcl_jax import olora

K, R, D_IN, D_OUT = 3, 2, 7, 5


def _state(seed=0):
  rng = np.random.default_rng(seed)
  layer_old = lambda: {"U": rng.normal(size=(K, D_OUT, R)), "sigma": np.ones((K, R)),
                       "V": rng.normal(size=(K, R, D_IN))}
  layer_new = lambda: {"U": rng.normal(size=(D_OUT, R)), "sigma": np.ones((R,)),
                       "V": rng.normal(size=(R, D_IN))}
  np_state = {"old": {"a": {"q": layer_old(), "v": layer_old()}},
              "new": {"a": {"q": layer_new(), "v": layer_new()}}}
  return np_state, jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), np_state)


def _numpy_penalty(s, lambda1, lambda2, squared=False):
  orth, l2 = 0.0, 0.0
  for name in ("q", "v"):
    old, new = s["old"]["a"][name], s["new"]["a"][name]
    for k in range(K):  # O-LoRA's lora_A holds all earlier tasks' A rows
      orth += np.abs(old["V"][k] @ new["V"].T).sum()
    for factor in ("U", "V"):
      sq = (new[factor] ** 2).sum()
      l2 += sq if squared else np.sqrt(sq)
  return lambda1 * orth + lambda2 * l2


def test_penalty_matches_numpy():
  np_state, state = _state()
  got = jax.jit(olora.olora_penalty)(state, 0.5, 0.1)
  np.testing.assert_allclose(got, _numpy_penalty(np_state, 0.5, 0.1), rtol=1e-5)
  got_sq = olora.olora_penalty(state, 0.3, 0.2, l2="squared")
  np.testing.assert_allclose(got_sq, _numpy_penalty(np_state, 0.3, 0.2, True), rtol=1e-5)
  # Defaults: lambda1 = 0.5, lambda2 = 0.
  np.testing.assert_allclose(olora.olora_penalty(state), _numpy_penalty(np_state, 0.5, 0.0),
                             rtol=1e-5)
  with pytest.raises(ValueError):
    olora.l2_loss(state["new"], l2="l1")


def test_zero_without_old_or_when_orthogonal_and_finite_grads_at_zero_u():
  _, state = _state(1)
  assert float(olora.olora_penalty({"old": {}, "new": state["new"]})) == 0.0
  # New A rows orthogonal to all old A rows -> no orthogonality loss.
  v_old = np.asarray(state["old"]["a"]["q"]["V"]).reshape(K * R, D_IN)
  q, _ = np.linalg.qr(np.concatenate([v_old.T, np.eye(D_IN)], axis=1))
  orth = {"old": {"a": {"q": state["old"]["a"]["q"]}},
          "new": {"a": {"q": {**state["new"]["a"]["q"],
                              "V": jnp.asarray(q[:, K * R:K * R + R].T, jnp.float32)}}}}
  assert float(olora.orthogonality_loss(orth)) < 1e-5
  # LoRA init has U == 0 exactly: the L2 term's gradient must stay finite there.
  zero_u = {"old": state["old"], "new": jax.tree_util.tree_map(jnp.zeros_like, state["new"])}
  grads = jax.grad(lambda new: olora.olora_penalty({**zero_u, "new": new}, 0.5, 1.0))(
      zero_u["new"])
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
  # Only the new A (V) gets an orthogonality gradient, never U.
  grads = jax.grad(lambda new: olora.olora_penalty({**state, "new": new}))(state["new"])
  assert not np.any(np.asarray(grads["a"]["q"]["U"]))
  assert np.any(np.asarray(grads["a"]["q"]["V"]))
