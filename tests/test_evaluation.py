"""Exact match with O-LoRA's normalisation, generation accuracy and rank classification."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require_shared
from lbcl_jax import evaluation
from lbcl_jax import tasks
from lbcl_jax.data import load_split
from lbcl_jax.data import pipeline


@pytest.fixture(scope="module")
def tok():
  path = require_shared("t5_tokenizer", "flan-t5-small")
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("text,normalized", [
    ("  Science or Technology. ", "science or technology"),
    ("Science-or-Technology", "scienceortechnology"),  # punctuation is deleted, not spaced
    ("The World", "the world"),  # articles stay (O-LoRA / Tk-Instruct, unlike SQuAD)
    ("Society & Culture", "society culture"),
    ("society  &culture!!", "society culture"),
    ("SST-2", "sst2"),
    ("very\tnegative\n", "very negative"),
    ("\u201cGood\u201d", "\u201cgood\u201d"),  # curly quotes are not ASCII punctuation
    ("", ""),
])
def test_normalize_answer(text, normalized):
  assert evaluation.normalize_answer(text) == normalized


def test_exact_match():
  assert evaluation.exact_match("science or technology!", "Science or Technology")
  assert evaluation.exact_match("Education & Reference", "education reference")
  assert not evaluation.exact_match("The World", "World")
  assert not evaluation.exact_match("positive.", "very positive")
  np.testing.assert_array_equal(
      evaluation.match_options(["world", "SPORTS.", "sport", "Science or technology"],
                               tasks.get_task("agnews").labels), [0, 1, -1, 3])


def test_evaluate_generation(tok):
  task = tasks.get_task("syn_news")
  examples = load_split("syn_news", "test", "synthetic")[::20]  # 10 examples, 4 classes
  data = pipeline.encode_seq2seq(examples, tok)
  batches = list(pipeline.eval_batches(data, 4, process_index=0, process_count=1))
  assert len(batches) == 3  # the last has 2 padding rows

  def fake_generate(batch):
    """Right for even rows, a wrong label for odd rows; junk after EOS; padding rows junk."""
    out = np.zeros((batch["label_index"].shape[0], 12), np.int32)
    for r, y in enumerate(batch["label_index"].tolist()):
      answer = task.labels[y] if r % 2 == 0 else task.labels[(y + 1) % 4]
      ids = [0] + tok(text_target=answer)["input_ids"] + tok("Sports")["input_ids"]
      out[r, :len(ids)] = ids
      if batch["weight"][r] == 0:
        out[r] = 7  # not even a label: must not count
    return out

  accuracy, predictions = evaluation.evaluate_generation(fake_generate, batches, tok, task,
                                                         return_predictions=True)
  assert len(predictions) == 10
  assert accuracy == pytest.approx(5 / 10)  # even rows of batches of 4, 4 and 2 real rows
  assert set(predictions) <= set(task.labels)
  assert evaluation.decode(tok, [[0, 1804, 1, 1804], [-100, 1804, 1, 7]]) == ["Good", "Good"]


def _first_token_model():
  """A fake scorer preferring the option whose first token equals the source's first token."""
  calls = []

  @jax.jit
  def seq_logprob(input_ids, attention_mask, labels, label_mask):
    del attention_mask, label_mask
    return -jnp.abs(labels[:, 0] - input_ids[:, 0]).astype(jnp.float32)

  def fn(*args):
    calls.append(args[0].shape)
    return seq_logprob(*args)
  return fn, seq_logprob, calls


def test_rank_classify_fixed_shapes(tok):
  option_ids, option_mask = evaluation.option_targets(tok, "agnews")
  assert option_ids.shape[0] == 4 and option_ids.shape[1] == 8
  want = np.array([3, 0, 2, 1, 1, 3])
  input_ids = np.zeros((6, 16), np.int32)
  input_ids[:, 0] = option_ids[want, 0]
  attention_mask = np.ones_like(input_ids)
  fn, jitted, calls = _first_token_model()
  pred = evaluation.rank_classify(fn, input_ids, attention_mask, option_ids, option_mask)
  np.testing.assert_array_equal(pred, want)
  assert calls == [(24, 16)]  # one call: 6 rows x 4 options
  # In chunks of 3 options: 2 calls of the same shape (the second chunk padded with option 0).
  calls.clear()
  pred = evaluation.rank_classify(fn, input_ids, attention_mask, option_ids, option_mask,
                                  option_chunk=3)
  np.testing.assert_array_equal(pred, want)
  assert calls == [(18, 16), (18, 16)]
  # Another batch of the same shape reuses the compilation.
  evaluation.rank_classify(fn, input_ids[::-1], attention_mask, option_ids, option_mask)
  assert jitted._cache_size() == 2  # pylint: disable=protected-access  # [24,..] and [18,..]
  # The whole classifier is itself jittable.
  whole = jax.jit(lambda i, m: evaluation.rank_classify(jitted, i, m, option_ids, option_mask))
  np.testing.assert_array_equal(whole(input_ids, attention_mask), want)


def test_rank_classify_length_normalization():
  option_ids = np.array([[5, 6, 7, 1], [8, 1, 0, 0]], np.int32)
  option_mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.int32)

  @jax.jit
  def per_token_minus_one(input_ids, attention_mask, labels, label_mask):
    del input_ids, attention_mask
    return -label_mask.sum(axis=1).astype(jnp.float32) + 0.5 * (labels[:, 0] == 5)

  inputs = np.ones((3, 4), np.int32)
  summed = evaluation.rank_classify(per_token_minus_one, inputs, inputs, option_ids, option_mask)
  np.testing.assert_array_equal(summed, [1, 1, 1])  # the shorter option wins on the sum
  mean = evaluation.rank_classify(per_token_minus_one, inputs, inputs, option_ids, option_mask,
                                  length_normalize=True)
  np.testing.assert_array_equal(mean, [0, 0, 0])  # -3.5/4 > -2/2


def test_evaluate_rank_classification_weights(tok):
  option_ids, option_mask = evaluation.option_targets(tok, "agnews")
  fn, _, _ = _first_token_model()
  input_ids = np.zeros((4, 8), np.int32)
  input_ids[:, 0] = option_ids[[0, 1, 2, 2], 0]
  batch = {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids),
           "label_index": np.array([0, 1, 3, 0], np.int32),
           "weight": np.array([1, 1, 1, 0], np.float32)}
  # Rows 0, 1 right, row 2 wrong, row 3 (weight 0) ignored.
  assert evaluation.evaluate_rank_classification(
      fn, [batch], option_ids, option_mask) == pytest.approx(2 / 3)
  assert evaluation.accuracy_from_predictions(np.array([0, 1, 2, 2]), batch) == (2.0, 3.0)
