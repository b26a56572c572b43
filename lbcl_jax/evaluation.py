"""Accuracy of a model on a task: exact match of generated text, or rank classification.

Exact match follows O-LoRA (`src/compute_metrics.py`, taken from InstructUIE / Tk-Instruct,
"adapted from Squad v1.1 evaluation, without removing the articles"): lower-case, drop every
character of `string.punctuation`, collapse whitespace; a prediction is right when its
normalised text equals the normalised label. Generated ids are decoded as O-LoRA's
`skip_instructions` does for T5: `batch_decode(..., skip_special_tokens=True,
clean_up_tokenization_spaces=True)`. Accuracies are fractions in [0, 1] (O-LoRA prints
percentages).

Rank classification scores every option's target sequence with the model and predicts the
arg-max: no decoding, so no malformed answers. Inputs are tiled over options in fixed shapes
([B * chunk, ...] per call), so a jit-compiled scorer compiles once per batch shape.
"""

from __future__ import annotations

import string
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from lbcl_jax import tasks as tasks_lib
from lbcl_jax.data import pipeline

_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
  """O-LoRA's normalisation: lower case, ASCII punctuation removed, whitespace collapsed.

  Unlike SQuAD's, articles are kept ("a", "an", "the" still count).
  """
  text = text.lower()
  text = "".join(ch for ch in text if ch not in _PUNCTUATION)
  return " ".join(text.split())


def exact_match(prediction: str, ground_truth: str) -> bool:
  return normalize_answer(prediction) == normalize_answer(ground_truth)


def decode(tokenizer: Any, ids: Any) -> list[str]:
  """Generated ids [B, L] -> texts, cut at each row's first EOS, special tokens skipped."""
  ids = np.asarray(ids)
  if ids.ndim != 2:
    raise ValueError(f"expected generated ids of shape [B, L], got {ids.shape}")
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  eos = tokenizer.eos_token_id
  rows = []
  for row in ids.tolist():
    row = [pad if t < 0 else t for t in row]  # -100 / -1 fillers are not tokens
    if eos is not None and eos in row:
      row = row[:row.index(eos)]
    rows.append(row)
  return tokenizer.batch_decode(rows, skip_special_tokens=True,
                                clean_up_tokenization_spaces=True)


def match_options(predictions: Sequence[str], labels: Sequence[str]) -> np.ndarray:
  """Index of the label each prediction exactly matches (after normalisation), -1 for none."""
  normalized = {}
  for i, label in enumerate(labels):
    normalized.setdefault(normalize_answer(label), i)
  return np.asarray([normalized.get(normalize_answer(p), -1) for p in predictions], np.int32)


def _weight(batch: Mapping[str, Any], n: int) -> np.ndarray:
  if "weight" in batch:
    return np.asarray(batch["weight"], dtype=np.float64).reshape(-1)
  return np.ones((n,), np.float64)


def evaluate_generation(generate_fn: Callable[[Mapping[str, Any]], Any],
                        batches: Iterable[Mapping[str, Any]], tokenizer: Any,
                        task: str | tasks_lib.Task, *,
                        return_predictions: bool = False) -> float | tuple[float, list[str]]:
  """Exact-match accuracy of generated answers.

  Args:
    generate_fn: batch -> generated token ids [B, L] (e.g. a jit-compiled greedy decoder).
    batches: batches with `label_index` and `weight` (see `lbcl_jax.data.pipeline`).
    tokenizer: the model's tokenizer.
    task: the task; the gold answer of a row is `task.labels[label_index]`.
    return_predictions: also return the decoded predictions of the real rows.

  Returns:
    The weighted accuracy in [0, 1] (and the predictions).
  """
  task = tasks_lib.get_task(task)
  correct, total, predictions = 0.0, 0.0, []
  for batch in batches:
    texts = decode(tokenizer, generate_fn(batch))
    label_index = np.asarray(batch["label_index"]).reshape(-1)
    weight = _weight(batch, len(texts))
    if not len(texts) == label_index.size == weight.size:
      raise ValueError(f"generate_fn returned {len(texts)} rows for a batch of "
                       f"{label_index.size}")
    for text, y, w in zip(texts, label_index.tolist(), weight.tolist()):
      if w > 0:
        correct += w * exact_match(text, task.labels[y])
        total += w
        predictions.append(text)
  accuracy = correct / total if total else float("nan")
  return (accuracy, predictions) if return_predictions else accuracy


def option_targets(tokenizer: Any, task: str | tasks_lib.Task, max_target_length: int = 50,
                   min_bucket: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """The task's options as decoder targets: ids [K, T] (with EOS) and mask [K, T]."""
  task = tasks_lib.get_task(task)
  return pipeline.encode_options(tokenizer, task.labels, max_target_length, min_bucket,
                                 target=True)


def option_scores(seq_logprob_fn: Callable[..., Any], input_ids: Any, attention_mask: Any,
                  option_ids: Any, option_mask: Any, *, option_chunk: int | None = None,
                  length_normalize: bool = False) -> jnp.ndarray:
  """Log-likelihood of every option for every row: [B, K].

  Args:
    seq_logprob_fn: (input_ids [N, S], attention_mask [N, S], labels [N, T], label_mask [N, T])
      -> [N] summed log-probability of each label sequence (jit-compiled by the caller).
    input_ids, attention_mask: the batch's sources [B, S].
    option_ids, option_mask: the options [K, T] (`option_targets`).
    option_chunk: options scored per call (None: all K at once); calls always have shape
      [B * chunk, ...], the last chunk being filled with copies of option 0.
    length_normalize: divide each score by its option's token count (mean log-probability).
  """
  input_ids, attention_mask = jnp.asarray(input_ids), jnp.asarray(attention_mask)
  option_ids, option_mask = jnp.asarray(option_ids), jnp.asarray(option_mask)
  b, k = input_ids.shape[0], option_ids.shape[0]
  chunk = k if option_chunk is None else max(1, min(int(option_chunk), k))
  # Tiled once: row b * chunk + j pairs source b with option j of the chunk.
  src = jnp.repeat(input_ids, chunk, axis=0)
  src_mask = jnp.repeat(attention_mask, chunk, axis=0)
  scores = []
  for start in range(0, k, chunk):
    ids, mask = option_ids[start:start + chunk], option_mask[start:start + chunk]
    real = ids.shape[0]
    if real < chunk:  # fixed shapes: fill with option 0, discarded below
      ids = jnp.concatenate([ids, jnp.repeat(option_ids[:1], chunk - real, axis=0)])
      mask = jnp.concatenate([mask, jnp.repeat(option_mask[:1], chunk - real, axis=0)])
    out = seq_logprob_fn(src, src_mask, jnp.tile(ids, (b, 1)), jnp.tile(mask, (b, 1)))
    scores.append(jnp.reshape(out, (b, chunk))[:, :real])
  scores = jnp.concatenate(scores, axis=1)
  if length_normalize:
    scores = scores / jnp.maximum(option_mask.sum(axis=1), 1)[None, :]
  return scores


def rank_classify(seq_logprob_fn: Callable[..., Any], input_ids: Any, attention_mask: Any,
                  option_ids: Any, option_mask: Any, *, option_chunk: int | None = None,
                  length_normalize: bool = False) -> jnp.ndarray:
  """The arg-max option of every row, int32 [B] (see `option_scores` for the arguments)."""
  scores = option_scores(seq_logprob_fn, input_ids, attention_mask, option_ids, option_mask,
                         option_chunk=option_chunk, length_normalize=length_normalize)
  return jnp.argmax(scores, axis=1).astype(jnp.int32)


def evaluate_rank_classification(seq_logprob_fn: Callable[..., Any],
                                 batches: Iterable[Mapping[str, Any]], option_ids: Any,
                                 option_mask: Any, *, option_chunk: int | None = None,
                                 length_normalize: bool = False) -> float:
  """Weighted accuracy of `rank_classify` over batches (with `label_index`, `weight`)."""
  correct, total = 0.0, 0.0
  for batch in batches:
    pred = np.asarray(rank_classify(seq_logprob_fn, batch["input_ids"], batch["attention_mask"],
                                    option_ids, option_mask, option_chunk=option_chunk,
                                    length_normalize=length_normalize))
    label_index = np.asarray(batch["label_index"]).reshape(-1)
    weight = _weight(batch, label_index.size)
    correct += float(np.sum(weight * (pred == label_index)))
    total += float(np.sum(weight))
  return correct / total if total else float("nan")


def accuracy_from_predictions(predicted_index: Any,
                              batch: Mapping[str, Any]) -> tuple[float, float]:
  """(weighted correct, weighted total) of predicted option indices for one batch."""
  pred = np.asarray(predicted_index).reshape(-1)
  label_index = np.asarray(batch["label_index"]).reshape(-1)
  weight = _weight(batch, label_index.size)
  return float(np.sum(weight * (pred == label_index))), float(np.sum(weight))
