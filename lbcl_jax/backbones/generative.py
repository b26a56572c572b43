"""Generative families: the model writes its answer (T5, and causal LMs such as Llama).

Training is token cross-entropy on the answer (the task's label string). Evaluation follows
`BackboneConfig.eval_mode`: "generate" decodes greedily from the prompt and scores the text by
exact match against the task's options (O-LoRA's protocol); "rank" scores every option's answer
tokens after the prompt and picks the most likely (rank classification). Both read only the
prompt, so no task id reaches the model.

`GenerativeBackbone` holds what every such family shares (the eval-mode branches, the options
rank mode scores, `to_options`, the log-probability of an answer); a family says how it encodes
examples and options, computes the loss, scores an answer and generates. `CausalLMBackbone` is
all of that for decoder-only models whose model module follows the Llama module's interface, so
a new decoder family is its model module plus a `model_type` and a `model_module`.
"""

from __future__ import annotations

import abc
import functools
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lbcl_jax import evaluation
from lbcl_jax import tasks as tasks_lib
from lbcl_jax.backbones.base import Backbone
from lbcl_jax.data import pipeline


def answer_logprob(logits: jax.Array, answer_ids: jax.Array,
                   answer_mask: jax.Array) -> jax.Array:
  """Summed log-probability [B] of each answer's real tokens, from the logits [B, T, V] that
  predict them (aligned with `answer_ids` [B, T]); log-softmax in f32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  # Padded positions may hold anything (-100, padding): they are never gathered.
  safe = jnp.where(answer_mask.astype(bool), answer_ids, 0).astype(jnp.int32)
  token = jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return jnp.sum(token * answer_mask.astype(jnp.float32), axis=-1)


def weighted_label_mask(batch: dict[str, jax.Array]) -> jax.Array:
  """The batch's label mask with every row scaled by its weight (0 for filler rows)."""
  return batch["label_mask"] * batch["weight"][:, None].astype(batch["label_mask"].dtype)


class GenerativeBackbone(Backbone):
  """A family that writes its answer: greedy generation or rank classification."""

  # Rank classification scores every row against the task's options, given once per batch.
  replicated_keys = ("option_ids", "option_mask")
  # The batch arrays generation and rank classification read: the prompt's ids and mask.
  prompt_keys: ClassVar[tuple[str, str]] = ("input_ids", "attention_mask")

  @abc.abstractmethod
  def option_targets(self, task: tasks_lib.Task) -> tuple[np.ndarray, np.ndarray]:
    """The options of `task.labels` as answers the model would write: ids and mask [K, T]."""

  @abc.abstractmethod
  def seq_logprob(self, params: Any, prompt_ids: jax.Array, prompt_mask: jax.Array,
                  answer_ids: jax.Array, answer_mask: jax.Array) -> jax.Array:
    """Summed log-probability [B] of each answer [B, T] (right-padded) after its prompt."""

  @abc.abstractmethod
  def generate(self, params: Any, prompt_ids: jax.Array, prompt_mask: jax.Array) -> jax.Array:
    """Greedily generated token ids [B, max_new_tokens] (padding after a row's end)."""

  def eval_extras(self, task: tasks_lib.Task) -> dict[str, np.ndarray]:
    if self.config.eval_mode != "rank":
      return {}
    option_ids, option_mask = self.option_targets(task)
    return {"option_ids": option_ids, "option_mask": option_mask}

  def predict(self, params, batch):
    """"generate": generated token ids [B, max_new_tokens]; "rank": the option index [B]."""
    prompt_ids, prompt_mask = (batch[k] for k in self.prompt_keys)
    if self.config.eval_mode == "rank":
      return evaluation.rank_classify(
          functools.partial(self.seq_logprob, params), prompt_ids, prompt_mask,
          batch["option_ids"], batch["option_mask"])
    return self.generate(params, prompt_ids, prompt_mask)

  def to_options(self, predictions: np.ndarray, task: tasks_lib.Task) -> np.ndarray:
    if self.config.eval_mode == "rank":
      return np.asarray(predictions)
    texts = evaluation.decode(self.tokenizer, predictions)
    return evaluation.match_options(texts, task.labels)


# ---------------------------------------------------------------------------------------------
# Decoder-only causal LMs.


class CausalLMBackbone(GenerativeBackbone):
  """A decoder-only LM reading O-LoRA's prompt and continuing it with `" " + label` and EOS.

  The model reads the prompt (the text T5's encoder reads, behind the tokenizer's own BOS if it
  adds one) and is trained on the answer tokens only (`pipeline.encode_causal_lm`); generation
  runs from the left-padded prompt and stops at EOS.

  What the model module provides (as `lbcl_jax.models.llama` does): a model called as
  `model(input_ids, attention_mask, *, deterministic, logits_at)` (positions counted over real
  tokens, so left padding changes nothing; `logits_at` [B, n] picks the columns whose logits
  are computed), a config with `eos_token_ids`, `greedy_generate(model, params, ids, mask,
  max_new_tokens, eos_token_id=...)`, and the model-agnostic `columns` (`logits_at` for a range
  of columns) and `causal_lm_loss` (a new module may bind llama's).
  """

  prompt_keys = ("prompt_ids", "prompt_mask")
  interface = "causal_lm"

  @staticmethod
  def init_variables(model, rng):
    ids = jnp.ones((1, 4), jnp.int32)
    return model.init(rng, ids, ids)

  # -- special tokens ----------------------------------------------------------------------------

  @functools.cached_property
  def eos_id(self) -> int:
    """The token ending an answer: the tokenizer's EOS, else the model config's first."""
    if self.tokenizer.eos_token_id is not None:
      return int(self.tokenizer.eos_token_id)
    ids = self.model.config.eos_token_ids
    if not ids:
      raise ValueError("neither the tokenizer nor the model config names an EOS token; a "
                       "causal-LM answer needs one")
    return ids[0]

  @functools.cached_property
  def stop_ids(self) -> tuple[int, ...]:
    """Tokens that end a generation: the config's EOS ids and the one answers are trained to
    end with (they differ in some checkpoints, e.g. an instruct model's end-of-turn)."""
    return tuple(sorted({*self.model.config.eos_token_ids, self.eos_id}))

  # -- data ----------------------------------------------------------------------------------------

  def encode(self, examples: Sequence[Any], task: tasks_lib.Task) -> pipeline.BatchSource:
    del task  # the prompt carries the task; the answer is the label string
    return pipeline.encode_causal_lm(
        examples, self.tokenizer, eos_id=self.eos_id,
        max_prompt_length=self.config.max_source_length,
        max_answer_length=self.config.max_target_length, truncation=self.config.truncation)

  def option_targets(self, task: tasks_lib.Task) -> tuple[np.ndarray, np.ndarray]:
    return pipeline.encode_causal_options(
        self.tokenizer, tasks_lib.get_task(task).labels, self.eos_id,
        self.config.max_target_length)

  # -- loss and prediction -------------------------------------------------------------------------

  def loss(self, params, batch, rng):
    deterministic = self._deterministic(rng)
    # The answer fills the last T columns of every row, so only the columns from the prompt's
    # last one (S - 1, which predicts the first answer token) on carry a label: the head runs
    # on those alone.
    start = batch["prompt_ids"].shape[1] - 1
    rows, length = batch["input_ids"].shape
    # Positions come from the attention mask (cumsum - 1), so left padding changes nothing.
    logits = self.model.apply(
        {"params": params}, batch["input_ids"], batch["attention_mask"],
        deterministic=deterministic, rngs=None if deterministic else {"dropout": rng},
        logits_at=self.model_module.columns(start, length, rows))
    mask = weighted_label_mask(batch)
    return self.model_module.causal_lm_loss(logits, batch["labels"][:, start:], mask[:, start:])

  def seq_logprob(self, params, prompt_ids, prompt_mask, answer_ids, answer_mask):
    """Summed log-probability of each answer [B, T] (right-padded) after its left-padded
    prompt [B, S]."""
    length = prompt_ids.shape[1]
    ids = jnp.concatenate([prompt_ids, answer_ids], axis=1)
    mask = jnp.concatenate([prompt_mask, answer_mask], axis=1)
    # The prompt's last token (column S - 1 under left padding) predicts answer token 0.
    cols = self.model_module.columns(length - 1, length - 1 + answer_ids.shape[1], ids.shape[0])
    logits = self.model.apply({"params": params}, ids, mask, logits_at=cols)
    return answer_logprob(logits, answer_ids, answer_mask)

  def generate(self, params, prompt_ids, prompt_mask):
    return self.model_module.greedy_generate(self.model, params, prompt_ids, prompt_mask,
                                             self.config.max_new_tokens,
                                             eos_token_id=self.stop_ids)
