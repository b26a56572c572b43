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

import dataclasses
import string
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from lbcl_jax import sharding
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


# ---------------------------------------------------------------------------------------------
# The evaluation loop: one for every family, used by the driver, the tests and the benchmarks.


def local_rows(batch: Mapping[str, Any], replicated: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """This process's rows of a global batch (every process holds the whole eval batch);
  arrays in `replicated` with no batch axis (a task's options) are kept whole."""
  n, i = jax.process_count(), jax.process_index()
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if k in replicated and v.ndim == 2:
      out[k] = v
      continue
    rows = v.shape[0] // n
    out[k] = v[i * rows:(i + 1) * rows]
  return out


def label_space(space: str, trained: Sequence[str]) -> tuple[str, ...] | None:
  """The options a task's answers are scored among, `evaluate`'s `labels`: "seen", every
  label of the tasks `trained` so far (which tells the model nothing about the task); "task",
  the task's own (None)."""
  if space == "seen":
    return tasks_lib.label_union(trained)
  if space == "task":
    return None
  raise ValueError(f"unknown label space {space!r}; expected 'seen' or 'task'")


class Answers(NamedTuple):
  """One evaluation batch's answers, every row of the global batch (padding rows have weight 0).

  Attributes:
    raw: the model's predictions as `predict_fn` returns them (generated ids [B, L], or option
      indices [B] for rank classification).
    option: the index in the label space each row's answer names, -1 for none.
    gold: the index in the label space of each row's label.
    weight: each row's weight (0 for the rows that fill the last batch).
  """

  raw: np.ndarray
  option: np.ndarray
  gold: np.ndarray
  weight: np.ndarray


def answers(backbone: Any, predict_fn: Callable[[Any, Mapping[str, Any]], Any], params: Any,
            data: pipeline.BatchSource, task: str | tasks_lib.Task, *, batch_size: int,
            mesh: Any, labels: Sequence[str] | None = None) -> Iterator[Answers]:
  """The model's answers on `data`, batch by batch (arguments as `evaluate`'s, which sums
  them): what a diagnosis reads (which option a collapsed task is answered with, or what
  text names none)."""
  task = tasks_lib.get_task(task)
  space = task.labels if labels is None else tuple(labels)
  missing = [label for label in task.labels if label not in space]
  if missing:
    raise ValueError(f"the label space lacks {missing} of task {task.name!r}")
  # The task as the model is asked it: options are the space's; gold indices move with them.
  scored = dataclasses.replace(task, labels=space)
  gold_of = np.asarray([space.index(label) for label in task.labels], np.int64)
  extras = backbone.eval_extras(scored)
  replicated = backbone.replicated_keys
  for batch in pipeline.eval_batches(data, batch_size, process_index=0, process_count=1):
    batch = dict(batch, **extras)
    pred = predict_fn(params, sharding.global_batch(local_rows(batch, replicated), mesh,
                                                    replicated_keys=replicated))
    pred = np.asarray(multihost_utils.process_allgather(pred, tiled=True))
    yield Answers(raw=pred, option=np.asarray(backbone.to_options(pred, scored)),
                  gold=gold_of[np.clip(np.asarray(batch["label_index"]), 0, len(gold_of) - 1)],
                  weight=np.asarray(batch["weight"]))


def evaluate(backbone: Any, predict_fn: Callable[[Any, Mapping[str, Any]], Any], params: Any,
             data: pipeline.BatchSource, task: str | tasks_lib.Task, *, batch_size: int,
             mesh: Any, labels: Sequence[str] | None = None) -> float:
  """Accuracy on `data` (a task's test split) with `params` (every adapter already merged).

  Args:
    backbone: the model family (`lbcl_jax.backbones.Backbone`): its `eval_extras`,
      `replicated_keys` and `to_options`.
    predict_fn: `(params, batch) -> predictions`, the backbone's `predict`, jit-compiled once
      by the caller so every task and stage shares the compilations.
    params: the parameters to evaluate.
    data: the tokenised test split.
    task: the task (its labels score the predictions; no task id reaches the model).
    batch_size: the global evaluation batch size (divisible by the data-parallel size).
    mesh: the device mesh; every process evaluates its rows, predictions are gathered.
    labels: the label space, the options predictions choose among (None: the task's own
      labels). It must hold every label of the task; `tasks.label_union` of the tasks
      trained so far is the "seen" space, which tells the model nothing about the task.

  Returns:
    The weighted fraction of rows whose prediction names their label.
  """
  correct = total = 0.0
  for a in answers(backbone, predict_fn, params, data, task, batch_size=batch_size, mesh=mesh,
                   labels=labels):
    correct += float(((a.option == a.gold) * a.weight).sum())
    total += float(a.weight.sum())
  return correct / max(total, 1.0)
