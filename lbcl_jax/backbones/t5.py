"""T5 (v1.0 and v1.1/flan), encoder-decoder: O-LoRA's prompt in, the label string out.

Trained with token cross-entropy on the label; evaluated by greedy generation scored by exact
match against the task's options (O-LoRA's protocol), or by rank classification (the option
with the highest likelihood), as `BackboneConfig.eval_mode` says.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lbcl_jax import evaluation
from lbcl_jax import tasks as tasks_lib
from lbcl_jax.backbones.base import Backbone
from lbcl_jax.data import pipeline
from lbcl_jax.models import t5 as t5_lib


class T5Backbone(Backbone):
  """Sequence-to-sequence T5."""

  model_type = "t5"
  model_module = t5_lib
  # Rank classification scores every row against the task's options, given once per batch.
  replicated_keys = ("option_ids", "option_mask")

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

  def eval_extras(self, task: tasks_lib.Task) -> dict[str, np.ndarray]:
    if self.config.eval_mode != "rank":
      return {}
    option_ids, option_mask = evaluation.option_targets(self.tokenizer, task,
                                                        self.config.max_target_length)
    return {"option_ids": option_ids, "option_mask": option_mask}

  def loss(self, params, batch, rng):
    deterministic = self._deterministic(rng)
    logits = self.model.apply(
        {"params": params}, batch["input_ids"], batch["attention_mask"],
        batch["decoder_input_ids"], batch["label_mask"], deterministic=deterministic,
        rngs=None if deterministic else {"dropout": rng})
    mask = batch["label_mask"] * batch["weight"][:, None].astype(batch["label_mask"].dtype)
    return t5_lib.seq2seq_loss(logits, batch["labels"], mask)

  def seq_logprob(self, params, input_ids, attention_mask, labels, label_mask) -> jax.Array:
    """Summed log-probability of each label sequence, [B]."""
    decoder_input_ids = t5_lib.shift_right(
        labels, self.model.config.decoder_start_token_id, self.model.config.pad_token_id)
    logits = self.model.apply({"params": params}, input_ids, attention_mask, decoder_input_ids,
                              label_mask)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    safe = jnp.where(label_mask.astype(bool), labels, 0)
    token = jnp.take_along_axis(logp, safe[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(token * label_mask.astype(jnp.float32), axis=-1)

  def predict(self, params, batch):
    """"generate": generated token ids [B, max_new_tokens]; "rank": the option index [B]."""
    if self.config.eval_mode == "rank":
      return evaluation.rank_classify(
          functools.partial(self.seq_logprob, params), batch["input_ids"],
          batch["attention_mask"], batch["option_ids"], batch["option_mask"])
    return t5_lib.greedy_generate(self.model, params, batch["input_ids"],
                                  batch["attention_mask"], self.config.max_new_tokens)

  def to_options(self, predictions: np.ndarray, task: tasks_lib.Task) -> np.ndarray:
    if self.config.eval_mode == "rank":
      return np.asarray(predictions)
    texts = evaluation.decode(self.tokenizer, predictions)
    return evaluation.match_options(texts, task.labels)
