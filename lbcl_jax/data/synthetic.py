"""The embedded synthetic suite: short English sentences from templates, offline and seeded.

Made by this project (not a published benchmark) so that a run works with nothing downloaded.
Two sentence families, built from fixed word lists:

* news headlines, "{subject} {event} {context}{time}." -- every slot carries the topic;
* product reviews, "{opener} {product} {opinion}{ending}." -- the product carries the product
  category, the opinion carries the sentiment (positive, negative, or neutral).

Five tasks (registered in `lbcl_jax.tasks.SYNTHETIC_TASKS`):

| task | sentences | label |
| --- | --- | --- |
| syn_news | headlines | World / Sports / Business / Science or Technology (AG News') |
| syn_sentiment | positive/negative reviews | sentiment: positive / negative |
| syn_product | reviews of any sentiment | Electronics / Kitchen / Books / Clothing |
| syn_rating | reviews of any sentiment | negative / neutral / positive |
| syn_sentiment_flip | the same sentences as syn_sentiment | the opposite sentiment label |

Shared structure: syn_sentiment and syn_rating read the same opinion words with the same
meaning (learning one helps the other); syn_news and syn_product are both "which topic" tasks
over different sentences. Conflict: **syn_sentiment and syn_sentiment_flip** -- identical
training and test sentences, identical label strings, opposite mapping. Only the prompt's
"Dataset:" line tells them apart, so training on syn_sentiment_flip after syn_sentiment drives
syn_sentiment's accuracy toward 0 unless the earlier task is protected.

Each class has its own combination space (the product of its slot lists, hundreds to thousands
of distinct sentences); a class's sentences are a seeded permutation of that space, test rows
first, so the test set does not change with the training size and never overlaps it. Every
sentence is at most ~25 T5 tokens. Draws use `np.random.default_rng((suite_seed, stream, class))`
only: no global random state.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence
import zlib

import numpy as np

from lbcl_jax import tasks as tasks_lib
from lbcl_jax.data import Example
from lbcl_jax.data import make_example
from lbcl_jax.data import sample_examples
from lbcl_jax.errors import InputError

TRAIN_PER_CLASS = 200
TEST_PER_CLASS = 50

# --- News headlines: one list per topic for every slot (topic order = syn_news labels). -------

_NEWS = {
    "World": dict(
        subject=["The prime minister", "The foreign ministry", "The United Nations envoy",
                 "Border officials", "The new ambassador", "Opposition leaders",
                 "The president", "Peace negotiators"],
        event=["signed a treaty", "held talks with rebels", "called for a ceasefire",
               "won the national election", "visited the capital", "announced new sanctions",
               "met regional leaders", "closed the embassy"],
        context=["after weeks of protests", "in the disputed region", "at the summit in Geneva",
                 "during the state visit", "amid rising tensions", "before the parliament vote"]),
    "Sports": dict(
        subject=["The striker", "The home team", "The tennis champion", "The head coach",
                 "The veteran goalkeeper", "The young sprinter", "The basketball captain",
                 "The cycling squad"],
        event=["scored twice", "won the final", "broke the world record", "lost the semifinal",
               "signed a new contract", "was injured", "trained with the squad",
               "celebrated the league title"],
        context=["in the league match", "at the Olympic stadium", "during the second half",
                 "before the world cup", "in front of home fans", "at the tennis tournament"]),
    "Business": dict(
        subject=["The bank", "Shareholders", "The retail chain", "The airline",
                 "The chief executive", "Investors", "The oil company", "The car maker"],
        event=["reported higher profits", "cut hundreds of jobs", "raised its prices",
               "agreed to a merger", "missed its sales targets", "bought a rival firm",
               "paid a larger dividend", "sold a factory"],
        context=["in the third quarter", "as stocks fell", "after the earnings report",
                 "on Wall Street", "despite weak demand", "amid a market rally"]),
    "Science or Technology": dict(
        subject=["Researchers", "The software company", "NASA engineers", "The chip maker",
                 "Astronomers", "The smartphone maker", "Biologists", "The robotics lab"],
        event=["discovered a new planet", "released a software update", "launched a satellite",
               "built a faster processor", "found a rare gene", "fixed a security flaw",
               "tested a new battery", "mapped the genome"],
        context=["using a new telescope", "in the laboratory", "for mobile devices",
                 "with artificial intelligence", "in a recent study", "on the space station"]),
}
_NEWS_TIME = ["", " on Monday", " this week", " yesterday", " last night"]

# --- Product reviews. -------------------------------------------------------------------------

_PRODUCTS = {  # category order = syn_product labels
    "Electronics": ["headset", "laptop", "phone charger", "camera", "speaker", "keyboard"],
    "Kitchen": ["blender", "frying pan", "coffee maker", "toaster", "knife set", "kettle"],
    "Books": ["novel", "cookbook", "biography", "history book", "poetry collection",
              "travel guide"],
    "Clothing": ["jacket", "pair of shoes", "sweater", "dress", "pair of jeans", "raincoat"],
}
_OPINIONS = {
    "positive": ["is excellent", "works perfectly", "is great value", "exceeded my expectations",
                 "is wonderful", "is absolutely fantastic", "made me very happy",
                 "is really well made"],
    "negative": ["is terrible", "broke after a week", "is a waste of money",
                 "was very disappointing", "is awful", "stopped working quickly",
                 "made me angry", "is poorly made"],
    "neutral": ["is okay", "is average", "does the job", "is fine for the price",
                "is neither good nor bad", "is acceptable", "is just ordinary",
                "is about what I expected"],
}
_OPENERS = ["This", "The", "My new", "Our", "The cheap", "Honestly, this"]
_ENDINGS = ["", " overall", " so far", " in my opinion", " to be honest",
            " if you ask me"]
_ALL_PRODUCTS = [p for ps in _PRODUCTS.values() for p in ps]
_ALL_OPINIONS = [o for os_ in _OPINIONS.values() for o in os_]


def _combinations(slots: Sequence[Sequence[str]], count: int, rng: np.random.Generator,
                  where: str) -> list[tuple[str, ...]]:
  """`count` distinct slot combinations, a seeded permutation prefix of the product space."""
  sizes = [len(s) for s in slots]
  total = math.prod(sizes)
  if count > total:
    raise InputError(f"{where}: asked for {count} sentences but the class has only {total} "
                     "distinct ones")
  flat = rng.permutation(total)[:count]
  out = []
  for f in flat.tolist():
    combo = []
    for slot, size in zip(reversed(slots), reversed(sizes)):
      f, r = divmod(f, size)
      combo.append(slot[r])
    out.append(tuple(reversed(combo)))
  return out


def _news(label: str) -> tuple[list[list[str]], Callable[..., str]]:
  w = _NEWS[label]
  return ([w["subject"], w["event"], w["context"], _NEWS_TIME],
          lambda s, e, c, t: f"{s} {e} {c}{t}.")


def _review(products: list[str], opinions: list[str]) -> tuple[list[list[str]], Callable[..., str]]:
  return ([_OPENERS, products, opinions, _ENDINGS], lambda o, p, x, e: f"{o} {p} {x}{e}.")


# Per task: (stream name, [(sentence slots, render) per class]). Tasks with the same stream name
# and class layout produce the same sentences (syn_sentiment_flip reuses syn_sentiment's).
def _class_sources(name: str):
  if name == "syn_news":
    return "news", [_news(label) for label in _NEWS]
  if name in ("syn_sentiment", "syn_sentiment_flip"):
    return "sentiment", [_review(_ALL_PRODUCTS, _OPINIONS[s]) for s in ("positive", "negative")]
  if name == "syn_product":
    return "product", [_review(ps, _ALL_OPINIONS) for ps in _PRODUCTS.values()]
  if name == "syn_rating":
    return "rating", [_review(_ALL_PRODUCTS, _OPINIONS[s])
                      for s in ("negative", "neutral", "positive")]
  raise ValueError(f"{name!r} is not a synthetic task; synthetic tasks: "
                   f"{', '.join(t.name for t in tasks_lib.SYNTHETIC_TASKS)}")


def class_sentences(name: str, class_index: int, count: int, suite_seed: int = 0) -> list[str]:
  """The first `count` sentences of one class of one task (test rows come first)."""
  stream, sources = _class_sources(name)
  slots, render = sources[class_index]
  rng = np.random.default_rng([suite_seed, zlib.crc32(stream.encode()), class_index])
  return [render(*c) for c in _combinations(slots, count, rng, f"{name} class {class_index}")]


def load(task: str | tasks_lib.Task, split: str, *, train_per_class: int = TRAIN_PER_CLASS,
         test_per_class: int = TEST_PER_CLASS, per_class: int | None = None,
         max_examples: int | None = None, seed: int = 0, suite_seed: int = 0) -> list[Example]:
  """One split of one synthetic task.

  Args:
    task: a synthetic task name or `Task`.
    split: "train" or "test".
    train_per_class: training sentences per class.
    test_per_class: test sentences per class (the test set depends only on this and
      `suite_seed`, not on the training size).
    per_class: overrides the split's per-class size (None/0: the split's default).
    max_examples: subsample to at most this many, seeded by `seed` (None/0: all).
    seed: the subsampling seed.
    suite_seed: the seed of the sentences themselves (0: the suite everyone shares).

  Returns:
    Examples grouped by class, classes in label order.
  """
  task = tasks_lib.get_task(task)
  if not task.synthetic:
    raise ValueError(f"task {task.name!r} is not part of the synthetic suite")
  if split not in ("train", "test"):
    raise ValueError(f"unknown split {split!r}; valid splits: train, test")
  n_test = test_per_class
  n = per_class if per_class else (train_per_class if split == "train" else test_per_class)
  if split == "test" and per_class:
    n_test = per_class
  examples = []
  for c in range(task.num_labels):
    if split == "test":
      sentences = class_sentences(task.name, c, n_test, suite_seed)
    else:
      sentences = class_sentences(task.name, c, n_test + n, suite_seed)[n_test:]
    # The conflicting task: same sentences, opposite label.
    label_index = task.num_labels - 1 - c if task.name == "syn_sentiment_flip" else c
    examples.extend(make_example(task, s, label_index) for s in sentences)
  return sample_examples(examples, max_examples=max_examples, seed=seed)
