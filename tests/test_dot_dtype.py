"""`config.model.dot_dtype`: bf16 operands for the Dense layers' matmuls, f32 elsewhere.

Every family's model takes it (Llama and the decoders built on it, T5, BERT); the backbone
applies it from the run config; with it a model's loss and adapter gradients track the f32
model's within bf16 rounding, and differ from them (the option does something). The products'
own numerics are `test_ops.py`'s.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lbcl_jax import adapters
from lbcl_jax import backbones
from lbcl_jax import config_lib
from lbcl_jax.errors import InputError
from lbcl_jax.models import bert as bert_lib
from lbcl_jax.models import llama as llama_lib
from lbcl_jax.models import t5 as t5_lib

import driver_utils as du

FAMILIES = {
    "llama": (llama_lib, du.TINY_LLAMA, llama_lib.LlamaForCausalLM),
    "t5": (t5_lib, du.TINY_T5, t5_lib.T5),
    "bert": (bert_lib, du.TINY_BERT, bert_lib.BertModel),
}


def _loss_and_grads(family, dot_dtype):
  lib, hf_cfg, make = FAMILIES[family]
  cfg = dataclasses.replace(lib.config_from_hf(hf_cfg), dot_dtype=dot_dtype)
  model = make(cfg)
  ids = jax.random.randint(jax.random.key(2), (2, 12), 3, 500)
  mask = jnp.ones_like(ids)
  call = {"llama": lambda p: model.apply({"params": p}, ids, mask),
          "t5": lambda p: model.apply({"params": p}, ids, mask, ids[:, :5]),
          "bert": lambda p: model.apply({"params": p}, ids, mask)}[family]
  params = model.init(jax.random.key(0), ids, mask, *((ids[:, :5],) if family == "t5" else ()))
  params = params["params"]
  new = adapters.init_new(jax.random.key(1), params,
                          adapters.AdapterConfig(targets=lib.ADAPTER_TARGETS, rank=4))
  new = jax.tree.map(lambda x: x + 0.1, new)  # sigma starts at 0: make the adapter count

  def loss(trainable):
    with adapters.intercept(jax.tree.map(lambda x: x[None], trainable), 1.0):
      out = call(params)
    # A fixed random read-out: BERT's output is layer-normed, so its mean square would not
    # depend on the adapter at all.
    return jnp.mean(out * jax.random.normal(jax.random.key(3), out.shape))

  return jax.jit(jax.value_and_grad(loss))(new)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_dots_track_the_f32_model(family):
  (ref_loss, ref_grads), (loss, grads) = (_loss_and_grads(family, d) for d in ("", "bfloat16"))
  np.testing.assert_allclose(loss, ref_loss, rtol=2e-2)
  a = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
  b = np.concatenate([np.ravel(g) for g in jax.tree.leaves(ref_grads)])
  assert a.dtype == b.dtype == np.float32
  cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
  assert cosine > 0.999, cosine
  assert not np.array_equal(a, b)  # the option reached the matmuls


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_refuses_an_unknown_dot_dtype(family):
  lib, hf_cfg, _ = FAMILIES[family]
  with pytest.raises(ValueError, match="dot_dtype 'float16'"):
    dataclasses.replace(lib.config_from_hf(hf_cfg), dot_dtype="float16")


def test_the_backbone_applies_the_run_configs_dot_dtype(tmp_path):
  du.tiny_llama(tmp_path)
  for dot_dtype in ("", "bfloat16"):
    config = backbones.BackboneConfig(family="llama", path=str(tmp_path / "tiny_llama"),
                                      random_init=True, dot_dtype=dot_dtype)
    assert backbones.build(config).model.config.dot_dtype == dot_dtype
  run = du.make_config("--config.model.dot_dtype=bfloat16")
  assert backbones.BackboneConfig.from_config(run).dot_dtype == "bfloat16"


def test_a_bad_dot_dtype_is_one_error_naming_the_key():
  config = config_lib.default_config()
  config.model.dot_dtype = "fp8"
  with pytest.raises(InputError, match=r"config\.model\.dot_dtype='fp8'"):
    config_lib.validate(config)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dot_dtype_is_no_hugging_face_field(family):
  """A run option, like remat: a saved config.json neither carries it nor sets it."""
  lib, hf_cfg, _ = FAMILIES[family]
  cfg = dataclasses.replace(lib.config_from_hf(hf_cfg), dot_dtype="bfloat16")
  saved = lib.config_to_hf(cfg)
  assert "dot_dtype" not in saved
  assert lib.config_from_hf(dict(saved, dot_dtype="bfloat16")).dot_dtype == ""


def test_bf16_dots_train_the_same_on_a_mesh_splitting_every_axis(tmp_path):
  """The custom-VJP product under GSPMD: 2 x 2 x 2 (data, fsdp, tensor) on 8 fake devices
  gives one device's losses, LB-CL's second task included (injection, projection, the sharded
  old stack). Measured: 8e-8 apart, where bf16 dots and f32 ones are 5e-5 apart, so a mesh
  that lost the option would fail here."""
  args = [*du.FAST, *du.tiny_llama(tmp_path), "--config.model.dot_dtype=bfloat16",
          "--config.optim.max_steps_per_task=3", "--config.plots=False",
          "--config.checkpoint.every_steps=0", "--config.eval.mode=rank",
          "--config.data.max_source_length=16", "--config.optim.num_epochs=2"]
  ref = du.run_losses_subprocess(tmp_path / "one", args, {"one": ["--config.mesh.data=1"]}, 1)["one"]
  mixed = {"mixed": ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]}
  got = du.run_losses_subprocess(tmp_path / "eight", args, mixed, 8)["mixed"]
  assert got.keys() == ref.keys() and sum(len(v) for v in ref.values()) == 6
  for task in ref:
    np.testing.assert_allclose(np.asarray(got[task])[:, 1], np.asarray(ref[task])[:, 1],
                               rtol=2e-6, atol=1e-6, err_msg=f"task {task}")
