"""The input pipeline: tokenised examples -> fixed-shape numpy batches.

Three encoders share one batching scheme:

* `encode_seq2seq` (T5): O-LoRA's prompt (`Task.prompt`) as the source, the label string as the
  target, truncated at `max_source_length` / `max_target_length` (the paper: 512 / 50); a long
  prompt loses the end of its sentence (`prompt_content_ids`: header, options and cue stay; the
  EOS token is kept), the target is cut as a Hugging Face tokenizer cuts it;
* `encode_causal_lm` (decoder-only models, e.g. Llama): the same prompt, then `" " + label` and
  EOS as the answer, the only tokens trained on; prompts are truncated the same way and
  batches are left-padded, so generation appends at the end;
* `encode_scoring` (encoder models that score label names, e.g. MiniLM/BERT): the sentence, plus
  every option of the task tokenised once.

Shapes. Lengths are padded up to a *bucket* (powers of two from `min_bucket`, capped at the
maximum length, see `length_buckets`), and every batch has exactly `batch_size` rows: a short
last batch is filled with padding rows of `weight` 0, so nothing is dropped and jit compiles at
most (#source buckets x #target buckets) shapes over a whole run, never one per batch.

Batch of `encode_seq2seq` (numpy, B = batch size):
  input_ids [B, S] int32, attention_mask [B, S] int32,
  labels [B, T] int32 (target ids with EOS, pad after), label_mask [B, T] int32 (the decoder
  attention mask), decoder_input_ids [B, T] int32 (labels shifted right, starting with
  `decoder_start_id` = pad = 0 as T5), label_index [B] int32, weight [B] float32 (1 real row,
  0 padding row).
Batch of `encode_causal_lm` (S prompt bucket, T answer bucket, every row right-aligned):
  input_ids [B, S + T], attention_mask [B, S + T] (prompt + answer), labels [B, S + T] (the ids
  shifted left: position t predicts labels[t]), label_mask [B, S + T] (1 where labels[t] is an
  answer token or its EOS), prompt_ids [B, S], prompt_mask [B, S] (the prompt alone, for
  generation), label_index [B], weight [B].
Batch of `encode_scoring`:
  input_ids [B, S], attention_mask [B, S], option_ids [K, L], option_mask [K, L] (the K options
  of the task), label_index [B], weight [B].

Padding rows hold one real token (source: the tokenisation of "" -- EOS for T5, [CLS] [SEP] for
BERT; a causal LM's prompt: its BOS, else EOS; target: EOS with label_mask 1) so that per-row
normalisations never divide by zero; their label_index is 0. Losses and accuracies must weight
rows by `weight` and normalise by the global sum of weights.

Training order (`TrainStream`): epoch e visits the examples in the permutation drawn by
`np.random.default_rng((seed, e))`; the global batch of step s is slice s mod steps_per_epoch of
epoch s // steps_per_epoch's permutation. A batch is therefore a pure function of (seed, s): a
resumed run sees exactly the batches an uninterrupted one would. With several processes each
takes rows [p * B/P, (p + 1) * B/P) of every global batch, and the padding length is chosen from
the global batch, so every process builds the same shapes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from lbcl_jax import tasks as tasks_lib
from lbcl_jax.data import Example

Batch = dict[str, np.ndarray]


def length_buckets(max_length: int, min_bucket: int = 16) -> tuple[int, ...]:
  """Powers of two from `min_bucket` below `max_length`, then `max_length` itself."""
  if max_length < 1:
    raise ValueError(f"max_length must be >= 1, got {max_length}")
  buckets = []
  b = max(1, min_bucket)
  while b < max_length:
    buckets.append(b)
    b *= 2
  buckets.append(max_length)
  return tuple(buckets)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket holding `length` tokens."""
  for b in buckets:
    if length <= b:
      return b
  raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def _pad(seqs: Sequence[Sequence[int]], rows: int, length: int, pad_id: int,
         filler: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """[rows, length] ids and mask; rows past len(seqs) hold `filler`."""
  ids = np.full((rows, length), pad_id, dtype=np.int32)
  mask = np.zeros((rows, length), dtype=np.int32)
  for r in range(rows):
    seq = seqs[r] if r < len(seqs) else filler
    n = min(len(seq), length)
    ids[r, :n] = seq[:n]
    mask[r, :n] = 1
  return ids, mask


class BatchSource(Protocol):
  """What `TrainStream` and `eval_batches` need from encoded data."""

  def __len__(self) -> int:
    ...

  def lengths(self, indices: np.ndarray) -> tuple[int, ...]:
    """The padded lengths (buckets) of a batch made of `indices`."""

  def collate(self, indices: np.ndarray, batch_size: int,
              lengths: tuple[int, ...] | None = None) -> Batch:
    """A batch of `batch_size` rows: `indices`' examples, then padding rows."""


def _token_ids(tokenizer: Any, texts: Sequence[str], max_length: int,
               target: bool = False) -> list[list[int]]:
  if not texts:
    return []
  kwargs = dict(truncation=True, max_length=max_length, add_special_tokens=True)
  out = tokenizer(text_target=list(texts), **kwargs) if target else tokenizer(list(texts),
                                                                            **kwargs)
  return [list(x) for x in out["input_ids"]]


# How a prompt longer than its limit is cut (`config.data.truncation`).
TRUNCATIONS = ("sentence", "left", "right")


def prompt_content_ids(tokenizer: Any, examples: Sequence[Example], budget: int,
                       truncation: str = "sentence") -> list[list[int]]:
  """Each example's O-LoRA prompt as token ids without special tokens, at most `budget` long.

  A prompt that fits is the tokenisation of the whole text. One that does not is cut by
  `truncation`:
    * "sentence": tokens of the example's own sentence are dropped from its end, so the header
      (task, dataset, instruction, options) and the closing "\nAnswer:" always survive; the
      kept ids are a sub-sequence of the whole prompt's tokenisation (a fast tokenizer's
      offsets tell which tokens are the sentence's; a slow one tokenises the three parts
      apart). Where even header and cue exceed the budget, the header loses its end.
    * "left": the first tokens are dropped (the cue survives, the header goes first);
    * "right": the last tokens are dropped (the header survives, the cue goes first).
  """
  if truncation not in TRUNCATIONS:
    raise ValueError(f"truncation {truncation!r}: expected one of {TRUNCATIONS}")
  if budget < 1:
    raise ValueError(f"a prompt budget of {budget} token(s) holds no prompt")
  if not examples:
    return []
  parts = [tasks_lib.get_task(e.task).prompt_parts(e.sentence) for e in examples]
  texts = ["".join(p) for p in parts]
  offsets = truncation == "sentence" and getattr(tokenizer, "is_fast", False)
  enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets)
  out = []
  for i, ids in enumerate(enc["input_ids"]):
    ids = list(ids)
    if len(ids) <= budget:
      out.append(ids)
    elif truncation == "left":
      out.append(ids[-budget:])
    elif truncation == "right":
      out.append(ids[:budget])
    else:
      head_text, sentence, _ = parts[i]
      if offsets:
        start, end = len(head_text), len(head_text) + len(sentence)
        starts = [a for a, _ in enc["offset_mapping"][i]]
        # Offsets rise along the ids: a token is the sentence's if it starts inside it (one
        # straddling the header's end stays with the header); the rest is the cue.
        n_head = sum(a < start for a in starts)
        n_body = sum(start <= a < end for a in starts)
        head, body, cue = ids[:n_head], ids[n_head:n_head + n_body], ids[n_head + n_body:]
      else:
        head, body, cue = (list(tokenizer(x, add_special_tokens=False)["input_ids"])
                           for x in parts[i])
      room = budget - len(head) - len(cue)
      if room >= 0:
        out.append(head + body[:room] + cue)
      else:
        cue = cue[-budget:]
        out.append(head[:budget - len(cue)] + cue)
  return out


def _prompt_ids(tokenizer: Any, examples: Sequence[Example], max_length: int,
                truncation: str) -> list[list[int]]:
  """Prompts with the tokenizer's special tokens (T5's EOS, BERT's [CLS] ... [SEP]), at most
  `max_length` ids; "right" is exactly the tokenizer's own truncation."""
  if truncation == "right":
    return _token_ids(tokenizer, [tasks_lib.get_task(e.task).prompt(e.sentence)
                                  for e in examples], max_length)
  prefix, suffix = special_affixes(tokenizer)
  budget = max_length - len(prefix) - len(suffix)
  return [prefix + ids + suffix
          for ids in prompt_content_ids(tokenizer, examples, budget, truncation)]


def _filler(tokenizer: Any, pad_id: int) -> list[int]:
  """What a padding row's source holds: the tokenisation of "", or one pad token."""
  ids = tokenizer("", add_special_tokens=True)["input_ids"]
  return list(ids) if len(ids) else [pad_id]


@dataclasses.dataclass
class Seq2SeqData:
  """Examples tokenised for an encoder-decoder model. Build with `encode_seq2seq`."""

  source_ids: list[list[int]]
  target_ids: list[list[int]]
  label_index: np.ndarray
  source_buckets: tuple[int, ...]
  target_buckets: tuple[int, ...]
  pad_id: int
  eos_id: int
  decoder_start_id: int
  filler: list[int]
  tasks: tuple[str, ...] = ()

  def __post_init__(self):
    self._src_len = np.asarray([len(s) for s in self.source_ids], dtype=np.int64)
    self._tgt_len = np.asarray([len(t) for t in self.target_ids], dtype=np.int64)

  def __len__(self) -> int:
    return len(self.source_ids)

  @property
  def source_lengths(self) -> np.ndarray:
    return self._src_len

  def lengths(self, indices: np.ndarray) -> tuple[int, int]:
    idx = np.asarray(indices, dtype=np.int64)
    src = int(self._src_len[idx].max()) if idx.size else 1
    tgt = int(self._tgt_len[idx].max()) if idx.size else 1
    return bucket_for(src, self.source_buckets), bucket_for(tgt, self.target_buckets)

  def collate(self, indices: np.ndarray, batch_size: int,
              lengths: tuple[int, int] | None = None) -> Batch:
    idx = [int(i) for i in np.asarray(indices).reshape(-1)]
    if len(idx) > batch_size:
      raise ValueError(f"{len(idx)} examples do not fit a batch of {batch_size}")
    src_len, tgt_len = lengths or self.lengths(np.asarray(idx, dtype=np.int64))
    input_ids, attention_mask = _pad([self.source_ids[i] for i in idx], batch_size, src_len,
                                     self.pad_id, self.filler)
    labels, label_mask = _pad([self.target_ids[i] for i in idx], batch_size, tgt_len,
                              self.pad_id, [self.eos_id])
    decoder_input_ids = np.full_like(labels, self.pad_id)
    decoder_input_ids[:, 0] = self.decoder_start_id
    decoder_input_ids[:, 1:] = labels[:, :-1]
    label_index = np.zeros((batch_size,), np.int32)
    label_index[:len(idx)] = self.label_index[idx]
    weight = np.zeros((batch_size,), np.float32)
    weight[:len(idx)] = 1.0
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                label_mask=label_mask, decoder_input_ids=decoder_input_ids,
                label_index=label_index, weight=weight)


def encode_seq2seq(examples: Sequence[Example], tokenizer: Any, *, max_source_length: int = 512,
                   max_target_length: int = 50, truncation: str = "sentence",
                   min_bucket: int = 16,
                   min_target_bucket: int = 8, source_buckets: Sequence[int] | None = None,
                   target_buckets: Sequence[int] | None = None,
                   decoder_start_id: int | None = None) -> Seq2SeqData:
  """Tokenises prompts and targets once, for `TrainStream` / `eval_batches`.

  Args:
    examples: examples of one or several tasks (each is prompted with its own task).
    tokenizer: the model's Hugging Face tokenizer.
    max_source_length, max_target_length: truncation lengths (the paper: 512 / 50).
    truncation: how a long prompt is cut (`prompt_content_ids`; the EOS is always kept).
    min_bucket, min_target_bucket: the smallest source / target bucket.
    source_buckets, target_buckets: explicit buckets (their last entry must be the max length).
    decoder_start_id: the decoder's start token (None: the tokenizer's pad id, as T5).
  """
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  eos_id = tokenizer.eos_token_id
  if eos_id is None:
    raise ValueError("the tokenizer has no EOS token; a seq2seq target needs one")
  source_ids = _prompt_ids(tokenizer, examples, max_source_length, truncation)
  # Few distinct labels: tokenise each once.
  unique = sorted({e.label for e in examples})
  label_ids = dict(zip(unique, _token_ids(tokenizer, unique, max_target_length, target=True)))
  return Seq2SeqData(
      source_ids=source_ids,
      target_ids=[label_ids[e.label] for e in examples],
      label_index=np.asarray([e.label_index for e in examples], dtype=np.int32),
      source_buckets=tuple(source_buckets or length_buckets(max_source_length, min_bucket)),
      target_buckets=tuple(target_buckets or length_buckets(max_target_length,
                                                            min_target_bucket)),
      pad_id=pad_id, eos_id=eos_id,
      decoder_start_id=pad_id if decoder_start_id is None else decoder_start_id,
      filler=_filler(tokenizer, pad_id),
      tasks=tuple(dict.fromkeys(e.task for e in examples)))


def _pad_left(seqs: Sequence[Sequence[int]], rows: int, length: int, pad_id: int,
              filler: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """[rows, length] ids and mask, every row right-aligned (left padding); rows past len(seqs)
  hold `filler`."""
  ids = np.full((rows, length), pad_id, dtype=np.int32)
  mask = np.zeros((rows, length), dtype=np.int32)
  for r in range(rows):
    seq = seqs[r] if r < len(seqs) else filler
    n = min(len(seq), length)
    if n:
      ids[r, length - n:] = seq[len(seq) - n:]
      mask[r, length - n:] = 1
  return ids, mask


# What every O-LoRA prompt ends with (`Task.prompt`); answers are tokenised after it.
_ANSWER_CONTEXT = "\nAnswer:"


def special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
  """The special tokens the tokenizer puts in front of a text and after it (T5: none and EOS;
  BERT: [CLS] and [SEP]; Llama-2: BOS and none), read off a probe text tokenised with and
  without `add_special_tokens`."""
  probe = _ANSWER_CONTEXT.strip()
  plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
  full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
  for start in range(len(full) - len(plain) + 1):
    if full[start:start + len(plain)] == plain:
      return full[:start], full[start + len(plain):]
  raise ValueError(f"the tokenizer's special tokens change the ids of {probe!r} "
                   f"({plain} alone, {full} with them); cannot tell its prefix")


def prompt_prefix(tokenizer: Any) -> list[int]:
  """The special tokens the tokenizer puts in front of a text (a BOS, or nothing).

  Tokens it appends (T5-style tokenizers, or `add_eos_token`, end every text with EOS) are not
  part of it: the answer has to continue the prompt.
  """
  return special_affixes(tokenizer)[0]


def answer_token_ids(tokenizer: Any, labels: Sequence[str], max_length: int,
                     eos_id: int) -> list[list[int]]:
  """The ids a causal LM should write after an O-LoRA prompt: `" " + label`, then `eos_id`.

  Each label is tokenised in the context of the prompt's end ("\\nAnswer: label") and the
  context's own ids are dropped, so the ids are those of the label inside the full text
  (SentencePiece's dummy prefix and BPE's leading-space pieces come out as they would there),
  which is what generation after the prompt must produce. Should the context's ids not be a
  prefix of the joined text's (a merge across the boundary), the label is tokenised alone.
  Truncated to `max_length` ids, the EOS kept (as a Hugging Face tokenizer keeps T5's).
  """
  if max_length < 1:
    raise ValueError(f"max_length must be >= 1, got {max_length}")
  if not labels:
    return []
  context = list(tokenizer(_ANSWER_CONTEXT, add_special_tokens=False)["input_ids"])
  joined = tokenizer([f"{_ANSWER_CONTEXT} {label}" for label in labels],
                     add_special_tokens=False)["input_ids"]
  out = []
  for label, ids in zip(labels, joined):
    ids = list(ids)
    if ids[:len(context)] == context:
      ids = ids[len(context):]
    else:
      ids = list(tokenizer(" " + label, add_special_tokens=False)["input_ids"])
    out.append(ids[:max_length - 1] + [eos_id])
  return out


def encode_causal_options(tokenizer: Any, labels: Sequence[str], eos_id: int,
                          max_length: int = 50,
                          min_bucket: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """A task's options as a causal LM's answers (`answer_token_ids`): ids and mask [K, T],
  right-padded, T a bucket of the longest (rank classification)."""
  ids = answer_token_ids(tokenizer, list(labels), max_length, eos_id)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  length = bucket_for(max(len(x) for x in ids), length_buckets(max_length, min_bucket))
  return _pad(ids, len(ids), length, pad_id, [pad_id])


@dataclasses.dataclass
class CausalLMData:
  """Examples tokenised for a decoder-only model. Build with `encode_causal_lm`.

  A batch serves training and generation alike: the prompt + answer sequence with its loss
  mask, and the prompt alone (both left-padded), so one `encode` per split feeds both the
  train step and `predict`.
  """

  prompt_ids: list[list[int]]
  answer_ids: list[list[int]]
  label_index: np.ndarray
  prompt_buckets: tuple[int, ...]
  answer_buckets: tuple[int, ...]
  pad_id: int
  eos_id: int
  filler: list[int]
  tasks: tuple[str, ...] = ()

  def __post_init__(self):
    self._prompt_len = np.asarray([len(s) for s in self.prompt_ids], dtype=np.int64)
    self._answer_len = np.asarray([len(t) for t in self.answer_ids], dtype=np.int64)

  def __len__(self) -> int:
    return len(self.prompt_ids)

  @property
  def source_lengths(self) -> np.ndarray:
    """Prompt lengths (what `eval_batches` sorts by)."""
    return self._prompt_len

  def lengths(self, indices: np.ndarray) -> tuple[int, int]:
    idx = np.asarray(indices, dtype=np.int64)
    prompt = int(self._prompt_len[idx].max()) if idx.size else 1
    answer = int(self._answer_len[idx].max()) if idx.size else 1
    return bucket_for(prompt, self.prompt_buckets), bucket_for(answer, self.answer_buckets)

  def collate(self, indices: np.ndarray, batch_size: int,
              lengths: tuple[int, int] | None = None) -> Batch:
    idx = [int(i) for i in np.asarray(indices).reshape(-1)]
    if len(idx) > batch_size:
      raise ValueError(f"{len(idx)} examples do not fit a batch of {batch_size}")
    prompt_len, answer_len = lengths or self.lengths(np.asarray(idx, dtype=np.int64))
    prompts = [self.prompt_ids[i] for i in idx]
    prompts += [self.filler] * (batch_size - len(idx))
    answers = [self.answer_ids[i] for i in idx]
    answers += [[self.eos_id]] * (batch_size - len(idx))
    prompt_ids, prompt_mask = _pad_left(prompts, batch_size, prompt_len, self.pad_id,
                                        self.filler)
    total = prompt_len + answer_len
    input_ids, attention_mask = _pad_left([p + a for p, a in zip(prompts, answers)],
                                          batch_size, total, self.pad_id, self.filler)
    # Position t predicts token t + 1: labels are the ids shifted left, counted where the next
    # token is an answer token (the answer fills the last len(answer) columns).
    labels = np.full_like(input_ids, self.pad_id)
    labels[:, :-1] = input_ids[:, 1:]
    label_mask = np.zeros_like(input_ids)
    for r, answer in enumerate(answers):
      label_mask[r, total - 1 - len(answer):total - 1] = 1
    label_index = np.zeros((batch_size,), np.int32)
    label_index[:len(idx)] = self.label_index[idx]
    weight = np.zeros((batch_size,), np.float32)
    weight[:len(idx)] = 1.0
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                label_mask=label_mask, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                label_index=label_index, weight=weight)


def encode_causal_lm(examples: Sequence[Example], tokenizer: Any, *, eos_id: int | None = None,
                     max_prompt_length: int = 512, max_answer_length: int = 50,
                     truncation: str = "sentence", min_bucket: int = 16,
                     min_answer_bucket: int = 8,
                     prompt_buckets: Sequence[int] | None = None,
                     answer_buckets: Sequence[int] | None = None) -> CausalLMData:
  """Tokenises O-LoRA prompts and their answers once, for a decoder-only model.

  The prompt is `Task.prompt(sentence)` (the text `encode_seq2seq` gives T5) behind the special
  tokens the tokenizer itself adds in front (`prompt_prefix`: SmolLM2 adds none, a Llama-2
  tokenizer its BOS); a trailing EOS the tokenizer may append is left out, as the answer
  follows. Long prompts are cut by `truncation` (`prompt_content_ids`): by default the
  sentence loses its end, so the header with the options and the final "...\\nAnswer:" cue
  (generation continues from the prompt's last token) always survive. The
  answer is `" " + label` + EOS (`answer_token_ids`), at most `max_answer_length` ids; only it
  is trained on.

  Args:
    examples: examples of one or several tasks (each is prompted with its own task).
    tokenizer: the model's Hugging Face tokenizer.
    eos_id: the token ending an answer (None: the tokenizer's EOS).
    max_prompt_length, max_answer_length: truncation lengths (prefix and EOS included).
    truncation: "sentence", "left" or "right" (see `prompt_content_ids`).
    min_bucket, min_answer_bucket: the smallest prompt / answer bucket.
    prompt_buckets, answer_buckets: explicit buckets (their last entry must be the max length).
  """
  eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
  if eos_id is None:
    raise ValueError("the tokenizer has no EOS token; a causal-LM answer needs one")
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
  prefix = prompt_prefix(tokenizer)
  keep = max_prompt_length - len(prefix)
  if keep < 1:
    raise ValueError(f"max_prompt_length {max_prompt_length} leaves no room for a prompt after "
                     f"the {len(prefix)} prefix token(s)")
  prompt_ids = [prefix + c for c in prompt_content_ids(tokenizer, examples, keep, truncation)]
  # Few distinct labels: tokenise each once.
  unique = sorted({e.label for e in examples})
  label_ids = dict(zip(unique, answer_token_ids(tokenizer, unique, max_answer_length, eos_id)))
  return CausalLMData(
      prompt_ids=prompt_ids,
      answer_ids=[label_ids[e.label] for e in examples],
      label_index=np.asarray([e.label_index for e in examples], dtype=np.int32),
      prompt_buckets=tuple(prompt_buckets or length_buckets(max_prompt_length, min_bucket)),
      answer_buckets=tuple(answer_buckets or length_buckets(max_answer_length,
                                                            min_answer_bucket)),
      pad_id=pad_id, eos_id=eos_id,
      # Padding rows prompt with the prefix (or one EOS): a real token to attend to.
      filler=prefix or [eos_id],
      tasks=tuple(dict.fromkeys(e.task for e in examples)))


@dataclasses.dataclass
class ScoringData:
  """Examples tokenised for label-name scoring by an encoder. Build with `encode_scoring`."""

  source_ids: list[list[int]]
  label_index: np.ndarray
  option_ids: np.ndarray
  option_mask: np.ndarray
  source_buckets: tuple[int, ...]
  pad_id: int
  filler: list[int]
  task: str = ""

  def __post_init__(self):
    self._src_len = np.asarray([len(s) for s in self.source_ids], dtype=np.int64)

  def __len__(self) -> int:
    return len(self.source_ids)

  @property
  def source_lengths(self) -> np.ndarray:
    return self._src_len

  def lengths(self, indices: np.ndarray) -> tuple[int]:
    idx = np.asarray(indices, dtype=np.int64)
    src = int(self._src_len[idx].max()) if idx.size else 1
    return (bucket_for(src, self.source_buckets),)

  def collate(self, indices: np.ndarray, batch_size: int,
              lengths: tuple[int] | None = None) -> Batch:
    idx = [int(i) for i in np.asarray(indices).reshape(-1)]
    if len(idx) > batch_size:
      raise ValueError(f"{len(idx)} examples do not fit a batch of {batch_size}")
    (src_len,) = lengths or self.lengths(np.asarray(idx, dtype=np.int64))
    input_ids, attention_mask = _pad([self.source_ids[i] for i in idx], batch_size, src_len,
                                     self.pad_id, self.filler)
    label_index = np.zeros((batch_size,), np.int32)
    label_index[:len(idx)] = self.label_index[idx]
    weight = np.zeros((batch_size,), np.float32)
    weight[:len(idx)] = 1.0
    return dict(input_ids=input_ids, attention_mask=attention_mask, option_ids=self.option_ids,
                option_mask=self.option_mask, label_index=label_index, weight=weight)


def encode_options(tokenizer: Any, labels: Sequence[str], max_length: int = 16,
                   min_bucket: int = 8, target: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """The options of a task as [K, L] ids and mask, L a bucket of the longest option.

  `target=True` tokenises them as decoder targets (T5 rank classification); otherwise as
  encoder inputs (label-name scoring).
  """
  ids = _token_ids(tokenizer, list(labels), max_length, target=target)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  length = bucket_for(max(len(x) for x in ids), length_buckets(max_length, min_bucket))
  return _pad(ids, len(ids), length, pad_id, [pad_id])


def encode_scoring(examples: Sequence[Example], tokenizer: Any, *,
                   task: str | tasks_lib.Task | None = None, max_length: int = 128,
                   option_max_length: int = 16, min_bucket: int = 16,
                   use_prompt: bool = False, truncation: str = "sentence") -> ScoringData:
  """Tokenises sentences (or full prompts with `use_prompt`, cut by `truncation`) and the
  task's options.

  All examples must belong to one task (its options are shared by every row).
  """
  names = {e.task for e in examples}
  if task is None:
    if len(names) != 1:
      raise ValueError(f"encode_scoring needs examples of exactly one task, got {sorted(names)}")
    task = names.pop()
  task = tasks_lib.get_task(task)
  if names - {task.name}:
    raise ValueError(f"examples of {sorted(names - {task.name})} given for task {task.name!r}")
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  option_ids, option_mask = encode_options(tokenizer, task.labels, option_max_length)
  source_ids = (_prompt_ids(tokenizer, examples, max_length, truncation) if use_prompt else
                _token_ids(tokenizer, [e.sentence for e in examples], max_length))
  return ScoringData(
      source_ids=source_ids,
      label_index=np.asarray([e.label_index for e in examples], dtype=np.int32),
      option_ids=option_ids, option_mask=option_mask,
      source_buckets=length_buckets(max_length, min_bucket), pad_id=pad_id,
      filler=_filler(tokenizer, pad_id), task=task.name)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  # only for the defaults
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  return process_index, process_count


def _local_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                     f"{process_count} processes")
  local = global_batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


class TrainStream:
  """Deterministic, resumable training batches: `batch(step)` is a pure function of (seed, step).

  Args:
    data: the tokenised examples.
    global_batch_size: rows per step over all processes.
    seed: the seed of the epoch permutations.
    process_index, process_count: this process and how many (default: JAX's).
    pad_to_longest: pad every batch to the bucket of the longest example in `data`, so the
      whole stream has one shape (one compilation of the train step) instead of one per
      bucket its batches happen to need.

  Attributes:
    num_steps_per_epoch: ceil(len(data) / global_batch_size); the last batch of an epoch is
      completed with padding rows (weight 0).
    global_batch_size, local_batch_size: rows per step in all / in this process.
  """

  def __init__(self, data: BatchSource, global_batch_size: int, seed: int, *,
               process_index: int | None = None, process_count: int | None = None,
               pad_to_longest: bool = False):
    if len(data) == 0:
      raise ValueError("cannot stream batches from no examples")
    if global_batch_size < 1:
      raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    self.data = data
    self.seed = int(seed)
    self.global_batch_size = int(global_batch_size)
    self.process_index, self.process_count = _process(process_index, process_count)
    self._rows = _local_rows(self.global_batch_size, self.process_index, self.process_count)
    self.local_batch_size = self.global_batch_size // self.process_count
    self.num_steps_per_epoch = math.ceil(len(data) / self.global_batch_size)
    self._perm_epoch, self._perm = -1, None
    self._lengths = data.lengths(np.arange(len(data))) if pad_to_longest else None

  def permutation(self, epoch: int) -> np.ndarray:
    """The order of epoch `epoch` (cached: consecutive steps share it)."""
    if epoch != self._perm_epoch:
      rng = np.random.default_rng([self.seed, int(epoch), 0x57AE])
      self._perm, self._perm_epoch = rng.permutation(len(self.data)), epoch
    return self._perm

  def global_indices(self, step: int) -> np.ndarray:
    """The example indices of global step `step` (fewer than the batch size at an epoch end)."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    epoch, k = divmod(int(step), self.num_steps_per_epoch)
    return self.permutation(epoch)[k * self.global_batch_size:(k + 1) * self.global_batch_size]

  def batch(self, step: int) -> Batch:
    """This process's rows of global step `step`."""
    idx = self.global_indices(step)
    lengths = self._lengths or self.data.lengths(idx)
    padded = np.full((self.global_batch_size,), -1, dtype=np.int64)
    padded[:idx.size] = idx
    local = padded[self._rows]
    return self.data.collate(local[local >= 0], self.local_batch_size, lengths)

  def __call__(self, step: int) -> Batch:
    return self.batch(step)

  def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[Batch]:
    """Batches of steps start_step, start_step + 1, ... (forever when num_steps is None)."""
    step = start_step
    while num_steps is None or step < start_step + num_steps:
      yield self.batch(step)
      step += 1


class MixedStream:
  """Joint training over several tasks (MTL): every step is one task's batch.

  Within an epoch each task contributes its own number of batches, in an order shuffled from
  the seed, so the mixture is proportional to task sizes and `batch(step)` stays a pure function
  of (seed, step). One task per batch keeps label-name options shared within a batch.
  """

  def __init__(self, streams: Sequence[TrainStream], seed: int):
    self.streams = list(streams)
    self.seed = seed
    owner = np.concatenate([np.full(s.num_steps_per_epoch, i) for i, s in enumerate(self.streams)])
    self.num_steps_per_epoch = len(owner)
    self._owner = owner

  def _schedule(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([self.seed, epoch, 0x3A7])
    owner = self._owner[rng.permutation(len(self._owner))]
    # The k-th appearance of task i in the epoch is task i's k-th batch of its own epoch.
    local = np.zeros_like(owner)
    for i in range(len(self.streams)):
      local[owner == i] = np.arange(int((owner == i).sum()))
    return owner, local

  def batch(self, step: int):
    epoch, k = divmod(int(step), self.num_steps_per_epoch)
    owner, local = self._schedule(epoch)
    stream = self.streams[int(owner[k])]
    return stream.batch(epoch * stream.num_steps_per_epoch + int(local[k]))


def num_eval_batches(data: BatchSource, batch_size: int) -> int:
  return math.ceil(len(data) / batch_size)


def eval_batches(data: BatchSource, batch_size: int, *, process_index: int | None = None,
                 process_count: int | None = None,
                 sort_by_length: bool = True) -> Iterator[Batch]:
  """Every example once, in global batches of `batch_size` (last one padded, weight 0).

  With `sort_by_length` examples are visited shortest first, so batches pad little and most
  use small buckets; each process yields its slice of every global batch.
  """
  process_index, process_count = _process(process_index, process_count)
  rows = _local_rows(batch_size, process_index, process_count)
  local_size = batch_size // process_count
  order = np.arange(len(data))
  if sort_by_length:
    order = np.argsort(data.source_lengths, kind="stable")
  for start in range(0, len(data), batch_size):
    idx = order[start:start + batch_size]
    lengths = data.lengths(idx)
    padded = np.full((batch_size,), -1, dtype=np.int64)
    padded[:idx.size] = idx
    local = padded[rows]
    yield data.collate(local[local >= 0], local_size, lengths)


def seed_samples(examples: Sequence[Example], n: int, seed: int) -> list[Example]:
  """`n` examples for sensitivity scoring: stratified over labels, deterministic in `seed`
  (`seed_sample_indices`' draw)."""
  idx = seed_sample_indices([e.label_index for e in examples], n, seed)
  return [examples[i] for i in idx]


def seed_sample_indices(labels: Sequence[int], n: int, seed: int) -> np.ndarray:
  """Indices of `n` examples with `labels`, stratified over labels, deterministic in `seed`.

  Classes take turns (in a seeded order), each contributing its next example of a seeded
  per-class shuffle, so n >= #classes covers every class and class counts differ by at most
  one while the classes last.
  """
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  if n > len(labels):
    raise ValueError(f"asked for {n} seed samples but only {len(labels)} examples exist")
  by_class: dict[int, list[int]] = {}
  for i, label in enumerate(labels):
    by_class.setdefault(int(label), []).append(i)
  classes = sorted(by_class)
  rng = np.random.default_rng([seed, 0x5EED5])
  queues = {c: list(rng.permutation(by_class[c])) for c in classes}
  classes = [classes[i] for i in rng.permutation(len(classes))]
  picked: list[int] = []
  while len(picked) < n:
    for c in classes:
      if queues[c] and len(picked) < n:
        picked.append(int(queues[c].pop(0)))
  return np.asarray(picked, dtype=np.int64)
