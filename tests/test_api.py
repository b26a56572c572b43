"""The public transform's API: its docstring examples run, and importing it stays light."""

import doctest
import json
import subprocess
import sys

from lbcl_jax import projection

# Modules a user importing the transform into their own training code must not pay for.
HEAVY = ("flax", "transformers", "orbax", "tensorboardX", "matplotlib", "torch", "tensorflow",
         "datasets", "ml_collections", "safetensors")


def test_projection_docstring_examples_run():
  """The Examples of `orthogonal_projection` (and every other docstring of the module)."""
  result = doctest.testmod(projection, optionflags=doctest.ELLIPSIS, verbose=False)
  assert result.failed == 0, result
  assert result.attempted >= 20, result  # the svd, nnx_lora and peft_lora examples


_IMPORT = """
import json, sys, time
t = time.perf_counter()
import lbcl_jax.projection
import lbcl_jax
seconds = time.perf_counter() - t
assert lbcl_jax.orthogonal_projection is lbcl_jax.projection.orthogonal_projection
print(json.dumps({"seconds": seconds, "modules": sorted(sys.modules)}))
"""


def test_import_projection_pulls_in_jax_and_optax_only():
  proc = subprocess.run([sys.executable, "-c", _IMPORT], capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  tops = {m.split(".")[0] for m in report["modules"]}
  assert {"jax", "optax"} <= tops
  assert not tops & set(HEAVY), sorted(tops & set(HEAVY))
  lbcl = sorted(m for m in report["modules"] if m.startswith("lbcl_jax"))
  assert lbcl == ["lbcl_jax", "lbcl_jax.projection"], lbcl
  print(f"import lbcl_jax.projection: {report['seconds']:.2f} s, {len(tops)} top-level modules")

