"""The backbone base classes: what a family inherits rather than writes.

A new decoder family is its model module plus a `model_type` and a `model_module`: a test-local
`CausalLMBackbone` declaring only those, on the tiny random Llama, encodes, trains, generates,
ranks and maps answers to options exactly as `LlamaBackbone` does. And `block_pattern` is the
family's own, so injection by depth counts the blocks of the model the backbone holds.
"""

from __future__ import annotations

import dataclasses
import re

from flax import traverse_util
import jax
import numpy as np
import pytest

from lbcl_jax import backbones
from lbcl_jax import tasks
from lbcl_jax.backbones import generative
from lbcl_jax.errors import InputError
from lbcl_jax.data import synthetic
from lbcl_jax.models import llama as llama_lib

import driver_utils as du


class TinyDecoderBackbone(generative.CausalLMBackbone):
  """What a new Llama-like decoder family writes: nothing but its name and model module."""

  model_type = "tiny-decoder"
  model_module = llama_lib


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """(backbone config, LlamaBackbone, params) of the tiny random Llama in rank mode."""
  path = tmp_path_factory.mktemp("tiny") / "tiny_llama"
  du.tiny_llama(path.parent)
  config = backbones.BackboneConfig(family="llama", path=str(path), random_init=True,
                                    eval_mode="rank", max_source_length=64,
                                    max_target_length=8, max_new_tokens=3)
  bb = backbones.build(config)
  return config, bb, jax.jit(bb.init_params)(jax.random.key(0))


def _examples(task):
  by_label = {}
  for e in synthetic.load(task, "test"):
    by_label.setdefault(e.label, e)
  return list(by_label.values())


def test_a_decoder_family_declaring_only_its_model_module_works_as_llama(llama):
  config, bb, params = llama
  new = TinyDecoderBackbone(config, bb.model, bb.tokenizer, None)
  task = tasks.get_task("syn_news")
  examples = _examples(task)
  n = len(examples)
  batch = bb.encode(examples, task).collate(np.arange(n), n)
  new_batch = new.encode(examples, task).collate(np.arange(n), n)
  assert batch.keys() == new_batch.keys()
  for k in batch:
    np.testing.assert_array_equal(new_batch[k], batch[k], err_msg=k)
  np.testing.assert_array_equal(jax.jit(new.loss)(params, batch, None),
                                jax.jit(bb.loss)(params, batch, None))
  # Rank mode: the same options, scored the same.
  extras = bb.eval_extras(task)
  assert extras.keys() == {"option_ids", "option_mask"}
  for k, v in new.eval_extras(task).items():
    np.testing.assert_array_equal(v, extras[k], err_msg=k)
  ranked = np.asarray(jax.jit(bb.predict)(params, {**batch, **extras}))
  assert ranked.shape == (n,)
  np.testing.assert_array_equal(jax.jit(new.predict)(params, {**batch, **extras}), ranked)
  # Generate mode: the same tokens, and an answer written out as an option's tokens (with its
  # EOS) names that option.
  gen_config = dataclasses.replace(config, eval_mode="generate")
  gen, new_gen = (cls(gen_config, bb.model, bb.tokenizer, None)
                  for cls in (type(bb), TinyDecoderBackbone))
  assert gen.eval_extras(task) == {} and new_gen.eval_extras(task) == {}
  generated = np.asarray(jax.jit(gen.predict)(params, batch))
  assert generated.shape == (n, 3)
  np.testing.assert_array_equal(jax.jit(new_gen.predict)(params, batch), generated)
  written = np.where(extras["option_mask"] > 0, extras["option_ids"], -100)
  np.testing.assert_array_equal(new_gen.to_options(written, task), np.arange(task.num_labels))
  np.testing.assert_array_equal(gen.to_options(written, task), np.arange(task.num_labels))
  # Rank mode's predictions already are option indices.
  np.testing.assert_array_equal(new.to_options(ranked, task), ranked)


def test_block_pattern_numbers_the_blocks_of_the_backbones_own_model(llama):
  _, bb, _ = llama
  flat = traverse_util.flatten_dict(bb.param_specs, sep="/")
  indices = {int(m["index"]) for m in (re.search(bb.block_pattern, p) for p in flat) if m}
  assert indices == set(range(bb.model.config.num_hidden_layers))
  # Another family's pattern finds no block in this model: the property is the family's own.
  from lbcl_jax.models import t5 as t5_lib  # pylint: disable=g-import-not-at-top
  assert not any(re.search(t5_lib.BLOCK_PATTERN, p) for p in flat)



def test_a_checkpoint_runs_as_its_own_family_only_within_one_interface(llama):
  config, _, _ = llama
  # A config written for another decoder (e.g. configs/smollm2_cl.py's "llama" given a Qwen
  # directory) runs the checkpoint's own family: both read and answer as causal LMs.
  as_qwen = backbones.build(dataclasses.replace(config, family="qwen2"))
  assert type(as_qwen).model_type == "llama"
  assert as_qwen.interface == backbones.backbone_class("qwen2").interface == "causal_lm"
  # Across interfaces the mismatch is bad input, named.
  for other in ("t5", "bert"):
    with pytest.raises(InputError, match=f"config.model.family='{other}' but .* holds a 'llama' model"):
      backbones.build(dataclasses.replace(config, family=other))
