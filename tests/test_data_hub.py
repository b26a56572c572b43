"""The Hugging Face and TFDS sources, on local fixtures (no network).

HF: `datasets.load_dataset` is monkeypatched to return in-memory `datasets.Dataset`s.
TFDS: `tfds.testing.mock_data` generates random rows from each builder's real feature spec.
"""

import collections

import datasets
import pytest

from lbcl_jax import tasks
from lbcl_jax.data import DataError
from lbcl_jax.data import hf_hub
from lbcl_jax.data import load_split


def _agnews_like(n_per_class=(30, 25, 40, 12), class_names=("World", "Sports", "Business",
                                                              "Sci/Tech")):
  labels = [c for c, n in enumerate(n_per_class) for _ in range(n)]
  ds = datasets.Dataset.from_dict({
      "label": labels,
      "text": [f"headline {i} of class {c}" for i, c in enumerate(labels)]})
  return ds.cast_column("label", datasets.ClassLabel(names=list(class_names)))


@pytest.fixture
def fake_hub(monkeypatch):
  """Serves fixtures by (path, config, split); records the calls."""
  tables, calls = {}, []

  def load_dataset(path, name=None, split=None, **kwargs):
    calls.append((path, name, split))
    try:
      return tables[(path, name, split)]
    except KeyError:
      raise FileNotFoundError(f"no fixture for {(path, name, split)}") from None

  monkeypatch.setattr(datasets, "load_dataset", load_dataset)
  return tables, calls


def test_per_class_sampling_counts_determinism_and_seeds(fake_hub):
  tables, calls = fake_hub
  tables[("ag_news", None, "train")] = _agnews_like()
  a = load_split("agnews", "train", "hf", train_per_class=10, seed=0)
  assert calls[-1] == ("ag_news", None, "train")
  counts = collections.Counter(e.label for e in a)
  assert counts == {"World": 10, "Sports": 10, "Business": 10, "Science or Technology": 10}
  assert all(tasks.get_task("agnews").labels[e.label_index] == e.label for e in a)
  assert a == load_split("agnews", "train", "hf", train_per_class=10, seed=0)
  b = load_split("agnews", "train", "hf", train_per_class=10, seed=1)
  assert {e.sentence for e in a} != {e.sentence for e in b}
  # A class smaller than the cap keeps all its rows; HF ag_news has one text column.
  c = load_split("agnews", "train", "hf", train_per_class=20, seed=0)
  assert collections.Counter(e.label for e in c)["Science or Technology"] == 12
  assert c[0].sentence.startswith("Text: headline ") and c[0].sentence.endswith("\n")
  # 0 = everything.
  assert len(load_split("agnews", "train", "hf", train_per_class=0)) == 107


def test_test_split_protocol(fake_hub):
  tables, _ = fake_hub
  tables[("ag_news", None, "test")] = _agnews_like()
  # The default test size (7,600) exceeds the fixture: the whole split.
  assert len(load_split("agnews", "test", "hf")) == 107
  small = load_split("agnews", "test", "hf", test_size=20, seed=5)
  assert len(small) == 20
  assert small == load_split("agnews", "test", "hf", test_size=20, seed=5)
  per_class = load_split("agnews", "test", "hf", test_per_class=5)
  assert collections.Counter(e.label_index for e in per_class) == {0: 5, 1: 5, 2: 5, 3: 5}
  assert len(load_split("agnews", "test", "hf", max_examples=7)) == 7


def test_glue_label_mapping_and_formats(fake_hub):
  tables, _ = fake_hub
  mnli = datasets.Dataset.from_dict({"premise": ["p0", "p1", "p2"],
                                     "hypothesis": ["h0", "h1", "h2"],
                                     "label": [0, 1, 2], "idx": [0, 1, 2]})
  tables[("glue", "mnli", "validation_matched")] = mnli.cast_column(
      "label", datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]))
  got = load_split("mnli", "test", "hf")
  assert [(e.sentence, e.label) for e in got] == [
      ("sentence 1: p0\nsentence 2: h0", "entailment"),
      ("sentence 1: p1\nsentence 2: h1", "neutral"),
      ("sentence 1: p2\nsentence 2: h2", "contradiction")]
  assert [e.label_index for e in got] == [1, 0, 2]  # O-LoRA's order: neutral, entailment, ...

  tables[("super_glue", "copa", "validation")] = datasets.Dataset.from_dict({
      "premise": ["The man turned on the faucet."], "choice1": ["The toilet filled with water."],
      "choice2": ["Water flowed from the spout."], "question": ["effect"], "label": [1]})
  (copa,) = load_split("copa", "test", "hf")
  assert copa.sentence == ('Which sentence is the effect of "The man turned on the faucet."? '
                           "Choose one between A and B.\nA: The toilet filled with water.\n"
                           "B: Water flowed from the spout.")
  assert copa.label == "B"

  tables[("super_glue", "wic", "validation")] = datasets.Dataset.from_dict({
      "word": ["class"], "sentence1": ["An emerging professional class."],
      "sentence2": ["Showed real class."], "label": [0]})
  (wic,) = load_split("wic", "test", "hf")
  assert (wic.sentence, wic.label) == (
      "word: class\nAn emerging professional class.\nShowed real class.", "False")

  tables[("glue", "qqp", "validation")] = datasets.Dataset.from_dict({
      "question1": ["How?"], "question2": ["Why?"], "label": [1]})
  (qqp,) = load_split("qqp", "test", "hf")
  assert (qqp.sentence, qqp.label) == ("first sentence: How?\nsecond sentence: Why?", "True")

  tables[("super_glue", "multirc", "validation")] = datasets.Dataset.from_dict({
      "paragraph": ["P."], "question": ["Q?"], "answer": ["A"], "label": [0]})
  (multirc,) = load_split("multirc", "test", "hf")
  assert multirc.sentence == "paragraph: P.\nquestion: Q?\ncandidate answer: A"

  tables[("super_glue", "boolq", "validation")] = datasets.Dataset.from_dict({
      "question": ["is it"], "passage": ["T -- text"], "label": [1]})
  (boolq,) = load_split("boolqa", "test", "hf")
  assert (boolq.sentence, boolq.label) == ("question: is it\npassage: T -- text", "True")

  tables[("glue", "sst2", "train")] = datasets.Dataset.from_dict({
      "sentence": ["a dull film . ", "a fine film . "], "label": [0, 1]})
  assert [(e.sentence, e.label) for e in load_split("sst-2", "train", "hf")] == [
      ("Text: a dull film . ", "Bad"), ("Text: a fine film . ", "Good")]


def test_multi_field_text_formats(fake_hub):
  tables, _ = fake_hub
  tables[("yahoo_answers_topics", None, "train")] = datasets.Dataset.from_dict({
      "topic": [3, 5], "question_title": ["Help?", "Who won?"],
      "question_content": ["Need homework help.", ""], "best_answer": ["Read.", "Them."]})
  yahoo = load_split("yahoo", "train", "hf")
  assert [e.sentence for e in yahoo] == [
      "Title: Help?\nQuestion: Need homework help.\nAnswer: Read.\n",
      "Question: Who won?\nAnswer: Them.\n"]
  assert [e.label for e in yahoo] == ["Education & Reference", "Sports"]
  tables[("dbpedia_14", None, "train")] = datasets.Dataset.from_dict({
      "label": [13], "title": ["Moby"], "content": [" A novel."]})
  (db,) = load_split("dbpedia", "train", "hf")
  assert (db.sentence, db.label) == ("Title: Moby\nText:  A novel.\n", "Written Work")
  tables[("amazon_reviews_multi", "en", "train")] = datasets.Dataset.from_dict({
      "stars": [1, 5], "review_title": ["Broke", "Love it"], "review_body": ["Bad.", "Good."]})
  amazon = load_split("amazon", "train", "hf")
  assert [(e.sentence, e.label) for e in amazon] == [
      ("Title: Broke\nText: Bad.\n", "very negative"), ("Title: Love it\nText: Good.\n",
                                                        "very positive")]


def test_bad_hub_data(fake_hub):
  tables, _ = fake_hub
  # GLUE's hidden test labels are -1: never silently dropped.
  tables[("glue", "sst2", "validation")] = datasets.Dataset.from_dict({
      "sentence": ["a", "b"], "label": [1, -1]})
  with pytest.raises(DataError, match=r"glue/sst2\[validation\]: row 1: label -1 is not one of"):
    load_split("sst-2", "test", "hf")
  # A copy with the classes reordered would mislabel every row.
  tables[("ag_news", None, "train")] = _agnews_like(
      class_names=("Sports", "World", "Business", "Sci/Tech"))
  with pytest.raises(DataError, match="in another order"):
    load_split("agnews", "train", "hf")
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    load_split("agnews", "dev", "hf")
  with pytest.raises(ValueError, match="no Hugging Face source for task 'syn_news'"):
    load_split("syn_news", "train", "hf")


def test_hub_overrides(fake_hub):
  tables, calls = fake_hub
  tables[("me/ag_news_copy", None, "train")] = _agnews_like()
  examples = hf_hub.load("agnews", "train", hub_id="me/ag_news_copy", train_per_class=3)
  assert calls[-1] == ("me/ag_news_copy", None, "train") and len(examples) == 12
  seen = []
  examples = hf_hub.load("agnews", "train", train_per_class=2,
                         load_fn=lambda p, n, split: seen.append(p) or _agnews_like())
  assert seen == ["ag_news"] and len(examples) == 8


# --------------------------------------------------------------------------------------------
# TFDS, with mocked builders.


@pytest.fixture(scope="module")
def tfds():
  return pytest.importorskip(
      "tensorflow_datasets",
      reason="tensorflow_datasets is not installed (pip install 'lbcl_jax[tfds]')")


def _tfds_all(tfds, name, split, **kw):
  with tfds.testing.mock_data(num_examples=80):
    return load_split(name, split, "tfds", train_per_class=0, test_size=None, **kw)


def test_tfds_per_class_sampling(tfds):
  everything = _tfds_all(tfds, "agnews", "train")
  assert len(everything) == 80
  available = collections.Counter(e.label for e in everything)
  with tfds.testing.mock_data(num_examples=80):
    a = load_split("agnews", "train", "tfds", train_per_class=6, seed=0)
    again = load_split("agnews", "train", "tfds", train_per_class=6, seed=0)
    b = load_split("agnews", "train", "tfds", train_per_class=6, seed=1)
  assert collections.Counter(e.label for e in a) == {k: min(6, n) for k, n in available.items()}
  assert a == again
  assert [e.sentence for e in a] != [e.sentence for e in b]
  # ag_news_subset keeps title and description apart: O-LoRA's exact format.
  assert all(e.sentence.startswith("Title: ") and "\nText: " in e.sentence for e in a)
  assert set(e.sentence for e in a) <= set(e.sentence for e in everything)


def test_tfds_formats_and_splits(tfds):
  mnli = _tfds_all(tfds, "mnli", "test")
  assert mnli and all(e.sentence.startswith("sentence 1: ") for e in mnli)
  assert {e.label for e in mnli} <= set(tasks.get_task("mnli").labels)
  copa = _tfds_all(tfds, "copa", "train")
  assert all(e.sentence.startswith("Which sentence is the ") and e.label in ("A", "B")
             for e in copa)
  multirc = _tfds_all(tfds, "multirc", "test")
  assert all("\ncandidate answer: " in e.sentence for e in multirc)
  with tfds.testing.mock_data(num_examples=40):
    sampled = load_split("sst-2", "test", "tfds", test_size=10, seed=2)
  assert len(sampled) == 10 and all(e.sentence.startswith("Text: ") for e in sampled)


def test_tfds_uncovered_tasks(tfds):
  for name in ("amazon", "yelp", "dbpedia", "yahoo"):
    with pytest.raises(ValueError, match=rf"no TFDS builder for task '{name}'"):
      load_split(name, "train", "tfds")
