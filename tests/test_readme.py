"""The README's optax example runs as printed, and its transform does what the README says."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_projection_example_runs_and_projects():
  text = README.read_text()
  section = text.split("## The optax transform in your own code", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  ns = {}
  exec(compile(code, str(README), "exec"), ns)  # pylint: disable=exec-used
  old, grads, lbcl_jax = ns["old"], ns["grads"], ns["lbcl_jax"]
  assert ns["new"]["encoder"]["q"]["U"].shape == (12, 4)
  # The chain's first transform leaves the gradient with no component in the old spans.
  tx = lbcl_jax.orthogonal_projection(old)
  projected, _ = tx.update(grads, tx.init(grads))
  g_u, g_v = (np.asarray(projected["encoder"]["q"][n]) for n in ("U", "V"))
  q_u, _ = np.linalg.qr(np.concatenate(list(np.asarray(old["encoder"]["q"]["U"])), axis=1))
  q_v, _ = np.linalg.qr(np.concatenate(list(np.asarray(old["encoder"]["q"]["V"])), axis=0).T)
  assert np.linalg.norm(q_u.T @ g_u) <= 1e-6 * np.linalg.norm(np.asarray(grads["encoder"]["q"]["U"]))
  assert np.linalg.norm(g_v @ q_v) <= 1e-6 * np.linalg.norm(np.asarray(grads["encoder"]["q"]["V"]))
  assert np.linalg.norm(g_u) > 0 and np.linalg.norm(g_v) > 0
