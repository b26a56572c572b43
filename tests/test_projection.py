"""Tests for lbcl_jax.projection: the orthogonal gradient projection transform."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lbcl_jax
from lbcl_jax import projection

D_IN, D_OUT, R, K = 12, 10, 2, 3
LAYERS = ("enc/q", "enc/v")


def _old_stack(seed=0, k=K):
  rng = np.random.default_rng(seed)
  return {
      "enc": {
          name: {
              "U": jnp.asarray(rng.normal(size=(k, D_OUT, R)), jnp.float32),
              "sigma": jnp.asarray(rng.uniform(0.5, 1.5, size=(k, R)), jnp.float32),
              "V": jnp.asarray(rng.normal(size=(k, R, D_IN)), jnp.float32),
          }
          for name in ("q", "v")
      }
  }


def _new_tree(seed=1, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return {
      "enc": {
          name: {
              "U": jnp.asarray(rng.normal(size=(D_OUT, R)), dtype),
              "sigma": jnp.asarray(rng.normal(size=(R,)), dtype),
              "V": jnp.asarray(rng.normal(size=(R, D_IN)), dtype),
          }
          for name in ("q", "v")
      }
  }


def _old_u_cols(old, name):
  u = np.asarray(old["enc"][name]["U"], np.float64)
  return np.concatenate(list(u), axis=1)  # [d_out, K*r]


def _old_v_rows(old, name):
  v = np.asarray(old["enc"][name]["V"], np.float64)
  return np.concatenate(list(v), axis=0)  # [K*r, d_in]


def _in_span_residual(g, basis_cols):
  """|| P_span(basis) g || / ||g|| with an exact float64 projector."""
  q, _ = np.linalg.qr(basis_cols)
  return np.linalg.norm(q @ (q.T @ g)) / np.linalg.norm(g)


@pytest.fixture(scope="module")
def projected():
  old, grads = _old_stack(), _new_tree()
  tx = lbcl_jax.orthogonal_projection(old)
  state = jax.jit(tx.init)(grads)
  out, _ = jax.jit(tx.update)(grads, state)
  return old, grads, tx, state, out


def test_no_component_left_in_old_span(projected):
  old, grads, _, _, out = projected
  for name in ("q", "v"):
    gu = np.asarray(out["enc"][name]["U"], np.float64)
    gv = np.asarray(out["enc"][name]["V"], np.float64)
    assert _in_span_residual(gu, _old_u_cols(old, name)) <= 1e-6
    assert _in_span_residual(gv.T, _old_v_rows(old, name).T) <= 1e-6
    # Only the in-span part was removed: g - out lies in the old span.
    diff = np.asarray(grads["enc"][name]["U"], np.float64) - gu
    q, _ = np.linalg.qr(_old_u_cols(old, name))
    np.testing.assert_allclose(q @ (q.T @ diff), diff, atol=1e-5)
    # sigma untouched, bit for bit.
    np.testing.assert_array_equal(out["enc"][name]["sigma"], grads["enc"][name]["sigma"])


def test_orthogonal_gradient_passes_unchanged(projected):
  old, grads, tx, state, out = projected
  # `out` is already orthogonal to the old spans: projecting again must not change it.
  again, _ = jax.jit(tx.update)(out, state)
  for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(out)):
    np.testing.assert_allclose(a, b, atol=1e-6 * float(jnp.max(jnp.abs(b))))
  # And a hand-made orthogonal gradient.
  cols = _old_u_cols(old, "q")
  full_q, _ = np.linalg.qr(np.concatenate([cols, np.random.default_rng(3).normal(
      size=(D_OUT, D_OUT))], axis=1))
  g_orth = full_q[:, K * R:K * R + R].astype(np.float32)  # orthogonal to span(cols)
  tree = {"enc": {"q": {"U": jnp.asarray(g_orth)}}}
  res, _ = tx.update(tree, state)
  np.testing.assert_allclose(res["enc"]["q"]["U"], g_orth, atol=1e-6)


def test_full_state_zeroes_old_and_matches_new_only(projected):
  old, grads, tx, state, out = projected
  full = {"old": jax.tree_util.tree_map(jnp.ones_like, old), "new": grads}
  res, _ = tx.update(full, state)
  assert all(not np.any(x) for x in jax.tree_util.tree_leaves(res["old"]))
  for a, b in zip(jax.tree_util.tree_leaves(res["new"]), jax.tree_util.tree_leaves(out)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_equals_sum_of_per_task_projections_when_orthogonal():
  # Old tasks spanning mutually orthogonal subspaces (columns of one orthogonal matrix).
  rng = np.random.default_rng(7)
  qu, _ = np.linalg.qr(rng.normal(size=(D_OUT, D_OUT)))
  qv, _ = np.linalg.qr(rng.normal(size=(D_IN, D_IN)))
  mix = lambda: rng.normal(size=(R, R))  # each task's factors: any basis of its block
  u = np.stack([qu[:, k * R:(k + 1) * R] @ mix() for k in range(K)])
  v = np.stack([(qv[:, k * R:(k + 1) * R] @ mix()).T for k in range(K)])
  old = {"l": {"U": jnp.asarray(u, jnp.float32), "sigma": jnp.ones((K, R)),
               "V": jnp.asarray(v, jnp.float32)}}
  g = {"l": {"U": jnp.asarray(rng.normal(size=(D_OUT, R)), jnp.float32),
             "V": jnp.asarray(rng.normal(size=(R, D_IN)), jnp.float32)}}
  tx = projection.orthogonal_projection(old)
  res, _ = tx.update(g, tx.init(g))
  # The paper's form: (I - sum_k Q_k Q_k^T) g per factor.
  pu = np.eye(D_OUT) - sum(np.linalg.qr(u[k])[0] @ np.linalg.qr(u[k])[0].T for k in range(K))
  pv = np.eye(D_IN) - sum(np.linalg.qr(v[k].T)[0] @ np.linalg.qr(v[k].T)[0].T
                          for k in range(K))
  np.testing.assert_allclose(res["l"]["U"], pu @ np.asarray(g["l"]["U"]), atol=1e-5)
  np.testing.assert_allclose(res["l"]["V"], np.asarray(g["l"]["V"]) @ pv, atol=1e-5)


def _exact_projector(cols):
  """I - P_span(cols) in float64, via SVD with numpy's default rank rule."""
  u, s, _ = np.linalg.svd(cols, full_matrices=True)
  rank = int(np.sum(s > 1e-6 * s.max()))
  return np.eye(cols.shape[0]) - u[:, :rank] @ u[:, :rank].T


@pytest.mark.parametrize("k", [1, 3, 6])  # K*r below, around and above d/2 and d
def test_matches_exact_projector_span_and_complement(k):
  old = _old_stack(seed=k, k=k)
  g = _new_tree(seed=20 + k)
  tx = projection.orthogonal_projection(old)
  res, _ = tx.update(g, tx.init(g))
  bases = tx.init(g).bases["enc/q"]
  kinds = {f: next(iter(bases[f])) for f in ("U", "V")}
  # Only the smaller of span / complement is stored.
  for f, d in (("U", D_OUT), ("V", D_IN)):
    width = bases[f][kinds[f]].shape[1]
    assert width <= d // 2 and width == (min(d, k * R) if kinds[f] == "span"
                                         else d - min(d, k * R))
  for name in ("q", "v"):
    pu = _exact_projector(_old_u_cols(old, name))
    pv = _exact_projector(_old_v_rows(old, name).T)
    np.testing.assert_allclose(res["enc"][name]["U"], pu @ np.asarray(g["enc"][name]["U"]),
                               atol=2e-5)
    np.testing.assert_allclose(res["enc"][name]["V"], np.asarray(g["enc"][name]["V"]) @ pv,
                               atol=2e-5)
  # Built from traced old adapters (fixed-shape span with zeroed columns): same result.
  traced = jax.jit(lambda o, g: projection.orthogonal_projection(o).update(
      g, projection.orthogonal_projection(o).init(g))[0])(old, g)
  for a, b in zip(jax.tree_util.tree_leaves(traced), jax.tree_util.tree_leaves(res)):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_rank_deficient_old_and_qr_method():
  old = _old_stack()
  dup = jax.tree_util.tree_map(lambda x: jnp.concatenate([x, x]), old)  # rank K*r of 2K*r
  fixed = projection.build_bases(dup, compact=False)["enc/q"]["U"]["span"]
  assert fixed.shape == (D_OUT, D_OUT)  # min(d_out, 2*K*r) columns, fixed shape
  norms = np.linalg.norm(np.asarray(fixed), axis=0)
  assert int(np.sum(norms > 0.5)) == K * R and np.all((norms > 0.5) | (norms == 0))
  compact = projection.build_bases(dup)["enc/q"]["U"]
  assert compact["complement"].shape == (D_OUT, D_OUT - K * R)  # the true rank, not 2K*r
  g = _new_tree()
  tx0 = projection.orthogonal_projection(old)
  ref, _ = tx0.update(g, tx0.init(g))
  for method in ("svd", "qr"):
    for stack in (old, dup):  # qr falls back to svd on the rank-deficient one
      for compact in (True, False):
        if method == "qr" and stack is dup and not compact:
          continue  # documented: unpivoted QR needs full column rank
        tx = projection.orthogonal_projection(stack, method=method, compact=compact)
        res, _ = tx.update(g, tx.init(g))
        for a, c in zip(jax.tree_util.tree_leaves(res), jax.tree_util.tree_leaves(ref)):
          np.testing.assert_allclose(a, c, atol=2e-5)
  with pytest.raises(ValueError):
    projection.orthogonal_projection(old, method="lu")


def test_empty_old_is_identity_and_from_bases():
  g = _new_tree()
  tx = projection.orthogonal_projection({})
  res, _ = tx.update(g, tx.init(g))
  for a, b in zip(jax.tree_util.tree_leaves(res), jax.tree_util.tree_leaves(g)):
    np.testing.assert_array_equal(a, b)
  old = _old_stack()
  tx1 = projection.from_bases(projection.build_bases(old))
  tx2 = projection.scale_by_orthogonal_projection(old)
  r1, _ = tx1.update(g, tx1.init(g))
  r2, _ = tx2.update(g, tx2.init(g))
  for a, b in zip(jax.tree_util.tree_leaves(r1), jax.tree_util.tree_leaves(r2)):
    np.testing.assert_array_equal(a, b)


def test_bf16_dtype_preserved_under_jit(projected):
  old, _, tx, state, out = projected
  g16 = _new_tree(dtype=jnp.bfloat16)
  res, _ = jax.jit(tx.update)(g16, state)
  for a, b in zip(jax.tree_util.tree_leaves(res), jax.tree_util.tree_leaves(out)):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=0.05, rtol=0.02)
  gu = np.asarray(res["enc"]["q"]["U"], np.float64)
  assert _in_span_residual(gu, _old_u_cols(old, "q")) <= 1e-2  # bf16 rounding only


def test_chain_with_adamw_and_multisteps():
  old = _old_stack()
  params = _new_tree(5)
  grads = [_new_tree(10 + i) for i in range(4)]
  tx = optax.chain(lbcl_jax.orthogonal_projection(old), optax.adamw(1e-2, weight_decay=0.0))
  ms = optax.MultiSteps(tx, every_k_schedule=2)

  @jax.jit
  def run(params, grads):
    state = ms.init(params)
    for g in grads:
      upd, state = ms.update(g, state, params)
      params = optax.apply_updates(params, upd)
    return params

  got = run(params, grads)
  # Reference: the plain chain on the mean of each pair of micro-batch gradients.
  ref, state = params, tx.init(params)
  for i in (0, 2):
    mean = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, grads[i], grads[i + 1])
    upd, state = tx.update(mean, state, ref)
    ref = optax.apply_updates(ref, upd)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The transform's state is found in the chain state with fixed-shape bases.
  inner = ms.init(params).inner_opt_state[0]
  assert isinstance(inner, projection.OrthogonalProjectionState)
  assert inner.bases["enc/q"]["U"]["complement"].shape == (D_OUT, D_OUT - K * R)
  assert inner.bases["enc/q"]["V"]["span"].shape == (D_IN, K * R)


_SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from lbcl_jax import projection
    assert jax.device_count() == 8, jax.device_count()
    rng = np.random.default_rng(0)
    K, R, DI, DO = 3, 4, 64, 32
    old = {"l": {"U": jnp.asarray(rng.normal(size=(K, DO, R)), jnp.float32),
                 "sigma": jnp.ones((K, R)),
                 "V": jnp.asarray(rng.normal(size=(K, R, DI)), jnp.float32)}}
    g = {"l": {"U": jnp.asarray(rng.normal(size=(DO, R)), jnp.float32),
               "sigma": jnp.ones((R,)),
               "V": jnp.asarray(rng.normal(size=(R, DI)), jnp.float32)}}
    tx = projection.orthogonal_projection(old)
    ref, _ = jax.jit(tx.update)(g, tx.init(g))
    mesh = Mesh(np.array(jax.devices()), ("x",))
    row = NamedSharding(mesh, P("x", None))
    col = NamedSharding(mesh, P(None, "x"))
    rep = NamedSharding(mesh, P())
    state_sh = projection.OrthogonalProjectionState(
        bases={"l": {"U": {"span": row}, "V": {"span": row}}})
    state = jax.jit(tx.init, out_shardings=state_sh)(g)
    assert len(state.bases["l"]["U"]["span"].sharding.device_set) == 8
    g_sh = jax.device_put(g, {"l": {"U": row, "sigma": rep, "V": col}})
    out, new_state = jax.jit(tx.update)(g_sh, state)
    assert len(out["l"]["U"].sharding.device_set) == 8
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    print("SHARDED_OK", state.bases["l"]["U"]["span"].sharding.spec)
""")


def test_state_sharded_over_8_devices():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", _SHARDED], env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "SHARDED_OK" in proc.stdout


@pytest.mark.parametrize("shape,kind", [((576, 104), "span"), ((192, 104), "complement"),
                                        ((64, 8), "span"), ((16, 40), "complement")])
def test_compact_basis_projects_as_the_full_svd_does(shape, kind):
  """`compact_basis` takes the span from the thin SVD (the full one forms all d columns, most
  of LB-CL's set-up at 13 old tasks): the projector it gives is the full SVD's, and it keeps
  the smaller side. A rank-deficient matrix keeps only its rank."""
  rng = np.random.default_rng(0)
  d, n = shape
  m = rng.standard_normal((d, n)) * 0.02
  m[:, -1] = m[:, 0] + m[:, 1]  # rank n - 1 (or d)
  basis = projection.compact_basis(m)
  assert list(basis) == [kind]
  q = np.asarray(basis[kind], np.float64)
  u, s, _ = np.linalg.svd(m, full_matrices=True)
  rank = int(np.sum(s > 1e-6 * s.max()))
  assert rank == min(d, n - 1)
  ref = u[:, :rank] if kind == "span" else u[:, rank:]
  assert q.shape == ref.shape
  np.testing.assert_allclose(q @ q.T, ref @ ref.T, atol=1e-6)
