"""Sharded training equals 1-device training on 8 fake CPU devices: T5 on pure data, fsdp and
tensor meshes, BERT and Llama on one mesh that splits all three axes (2 x 2 x 2)."""

from __future__ import annotations

import numpy as np
import pytest

import driver_utils as du

MESHES = {
    "data": ["--config.mesh.data=8", "--config.mesh.fsdp=1", "--config.mesh.tensor=1"],
    "fsdp": ["--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.mesh.tensor=1"],
    "tensor": ["--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=8"],
}
MIXED = {"mixed": ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]}


@pytest.mark.parametrize("family", ["bert", "t5", "llama"])
def test_sharded_losses_equal_single_device(tmp_path, family):
  model = getattr(du, f"tiny_{family}")(tmp_path)
  # Two tasks of lbcl: the second exercises injection, projection and the sharded old stack.
  args = [*du.FAST, *model, "--config.optim.max_steps_per_task=3", "--config.plots=False",
          "--config.checkpoint.every_steps=0", "--config.eval.mode=rank",
          "--config.data.max_source_length=16", "--config.optim.num_epochs=2"]
  ref = du.run_losses_subprocess(tmp_path / "one", args, {"one": ["--config.mesh.data=1"]}, 1)["one"]
  assert sum(len(v) for v in ref.values()) == 6
  meshes = MESHES if family == "t5" else MIXED
  got = du.run_losses_subprocess(tmp_path / "eight", args, meshes, 8)
  for name in meshes:
    assert got[name].keys() == ref.keys()
    for task in ref:
      # Sharded reductions sum in another order: equal up to f32 rounding (losses are
      # token sums of ~40, so a relative tolerance).
      np.testing.assert_allclose(np.asarray(got[name][task])[:, 1], np.asarray(ref[task])[:, 1],
                                 rtol=2e-6, atol=1e-6, err_msg=f"{name} mesh, task {task}")
