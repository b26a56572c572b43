"""T5 (v1.0 and v1.1/flan), encoder-decoder: O-LoRA's prompt in, the label string out.

Trained with token cross-entropy on the label; evaluated by greedy generation scored by exact
match against the task's options (O-LoRA's protocol), or by rank classification (the option
with the highest likelihood), as `BackboneConfig.eval_mode` says (`generative`).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp

from lbcl_jax import evaluation
from lbcl_jax import tasks as tasks_lib
from lbcl_jax.backbones import generative
from lbcl_jax.data import pipeline
from lbcl_jax.models import t5 as t5_lib


class T5Backbone(generative.GenerativeBackbone):
  """Sequence-to-sequence T5: the encoder reads the prompt, the decoder writes the label."""

  model_type = "t5"
  model_module = t5_lib

  @staticmethod
  def init_variables(model, rng):
    ids = jnp.ones((1, 4), jnp.int32)
    return model.init(rng, ids, ids, ids)

  def encode(self, examples: Sequence[Any], task: tasks_lib.Task) -> pipeline.BatchSource:
    del task  # the prompt carries the task; the target is the label string
    return pipeline.encode_seq2seq(
        examples, self.tokenizer, max_source_length=self.config.max_source_length,
        max_target_length=self.config.max_target_length, truncation=self.config.truncation,
        decoder_start_id=self.model.config.decoder_start_token_id)

  def option_targets(self, task):
    return evaluation.option_targets(self.tokenizer, task, self.config.max_target_length)

  def loss(self, params, batch, rng):
    deterministic = self._deterministic(rng)
    logits = self.model.apply(
        {"params": params}, batch["input_ids"], batch["attention_mask"],
        batch["decoder_input_ids"], batch["label_mask"], deterministic=deterministic,
        rngs=None if deterministic else {"dropout": rng})
    return t5_lib.seq2seq_loss(logits, batch["labels"], generative.weighted_label_mask(batch))

  def seq_logprob(self, params, prompt_ids, prompt_mask, answer_ids, answer_mask):
    # Teacher forcing: the decoder reads the answer shifted right behind its start token.
    decoder_input_ids = t5_lib.shift_right(
        answer_ids, self.model.config.decoder_start_token_id, self.model.config.pad_token_id)
    logits = self.model.apply({"params": params}, prompt_ids, prompt_mask, decoder_input_ids,
                              answer_mask)
    return generative.answer_logprob(logits, answer_ids, answer_mask)

  def generate(self, params, prompt_ids, prompt_mask):
    return t5_lib.greedy_generate(self.model, params, prompt_ids, prompt_mask,
                                  self.config.max_new_tokens)
