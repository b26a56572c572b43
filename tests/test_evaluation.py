"""Exact match with O-LoRA's normalisation, generation accuracy and rank classification."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require_shared
from lbcl_jax import data as data_lib
from lbcl_jax import evaluation
from lbcl_jax import sharding
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

  class FakeGenerator:
    """A generative backbone: its predictions are token ids, scored by exact match."""

    replicated_keys = ()

    def eval_extras(self, task):
      del task
      return {}

    def to_options(self, predictions, task):
      return evaluation.match_options(evaluation.decode(tok, predictions), task.labels)

  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  predict = lambda params, batch: fake_generate(jax.tree.map(np.asarray, batch))
  accuracy = evaluation.evaluate(FakeGenerator(), predict, None, data, task, batch_size=4,
                                 mesh=mesh)
  assert accuracy == pytest.approx(5 / 10)  # even rows of batches of 4, 4 and 2 real rows
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

  class FakeRanker:
    """A backbone predicting option indices by rank classification with the task's options."""

    replicated_keys = ("option_ids", "option_mask")

    def eval_extras(self, task):
      del task
      return {"option_ids": option_ids, "option_mask": option_mask}

    def to_options(self, predictions, task):
      del task
      return predictions

  def predict(params, batch):
    del params
    return evaluation.rank_classify(fn, batch["input_ids"], batch["attention_mask"],
                                    batch["option_ids"], batch["option_mask"])

  examples = [data_lib.make_example(tasks.get_task("agnews"), s, y)
              for s, y in (("a", 0), ("b", 1), ("c", 3))]
  data = pipeline.encode_seq2seq(examples, tok)
  first = option_ids[[0, 1, 2], 0]  # rows 0 and 1 start like their label, row 2 like another

  class Rigged:
    """The encoded test split with each row's first token set as above."""

    source_lengths = data.source_lengths

    def __len__(self):
      return len(data)

    def lengths(self, idx):
      return data.lengths(idx)

    def collate(self, idx, batch_size, lengths=None):
      batch = dict(data.collate(idx, batch_size, lengths))
      batch["input_ids"] = np.array(batch["input_ids"])
      batch["input_ids"][:len(idx), 0] = first[np.asarray(idx)]
      return batch

  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  # Rows 0, 1 right, row 2 wrong; the padding row of the batch of 4 (weight 0) is ignored.
  assert evaluation.evaluate(FakeRanker(), predict, None, Rigged(), "agnews", batch_size=4,
                             mesh=mesh) == pytest.approx(2 / 3)


class _Answers:
  """A tiny test split of `task`: each row holds (gold label, the label the model will pick)."""

  def __init__(self, task, rows):
    self.task, self.rows = tasks.get_task(task), rows
    self.source_lengths = np.ones(len(rows), np.int64)

  def __len__(self):
    return len(self.rows)

  def lengths(self, idx):
    return (1,)

  def collate(self, idx, batch_size, lengths=None):
    idx = list(np.asarray(idx).reshape(-1))
    picks = np.full((batch_size, 1), -1, np.int64)
    gold = np.zeros((batch_size,), np.int32)
    weight = np.zeros((batch_size,), np.float32)
    for b, i in enumerate(idx):
      label, pick = self.rows[i]
      gold[b], weight[b] = self.task.label_index(label), 1.0
      picks[b, 0] = _code(pick)
    return {"pick": picks, "label_index": gold, "weight": weight}


def _code(label):
  return sum(ord(c) * 31 ** i for i, c in enumerate(label)) % 1_000_003


class _LabelScorer:
  """A scoring backbone that picks, among the options it is given, the one each row names
  (option 0 when the named label is not an option)."""

  replicated_keys = ("option_code",)

  def eval_extras(self, task):
    return {"option_code": np.asarray([_code(label) for label in task.labels], np.int64)}

  def to_options(self, predictions, task):
    del task
    return predictions


def _pick(params, batch):
  del params
  return jnp.argmax(batch["pick"] == batch["option_code"][None, :], axis=1)


def test_label_space_seen_scores_every_seen_label_without_task_identity():
  """In the "seen" space an answer naming another task's label is a wrong answer that the
  task's own space cannot even express; gold indices follow the union's order."""
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  rows = [("Sports", "Sports"), ("Business", "Business"), ("Sports", "negative"),
          ("World", "very positive"), ("Science or Technology", "Science or Technology")]
  data = _Answers("agnews", rows)
  seen = tasks.label_union(["amazon", "yelp", "agnews"])
  assert seen == ("very negative", "negative", "neutral", "positive", "very positive",
                  "World", "Sports", "Business", "Science or Technology")

  def acc(labels):
    return evaluation.evaluate(_LabelScorer(), _pick, None, data, "agnews", batch_size=8,
                               mesh=mesh, labels=labels)
  # Task space: the two sentiment answers are not options, so argmax falls to option 0
  # ("World"), which happens to be row 3's gold: 4 of 5 right.
  assert acc(None) == pytest.approx(4 / 5)
  # Seen space: both sentiment answers are chosen, and wrong: 3 of 5.
  assert acc(seen) == pytest.approx(3 / 5)
  with pytest.raises(ValueError, match="lacks"):
    acc(tasks.label_union(["amazon"]))


def test_label_space():
  """"seen": every label of the tasks trained so far, once each, in order; "task": None (the
  task's own); anything else is refused."""
  assert evaluation.label_space("seen", ["sst-2", "imdb"]) == tasks.label_union(
      ["sst-2", "imdb"])
  assert set(evaluation.label_space("seen", ["agnews", "sst-2"])) == (
      set(tasks.get_task("agnews").labels) | set(tasks.get_task("sst-2").labels))
  assert evaluation.label_space("task", ["agnews"]) is None
  with pytest.raises(ValueError, match="'all'"):
    evaluation.label_space("all", ["agnews"])
