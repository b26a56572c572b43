"""The projection's LoRA layouts: flax.nnx (the README's example, run as printed) and PEFT.

The toy tasks are built so that the projection's protection is exact, and so that its absence
(or a wrong projection) shows: task 1's inputs use features 0-2 only, task 2's inputs overlap
them, and task 2's targets contradict task 1's there. The input factor starts at zero, so after
task 1 it spans exactly task 1's input span; task 2's input factor, projected off that span,
never sees task 1's inputs, and task 1's loss stays where it was. Without the projection task 2
rewrites the map on task 1's inputs and task 1's loss rises by two orders of magnitude.
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lbcl_jax
from lbcl_jax import projection

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _readme_nnx_code() -> str:
  section = README.read_text(encoding="utf-8").split("### LoRA from `flax.nnx` or PEFT", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def readme_nnx():
  ns = {"__name__": "readme_nnx"}
  exec(compile(_readme_nnx_code(), str(README), "exec"), ns)  # pylint: disable=exec-used
  return ns


def test_readme_nnx_example_projection_keeps_task1(readme_nnx):
  before, after, task2 = readme_nnx["with_projection"]
  print(f"nnx, projection after Adam: task 1 {before:.5f} -> {after:.5f}, task 2 {task2:.5f}")
  assert abs(after - before) <= 0.01 * before  # the bar; in fact equal to ~1e-7
  assert task2 < 0.05  # task 2 learned (it starts near 3; its noise floor is 0.01)
  before_np, after_np, task2_np = readme_nnx["without"]
  print(f"nnx, no projection: task 1 {before_np:.5f} -> {after_np:.5f}, task 2 {task2_np:.5f}")
  assert before_np == pytest.approx(before, rel=1e-6)  # same task-1 training
  assert after_np > 10 * before_np  # forgetting without the projection


def test_readme_nnx_before_adam_leaks_as_documented(readme_nnx):
  """The README's number for the projection placed before Adam (rounding residue amplified)."""
  ns = readme_nnx
  nnx, optax_, lbcl = ns["nnx"], ns["optax"], ns["lbcl_jax"]
  model = ns["Model"]()
  ns["train"](model, optax_.adamw(1e-2), ns["task1"])
  before = float(ns["loss"](model, *ns["task1"]))
  old = jax.tree.map(lambda a: a[None], nnx.state(model, nnx.LoRAParam))
  model.base.kernel[...] += model.lora.lora_a[...] @ model.lora.lora_b[...]
  model.new_adapter(seed=1)
  tx = optax_.chain(lbcl.orthogonal_projection(old, layout="nnx_lora"), optax_.adamw(1e-2))
  ns["train"](model, tx, ns["task2"])
  after = float(ns["loss"](model, *ns["task1"]))
  print(f"nnx, projection before Adam: task 1 {before:.5f} -> {after:.5f}")
  # Not pinned to the digit (it is rounding residue amplified by Adam): the README says it rises.
  assert after > 1.01 * before


def _peft_sequence(ns, mode, steps=500, lr=1e-2):
  """The README's toy with PEFT-named factors in a plain dict: `y = x (W0 + B A)^T`.

  The same data, base and initial factors as the README's nnx example, transposed into PEFT's
  layout (`W: [out, in]`, `lora_A: [r, in]`, `lora_B: [out, r]`), trained with optax alone.

  mode: 'after' (layout 'peft_lora', after Adam), 'none', 'input_only' (`{'lora_A': 'rows'}`)
  or 'output_only' (`{'lora_B': 'columns'}`).
  """
  w0 = jnp.asarray(ns["w0"].T, jnp.float32)
  task1, task2 = ns["task1"], ns["task2"]
  model = ns["Model"]()  # only for the initial factors nnx draws, so results compare

  def fresh(seed):
    model.new_adapter(seed=seed)
    return {"q": {"lora_A": model.lora.lora_a[...].T, "lora_B": model.lora.lora_b[...].T}}

  def loss(params, base, x, y):
    a, b = params["q"]["lora_A"], params["q"]["lora_B"]
    return jnp.mean((x @ (base + b @ a).T - y) ** 2)

  def train(params, base, tx, task):
    state = tx.init(params)

    @jax.jit
    def step(params, state):
      grads = jax.grad(loss)(params, base, *task)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    for _ in range(steps):
      params, state = step(params, state)
    return params

  params = train(fresh(0), w0, optax.adamw(lr), task1)
  before = float(loss(params, w0, *task1))
  old = jax.tree.map(lambda a: a[None], params)  # {"q": {"lora_A": [1, r, in], ...}}
  base = w0 + params["q"]["lora_B"] @ params["q"]["lora_A"]  # fold task 1's adapter
  layout = {"after": "peft_lora", "input_only": {"lora_A": "rows"},
            "output_only": {"lora_B": "columns"}}.get(mode)
  tx = optax.adamw(lr)
  if layout is not None:
    tx = optax.chain(tx, lbcl_jax.orthogonal_projection(old, layout=layout))
  params = train(fresh(1), base, tx, task2)
  return before, float(loss(params, base, *task1)), float(loss(params, base, *task2))


def test_peft_layout_plain_pytrees_keeps_task1(readme_nnx):
  before, after, task2 = _peft_sequence(readme_nnx, "after")
  print(f"peft, projection after Adam: task 1 {before:.5f} -> {after:.5f}, task 2 {task2:.5f}")
  assert abs(after - before) <= 0.01 * before
  assert task2 < 0.05
  # The same numbers as the nnx model: the layouts are one projection, transposed.
  np.testing.assert_allclose((before, after, task2), readme_nnx["with_projection"], rtol=2e-3)
  before_n, after_n, _ = _peft_sequence(readme_nnx, "none")
  print(f"peft, no projection: task 1 {before_n:.5f} -> {after_n:.5f}")
  assert after_n > 10 * before_n
  # The protection is the input side's (lora_A starts at zero); the output side alone is not.
  before_o, after_o, _ = _peft_sequence(readme_nnx, "output_only")
  print(f"peft, only lora_B projected: task 1 {before_o:.5f} -> {after_o:.5f}")
  assert after_o > 10 * before_o
  before_i, after_i, task2_i = _peft_sequence(readme_nnx, "input_only")
  print(f"peft, only lora_A projected: task 1 {before_i:.5f} -> {after_i:.5f}, "
        f"task 2 {task2_i:.5f}")
  assert abs(after_i - before_i) <= 0.01 * before_i and task2_i < 0.02


# ----- unit checks of the layouts against the svd layout and an exact projector -------------

K, R, D_IN, D_OUT = 2, 3, 9, 7


def _exact_complement(cols):
  q, _ = np.linalg.qr(np.asarray(cols, np.float64))
  return np.eye(cols.shape[0]) - q @ q.T


def test_layouts_are_the_svd_projection_renamed_and_transposed():
  rng = np.random.default_rng(3)
  u = rng.normal(size=(K, D_OUT, R)).astype(np.float32)  # output side, columns
  v = rng.normal(size=(K, R, D_IN)).astype(np.float32)   # input side, rows
  gu = rng.normal(size=(D_OUT, R)).astype(np.float32)
  gv = rng.normal(size=(R, D_IN)).astype(np.float32)
  svd = lbcl_jax.orthogonal_projection({"l": {"U": u, "sigma": np.ones((K, R)), "V": v}})
  ref, _ = svd.update({"l": {"U": gu, "V": gv}}, svd.init(None))
  p_out = _exact_complement(np.concatenate(list(u), axis=1))
  p_in = _exact_complement(np.concatenate(list(v), axis=0).T)
  np.testing.assert_allclose(ref["l"]["U"], p_out @ gu, atol=2e-5)
  np.testing.assert_allclose(ref["l"]["V"], gv @ p_in, atol=2e-5)
  cases = {
      # nnx: lora_a [in, r] is V^T, lora_b [r, out] is U^T.
      "nnx_lora": ({"lora_a": v.transpose(0, 2, 1), "lora_b": u.transpose(0, 2, 1)},
                   {"lora_a": gv.T, "lora_b": gu.T},
                   {"lora_a": ref["l"]["V"].T, "lora_b": ref["l"]["U"].T}),
      # PEFT: lora_A [r, in] is V, lora_B [out, r] is U.
      "peft_lora": ({"lora_A": v, "lora_B": u}, {"lora_A": gv, "lora_B": gu},
                    {"lora_A": ref["l"]["V"], "lora_B": ref["l"]["U"]}),
      # A custom naming (lorax-style b: [in, r], a: [r, out]).
      "custom": ({"b": v.transpose(0, 2, 1), "a": u.transpose(0, 2, 1)},
                 {"b": gv.T, "a": gu.T},
                 {"b": ref["l"]["V"].T, "a": ref["l"]["U"].T}),
  }
  for name, (old, grads, want) in cases.items():
    layout = {"b": "columns", "a": "rows"} if name == "custom" else name
    for jit in (False, True):
      tx = lbcl_jax.orthogonal_projection({"blk": {"l": old}}, layout=layout)
      update = jax.jit(tx.update) if jit else tx.update
      got, _ = update({"blk": {"l": grads}}, tx.init(None))
      for f, w in want.items():
        np.testing.assert_allclose(got["blk"]["l"][f], w, rtol=1e-5, atol=1e-5, err_msg=name)
    # Traced old factors (bases built in init, fixed shapes) agree.
    traced = jax.jit(lambda o, g, layout=layout: (lambda t: t.update(g, t.init(g))[0])(
        lbcl_jax.orthogonal_projection(o, layout=layout)))({"blk": {"l": old}},
                                                           {"blk": {"l": grads}})
    for f, w in want.items():
      np.testing.assert_allclose(traced["blk"]["l"][f], w, rtol=1e-5, atol=1e-5, err_msg=name)


def test_nnx_state_with_variable_leaves_and_other_leaves_untouched():
  nnx = pytest.importorskip("flax.nnx")

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.enc = nnx.LoRALinear(D_IN, D_OUT, lora_rank=R, rngs=rngs)
      self.head = nnx.LoRA(D_OUT, R, 4, rngs=rngs)

    def __call__(self, x):
      return self.head(self.enc(x))

  net = Net(nnx.Rngs(0))
  state = nnx.state(net, nnx.LoRAParam)
  old = jax.tree.map(lambda a: jnp.stack([a, 2 * a + 1]), state)  # K = 2, Variable leaves
  tx = lbcl_jax.orthogonal_projection(old, layout="nnx_lora")
  assert set(tx.init(None).bases) == {"enc/lora", "head"}
  grads = nnx.grad(lambda m, x: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, nnx.Param))(
      net, jnp.ones((3, D_IN)))  # all params (kernel, bias too), as Variables
  out, _ = tx.update(grads, tx.init(None))
  flat_in = dict(jax.tree_util.tree_flatten_with_path(grads)[0])
  for path, g in jax.tree_util.tree_flatten_with_path(out)[0]:
    keys = [projection._key_name(e) for e in path]  # pylint: disable=protected-access
    if "lora_a" in keys:
      old_a = old["enc"]["lora"]["lora_a"] if keys[0] == "enc" else old["head"]["lora_a"]
      cols = np.concatenate(list(np.asarray(old_a[...])), axis=1)
      np.testing.assert_allclose(g, _exact_complement(cols) @ flat_in[path], atol=2e-5)
    elif "lora_b" in keys:
      old_b = old["enc"]["lora"]["lora_b"] if keys[0] == "enc" else old["head"]["lora_b"]
      rows = np.concatenate(list(np.asarray(old_b[...])), axis=0)
      np.testing.assert_allclose(g, flat_in[path] @ _exact_complement(rows.T), atol=2e-5)
    else:  # kernel, bias: not factors
      np.testing.assert_array_equal(g, flat_in[path])


def test_bad_layouts_and_shapes_are_refused():
  old = {"q": {"lora_A": jnp.ones((1, R, D_IN)), "lora_B": jnp.ones((1, D_OUT, R))}}
  with pytest.raises(ValueError, match="layout must be one of"):
    lbcl_jax.orthogonal_projection(old, layout="lora")
  with pytest.raises(ValueError, match="orientation"):
    lbcl_jax.orthogonal_projection(old, layout={"lora_A": "cols"})
  with pytest.raises(ValueError, match="stacked on a leading task axis"):
    lbcl_jax.orthogonal_projection({"q": {"lora_A": jnp.ones((R, D_IN))}}, layout="peft_lora")
  tx = lbcl_jax.orthogonal_projection(old, layout="peft_lora")
  with pytest.raises(ValueError, match="q/lora_A"):  # an nnx-shaped factor under PEFT's name
    tx.update({"q": {"lora_A": jnp.ones((D_IN, R))}}, tx.init(None))
  with pytest.raises(ValueError, match="does not name"):
    projection.from_bases(projection.build_bases(old, layout="peft_lora"))  # svd layout
  # A factor with no old counterpart, and a layer absent from old, pass through.
  g = {"q": {"lora_B": jnp.ones((D_OUT, R)), "extra": jnp.ones(3)}, "k": {"lora_A": jnp.ones((R, 2))}}
  tx = lbcl_jax.orthogonal_projection({"q": {"lora_B": old["q"]["lora_B"]}}, layout="peft_lora")
  out, _ = tx.update(g, tx.init(None))
  np.testing.assert_array_equal(out["k"]["lora_A"], g["k"]["lora_A"])
  np.testing.assert_array_equal(out["q"]["extra"], g["q"]["extra"])
