"""The synthetic suite: deterministic, sized as asked, learnable, and with its conflicting pair."""

import collections
import re

import numpy as np
import pytest

from conftest import require_shared
from lbcl_jax import tasks
from lbcl_jax.data import load_split
from lbcl_jax.data import synthetic

NAMES = [t.name for t in tasks.SYNTHETIC_TASKS]


def test_suite_tasks_and_orders():
  assert NAMES == ["syn_news", "syn_sentiment", "syn_product", "syn_rating",
                   "syn_sentiment_flip"]
  for order in tasks.SYNTHETIC_ORDERS:
    assert all(t.synthetic for t in tasks.resolve_order(order))
  with pytest.raises(ValueError, match="not part of the synthetic suite"):
    synthetic.load("agnews", "train")


@pytest.mark.parametrize("name", NAMES)
def test_sizes_determinism_and_disjoint_splits(name):
  task = tasks.get_task(name)
  train = load_split(name, "train", "synthetic", train_per_class=40, test_per_class=10)
  test = load_split(name, "test", "synthetic", train_per_class=40, test_per_class=10)
  classes = range(task.num_labels)
  assert collections.Counter(e.label_index for e in train) == {c: 40 for c in classes}
  assert collections.Counter(e.label_index for e in test) == {c: 10 for c in classes}
  assert train == load_split(name, "train", "synthetic", train_per_class=40, test_per_class=10)
  assert not {e.sentence for e in train} & {e.sentence for e in test}
  assert len({e.sentence for e in train}) == len(train)
  # The test set does not depend on the training size.
  assert test == load_split(name, "test", "synthetic", train_per_class=7, test_per_class=10)
  # Another suite seed, other sentences.
  other = load_split(name, "train", "synthetic", train_per_class=40, test_per_class=10,
                     suite_seed=1)
  assert {e.sentence for e in other} != {e.sentence for e in train}
  for e in train:
    assert task.labels[e.label_index] == e.label and e.task == name
    assert re.fullmatch(r"[A-Z][A-Za-z ,]+\.", e.sentence), e.sentence


def test_per_class_and_max_examples():
  assert len(load_split("syn_news", "train", "synthetic", per_class=3)) == 12
  capped = load_split("syn_news", "train", "synthetic", max_examples=25, seed=1)
  assert len(capped) == 25
  assert capped != load_split("syn_news", "train", "synthetic", max_examples=25, seed=2)
  with pytest.raises(ValueError, match="has only 1920 distinct"):
    load_split("syn_news", "train", "synthetic", per_class=5000)
  # A driver may pass its empty data directory to every source.
  assert len(load_split("syn_news", "test", "synthetic", root="", per_class=2)) == 8
  with pytest.raises(ValueError, match="only read by source='local'"):
    load_split("syn_news", "test", "synthetic", root="/data")


def test_conflicting_pair_same_sentences_opposite_labels():
  for split in ("train", "test"):
    a = load_split("syn_sentiment", split, "synthetic")
    b = load_split("syn_sentiment_flip", split, "synthetic")
    assert [e.sentence for e in a] == [e.sentence for e in b]
    assert all(x.label != y.label and x.label_index == 1 - y.label_index for x, y in zip(a, b))


def test_sentences_are_short():
  tokenizer_dir = require_shared("t5_tokenizer", "flan-t5-small")
  transformers = pytest.importorskip("transformers")
  tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
  for name in NAMES:
    sentences = [e.sentence for split in ("train", "test")
                 for e in load_split(name, split, "synthetic")]
    assert max(len(ids) for ids in tok(sentences)["input_ids"]) < 32, name


# --------------------------------------------------------------------------------------------
# Learnability and conflict, checked with a bag-of-words softmax regression (a stand-in for a
# pretrained model: if words separate the classes linearly, a fine-tuned transformer will too).


def _bow(examples, vocab):
  x = np.zeros((len(examples), len(vocab)), np.float32)
  for i, e in enumerate(examples):
    for w in re.findall(r"[a-z]+", e.sentence.lower()):
      if w in vocab:
        x[i, vocab[w]] += 1.0
  return x


def _fit(w, x, y, num_classes, steps=150, lr=0.5):
  onehot = np.eye(num_classes, dtype=np.float32)[y]
  for _ in range(steps):
    logits = x @ w
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    w = w - lr * x.T @ (p - onehot) / len(y)
  return w


def _accuracy(w, x, y):
  return float(np.mean((x @ w).argmax(1) == y))


def _vocab(*splits):
  words = sorted({w for s in splits for e in s for w in re.findall(r"[a-z]+", e.sentence.lower())})
  return {w: i for i, w in enumerate(words)}


@pytest.mark.parametrize("name", NAMES)
def test_each_task_is_learnable(name):
  task = tasks.get_task(name)
  train = load_split(name, "train", "synthetic", train_per_class=64)
  test = load_split(name, "test", "synthetic")
  vocab = _vocab(train)
  y_train = np.asarray([e.label_index for e in train])
  w = _fit(np.zeros((len(vocab), task.num_labels), np.float32), _bow(train, vocab), y_train,
           task.num_labels)
  acc = _accuracy(w, _bow(test, vocab), np.asarray([e.label_index for e in test]))
  assert acc > 0.9, (name, acc)


def test_sequential_training_on_the_flip_task_erases_sentiment():
  sent_train = load_split("syn_sentiment", "train", "synthetic", train_per_class=64)
  sent_test = load_split("syn_sentiment", "test", "synthetic")
  flip_train = load_split("syn_sentiment_flip", "train", "synthetic", train_per_class=64)
  vocab = _vocab(sent_train)
  x_test, y_test = _bow(sent_test, vocab), np.asarray([e.label_index for e in sent_test])
  w = _fit(np.zeros((len(vocab), 2), np.float32), _bow(sent_train, vocab),
           np.asarray([e.label_index for e in sent_train]), 2)
  before = _accuracy(w, x_test, y_test)
  w = _fit(w, _bow(flip_train, vocab), np.asarray([e.label_index for e in flip_train]), 2)
  after = _accuracy(w, x_test, y_test)
  assert before > 0.9 and after < 0.1, (before, after)
