"""Sharded training equals 1-device training: data, fsdp and tensor meshes on 8 fake CPU devices."""

from __future__ import annotations

import json

import numpy as np
import pytest

import driver_utils as du

MESHES = {
    "data": ["--config.mesh.data=8", "--config.mesh.fsdp=1", "--config.mesh.tensor=1"],
    "fsdp": ["--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.mesh.tensor=1"],
    "tensor": ["--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=8"],
}


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_sharded_losses_equal_single_device(tmp_path, family):
  model = du.tiny_bert(tmp_path) if family == "bert" else du.tiny_t5(tmp_path)
  # lbcl on the second task exercises injection, projection and the sharded old stack.
  args = [*du.FAST, *model, "--config.optim.max_steps_per_task=3", "--config.plots=False",
          "--config.checkpoint.every_steps=0"]
  du.run_main(tmp_path / "one", *args, "--config.mesh.data=1", devices=1)
  ref = json.loads((tmp_path / "one" / "results.json").read_text())["losses"]
  assert sum(len(v) for v in ref.values()) == 6
  for name, mesh in MESHES.items():
    du.run_main(tmp_path / name, *args, *mesh, devices=8)
    got = json.loads((tmp_path / name / "results.json").read_text())["losses"]
    assert got.keys() == ref.keys()
    for task in ref:
      np.testing.assert_allclose(np.asarray(got[task])[:, 1], np.asarray(ref[task])[:, 1],
                                 rtol=0, atol=1e-5, err_msg=f"{name} mesh, task {task}")
